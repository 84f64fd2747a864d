"""The frozen models: loading Stable Diffusion's parts and the LLM teacher, and the three feature functions.

Loading goes through the real `from_pretrained` paths, so a diffusers SD folder, a hub id, or the tiny test models
all take the same road. The three `encode_*` functions are shared by stage one (extract) and stage two's
`--online` mode, so cached and online features are computed by the same code.

All three run under `torch.no_grad()` (not `inference_mode`, whose tensors could not enter the adapter's autograd
graph in `--online` training) and return float32 tensors on the model's device; callers move them to the CPU.

Which LLM tensor is "layer i" (DESIGN.md section 2): the raw output of decoder layer i, before the model's final
norm, read with a forward hook on the layer module. `output_hidden_states` would give the same tensor for every
layer but the last, whose entry has the final norm applied; the hook avoids that trap. LLM_LAYER_SOURCE records
this in the store's manifest.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# LLM_ALIASES: alias -> (public hub id, hidden size). The hidden size lets a user check an LLM feature file before
# loading. It, Pooling and the dtype names are in sur_cache.choices, which the command line reads without torch.
from sur_cache.choices import DTYPE_NAMES, LLM_ALIASES, Pooling  # noqa: F401 - defined there, owned here

# What `--sd` and `--llm` may name, for the errors of a source that cannot be loaded.
SD_SOURCE = "a diffusers Stable Diffusion folder or hub id"
LLM_SOURCE = f"a hub id, a local model folder, or one of the aliases {', '.join(LLM_ALIASES)}"

LLM_LAYER_SOURCE = "raw output of decoder layer `llm_layer` (forward hook on the layer module, before the final norm)"
DEFAULT_VAE_SCALING_FACTOR = 0.18215  # AutoencoderKL's default when a vae/config.json does not name one


@dataclass
class ClipFeatures:
    """`embeddings` [B, 77, d] float32 (`last_hidden_state`); `truncated` [B] bool: the prompt did not fit."""

    embeddings: torch.Tensor
    truncated: torch.Tensor


@dataclass
class LatentDistribution:
    """The VAE encoder's diagonal Gaussian: `mean`, `logvar` [B, c, h, w] float32 (unscaled latents)."""

    mean: torch.Tensor
    logvar: torch.Tensor


@dataclass
class LLMFeatures:
    """`pooled` [B, D] float32; with per-token states, `tokens` [B, T, D] float32 (zeros past the prompt)
    and `mask` [B, T] bool (True on real tokens), T = max_length."""

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------- loading

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # CLI name -> dtype


def resolve_llm(name: str) -> str:
    """An alias (`llama-13b`, ...) -> its hub id; a local path or any other hub id passes through unchanged."""
    alias = LLM_ALIASES.get(name.lower())
    return alias[0] if alias and not Path(name).exists() else name


def load_clip(sd: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """CLIP tokenizer and text encoder from a diffusers SD folder or hub id (subfolders tokenizer/, text_encoder/)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    with naming_the_source("--sd", sd, f"{SD_SOURCE} with tokenizer/ and text_encoder/"):
        tokenizer = CLIPTokenizer.from_pretrained(str(sd), subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(str(sd), subfolder="text_encoder", dtype=dtype)
    return tokenizer, _frozen(text_encoder.to(device))


def load_vae(sd: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The `AutoencoderKL` from a diffusers SD folder or hub id (subfolder vae/)."""
    from diffusers import AutoencoderKL

    with naming_the_source("--sd", sd, f"{SD_SOURCE} with vae/"):
        vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae", torch_dtype=dtype)
    return _frozen(vae.to(device))


def load_llm(
    name: str,
    *,
    load_in_8bit: bool = True,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """The LLM's tokenizer and base model (`AutoModel`: no LM head), so decoder LLMs and BERT-like encoders both load.

    `name` is an alias from LLM_ALIASES, a hub id, or a local folder. By default the weights are quantised to
    LLM.int8 with bitsandbytes (`BitsAndBytesConfig(load_in_8bit=True)`, works on the CPU too) with `dtype` for
    the non-quantised parts; `load_in_8bit=False` loads plain `dtype` weights. The tokenizer pads on the right
    (with the EOS token if it has no pad token); the attention mask keeps padding out of every feature.
    """
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

    path = resolve_llm(name)
    with naming_the_source("--llm", name, LLM_SOURCE):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": torch.device(device)}
    with naming_the_source("--llm", name, LLM_SOURCE):
        model = AutoModel.from_pretrained(path, **kwargs)
    if not load_in_8bit:
        model = model.to(device)
    return tokenizer, _frozen(model)


@dataclass(frozen=True)
class SDModelFacts:
    """What a Stable Diffusion model's config files say about the features it takes and gives (no weights loaded).

    The UNet and scheduler facts are None for a folder without `unet/` or `scheduler/` (extract needs neither).
    """

    clip_width: int  # text_encoder hidden_size
    tokenizer_max_length: int  # tokenizer model_max_length (77 for SD's CLIP)
    latent_channels: int  # vae latent_channels
    vae_downsampling: int  # 2 ** (number of VAE down blocks - 1): pixels per latent cell along each side
    vae_scaling_factor: float
    unet_in_channels: int | None
    unet_sample_size: int | None  # latent cells per side the UNet was trained at
    cross_attention_dim: int | None  # the text-embedding width the UNet expects
    prediction_type: str | None  # scheduler's: epsilon, v_prediction, ...


_SD_CONFIGS = {  # part -> its config file, and whether every use of an SD model needs it
    "text_encoder": ("config.json", True),
    "tokenizer": ("tokenizer_config.json", True),
    "vae": ("config.json", True),
    "unet": ("config.json", False),
    "scheduler": ("scheduler_config.json", False),
}


def sd_model_facts(sd: str) -> SDModelFacts:
    """The facts of the SD model `sd` (a diffusers folder or hub id) from its parts' config files only.

    A missing required config is an OSError naming `--sd`; used by extract (the store's shapes), train (the store
    must fit the model) and generate.
    """
    configs = {part: _sd_config(sd, part, name, required) for part, (name, required) in _SD_CONFIGS.items()}
    text, tokenizer, vae = configs["text_encoder"], configs["tokenizer"], configs["vae"]
    unet, scheduler = configs["unet"] or {}, configs["scheduler"] or {}
    if not isinstance(tokenizer.get("model_max_length"), int):
        raise OSError(f"--sd {sd}: tokenizer/tokenizer_config.json names no model_max_length (77 for SD's CLIP)")
    return SDModelFacts(
        clip_width=int(text["hidden_size"]),
        tokenizer_max_length=tokenizer["model_max_length"],
        latent_channels=int(vae["latent_channels"]),
        vae_downsampling=2 ** (len(vae["block_out_channels"]) - 1),
        vae_scaling_factor=float(vae.get("scaling_factor", DEFAULT_VAE_SCALING_FACTOR)),
        unet_in_channels=unet.get("in_channels"),
        unet_sample_size=unet.get("sample_size"),
        cross_attention_dim=unet.get("cross_attention_dim"),
        prediction_type=scheduler.get("prediction_type"),
    )


def _sd_config(sd: str, part: str, name: str, required: bool) -> dict | None:
    """`<sd>/<part>/<name>` as a dict, from a local folder or the hub (that file only); None if absent and optional."""
    import json

    local = Path(sd) / part / name
    if Path(sd).is_dir() and not local.is_file():
        if required:
            raise OSError(f"--sd {sd}: cannot load it as {SD_SOURCE}: {part}/{name} is missing")
        return None
    if not Path(sd).is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        with naming_the_source("--sd", sd, f"{SD_SOURCE} with {part}/{name}"):
            try:
                local = Path(hf_hub_download(sd, name, subfolder=part))
            except HFValidationError as error:  # neither a folder nor a valid hub id
                raise OSError(str(error)) from error
            except EntryNotFoundError:
                if required:
                    raise
                return None
    return json.loads(local.read_text())


@contextmanager
def naming_the_source(option: str, source: str, expected: str):
    """Re-raise a loading failure (missing folder or file, unknown hub id, offline) naming the option and input."""
    try:
        yield
    except OSError as error:
        raise OSError(f"{option} {source}: cannot load it as {expected}. {error}") from error


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


# ------------------------------------------------------------------------------------------------ fingerprints


def model_fingerprint(name_or_path: str, subfolder: str | None = None) -> dict:
    """What identifies the loaded weights, for the store's manifest: `{"id": ..., "revision": ...}`.

    A local folder: "sha256:<hex>" over every file under it (relative name, size and bytes, in sorted order;
    hidden files such as `.cache/` skipped), so weights, configs and tokenizer files all count. A hub id: the
    resolved commit, from the local hub cache first (what `from_pretrained` just loaded), else from the hub;
    "unresolved" when neither is reachable (offline and not cached).
    """
    folder = Path(name_or_path)
    if folder.is_dir():
        target = folder / subfolder if subfolder else folder
        return {"id": str(folder.resolve()) + (f"/{subfolder}" if subfolder else ""), "revision": _folder_hash(target)}
    repo_id = resolve_llm(name_or_path)
    model_id = repo_id + (f"/{subfolder}" if subfolder else "")
    return {"id": model_id, "revision": _hub_commit(repo_id)}


def _folder_hash(folder: Path) -> str:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; cannot fingerprint the model there")
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    for path in files:
        name = path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _hub_commit(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["config.json"])).name
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if _hub_offline():
        return "unresolved"
    try:
        from huggingface_hub import model_info

        return model_info(repo_id).sha or "unresolved"
    except Exception:  # noqa: BLE001 - network or auth failure: the manifest records that we could not tell
        return "unresolved"


def _hub_offline() -> bool:
    """huggingface_hub's own rule (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE, set to 1/on/yes/true), read now: the
    hub library reads it once at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


# ---------------------------------------------------------------------------------------------------- features


@torch.no_grad()
def encode_clip(tokenizer, text_encoder, prompts: list[str]) -> ClipFeatures:
    """CLIP `last_hidden_state` of prompts padded/truncated to `tokenizer.model_max_length` (77), as SD sees them.

    No attention mask is passed, exactly as StableDiffusionPipeline and the diffusers training scripts call the
    text encoder. `truncated` marks prompts whose tokens (with BOS/EOS) did not fit.

    The prompts are tokenized once, untruncated, and fitted here: `[BOS] + first tokens + [EOS]`, then padding,
    which is what the tokenizer's own truncation produces (tested) without paying for a second tokenization.
    """
    max_length = tokenizer.model_max_length
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    fitted = [ids[: max_length - 1] + ids[-1:] if len(ids) > max_length else ids for ids in full]
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (max_length - len(ids)) for ids in fitted])
    embeddings = text_encoder(input_ids.to(text_encoder.device)).last_hidden_state
    truncated = torch.tensor([len(ids) > max_length for ids in full], dtype=torch.bool, device=embeddings.device)
    return ClipFeatures(embeddings.float(), truncated)


@torch.no_grad()
def encode_vae(vae, pixels: torch.Tensor) -> LatentDistribution:
    """`vae.encode(pixels).latent_dist` for pixels [B, 3, H, W] in [-1, 1]; mean and log-variance in float32."""
    distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return LatentDistribution(distribution.mean.float(), distribution.logvar.float())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers, found generically (model.layers, encoder.layer, h, ...).

    It is the shortest-named `ModuleList` with `config.num_hidden_layers` entries.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count)
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the layer stack of {type(model).__name__}: expected an nn.ModuleList with "
            f"config.num_hidden_layers={count} entries"
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A possibly negative layer index -> the 0-based index it names; raises if out of range."""
    count = len(decoder_layers(model))
    if not -count <= layer < count:
        raise ValueError(
            f"--llm-layer {layer} is out of range: {type(model).__name__} has {count} layers (0..{count - 1})"
        )
    return layer % count


class _LayerReached(Exception):
    """Raised by the hook to stop the forward once the wanted layer has run (later layers are not needed)."""


@torch.no_grad()
def encode_llm(
    tokenizer,
    model,
    prompts: list[str],
    *,
    layer: int = -1,
    pooling: Pooling = "mean",
    per_token: bool = False,
    max_length: int = 77,
) -> LLMFeatures:
    """Layer `layer`'s raw hidden states of the prompts, pooled over real tokens (`mean`) or the last real token.

    Prompts are truncated to `max_length` tokens and each batch is right-padded only to its longest prompt;
    the attention mask keeps padding out, so a prompt's feature does not depend on its batch-mates (up to
    floating-point noise). With `per_token`, the states are also returned padded with zeros to `max_length`.
    """
    if pooling not in ("mean", "last"):
        raise ValueError(f"--llm-pooling must be 'mean' or 'last', found {pooling!r}")
    index = resolve_layer(model, layer)
    batch = tokenizer(
        prompts, padding="longest", padding_side="right", truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch = {key: value.to(model.device) for key, value in batch.items()}
    states = _layer_output(model, decoder_layers(model)[index], batch).float()
    mask = batch["attention_mask"].bool()
    weights = mask.unsqueeze(-1).float()
    if pooling == "mean":
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    else:
        last = mask.long().sum(1).clamp_min(1) - 1
        pooled = states[torch.arange(states.shape[0], device=states.device), last]
    if not per_token:
        return LLMFeatures(pooled)
    tokens = states.new_zeros(states.shape[0], max_length, states.shape[-1])
    tokens[:, : states.shape[1]] = states * weights
    token_mask = mask.new_zeros(mask.shape[0], max_length)
    token_mask[:, : mask.shape[1]] = mask
    return LLMFeatures(pooled, tokens, token_mask)


def _layer_output(model: nn.Module, layer_module: nn.Module, batch: dict) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _LayerReached

    handle = layer_module.register_forward_hook(hook)
    try:
        model(**_forward_inputs(model, batch))
    except _LayerReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward of {type(model).__name__} never ran the selected layer")
    return captured[0]


def _forward_inputs(model: nn.Module, batch: dict) -> dict:
    """The tokenizer outputs the model's forward declares (a Llama has no token_type_ids), and no KV cache."""
    accepted = inspect.signature(model.forward).parameters
    inputs = {name: value for name, value in batch.items() if name in accepted}
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs
