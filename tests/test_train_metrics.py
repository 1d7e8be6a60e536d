"""The run's metrics outputs, faults the trainer survives: strict JSON (NaN and Infinity written as null),
metrics.jsonl cut short or corrupted by a stopped run (a resume keeps exactly the whole records up to its step, or
stops with one line), an out-dir whose metrics.jsonl cannot be opened, and summary.json never left half written or
from an earlier run."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fault_runs import one_line_error, strict_records, tiny_config
from smet_kernels.train.metrics import finite_or_none, strict_json
from smet_kernels.train.trainer import train
from test_train_trainer import cache_dir, one_thread  # noqa: F401 -- autouse: shared token cache, one thread


def test_outputs_are_strict_json():
    assert finite_or_none({"a": [1.0, float("nan")], "b": (float("inf"), 2), "c": "x"}) == {
        "a": [1.0, None], "b": [None, 2], "c": "x"}
    assert strict_json({"loss": float("-inf")}) == '{"loss": null}'
    assert strict_json({"loss": torch.tensor(float("nan"), dtype=torch.float64).numpy()[()]}) == '{"loss": null}'


def test_a_resume_leaves_out_a_last_metrics_line_cut_short_by_a_stopped_run(tmp_path):
    """A run killed while writing a record left metrics.jsonl ending in half a line: the resume stopped with a
    JSONDecodeError traceback."""
    from smet_kernels.train.metrics import MetricsLog, MetricsWarning

    records = [strict_json({"type": "train", "step": step, "loss": 1.0}) for step in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in records) + records[0][:10])
    with pytest.warns(MetricsWarning, match="metrics.jsonl"):
        log = MetricsLog(tmp_path, resumed_step=2)
    log.log({"type": "train", "step": 3, "loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in strict_records(path)] == [(1, 1.0), (2, 1.0), (3, 0.5)]


@pytest.mark.parametrize("line, problem", [("{garbage", "is not JSON"), ("[]", "is not a metrics record"),
                                           ('{"loss": 1.0}', "is not a metrics record")])
def test_a_resume_of_a_run_whose_metrics_jsonl_has_a_corrupt_line_is_a_one_line_error(tmp_path, capsys, line,
                                                                                        problem):
    """A line that is not JSON before the last one (not cut short by a stop), or JSON that is not a record: the
    resume failed with a JSONDecodeError, TypeError or KeyError traceback."""
    out = tmp_path / "run"
    train(tiny_config(max_steps=2, checkpoint_every=2, out_dir=str(out)))
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([line, *lines[1:]]) + "\n")
    reason = one_line_error(capsys, ["--resume", str(out), "--max-steps", "4", "--no-progress"], 2)
    assert reason.startswith(f"{path}: line 1 {line!r} {problem}") and reason.endswith("repair or remove that line")


def test_an_out_dir_whose_metrics_jsonl_cannot_be_opened_stops_the_run_with_one_line(tmp_path, capsys):
    """A folder named metrics.jsonl in --out-dir: the run failed with an IsADirectoryError traceback."""
    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    reason = one_line_error(capsys, ["--config", "tiny", "--batch-size", "4", "--seq-len", "32", "--max-steps", "2",
                                     "--update-interval", "2", "--eval-every", "0", "--backend", "reference",
                                     "--no-progress", "--out-dir",
                                     str(out)], 1)
    assert reason.startswith(f"could not prepare --out-dir {str(out)!r}: [Errno 21] Is a directory")


def test_a_resume_stopped_while_dropping_the_interrupted_tail_leaves_metrics_jsonl_whole(tmp_path, monkeypatch):
    """The kept records were written over the truncated file: a run stopped then lost every record before the
    checkpoint. A write that stops halfway (a kill) now leaves the file as it was."""
    import pathlib

    from smet_kernels.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(strict_json({"type": "train", "step": step}) + "\n" for step in (1, 2, 3)))
    before = path.read_text()
    real_open = pathlib.Path.open

    class StopsHalfway:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise KeyboardInterrupt("stopped")

        writelines = lambda self, lines: self.write("".join(lines))  # noqa: E731

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def opened(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return StopsHalfway(handle) if "w" in mode else handle

    monkeypatch.setattr(pathlib.Path, "open", opened)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, resumed_step=2)
    assert path.read_text() == before


def test_a_run_stopped_while_writing_summary_json_leaves_no_half_summary(tmp_path, monkeypatch):
    """summary.json marks a finished run (the stability sweep skips its folder and reads it): half of one made every
    later sweep stop with a JSONDecodeError."""
    import pathlib

    from bench.stability.sweep import is_done
    from smet_kernels.train.metrics import write_summary

    real_write_text = pathlib.Path.write_text

    def stops_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(pathlib.Path, "write_text", stops_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_summary(tmp_path, {"steps": 6, "final_val_loss": 1.0})
    assert not is_done(tmp_path)


def test_a_run_stopped_before_its_end_leaves_no_summary_json_of_an_earlier_run(tmp_path):
    """A resumed (or fresh) run killed before its end left the summary.json of the run before it: steps, losses and
    config of another run read as this folder's result, and the stability sweep counted the folder finished."""
    from bench.stability.sweep import is_done
    from smet_kernels.train.metrics import MetricsLog, write_summary

    write_summary(tmp_path, {"steps": 6})
    (tmp_path / "metrics.jsonl").write_text(strict_json({"type": "train", "step": 1}) + "\n")
    MetricsLog(tmp_path, resumed_step=4).close()
    assert not is_done(tmp_path)
    assert [r["step"] for r in strict_records(tmp_path / "metrics.jsonl")] == [1]


@st.composite
def _metrics_records(draw):
    record = {"type": draw(st.sampled_from(["train", "eval", "loss_spike"])), "step": draw(st.integers(0, 12)),
              "loss": draw(st.one_of(st.floats(), st.none())), "note": draw(st.text(max_size=4))}
    complete = draw(st.sampled_from([None, True, False]))
    return record if complete is None else record | {"complete": complete}


@settings(max_examples=80, deadline=None, derandomize=True)
@given(records=st.lists(_metrics_records(), max_size=6), resumed_step=st.integers(0, 12), data=st.data())
def test_a_resume_keeps_exactly_the_whole_metrics_records_up_to_its_step_whatever_byte_a_stop_cut_at(
    records, resumed_step, data
):
    """Any records (non-finite losses, any text), metrics.jsonl cut at any byte by a stopped run: the resume does not
    raise, warns exactly when a last line was cut inside its record, and leaves the file holding exactly the whole
    records up to its step that are not an unfinished spike window, followed by what it logs."""
    import tempfile
    import warnings
    from pathlib import Path

    from smet_kernels.train.metrics import MetricsLog, MetricsWarning

    lines = [strict_json(record) for record in records]
    text = "".join(line + "\n" for line in lines)
    cut = data.draw(st.integers(0, len(text)), label="cut")
    starts = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]
    whole = [json.loads(line) for line, start in zip(lines, starts) if start + len(line) <= cut]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "metrics.jsonl").write_text(text[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            log = MetricsLog(folder, resumed_step)
        assert any(issubclass(w.category, MetricsWarning) for w in caught) == any(
            start < cut < start + len(line) for line, start in zip(lines, starts))
        log.log({"type": "train", "step": resumed_step + 1})
        log.close()
        kept = [strict_json(r) for r in whole if r["step"] <= resumed_step and r.get("complete", True) is not False]
        assert (folder / "metrics.jsonl").read_text().splitlines() == kept + [strict_json(
            {"type": "train", "step": resumed_step + 1})]


def test_the_perplexity_of_a_diverged_loss_is_capped_instead_of_overflowing():
    """``exp`` overflows past ~709: uncapped, a diverged run's validation loss of 1000 nats would stop the run at its
    final evaluation (OverflowError) instead of writing its summary."""
    from smet_kernels.train.metrics import perplexity

    assert perplexity(1.0) == pytest.approx(2.718281828) and perplexity(1000.0) == perplexity(700.0) < float("inf")


def test_a_blank_line_in_metrics_jsonl_is_passed_over_and_a_step_that_is_not_an_integer_is_refused(tmp_path):
    """A hand repair (the advice of the corrupt-line error) may leave an empty line: it is no record, not a corrupt
    one. A ``step`` of another type ("3", 2.5) let past the check would fail the resume with a TypeError traceback, and
    ``true`` passed as step 1 (a bool is an int in Python)."""
    from smet_kernels.train.config import ConfigError
    from smet_kernels.train.metrics import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n\n')
    assert read_records(path) == [{"step": 1}, {"step": 2}]
    for step in ('"3"', "2.5", "null", "true"):
        path.write_text(f'{{"step": 1}}\n{{"step": {step}}}\n')
        with pytest.raises(ConfigError, match="line 2 .* is not a metrics record"):
            read_records(path)


def test_the_cpu_peak_memory_is_in_bytes_at_least_a_buffer_the_process_filled():
    """``ru_maxrss`` counts KiB on Linux (bytes on macOS): read as bytes, a process peak is 1024 times too small."""
    from smet_kernels.train.metrics import peak_memory_bytes

    buffer = torch.ones(2**24)  # 64 MiB, written
    peak, kind = peak_memory_bytes(torch.device("cpu"))
    assert kind == "cpu_peak_rss" and peak >= buffer.numel() * buffer.element_size()


def test_each_metrics_record_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    """A run killed mid-way (no close) keeps every record it logged: the log is flushed after each one."""
    from smet_kernels.train.metrics import MetricsLog, read_records

    log = MetricsLog(tmp_path)
    try:
        log.log({"type": "train", "step": 1, "loss": 2.5})
        assert read_records(tmp_path / "metrics.jsonl") == [{"type": "train", "step": 1, "loss": 2.5}]
    finally:
        log.close()


def test_a_failed_write_of_metrics_jsonl_stops_a_single_process_run_at_once(tmp_path, monkeypatch):
    from smet_kernels.train.distributed import TrainingFailed
    from smet_kernels.train.metrics import MetricsLog

    real_log = MetricsLog.log

    def full_disk_at_step_2(self, record):
        if record["step"] == 2:
            raise OSError(28, "No space left on device")
        real_log(self, record)

    monkeypatch.setattr(MetricsLog, "log", full_disk_at_step_2)
    with pytest.raises(TrainingFailed, match=r"^could not write '.*metrics.jsonl': \[Errno 28\] No space left on dev"):
        train(tiny_config(max_steps=4, out_dir=str(tmp_path)))
    assert [r["step"] for r in strict_records(tmp_path / "metrics.jsonl")] == [1]
    assert not (tmp_path / "summary.json").exists()
