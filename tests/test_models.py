"""Model loading and the three feature functions, on the tiny models loaded through the same paths the CLI uses."""

import json
import shutil

import pytest
import torch

from sur_cache.models import (
    LLM_ALIASES,
    LLM_LAYER_SOURCE,
    decoder_layers,
    encode_clip,
    encode_llm,
    encode_vae,
    load_clip,
    load_llm,
    load_vae,
    model_fingerprint,
    resolve_layer,
    resolve_llm,
    sd_model_facts,
)
from sur_cache.tiny_models import (
    TINY_CLIP_WIDTH,
    TINY_LLM_FAMILIES,
    TINY_LLM_LAYERS,
    TINY_LLM_WIDTH,
    TINY_RESOLUTION,
    build_llm,
)

PROMPTS = ["a red circle waits by the sea", "a cat", "portrait of a knight, highly detailed, digital painting"]


@pytest.fixture(scope="module")
def clip(tiny_models):
    return load_clip(str(tiny_models.sd))


@pytest.fixture(scope="module")
def llm_fp32(tiny_models):
    return load_llm(str(tiny_models.llm), load_in_8bit=False, dtype=torch.float32)


def _reference_states(tokenizer, model, prompts):
    batch = tokenizer(prompts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.hidden_states, batch["attention_mask"].bool()


@pytest.mark.parametrize("prompts", [PROMPTS, ["a" * 75, "a" * 76, "word " * 60, ""]], ids=["short", "long"])
def test_encode_clip_equals_the_text_encoder_called_directly(clip, prompts):
    tokenizer, text_encoder = clip
    features = encode_clip(tokenizer, text_encoder, prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = text_encoder(ids).last_hidden_state
    assert features.embeddings.shape == (len(prompts), 77, TINY_CLIP_WIDTH)
    assert features.embeddings.dtype == torch.float32
    assert torch.equal(features.embeddings, expected)


def test_encode_clip_flags_exactly_the_prompts_that_do_not_fit(clip):
    tokenizer, text_encoder = clip
    # the tiny CLIP tokenizer has one token per character: 75 characters + BOS + EOS fill the 77 slots exactly
    prompts = ["a" * 75, "a" * 76, "word " * 60, *PROMPTS]
    features = encode_clip(tokenizer, text_encoder, prompts)
    assert features.truncated.tolist() == [False, True, True, False, False, False]


def test_encode_vae_returns_the_latent_distribution(tiny_models):
    vae = load_vae(str(tiny_models.sd))
    pixels = torch.rand(2, 3, TINY_RESOLUTION, TINY_RESOLUTION) * 2 - 1
    latents = encode_vae(vae, pixels)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist
    side = TINY_RESOLUTION // 4
    assert latents.mean.shape == latents.logvar.shape == (2, 4, side, side)
    assert torch.equal(latents.mean, expected.mean) and torch.equal(latents.logvar, expected.logvar)
    assert not vae.training


def test_non_last_layer_equals_hidden_states_of_that_layer(llm_fp32):
    tokenizer, model = llm_fp32
    hidden, mask = _reference_states(tokenizer, model, PROMPTS)
    features = encode_llm(tokenizer, model, PROMPTS, layer=1, pooling="mean", per_token=True)
    states = hidden[2]  # hidden_states[0] is the embeddings, so layer i is entry i + 1
    weights = mask[..., None].float()
    assert torch.allclose(features.pooled, (states * weights).sum(1) / weights.sum(1), atol=1e-6)
    assert torch.allclose(features.tokens[:, : states.shape[1]], states * weights, atol=1e-6)


def test_last_layer_is_the_raw_output_before_the_final_norm(llm_fp32):
    tokenizer, model = llm_fp32
    hidden, mask = _reference_states(tokenizer, model, PROMPTS)
    last = encode_llm(tokenizer, model, PROMPTS, layer=-1, pooling="last", per_token=True)
    assert torch.equal(
        last.pooled, encode_llm(tokenizer, model, PROMPTS, layer=TINY_LLM_LAYERS - 1, pooling="last").pooled
    )
    length = mask.sum(1) - 1
    normed = hidden[-1][torch.arange(3), length]
    assert not torch.allclose(last.pooled, normed, atol=1e-2), "the final norm must not be applied"
    # the manual computation: the model's own final norm applied to what we stored gives hidden_states[-1]
    assert torch.allclose(model.norm(last.pooled), normed, atol=1e-5)
    assert torch.allclose(model.norm(last.tokens[:, : mask.shape[1]])[mask], hidden[-1][mask], atol=1e-5)
    assert "before the final norm" in LLM_LAYER_SOURCE


def test_last_pooling_takes_the_last_real_token(llm_fp32):
    tokenizer, model = llm_fp32
    features = encode_llm(tokenizer, model, PROMPTS, layer=0, pooling="last", per_token=True)
    lengths = features.mask.sum(1)
    assert torch.equal(features.pooled, features.tokens[torch.arange(3), lengths - 1])


def test_pooling_does_not_depend_on_batch_padding(llm_fp32):
    tokenizer, model = llm_fp32
    short, long = "a cat", "a castle on a hill, fantasy landscape, matte painting, volumetric light, by greg rutkowski"
    for pooling in ("mean", "last"):
        alone = encode_llm(tokenizer, model, [short], layer=1, pooling=pooling).pooled
        batched = encode_llm(tokenizer, model, [short, long], layer=1, pooling=pooling).pooled
        assert torch.allclose(alone[0], batched[0], atol=1e-5), pooling


def test_a_left_padding_tokenizer_gives_the_same_features(llm_fp32):
    import copy

    tokenizer, model = llm_fp32
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    for pooling in ("mean", "last"):
        expected = encode_llm(tokenizer, model, PROMPTS, layer=1, pooling=pooling, per_token=True)
        got = encode_llm(left, model, PROMPTS, layer=1, pooling=pooling, per_token=True)
        assert torch.equal(got.pooled, expected.pooled) and torch.equal(got.tokens, expected.tokens)


def test_per_token_states_are_padded_to_max_length_with_zeros(llm_fp32):
    tokenizer, model = llm_fp32
    features = encode_llm(tokenizer, model, PROMPTS, layer=1, per_token=True)
    assert features.tokens.shape == (3, 77, TINY_LLM_WIDTH) and features.mask.shape == (3, 77)
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert features.mask.sum(1).tolist() == lengths
    assert torch.equal(features.tokens[~features.mask], torch.zeros(int((~features.mask).sum()), TINY_LLM_WIDTH))
    assert encode_llm(tokenizer, model, PROMPTS, layer=1).tokens is None


def test_prompts_longer_than_max_length_are_truncated(llm_fp32):
    tokenizer, model = llm_fp32
    features = encode_llm(tokenizer, model, ["a cat " * 100], layer=0, per_token=True, max_length=77)
    assert features.mask.sum().item() == 77


def test_8bit_is_the_default_and_quantises_the_linear_layers(tiny_models, llm_fp32):
    from bitsandbytes.nn import Linear8bitLt

    tokenizer, model = load_llm(str(tiny_models.llm))
    layers = decoder_layers(model)
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear8bitLt) for m in linears)
    assert not model.training and model.dtype == torch.float16
    features = encode_llm(tokenizer, model, PROMPTS, layer=-1)
    assert features.pooled.dtype == torch.float32
    expected = encode_llm(*llm_fp32, PROMPTS, layer=-1).pooled  # the same weights, unquantised
    assert torch.nn.functional.cosine_similarity(features.pooled, expected).min() > 0.99


def test_a_bert_like_encoder_loads_and_its_last_layer_is_last_hidden_state(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "mat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=80,
    )
    BertModel(config).save_pretrained(tmp_path)
    tokenizer, model = load_llm(str(tmp_path), load_in_8bit=False, dtype=torch.float32)
    assert decoder_layers(model) is model.encoder.layer
    prompts = ["a cat on the mat", "a dog"]
    hidden, mask = _reference_states(tokenizer, model, prompts)
    features = encode_llm(tokenizer, model, prompts, layer=-1, pooling="mean")
    weights = mask[..., None].float()
    assert torch.allclose(features.pooled, (hidden[-1] * weights).sum(1) / weights.sum(1), atol=1e-6)


def test_layer_index_validation(llm_fp32):
    _, model = llm_fp32
    assert resolve_layer(model, -1) == TINY_LLM_LAYERS - 1 and resolve_layer(model, 0) == 0
    with pytest.raises(ValueError, match=r"--llm-layer 3 is out of range.*3 layers"):
        resolve_layer(model, 3)
    with pytest.raises(ValueError, match="--llm-pooling"):
        encode_llm(*llm_fp32, ["a"], layer=0, pooling="max")


def test_aliases_resolve_to_public_hub_ids():
    assert LLM_ALIASES["llama-13b"] == ("huggyllama/llama-13b", 5120)
    assert {alias: width for alias, (_, width) in LLM_ALIASES.items() if alias.startswith("llama-")} == {
        "llama-7b": 4096,
        "llama-13b": 5120,
        "llama-30b": 6656,
    }
    assert LLM_ALIASES["llama3-8b"] == ("meta-llama/Meta-Llama-3-8B", 4096)
    assert LLM_ALIASES["qwen2.5-7b"] == ("Qwen/Qwen2.5-7B", 3584)
    assert all(alias == alias.lower() for alias in LLM_ALIASES)  # resolve_llm lower-cases what the user typed
    assert resolve_llm("Qwen3-8B") == "Qwen/Qwen3-8B"
    assert resolve_llm("llama-7b") == "huggyllama/llama-7b"
    assert resolve_llm("LLaMA-30B") == "huggyllama/llama-30b"
    assert resolve_llm("meta-llama/Llama-2-13b-hf") == "meta-llama/Llama-2-13b-hf"
    assert resolve_llm("/models/my-llm") == "/models/my-llm"


def test_folder_fingerprint_tracks_file_contents(tiny_models, tmp_path):
    first = model_fingerprint(str(tiny_models.sd), "vae")
    assert first["revision"].startswith("sha256:") and first["id"].endswith("/vae")
    assert model_fingerprint(str(tiny_models.sd), "vae") == first
    copy = shutil.copytree(tiny_models.sd / "vae", tmp_path / "sd" / "vae")
    assert model_fingerprint(str(tmp_path / "sd"), "vae")["revision"] == first["revision"]
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(tmp_path / "sd"), "vae")["revision"] != first["revision"]
    assert model_fingerprint(str(tiny_models.sd))["revision"] != first["revision"]


def test_hub_fingerprint_is_the_cached_commit_or_unresolved(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_fingerprint("llama-13b") == {"id": "huggyllama/llama-13b", "revision": "unresolved"}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--huggyllama--llama-13b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert model_fingerprint("llama-13b") == {"id": "huggyllama/llama-13b", "revision": commit}


def test_hub_fingerprint_asks_the_hub_only_when_online(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    asked = []
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo: asked.append(repo) or type("I", (), {"sha": "c0"}))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for value, revision in [("1", "unresolved"), ("yes", "unresolved"), ("0", "c0"), ("off", "c0")]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert model_fingerprint("llama-7b")["revision"] == revision, value
    assert asked == ["huggyllama/llama-7b"] * 2


def test_features_can_enter_an_autograd_graph(clip):
    """`--online` training feeds these straight into the adapter: they must not be inference-mode tensors."""
    tokenizer, text_encoder = clip
    embeddings = encode_clip(tokenizer, text_encoder, PROMPTS).embeddings
    weight = torch.ones(TINY_CLIP_WIDTH, requires_grad=True)
    (embeddings * weight).sum().backward()
    assert weight.grad is not None and not embeddings.requires_grad


def test_loading_failures_name_the_option_and_the_input(tmp_path):
    with pytest.raises(OSError, match=r"--sd .*empty_sd.*tokenizer/ and text_encoder/"):
        load_clip(str(tmp_path / "empty_sd"))
    with pytest.raises(OSError, match=r"--sd .*vae/"):
        load_vae(str(tmp_path))
    with pytest.raises(OSError, match=r"--llm .*missing_llm.*aliases llama-7b"):
        load_llm(str(tmp_path / "missing_llm"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_features_stay_on_the_device_and_match_the_cpu(tiny_models, clip, llm_fp32):
    tokenizer, text_encoder = load_clip(str(tiny_models.sd), device="cuda")
    features = encode_clip(tokenizer, text_encoder, PROMPTS)
    assert features.embeddings.is_cuda and features.truncated.is_cuda
    assert torch.allclose(features.embeddings.cpu(), encode_clip(*clip, PROMPTS).embeddings, atol=1e-4)
    vae = load_vae(str(tiny_models.sd), device="cuda")
    pixels = torch.rand(2, 3, TINY_RESOLUTION, TINY_RESOLUTION) * 2 - 1
    assert torch.allclose(
        encode_vae(vae, pixels).mean.cpu(), encode_vae(load_vae(str(tiny_models.sd)), pixels).mean, atol=1e-4
    )
    llm = load_llm(str(tiny_models.llm), device="cuda")  # 8-bit on the GPU
    pooled = encode_llm(*llm, PROMPTS, layer=-1, per_token=True)
    assert pooled.pooled.is_cuda and pooled.tokens.is_cuda and pooled.mask.is_cuda
    expected = encode_llm(*llm_fp32, PROMPTS, layer=-1).pooled
    assert torch.nn.functional.cosine_similarity(pooled.pooled.cpu(), expected).min() > 0.99  # int8 vs fp32


def test_sd_model_facts_come_from_the_config_files_alone(tiny_models, tmp_path):
    facts = sd_model_facts(str(tiny_models.sd))
    assert (facts.clip_width, facts.tokenizer_max_length, facts.latent_channels) == (TINY_CLIP_WIDTH, 77, 4)
    assert facts.unet_in_channels == 4
    assert facts.cross_attention_dim == TINY_CLIP_WIDTH and facts.prediction_type == "epsilon"
    vae = json.loads((tiny_models.sd / "vae" / "config.json").read_text())
    unet = json.loads((tiny_models.sd / "unet" / "config.json").read_text())
    assert facts.vae_downsampling == 2 ** (len(vae["block_out_channels"]) - 1)
    assert facts.vae_scaling_factor == vae["scaling_factor"] and facts.unet_sample_size == unet["sample_size"]
    configs_only = tmp_path / "sd"  # no weights at all: only the config files are read
    shutil.copytree(tiny_models.sd, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert sd_model_facts(str(configs_only)) == facts
    del vae["scaling_factor"]
    (configs_only / "vae" / "config.json").write_text(json.dumps(vae))
    shutil.rmtree(configs_only / "unet")
    shutil.rmtree(configs_only / "scheduler")
    without = sd_model_facts(str(configs_only))  # extract needs neither the UNet nor the scheduler
    assert without.vae_scaling_factor == 0.18215  # AutoencoderKL's default
    assert without.unet_in_channels is None and without.prediction_type is None
    shutil.rmtree(configs_only / "vae")
    with pytest.raises(OSError, match=r"--sd .*sd: cannot load it as a diffusers Stable Diffusion .*vae/config.json"):
        sd_model_facts(str(configs_only))


def test_sd_model_facts_name_the_family_and_its_widths(tiny_models, tiny_sdxl):
    from sur_cache.tiny_models import TINY_SDXL_CLIP_WIDTHS, TINY_SDXL_POOLED_WIDTH, TINY_SDXL_TIME_EMBED_DIM

    sdxl, sd = sd_model_facts(str(tiny_sdxl)), sd_model_facts(str(tiny_models.sd))
    assert (sdxl.kind, sdxl.clip_width, sdxl.pooled_width) == (
        "sdxl",
        sum(TINY_SDXL_CLIP_WIDTHS),
        TINY_SDXL_POOLED_WIDTH,
    )
    assert sdxl.addition_time_embed_dim == TINY_SDXL_TIME_EMBED_DIM and sdxl.time_ids_fit
    assert sdxl.cross_attention_dim == sdxl.clip_width and sdxl.vae_force_upcast
    assert (sdxl.default_resolution, sd.default_resolution) == (1024, 512)
    assert (sd.kind, sd.pooled_width, sd.addition_time_embed_dim) == ("sd", None, None)


@torch.no_grad()
def test_sdxl_prompts_longer_than_77_tokens_are_cut_as_the_pipeline_cuts_them(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from sur_cache.models import encode_prompts, load_text_encoders

    prompts = ["a cat", "a very long prompt " * 8]  # one token per character: far past 77
    features = encode_prompts(load_text_encoders(str(tiny_sdxl), "sdxl"), prompts)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert features.truncated.tolist() == [False, True]
    torch.testing.assert_close(features.embeddings, embeds, rtol=0, atol=0)
    torch.testing.assert_close(features.pooled, pooled, rtol=0, atol=0)


# ---- every decoder family: the same hook, the same meaning of "layer i" -------------------------------------------


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """family -> folder of its tiny causal LM, saved with save_pretrained and loaded back by load_llm."""
    root = tmp_path_factory.mktemp("llm_families")
    for family in TINY_LLM_FAMILIES:
        build_llm(root / family, family=family)
    return {family: root / family for family in TINY_LLM_FAMILIES}


@pytest.mark.parametrize("family", list(TINY_LLM_FAMILIES))
def test_layer_i_is_the_raw_output_of_decoder_layer_i_in_every_family(family_folders, family):
    tokenizer, model = load_llm(str(family_folders[family]), load_in_8bit=False, dtype=torch.float32)
    hidden, mask = _reference_states(tokenizer, model, PROMPTS)
    assert len(hidden) == TINY_LLM_LAYERS + 1
    weights = mask[..., None].float()
    for layer in range(TINY_LLM_LAYERS - 1):  # hidden_states[i + 1] is layer i's raw output but for the last layer
        features = encode_llm(tokenizer, model, PROMPTS, layer=layer, per_token=True)
        assert torch.allclose(features.pooled, (hidden[layer + 1] * weights).sum(1) / weights.sum(1), atol=1e-5)
    last = encode_llm(tokenizer, model, PROMPTS, layer=-1, per_token=True)
    tokens = last.tokens[:, : mask.shape[1]]
    assert not torch.allclose(tokens[mask], hidden[-1][mask], atol=1e-2), "the final norm must not be applied"
    assert torch.allclose(model.norm(tokens)[mask], hidden[-1][mask], atol=1e-5)


@pytest.mark.parametrize("family", list(TINY_LLM_FAMILIES))
def test_every_family_keeps_its_tokenizers_bos_as_a_real_token(family_folders, family):
    tokenizer, model = load_llm(str(family_folders[family]), load_in_8bit=False, dtype=torch.float32)
    adds_bos = TINY_LLM_FAMILIES[family][2]
    ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    assert all((row[0] == tokenizer.bos_token_id) == adds_bos for row in ids)
    features = encode_llm(tokenizer, model, PROMPTS, layer=0, pooling="last", per_token=True)
    assert features.mask.sum(1).tolist() == [len(row) for row in ids]  # BOS counted, padding not
    alone = encode_llm(tokenizer, model, PROMPTS[1:2], layer=0, pooling="mean").pooled
    assert torch.allclose(alone[0], encode_llm(tokenizer, model, PROMPTS, layer=0).pooled[1], atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3"])
def test_every_family_loads_in_8bit(family_folders, family):
    from bitsandbytes.nn import Linear8bitLt

    tokenizer, model = load_llm(str(family_folders[family]))
    linears = [m for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear8bitLt) for m in linears)
    fp32 = load_llm(str(family_folders[family]), load_in_8bit=False, dtype=torch.float32)
    expected = encode_llm(*fp32, PROMPTS).pooled  # the same weights, unquantised
    assert torch.nn.functional.cosine_similarity(encode_llm(tokenizer, model, PROMPTS).pooled, expected).min() > 0.99


def test_several_layers_in_one_forward_equal_each_layer_read_alone(family_folders):
    tokenizer, model = load_llm(str(family_folders["qwen2"]), load_in_8bit=False, dtype=torch.float32)
    layers = [2, 0, 1]
    features = encode_llm(tokenizer, model, PROMPTS, layer=layers, pooling="last")
    assert features.pooled.shape == (len(PROMPTS), len(layers), TINY_LLM_WIDTH) and features.tokens is None
    for position, layer in enumerate(layers):
        alone = encode_llm(tokenizer, model, PROMPTS, layer=layer, pooling="last").pooled
        assert torch.equal(features.pooled[:, position], alone), layer
    with pytest.raises(ValueError, match="--llm-per-token"):
        encode_llm(tokenizer, model, PROMPTS, layer=layers, per_token=True)


def test_the_chat_template_wraps_the_prompt_as_a_user_message(family_folders, llm_fp32):
    tokenizer, model = load_llm(str(family_folders["qwen2"]), load_in_8bit=False, dtype=torch.float32)
    templated = encode_llm(tokenizer, model, PROMPTS, layer=1, chat_template=True, per_token=True)
    texts = [f"<|im_start|>user\n{prompt}<|im_end|>\n" for prompt in PROMPTS]
    by_hand = encode_llm(tokenizer, model, texts, layer=1, per_token=True)  # Qwen adds no special token itself
    assert torch.equal(templated.mask, by_hand.mask) and torch.allclose(templated.pooled, by_hand.pooled, atol=1e-6)
    assert not torch.allclose(templated.pooled, encode_llm(tokenizer, model, PROMPTS, layer=1).pooled, atol=1e-3)
    with pytest.raises(ValueError, match="--llm-chat-template: the tokenizer .* has no chat template"):
        encode_llm(*llm_fp32, PROMPTS, chat_template=True)
