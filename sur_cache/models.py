"""The frozen models: loading Stable Diffusion's parts and the LLM teacher, and the three feature functions.

Loading goes through the real `from_pretrained` paths, so a diffusers SD folder, a hub id, or the tiny test models
all take the same road. The three `encode_*` functions are shared by stage one (extract) and stage two's
`--online` mode, so cached and online features are computed by the same code.

All three run under `torch.no_grad()` (not `inference_mode`, whose tensors could not enter the adapter's autograd
graph in `--online` training) and return float32 tensors on the model's device; callers move them to the CPU.

Which LLM tensor is "layer i" (DESIGN.md section 2): the raw output of decoder layer i, before the model's final
norm, read with a forward hook on the layer module. `output_hidden_states` would give the same tensor for every
layer but the last, whose entry has the final norm applied; the hook avoids that trap. LLM_LAYER_SOURCE records
this in the store's manifest. The same hook serves every decoder family (Llama 1/2/3, Mistral, Qwen 2/2.5/3,
Gemma 1/2/3: tests/test_models.py checks each): the layer stack is found by its length, and a layer's output
is taken whether the family's layer returns a tensor (transformers 5) or a tuple whose first entry is the states.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# LLM_ALIASES: alias -> (public hub id, hidden size). The hidden size lets a user check an LLM feature file before
# loading. It, Pooling, the SD families' default resolution and the dtype names are in sur_cache.choices, which the
# command line reads without torch.
from sur_cache.choices import DEFAULT_RESOLUTION, DTYPE_NAMES, LLM_ALIASES, Pooling, SDKind  # noqa: F401 - owned here

# What `--sd` and `--llm` may name, for the errors of a source that cannot be loaded.
SD_SOURCE = "a diffusers Stable Diffusion (1.x/2.x or XL) folder or hub id"
LLM_SOURCE = f"a hub id, a local model folder, or one of the aliases {', '.join(LLM_ALIASES)}"

LLM_LAYER_SOURCE = "raw output of decoder layer `llm_layer` (forward hook on the layer module, before the final norm)"
LLM_LAYERS_SOURCE = (
    "raw output of each decoder layer in `llm_layers` (forward hooks on the layer modules, before the final norm)"
)
DEFAULT_VAE_SCALING_FACTOR = 0.18215  # AutoencoderKL's default when a vae/config.json does not name one

# The SD model families, by the pipeline class their model_index.json names (never by a flag the user could get wrong)
SD_KINDS: dict[str, SDKind] = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


@dataclass
class ClipFeatures:
    """`embeddings` [B, 77, d] float32 (`last_hidden_state`); `truncated` [B] bool: the prompt did not fit.

    For SDXL, `embeddings` are both encoders' penultimate hidden states concatenated ([B, 77, d1 + d2]) and `pooled`
    [B, p] is the second encoder's projected `text_embeds`, as `StableDiffusionXLPipeline.encode_prompt` builds them.
    """

    embeddings: torch.Tensor
    truncated: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class TextEncoders:
    """A model's tokenizers and frozen text encoders: one pair for SD 1.x/2.x, two for SDXL."""

    kind: SDKind
    tokenizers: tuple
    encoders: tuple


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


def load_text_encoders(
    sd: str, kind: SDKind, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TextEncoders:
    """The text side of an SD model of family `kind`: SDXL adds tokenizer_2/ and text_encoder_2/ (with projection)."""
    if kind == "sd":
        tokenizer, text_encoder = load_clip(sd, device=device, dtype=dtype)
        return TextEncoders(kind, (tokenizer,), (text_encoder,))
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with naming_the_source("--sd", sd, f"{SD_SOURCE} with tokenizer(_2)/ and text_encoder(_2)/"):
        tokenizers = tuple(CLIPTokenizer.from_pretrained(str(sd), subfolder=s) for s in ("tokenizer", "tokenizer_2"))
        first = CLIPTextModel.from_pretrained(str(sd), subfolder="text_encoder", dtype=dtype)
        second = CLIPTextModelWithProjection.from_pretrained(str(sd), subfolder="text_encoder_2", dtype=dtype)
    return TextEncoders(kind, tokenizers, (_frozen(first.to(device)), _frozen(second.to(device))))


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

    Any `AutoModelForCausalLM` checkpoint (Llama, Mistral, Qwen, Gemma, ...) loads this way as its base model; the
    LM head, which no feature uses, is left on disk. `name` is an alias from LLM_ALIASES, a hub id, or a local
    folder. By default the weights are quantised to LLM.int8 with bitsandbytes (`BitsAndBytesConfig(load_in_8bit=
    True)`, works on the CPU too) with `dtype` for the non-quantised parts; `load_in_8bit=False` loads plain
    `dtype` weights. The tokenizer pads on the right (with the EOS token if it has no pad token); the attention mask
    keeps padding out of every feature.
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

    The UNet and scheduler facts are None for a folder without `unet/` or `scheduler/` (extract needs neither);
    the SDXL-only facts are None for SD 1.x/2.x.
    """

    kind: SDKind  # from model_index.json's pipeline class (SD_KINDS)
    clip_width: int  # the text embedding's width: text_encoder hidden_size (SDXL: + text_encoder_2's)
    tokenizer_max_length: int  # tokenizer model_max_length (77 for SD's CLIP)
    latent_channels: int  # vae latent_channels
    vae_downsampling: int  # 2 ** (number of VAE down blocks - 1): pixels per latent cell along each side
    vae_scaling_factor: float
    unet_in_channels: int | None
    unet_sample_size: int | None  # latent cells per side the UNet was trained at
    cross_attention_dim: int | None  # the text-embedding width the UNet expects
    prediction_type: str | None  # scheduler's: epsilon, v_prediction, ...
    default_resolution: int  # DEFAULT_RESOLUTION of the kind
    vae_force_upcast: bool  # vae config force_upcast (AutoencoderKL's default True): SDXL runs such a VAE in fp32
    pooled_width: int | None = None  # SDXL: text_encoder_2 projection_dim (the pooled `text_embeds`)
    addition_time_embed_dim: int | None = None  # SDXL UNet: width of each of the six time ids' embeddings
    projection_input_dim: int | None = None  # SDXL UNet projection_class_embeddings_input_dim: 6 x above + pooled

    @property
    def time_ids_fit(self) -> bool:
        """The SDXL UNet's added embedding takes six time ids and the pooled text embedding."""
        return self.projection_input_dim == 6 * (self.addition_time_embed_dim or 0) + (self.pooled_width or 0)


_SD_CONFIGS = {  # part -> its config file, and whether every use of an SD model needs it
    "text_encoder": ("config.json", True),
    "tokenizer": ("tokenizer_config.json", True),
    "vae": ("config.json", True),
    "unet": ("config.json", False),
    "scheduler": ("scheduler_config.json", False),
}
_SDXL_CONFIGS = {"text_encoder_2": ("config.json", True), "tokenizer_2": ("tokenizer_config.json", True)}


def sd_model_facts(sd: str) -> SDModelFacts:
    """The facts of the SD model `sd` (a diffusers folder or hub id) from its parts' config files only.

    A missing required config is an OSError naming `--sd`; used by extract (the store's shapes), train (the store
    must fit the model) and generate.
    """
    kind = sd_kind(sd)
    parts = dict(_SD_CONFIGS, **(_SDXL_CONFIGS if kind == "sdxl" else {}))
    configs = {part: _sd_config(sd, part, name, required) for part, (name, required) in parts.items()}
    text, tokenizer, vae = configs["text_encoder"], configs["tokenizer"], configs["vae"]
    unet, scheduler = configs["unet"] or {}, configs["scheduler"] or {}
    if not isinstance(tokenizer.get("model_max_length"), int):
        raise OSError(f"--sd {sd}: tokenizer/tokenizer_config.json names no model_max_length (77 for SD's CLIP)")
    second = configs.get("text_encoder_2") or {}
    return SDModelFacts(
        kind=kind,
        clip_width=int(text["hidden_size"]) + int(second.get("hidden_size", 0)),
        tokenizer_max_length=tokenizer["model_max_length"],
        latent_channels=int(vae["latent_channels"]),
        vae_downsampling=2 ** (len(vae["block_out_channels"]) - 1),
        vae_scaling_factor=float(vae.get("scaling_factor", DEFAULT_VAE_SCALING_FACTOR)),
        unet_in_channels=unet.get("in_channels"),
        unet_sample_size=unet.get("sample_size"),
        cross_attention_dim=unet.get("cross_attention_dim"),
        prediction_type=scheduler.get("prediction_type"),
        default_resolution=DEFAULT_RESOLUTION[kind],
        vae_force_upcast=bool(vae.get("force_upcast", True)),
        pooled_width=second.get("projection_dim"),
        addition_time_embed_dim=unet.get("addition_time_embed_dim") if kind == "sdxl" else None,
        projection_input_dim=unet.get("projection_class_embeddings_input_dim") if kind == "sdxl" else None,
    )


def sd_kind(sd: str) -> SDKind:
    """The family of the SD model `sd`, from its model_index.json's `_class_name` (SD_KINDS).

    A folder without model_index.json (assembled by hand from parts) is SD 1.x/2.x unless it has a text_encoder_2/.
    """
    index = _sd_config(sd, "", "model_index.json", required=False)
    if index is None:
        return "sdxl" if (Path(sd) / "text_encoder_2").is_dir() else "sd"
    name = index.get("_class_name")
    if name not in SD_KINDS:
        raise ValueError(
            f"--sd {sd}: model_index.json names the pipeline {name!r}; sur-cache supports {', '.join(SD_KINDS)}"
        )
    return SD_KINDS[name]


def _sd_config(sd: str, part: str, name: str, required: bool) -> dict | None:
    """`<sd>/<part>/<name>` as a dict, from a local folder or the hub (that file only); None if absent and optional."""
    import json

    local = Path(sd) / part / name
    where = f"{part}/{name}" if part else name
    if Path(sd).is_dir() and not local.is_file():
        if required:
            raise OSError(f"--sd {sd}: cannot load it as {SD_SOURCE}: {where} is missing")
        return None
    if not Path(sd).is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        with naming_the_source("--sd", sd, f"{SD_SOURCE} with {where}"):
            try:
                local = Path(hf_hub_download(sd, name, subfolder=part or None))
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
    input_ids, truncated = _fitted_ids(tokenizer, prompts)
    embeddings = text_encoder(input_ids.to(text_encoder.device)).last_hidden_state
    return ClipFeatures(embeddings.float(), truncated.to(embeddings.device))


@torch.no_grad()
def encode_prompts(text: TextEncoders, prompts: list[str]) -> ClipFeatures:
    """The text embeddings the model's UNet takes: `encode_clip` for SD 1.x/2.x, `encode_clip_sdxl` for SDXL."""
    if text.kind == "sd":
        return encode_clip(text.tokenizers[0], text.encoders[0], prompts)
    return encode_clip_sdxl(text.tokenizers, text.encoders, prompts)


@torch.no_grad()
def encode_clip_sdxl(tokenizers, text_encoders, prompts: list[str]) -> ClipFeatures:
    """SDXL's prompt embedding, as `StableDiffusionXLPipeline.encode_prompt` computes it (clip_skip None, tested):
    each encoder's penultimate hidden state (`hidden_states[-2]`), concatenated, and the second encoder's
    projected `text_embeds` as the pooled embedding. Truncation as in `encode_clip`; `truncated` if either fit cut."""
    states, truncated, pooled = [], [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        input_ids, cut = _fitted_ids(tokenizer, prompts)
        output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        truncated.append(cut)
        pooled = output[0] if output[0].ndim == 2 else pooled  # text_embeds of the encoder with projection
    embeddings = torch.cat(states, dim=-1)
    flags = torch.stack(truncated).any(0).to(embeddings.device)
    return ClipFeatures(embeddings.float(), flags, pooled.float())


def _fitted_ids(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[BOS] + first tokens + [EOS]` then padding to `model_max_length` (the tokenizer's own truncation, tested),
    from one untruncated tokenization; and whether each prompt was cut."""
    max_length = tokenizer.model_max_length
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    fitted = [ids[: max_length - 1] + ids[-1:] if len(ids) > max_length else ids for ids in full]
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (max_length - len(ids)) for ids in fitted])
    return input_ids, torch.tensor([len(ids) > max_length for ids in full], dtype=torch.bool)


@torch.no_grad()
def encode_vae(vae, pixels: torch.Tensor) -> LatentDistribution:
    """`vae.encode(pixels).latent_dist` for pixels [B, 3, H, W] in [-1, 1]; mean and log-variance in float32."""
    distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return LatentDistribution(distribution.mean.float(), distribution.logvar.float())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers, found generically (model.layers, encoder.layer, h, ...).

    It is the shortest-named `ModuleList` with `num_hidden_layers` entries of the model's text config (the config
    itself for a text-only model; a multimodal one's `text_config`).
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
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
    layer: int | Sequence[int] = -1,
    pooling: Pooling = "mean",
    per_token: bool = False,
    max_length: int = 77,
    chat_template: bool = False,
) -> LLMFeatures:
    """Layer `layer`'s raw hidden states of the prompts, pooled over real tokens (`mean`) or the last real token.

    `layer` may be a sequence of layers: one forward reads them all and `pooled` is [B, len(layer), D], in the
    order given (per-token states are one layer's only). Prompts are encoded as the tokenizer encodes them (with
    the BOS token of a family that prepends one: Llama, Mistral, Gemma), or, with `chat_template`, as a user message
    through the tokenizer's chat template (which then writes every special token). They are truncated to
    `max_length` tokens and each batch is right-padded only to its longest prompt; the attention mask keeps
    padding out, so a prompt's feature does not depend on its batch-mates (up to floating-point noise). With
    `per_token`, the states are also returned padded with zeros to `max_length`.
    """
    if pooling not in ("mean", "last"):
        raise ValueError(f"--llm-pooling must be 'mean' or 'last', found {pooling!r}")
    layered = not isinstance(layer, int)
    if layered and per_token:
        raise ValueError("--llm-per-token stores one layer's states per token: pass a single --llm-layer with it")
    stack = decoder_layers(model)
    modules = [stack[resolve_layer(model, index)] for index in (layer if layered else [layer])]
    batch = _tokenize(tokenizer, prompts, max_length, chat_template)
    batch = {key: value.to(model.device) for key, value in batch.items()}
    outputs = [states.float() for states in _layer_outputs(model, modules, batch)]
    mask = batch["attention_mask"].bool()
    pooled = [_pool(states, mask, pooling) for states in outputs]
    if layered:
        return LLMFeatures(torch.stack(pooled, 1))
    if not per_token:
        return LLMFeatures(pooled[0])
    states = outputs[0]
    tokens = states.new_zeros(states.shape[0], max_length, states.shape[-1])
    tokens[:, : states.shape[1]] = states * mask.unsqueeze(-1).float()
    token_mask = mask.new_zeros(mask.shape[0], max_length)
    token_mask[:, : mask.shape[1]] = mask
    return LLMFeatures(pooled[0], tokens, token_mask)


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user message through the tokenizer's chat template, without a generation prompt."""
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"--llm-chat-template: the tokenizer {tokenizer.name_or_path} has no chat template; drop the flag to "
            "encode the prompts raw, or pass an instruct model's folder or hub id"
        )
    message = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=False)


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _tokenize(tokenizer, prompts: list[str], max_length: int, chat_template: bool) -> dict:
    texts = [chat_prompt(tokenizer, prompt) for prompt in prompts] if chat_template else prompts
    return tokenizer(
        texts,
        padding="longest",
        padding_side="right",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        add_special_tokens=not chat_template,  # a chat template writes the BOS itself where the family has one
    )


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, T, D] states -> [B, D]: the mean over the real tokens, or the last real token (right padding)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).float()
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    last = mask.long().sum(1).clamp_min(1) - 1
    return states[torch.arange(states.shape[0], device=states.device), last]


def _layer_outputs(model: nn.Module, modules: list[nn.Module], batch: dict) -> list[torch.Tensor]:
    """The outputs of `modules` (layers of `model`) in one forward, stopped once the last of them has run."""
    captured: dict[int, torch.Tensor] = {}
    distinct = {id(module): module for module in modules}

    def hook(module, _inputs, output):
        captured[id(module)] = output[0] if isinstance(output, tuple) else output
        if len(captured) == len(distinct):
            raise _LayerReached

    handles = [module.register_forward_hook(hook) for module in distinct.values()]
    try:
        model(**_forward_inputs(model, batch))
    except _LayerReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) < len(distinct):
        raise RuntimeError(f"the forward of {type(model).__name__} never ran a selected layer")
    return [captured[id(module)] for module in modules]


def _forward_inputs(model: nn.Module, batch: dict) -> dict:
    """The tokenizer outputs the model's forward declares (a Llama has no token_type_ids), and no KV cache."""
    accepted = inspect.signature(model.forward).parameters
    inputs = {name: value for name, value in batch.items() if name in accepted}
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs
