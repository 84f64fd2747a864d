"""Stage one end to end on the tiny models: stored values, layer/pooling, resume after kill -9, bad rows, manifest
refusal, two-process equality, the reference LLM-feature file, store URLs, creation killed, the writer lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sur_cache.config import ExtractConfig
from sur_cache.dataset import ImageDataset, read_metadata
from sur_cache.locations import StoreURLError
from sur_cache.models import LLM_LAYERS_SOURCE, encode_clip, encode_llm, encode_vae, load_clip, load_llm, load_vae
from sur_cache.stages import extract
from sur_cache.stages.extract import load_llm_features, run_extract
from sur_cache.store import (
    DONE,
    PENDING,
    SKIPPED,
    FeatureStore,
    ManifestMismatchError,
)
from sur_cache.tiny_models import TINY_CLIP_WIDTH, TINY_LLM_WIDTH, TINY_RESOLUTION
from sur_cache.writer_lock import StoreLockedError, writer_lock

VENV_BIN = Path(sys.executable).parent
LAYER = 1  # of the tiny Llama's 3: not the last, so `output_hidden_states[LAYER + 1]` is the same tensor
SETTINGS = {
    "resolution": TINY_RESOLUTION,
    "batch_size": 2,
    "llm_batch_size": 3,  # LLM batches cut shards differently from the CLIP/VAE ones
    "shard_rows": 4,
    "num_workers": 0,
    "llm_8bit": False,
    "llm_dtype": "float32",
    "store_dtype": "float32",
    "llm_layer": LAYER,
    "llm_pooling": "last",
    "llm_per_token": True,
    "flip_variants": True,
    "progress": False,
}


def _config(data, out, models, **overrides) -> ExtractConfig:
    options = {**SETTINGS, "data": Path(data), "out": str(out), "sd": str(models.sd), "llm": str(models.llm)}
    return ExtractConfig(**{**options, **overrides})


def _cli_args(data, out, models, **overrides) -> list[str]:
    """The same settings as `_config`, as `sur-cache extract` arguments."""
    settings = {**SETTINGS, **overrides}
    args = ["extract", "--data", str(data), "--out", str(out), "--sd", str(models.sd), "--llm", str(models.llm)]
    keys = ("resolution", "batch_size", "llm_batch_size", "shard_rows", "num_workers", "llm_dtype", "store_dtype")
    for key in (*keys, "llm_layer"):
        args += [f"--{key.replace('_', '-')}", str(settings[key])]
    args += ["--llm-pooling", settings["llm_pooling"], "--no-8bit", "--llm-per-token", "--flip-variants"]
    return args + ["--no-progress"]


def _contents(url) -> dict[str, np.ndarray]:
    store = FeatureStore.open(url)
    return {name: store.array(name)[:] for name in store.array_names}


def _assert_same_store(a, b) -> None:
    left, right = _contents(a), _contents(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].tobytes() == right[name].tobytes(), f"array {name} differs"
    assert FeatureStore.open(a).skipped_records() == FeatureStore.open(b).skipped_records()


@pytest.fixture(scope="module")
def reference(tiny_models, demo_dataset, tmp_path_factory):
    """One uninterrupted single-process run (fp32 store) that the other runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "store.zarr"
    summary = run_extract(_config(demo_dataset, out, tiny_models))
    return out, summary


# A different batching changes the last bits of batched float math (padding, kernel choice, thread count), so
# bit equality is asserted only on extract's own batches and the batch-independent check has a tolerance.
FP32_ACROSS_BATCHINGS = {"rtol": 1e-5, "atol": 1e-6}


def _extract_batches(batch_size: int) -> list[tuple[int, int]]:
    """The fixed batches extract uses over the 12 demo samples: its own `_batches` inside each shard."""
    shard_rows = SETTINGS["shard_rows"]
    return [b for s in range(0, 12, shard_rows) for b in extract._batches(s, min(s + shard_rows, 12), batch_size)]


def test_stored_values_equal_the_models_called_on_extracts_batches(reference, tiny_models, demo_dataset):
    out, summary = reference
    assert summary["complete"] == 12 and summary["skipped"] == {}
    store = FeatureStore.open(out)
    assert store.manifest.clip_width == TINY_CLIP_WIDTH and store.manifest.llm_width == TINY_LLM_WIDTH
    assert store.manifest.llm_layer == LAYER and store.manifest.latent_size == TINY_RESOLUTION // 4
    lines = [json.loads(line) for line in (demo_dataset / "metadata.jsonl").read_text().splitlines()]
    assert store.file_names() == [line["file_name"] for line in lines]  # the names array, in metadata order
    tokenizer, text_encoder = load_clip(str(tiny_models.sd))
    vae = load_vae(str(tiny_models.sd))
    rows, _ = read_metadata(demo_dataset)
    images = ImageDataset(rows, TINY_RESOLUTION, flip=True)
    for start, stop in _extract_batches(SETTINGS["batch_size"]):
        batch = lines[start:stop]
        stored = store.read(store.array_names, start, stop)
        texts, prompts = [r["text"] for r in batch], [r["prompt"] for r in batch]
        np.testing.assert_array_equal(stored["clip_simple"], encode_clip(tokenizer, text_encoder, texts).embeddings)
        np.testing.assert_array_equal(stored["clip_complex"], encode_clip(tokenizer, text_encoder, prompts).embeddings)
        pixels = torch.stack([images[i]["pixels"] for i in range(start, stop)])
        latents = encode_vae(vae, pixels)
        np.testing.assert_array_equal(stored["latent_mean"], latents.mean)
        np.testing.assert_array_equal(stored["latent_logvar"], latents.logvar)
        np.testing.assert_array_equal(stored["latent_mean_flipped"], encode_vae(vae, pixels.flip(-1)).mean)
        assert stored["sample_line"].tolist() == list(range(start, stop))
        assert stored["status"].tolist() == [DONE] * (stop - start)


def test_stored_llm_features_equal_the_llm_called_on_extracts_batches(reference, tiny_models, demo_dataset):
    store = FeatureStore.open(reference[0])
    texts = [json.loads(line)["text"] for line in (demo_dataset / "metadata.jsonl").read_text().splitlines()]
    tokenizer, llm = load_llm(str(tiny_models.llm), load_in_8bit=False, dtype=torch.float32)
    for start, stop in _extract_batches(SETTINGS["llm_batch_size"]):
        stored = store.read(["llm", "llm_tokens", "llm_mask"], start, stop)
        features = encode_llm(tokenizer, llm, texts[start:stop], layer=LAYER, pooling="last", per_token=True)
        np.testing.assert_array_equal(stored["llm"], features.pooled)
        np.testing.assert_array_equal(stored["llm_tokens"], features.tokens)
        np.testing.assert_array_equal(stored["llm_mask"], features.mask)
    for index, text in enumerate(texts):  # one prompt at a time: equal up to float32 noise, not bit for bit
        alone = encode_llm(tokenizer, llm, [text], layer=LAYER, pooling="last", per_token=True)
        stored = store.read(["llm", "llm_tokens"], index, index + 1)
        np.testing.assert_allclose(stored["llm"], alone.pooled, **FP32_ACROSS_BATCHINGS)
        np.testing.assert_allclose(stored["llm_tokens"], alone.tokens, **FP32_ACROSS_BATCHINGS)


def test_llm_feature_is_the_requested_layer_and_pooling(reference, tiny_models, demo_dataset):
    """Checked against transformers' own `output_hidden_states`, independently of `encode_llm`."""
    store = FeatureStore.open(reference[0])
    tokenizer, llm = load_llm(str(tiny_models.llm), load_in_8bit=False, dtype=torch.float32)
    text = json.loads((demo_dataset / "metadata.jsonl").read_text().splitlines()[5])["text"]
    tokens = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = llm(**tokens, output_hidden_states=True).hidden_states[LAYER + 1][0]
    stored = store.read(["llm", "llm_tokens", "llm_mask"], 5, 6)
    count = tokens.input_ids.shape[1]
    np.testing.assert_allclose(stored["llm"][0], hidden[-1], rtol=1e-5, atol=1e-5)  # last real token
    np.testing.assert_allclose(stored["llm_tokens"][0, :count], hidden, rtol=1e-5, atol=1e-5)
    assert stored["llm_mask"][0].sum() == count and not stored["llm_tokens"][0, count:].any()


def test_rerun_resumes_nothing_and_other_settings_are_refused(reference, tiny_models, demo_dataset):
    out, _ = reference
    again = run_extract(_config(demo_dataset, out, tiny_models))
    assert again["computed_now"] == 0 and again["complete"] == 12
    with pytest.raises(ManifestMismatchError) as error:
        run_extract(
            _config(demo_dataset, out, tiny_models, llm_layer=0, store_dtype="float16", batch_size=3, llm_batch_size=5)
        )
    assert "llm_layer: expected 0, found 1" in str(error.value)
    assert 'store_dtype: expected "float16", found "float32"' in str(error.value)
    assert "batch_size: expected 3, found 2" in str(error.value)
    assert "llm_batch_size: expected 5, found 3" in str(error.value)
    assert "--overwrite" in str(error.value)


def test_rerunning_a_finished_store_skips_the_metadata_pass_unless_the_file_changed(
    reference, tiny_models, demo_dataset, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    out = tmp_path / "store.zarr"
    shutil.copytree(reference[0], out)
    real_pass = extract._read_rows
    monkeypatch.setattr(extract, "_read_rows", lambda *a: pytest.fail("the metadata pass ran"))
    with pytest.raises(ManifestMismatchError, match="dataset_path"):  # the copy's path: compared all the same
        run_extract(_config(data, out, tiny_models))
    (out / "commits" / "index.json").unlink()  # as a store extracted before the commit index: the resume writes one
    again = run_extract(_config(demo_dataset, out, tiny_models))
    assert again["computed_now"] == 0 and again["complete"] == reference[1]["complete"]
    assert again["skipped"] == reference[1]["skipped"] and again["truncated"] == reference[1]["truncated"]
    assert (out / "commits" / "index.json").exists()
    monkeypatch.setattr(extract, "_read_rows", real_pass)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ManifestMismatchError, match="metadata_sha256.*\n.*num_samples"):
        run_extract(_config(data, out, tiny_models))  # parsed again: every differing field named


_KILLER = """
import os, signal, sys, threading
from sur_cache.store import FeatureStore
method, count = sys.argv[1], float(sys.argv[2])
if method == "timer":
    threading.Timer(count, os.kill, (os.getpid(), signal.SIGKILL)).start()
else:
    original, calls = getattr(FeatureStore, method), []
    def killing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    setattr(FeatureStore, method, killing)
from sur_cache.cli import main
main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "count"),
    [("_writable", 20), ("commit_shard", 2), ("timer", float(np.random.default_rng().uniform(4, 9)))],
    ids=["mid-shard-write", "before-second-commit", "random-time"],
)
def test_resume_after_kill_is_bit_identical(method, count, reference, tiny_models, demo_dataset, tmp_path):
    """kill -9 inside the first pass (a shard half written), inside the second pass (one shard committed), and at a
    random time; the re-run must finish the store with exactly the uninterrupted run's bytes."""
    out = tmp_path / "store.zarr"
    args = _cli_args(demo_dataset, out, tiny_models)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, method, str(count), *args], cwd=tmp_path, env=env, capture_output=True
    )
    if method != "timer":
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        status = FeatureStore.open(out).status()
        assert (status == PENDING).any()
        assert ((status == DONE).sum() == 4) == (method == "commit_shard")
    summary = run_extract(_config(demo_dataset, out, tiny_models))
    assert summary["complete"] == 12
    assert not list(out.rglob("*.partial"))
    _assert_same_store(out, reference[0])


@pytest.mark.slow
@pytest.mark.parametrize(("method", "count"), [("_writable", 20), ("commit_shard", 2)], ids=["mid-shard", "commit"])
def test_an_overlapped_run_killed_resumes_bit_identical(method, count, reference, tiny_models, demo_dataset, tmp_path):
    """kill -9 of `--overlap` in the middle of writing the second shard, and just before committing it (the third
    shard's halves in flight); the re-run, sequential, finishes the uninterrupted run's bytes."""
    out = tmp_path / "store.zarr"
    args = [*_cli_args(demo_dataset, out, tiny_models), "--overlap"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, method, str(count), *args], cwd=tmp_path, env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    status = FeatureStore.open(out).status()
    assert (status == DONE).sum() == 4 and (status == PENDING).sum() == 8  # the first shard committed, no other
    summary = run_extract(_config(demo_dataset, out, tiny_models))
    assert summary["complete"] == 12 and summary["computed_now"] == 8
    assert not list(out.rglob("*.partial"))
    _assert_same_store(out, reference[0])


def _bad_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "images" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # unreadable
    lines = (target / "metadata.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"file_name": "../outside.png", "text": "a", "prompt": "b"})
    lines[3] = "{not json"
    lines[4] = json.dumps({"file_name": "images/00004.png", "text": "  ", "prompt": "b"})
    lines[6] = json.dumps({"file_name": "images/missing.png", "text": "a", "prompt": "b"})
    (target / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return target


def test_bad_rows_are_skipped_reported_and_never_done(tiny_models, demo_dataset, tmp_path):
    data = _bad_dataset(demo_dataset, tmp_path / "data")
    out = tmp_path / "store.zarr"
    summary = run_extract(_config(data, out, tiny_models, shard_rows=3, num_workers=1))  # decode errors in a worker
    assert summary["skipped"] == {
        "empty_prompt": 1,
        "malformed_json": 1,
        "missing_file": 1,
        "unreadable_image": 1,
        "unsafe_path": 1,
    }
    store = FeatureStore.open(out)
    assert store.num_samples == 9  # rows that passed the metadata checks; a missing file is found when read
    lines = store.array("sample_line")[:]
    status = store.status()
    assert lines.tolist() == [0, 1, 5, 6, 7, 8, 9, 10, 11]
    metadata = (data / "metadata.jsonl").read_text().splitlines()
    assert store.file_names() == [json.loads(metadata[line])["file_name"] for line in lines]
    assert status.tolist() == [DONE, SKIPPED, DONE, SKIPPED] + [DONE] * 5
    for name in ("latent_mean", "latent_mean_flipped", "clip_simple", "llm", "llm_tokens", "truncated"):
        assert not store.array(name)[1].any(), f"{name} of a skipped sample should be zeros"
    texts = [json.loads(line).get("text") for line in (data / "metadata.jsonl").read_text().splitlines()[:2]]
    assert bytes(store.array("text_sha256")[1]) == hashlib.sha256(texts[1].encode()).digest()  # identity kept
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in report] == [
        (1, "unreadable_image"),
        (2, "unsafe_path"),
        (3, "malformed_json"),
        (4, "empty_prompt"),
        (6, "missing_file"),
    ]
    with pytest.raises(ValueError, match="--strict: 4 bad rows"):
        run_extract(_config(data, tmp_path / "strict.zarr", tiny_models, strict=True))


def test_non_finite_features_are_skipped_not_stored(tiny_models, demo_dataset, tmp_path, monkeypatch):
    """A NaN from a model, or a value that overflows the fp16 store, makes its sample skipped, never done."""
    real_encode_llm = extract.encode_llm

    def poisoned(tokenizer, model, prompts, **options):
        features = real_encode_llm(tokenizer, model, prompts, **options)
        for i, prompt in enumerate(prompts):
            if prompt == first_text:
                features.pooled[i, 0] = float("nan")
            if prompt == second_text:
                features.pooled[i, 1] = 1e6  # finite in float32, inf in float16
        return features

    lines = (demo_dataset / "metadata.jsonl").read_text().splitlines()
    first_text, second_text = json.loads(lines[2])["text"], json.loads(lines[9])["text"]
    monkeypatch.setattr(extract, "encode_llm", poisoned)
    out = tmp_path / "store.zarr"
    summary = run_extract(_config(demo_dataset, out, tiny_models, store_dtype="float16"))
    store = FeatureStore.open(out)
    status = store.status()
    lines_of = store.array("sample_line")[:].tolist()
    skipped_lines = sorted(lines_of[i] for i in np.flatnonzero(status == SKIPPED))
    texts = [json.loads(line)["text"] for line in lines]
    expected = sorted(i for i, text in enumerate(texts) if text in (first_text, second_text))
    assert skipped_lines == expected and summary["skipped"] == {"non_finite_feature": len(expected)}
    assert np.isfinite(store.array("llm")[:].astype(np.float32)).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        run_extract(_config(demo_dataset, tmp_path / "strict.zarr", tiny_models, strict=True))


def test_unreadable_image_is_fatal_with_strict(tiny_models, demo_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    (data / "images" / "00001.png").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"--strict: line 1 \(images/00001.png\): unreadable_image"):
        run_extract(_config(data, tmp_path / "s.zarr", tiny_models, strict=True))


def test_one_sample_dataset_with_default_shards(tiny_models, demo_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    first = (data / "metadata.jsonl").read_text().splitlines()[0]
    (data / "metadata.jsonl").write_text(first + "\n")
    out = tmp_path / "s.zarr"
    summary = run_extract(_config(data, out, tiny_models, shard_rows=256, batch_size=16))
    assert summary["complete"] == 1
    store = FeatureStore.open(out)
    assert store.shard_ranges() == [(0, 1)] and store.array("llm").shape == (1, TINY_LLM_WIDTH)
    assert store.verify() == []


def test_a_model_that_cannot_be_loaded_is_named_by_its_option(tiny_models, demo_dataset, tmp_path):
    with pytest.raises(OSError, match=r"--sd .*no_sd: cannot load it as a diffusers Stable Diffusion"):
        run_extract(_config(demo_dataset, tmp_path / "s.zarr", tiny_models, sd=str(tmp_path / "no_sd")))
    with pytest.raises(OSError, match=r"--llm .*no_llm: cannot load it as a hub id, a local model folder"):
        run_extract(_config(demo_dataset, tmp_path / "s.zarr", tiny_models, llm=str(tmp_path / "no_llm")))
    assert not (tmp_path / "s.zarr").exists()


def test_dataset_without_usable_rows_is_an_error(tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "a", "prompt": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="could be extracted: {'malformed_json': 1, 'missing_file': 1}"):
        run_extract(_config(data, tmp_path / "s.zarr", tiny_models))


@pytest.mark.slow
def test_two_processes_write_the_same_store(reference, tiny_models, demo_dataset, tmp_path):
    out = tmp_path / "store.zarr"
    command = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
    command += [str(VENV_BIN / "sur-cache"), *_cli_args(demo_dataset, out, tiny_models)]
    # CPU kernels reduce in a thread-count-dependent order: give each process the reference run's thread count
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done        12 of 12 samples") == 1  # only the main process prints
    _assert_same_store(out, reference[0])


def _feature_file(path: Path, prompts: list[str], width: int = 40, odd: str | None = None) -> Path:
    generator = torch.Generator().manual_seed(0)
    table = {prompt: torch.randn(width, generator=generator).half() for prompt in prompts}
    if odd is not None:
        table[odd] = torch.zeros(width + 1, dtype=torch.float16)
    torch.save(table, path)
    return path


def test_reference_llm_feature_file_replaces_the_llm(tiny_models, demo_dataset, tmp_path):
    texts = [json.loads(line)["text"] for line in (demo_dataset / "metadata.jsonl").read_text().splitlines()]
    missing = texts[3]
    kept = [t for t in texts if t != missing]
    features = _feature_file(tmp_path / "39.pt", kept)
    out = tmp_path / "store.zarr"
    config = _config(demo_dataset, out, tiny_models, llm=None, llm_features=features, llm_per_token=False)
    summary = run_extract(config)
    assert summary["skipped"] == {"missing_llm_feature": texts.count(missing)}
    store = FeatureStore.open(out)
    table = torch.load(features, weights_only=True)
    lines = store.array("sample_line")[:]
    expected = np.stack([table[texts[line]].float().numpy() for line in lines])
    np.testing.assert_array_equal(store.array("llm")[:], expected)
    assert store.manifest.llm_width == 40 and store.manifest.llm_model is None
    assert store.manifest.llm_batch_size is None and store.manifest.llm_dtype is None  # no LLM runs
    assert store.manifest.llm_features_file.sha256 == hashlib.sha256(features.read_bytes()).hexdigest()
    wrong = _feature_file(tmp_path / "wrong.pt", kept, odd="an odd prompt")
    with pytest.raises(ValueError, match=r"one width; most have 40, but 'an odd prompt' has 41"):
        run_extract(
            _config(demo_dataset, tmp_path / "w.zarr", tiny_models, llm=None, llm_features=wrong, llm_per_token=False)
        )


def test_a_feature_file_that_is_not_a_tensor_dict_is_refused_by_name(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"a cat": np.zeros(3)}, tmp_path / "numpy.pt")  # needs a full unpickler: refused by weights_only
    for name, kind in [("text.pt", "KeyError"), ("numpy.pt", "UnpicklingError")]:
        with pytest.raises(ValueError, match=rf"--llm-features .*{name}: cannot load it as .*{kind}"):
            load_llm_features(tmp_path / name)


def test_memory_url_is_refused_and_a_file_url_is_its_folder(reference, tiny_models, demo_dataset, tmp_path):
    url = f"memory://sur-cache-extract-{uuid.uuid4().hex}/store.zarr"
    with pytest.raises(StoreURLError, match=r"--out memory://.* gone when extract exits"):
        run_extract(_config(demo_dataset, url, tiny_models))
    out = tmp_path / "store.zarr"
    summary = run_extract(_config(demo_dataset, f"file://{out}", tiny_models))
    assert summary["complete"] == 12 and Path(summary["report"]).is_file()
    _assert_same_store(out, reference[0])


class _Killed(Exception):
    """Stands in for kill -9: nothing after the raise runs, so the files are left as a kill would leave them."""


@pytest.mark.parametrize("arrays_created", [3, 16], ids=["mid-arrays", "before-status"])
def test_a_run_killed_while_creating_the_store_resumes(
    arrays_created, reference, tiny_models, demo_dataset, tmp_path, monkeypatch
):
    import zarr

    real, calls = zarr.Group.create_array, []

    def dying(self, *args, **kwargs):
        if len(calls) == arrays_created:
            raise _Killed
        calls.append(1)
        return real(self, *args, **kwargs)

    out = tmp_path / "store.zarr"
    monkeypatch.setattr(zarr.Group, "create_array", dying)
    with pytest.raises(_Killed):
        run_extract(_config(demo_dataset, out, tiny_models))
    monkeypatch.undo()
    assert (out / "zarr.json").is_file() and not (out / "status" / "c").exists()
    assert run_extract(_config(demo_dataset, out, tiny_models))["complete"] == 12  # the same command, no --overwrite
    _assert_same_store(out, reference[0])


def test_a_second_writer_is_refused_naming_the_holder(reference, tiny_models, demo_dataset, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(reference[0], out)
    with writer_lock(out):
        with pytest.raises(StoreLockedError, match=rf"being written by process {os.getpid()} on host "):
            run_extract(_config(demo_dataset, out, tiny_models))
    assert run_extract(_config(demo_dataset, out, tiny_models))["computed_now"] == 0  # released: resumes


def test_the_overlapped_extract_writes_the_sequential_store_bit_for_bit(reference, tiny_models, demo_dataset, tmp_path):
    """CLIP/VAE and the LLM in concurrent threads write every array, the skip report and the manifest (but the
    store's own id) exactly as the default two passes, one after the other, do."""
    out = tmp_path / "store.zarr"
    summary = run_extract(_config(demo_dataset, out, tiny_models, overlap=True))
    assert summary["overlap"] is True and reference[1]["overlap"] is False  # the CPU's auto: sequential
    _assert_same_store(out, reference[0])
    assert FeatureStore.open(out).manifest.settings() == FeatureStore.open(reference[0]).manifest.settings()


def test_overlapped_skips_are_the_sequential_ones_in_the_same_order(tiny_models, demo_dataset, tmp_path, monkeypatch):
    """Bad rows, an unreadable image (line 1), a NaN from the VAE (line 5) and one from the LLM (line 0), all in the
    first shard: the image half decides first, so both modes skip the same samples and report them in the same
    order (the VAE's before the LLM's, though the LLM's sample comes first)."""
    data = _bad_dataset(demo_dataset, tmp_path / "data")
    real_vae, real_llm = extract.encode_vae, extract.encode_llm
    first_text = json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["text"]

    def poisoned_llm(tokenizer, model, prompts, **options):
        features = real_llm(tokenizer, model, prompts, **options)
        features.pooled[[i for i, p in enumerate(prompts) if p == first_text], 0] = float("nan")
        return features

    def run(overlap: bool):
        calls = []

        def poisoned_vae(vae, pixels):
            latents = real_vae(vae, pixels)
            calls.append(1)
            if len(calls) == 3:  # the second batch's images (after the first batch's and their mirrors)
                latents.mean[0, 0, 0, 0] = float("nan")
            return latents

        monkeypatch.setattr(extract, "encode_vae", poisoned_vae)
        monkeypatch.setattr(extract, "encode_llm", poisoned_llm)
        out = tmp_path / f"overlap-{overlap}.zarr"
        return run_extract(_config(data, out, tiny_models, shard_rows=3, num_workers=1, overlap=overlap)), out

    (sequential, one), (overlapped, other) = run(False), run(True)
    assert sequential["skipped"] == overlapped["skipped"] and sequential["skipped"]["non_finite_feature"] >= 2
    # the first shard's own report, as written (PIL's message names an object's address, so not its bytes)
    order = [
        [(json.loads(line)["line"], json.loads(line)["reason"]) for line in part.read_text().splitlines()]
        for part in (one / "skipped" / "shard-000000.jsonl", other / "skipped" / "shard-000000.jsonl")
    ]
    assert order[0] == order[1] == [(1, "unreadable_image"), (5, "non_finite_feature"), (0, "non_finite_feature")]
    left, right = _contents(one), _contents(other)
    assert left.keys() == right.keys() and all(left[name].tobytes() == right[name].tobytes() for name in left)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_auto_overlaps_and_writes_the_sequential_store(tiny_models, demo_dataset, tmp_path):
    """The real GPU path: LLM.int8 and CLIP/VAE on their own CUDA streams, decoding workers, the batch size picked
    from free memory (the cap, for the tiny LLM), the same bytes as --no-overlap."""
    gpu = {"device": "cuda", "llm_batch_size": None, "llm_8bit": True, "llm_dtype": "float16", "num_workers": 2}
    sequential = run_extract(_config(demo_dataset, tmp_path / "sequential.zarr", tiny_models, overlap=False, **gpu))
    overlapped = run_extract(_config(demo_dataset, tmp_path / "auto.zarr", tiny_models, **gpu))
    assert sequential["overlap"] is False and overlapped["overlap"] is True
    assert FeatureStore.open(tmp_path / "auto.zarr").manifest.llm_batch_size == 128
    _assert_same_store(tmp_path / "auto.zarr", tmp_path / "sequential.zarr")


def test_llm_batch_size_auto_is_the_recorded_one_on_resume_else_picked_from_free_memory(
    reference, tiny_models, demo_dataset, tmp_path, monkeypatch
):
    """On the CPU 64; on (a faked) CUDA the memory plan's pick, the LLM alone when the passes will not overlap; a
    resume keeps the store's recorded size whatever the free memory says."""
    from sur_cache.memory_plan import GIB, LLMFootprint

    manifest = replace(FeatureStore.open(reference[0]).manifest, llm_batch_size=None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fresh = _config(demo_dataset, tmp_path / "new.zarr", tiny_models, llm_batch_size=None)
    assert extract._llm_batch_size(fresh, manifest, cpu) == 64
    monkeypatch.setattr(extract, "_llm_footprint", lambda config, manifest: LLMFootprint(2 * GIB, 64 * 2**20))
    monkeypatch.setattr(extract, "_image_pass_bytes", lambda manifest: 7 * GIB)
    free = {"bytes": 140 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 141 * GIB))
    assert extract._llm_batch_size(fresh, manifest, cuda) == 128  # the cap
    assert extract._overlap(fresh, replace(manifest, llm_batch_size=128), cuda) is True
    free["bytes"] = 11 * GIB  # 0.75 x 11 - 2 = 6.25 GiB: 64 x 64 MiB fit alone; beside the image pass's 7, none
    assert extract._llm_batch_size(fresh, manifest, cuda) == 64
    assert extract._overlap(fresh, replace(manifest, llm_batch_size=64), cuda) is False
    assert extract._llm_batch_size(replace(fresh, overlap=True), manifest, cuda) == 1  # --overlap: planned beside
    resumed = _config(demo_dataset, reference[0], tiny_models, llm_batch_size=None)
    assert extract._llm_batch_size(resumed, manifest, cuda) == SETTINGS["llm_batch_size"] == 3
    assert run_extract(resumed)["computed_now"] == 0  # no mismatch: the recorded size is the one used


def test_config_reports_every_bad_option_at_once(tiny_models, demo_dataset, tmp_path):
    with pytest.raises(ValueError) as error:
        _config(demo_dataset, tmp_path / "s.zarr", tiny_models, llm_features=tmp_path / "f.pt", batch_size=0)
    message = str(error.value)
    assert "exactly one LLM source" in message and "--llm-per-token needs --llm" in message
    assert "--batch-size must be >= 1, got 0" in message


def test_several_layers_are_stored_as_sample_layer_width_equal_to_single_layer_extracts(
    reference, tiny_models, demo_dataset, tmp_path
):
    """`--llm-layers all` holds, on its llm_layer axis, exactly what one extract per layer stores (same batches)."""
    single = {"llm_layer": -1, "llm_per_token": False}
    run_extract(_config(demo_dataset, tmp_path / "all.zarr", tiny_models, **single, llm_layers="all"))
    layered = FeatureStore.open(tmp_path / "all.zarr")
    assert layered.manifest.llm_layers == (0, 1, 2) and layered.manifest.llm_layer is None
    assert layered.manifest.llm_layer_source == LLM_LAYERS_SOURCE
    stored = layered.array("llm")[:]
    assert stored.shape == (12, 3, TINY_LLM_WIDTH)
    np.testing.assert_array_equal(stored[:, LAYER], FeatureStore.open(reference[0]).array("llm")[:])
    for layer in (0, 2):
        out = tmp_path / f"layer{layer}.zarr"
        run_extract(_config(demo_dataset, out, tiny_models, **{**single, "llm_layer": layer}))
        np.testing.assert_array_equal(stored[:, layer], FeatureStore.open(out).array("llm")[:], err_msg=str(layer))
    np.testing.assert_array_equal(
        layered.array("clip_simple")[:], FeatureStore.open(reference[0]).array("clip_simple")[:]
    )


def test_layer_lists_are_checked_before_any_model_runs(tiny_models, demo_dataset, tmp_path):
    out = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match=r"--llm-layers 0,3: \[3\] out of range: .* has 3 layers"):
        run_extract(_config(demo_dataset, out, tiny_models, llm_layer=-1, llm_per_token=False, llm_layers="0,3"))
    with pytest.raises(ValueError, match="named twice"):
        run_extract(_config(demo_dataset, out, tiny_models, llm_layer=-1, llm_per_token=False, llm_layers="2,-1"))
    assert not out.exists()
    with pytest.raises(ValueError) as error:
        _config(demo_dataset, out, tiny_models, llm_layers="1,x")
    message = str(error.value)
    assert "comma-separated layer numbers" in message and "not both" in message and "--llm-per-token stores" in message


def test_the_chat_template_is_applied_recorded_and_refused_without_one(tiny_models, demo_dataset, tmp_path):
    from sur_cache.tiny_models import build_llm

    with pytest.raises(ValueError, match="--llm-chat-template: the tokenizer of --llm .* has no chat template"):
        run_extract(_config(demo_dataset, tmp_path / "refused.zarr", tiny_models, llm_chat_template=True))
    assert not (tmp_path / "refused.zarr").exists()
    build_llm(tmp_path / "qwen2", family="qwen2")
    out = tmp_path / "chat.zarr"
    overrides = {
        "llm": str(tmp_path / "qwen2"),
        "llm_chat_template": True,
        "llm_per_token": False,
        "llm_batch_size": 12,
    }
    run_extract(_config(demo_dataset, out, tiny_models, **overrides))
    store = FeatureStore.open(out)
    assert store.manifest.llm_chat_template is True
    texts = [json.loads(line)["text"] for line in (demo_dataset / "metadata.jsonl").read_text().splitlines()]
    tokenizer, llm = load_llm(str(tmp_path / "qwen2"), load_in_8bit=False, dtype=torch.float32)
    for start, stop in _extract_batches(12):
        expected = encode_llm(tokenizer, llm, texts[start:stop], layer=LAYER, pooling="last", chat_template=True)
        np.testing.assert_array_equal(store.read(["llm"], start, stop)["llm"], expected.pooled)
