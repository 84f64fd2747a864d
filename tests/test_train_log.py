"""The step log: JSON lines, truncation on resume, and the loss plot."""

from __future__ import annotations

import json

from sur_cache.train_log import StepLog, plot_losses, read_log


def _record(step: int, denoise: float | None) -> dict:
    return {"step": step, "denoise": denoise, "distill": 30.0 - step, "align": 12.0, "total": 1.0 / step, "lr": 1e-5}


def test_resume_truncation_keeps_the_checkpointed_steps(tmp_path):
    log = StepLog(tmp_path / "train_log.jsonl")
    for step in range(1, 6):
        log.write(_record(step, 0.5))
    with log.path.open("a") as f:
        f.write('[4]\n{"loss": 1}\n{"step": "2"}\n')  # hand-edited lines that are no step record
        f.write('{"step": 6, "denoise": 0.')  # the crash cut this line short
    log.truncate_after(3)
    assert [r["step"] for r in read_log(log.path)] == [1, 2, 3]
    silent = StepLog(tmp_path / "other.jsonl", enabled=False)  # a non-main process writes nothing
    silent.write(_record(1, 0.5))
    assert not silent.path.exists()


def test_plot_draws_only_the_terms_that_were_computed(tmp_path, monkeypatch):
    log = StepLog(tmp_path / "train_log.jsonl")
    for step in range(1, 4):
        log.write(_record(step, None))  # features-only: no denoising term
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_ylabel", lambda self, label, **kw: drawn.append(label) or original(self, label, **kw)
    )
    png = plot_losses(log.path, tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and drawn == ["distill", "align", "total"]


def test_plot_of_a_run_without_any_finite_loss_still_writes_a_png(tmp_path):
    log = StepLog(tmp_path / "train_log.jsonl")
    for step in range(1, 3):  # json writes NaN, and reads it back as float("nan")
        log.write({"step": step, "denoise": float("nan"), "distill": None, "align": None, "total": float("nan")})
    assert plot_losses(log.path, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _validation(step: int, denoise: float | None) -> dict:
    return {
        "kind": "validation",
        "step": step,
        "denoise": denoise,
        "distill": 20.0 - step,
        "align": 10.0,
        "total": 2.0 / step,
        "cosine_adapted_complex": 0.5 + 0.01 * step,
        "cosine_simple_complex": 0.5,
    }


def test_validation_records_are_read_apart_truncated_on_resume_and_drawn_beside_the_training_curve(
    tmp_path, monkeypatch
):
    import matplotlib.axes

    path = tmp_path / "train_log.jsonl"
    path.write_text(json.dumps(_record(1, 0.5)) + "\n")  # a line of an older log: no kind, a step record
    log = StepLog(path)
    for step in range(2, 5):
        log.write({"kind": "step", **_record(step, 0.5)})
        if step % 2 == 0:
            log.write(_validation(step, 0.4))
    assert [r["step"] for r in read_log(path)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(path, "validation")] == [2, 4]
    assert len(read_log(path, None)) == 6
    plotted = []
    original = matplotlib.axes.Axes.plot

    def plot(self, *points, **style):
        plotted.append((style["label"], points))
        return original(self, *points, **style)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    assert plot_losses(path, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    drawn = dict.fromkeys(label for label, _ in plotted)
    assert list(drawn) == ["train", "validation", "adapter(simple) vs CLIP(complex)", "CLIP(simple) vs CLIP(complex)"]
    validation_total = [points for label, points in plotted if label == "validation"][3]
    assert validation_total == ((2, 4), (1.0, 0.5))  # the total panel: its validation points at their steps
    log.truncate_after(3)  # a resume from step 3 drops the validation of step 4 with the step records after 3
    assert [r["step"] for r in read_log(path, None)] == [1, 2, 2, 3]
