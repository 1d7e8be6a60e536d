"""What both commands, ``smet-train`` and ``smet-bench``, do at their console: the library's warnings as one line,
a Ctrl-C as one line and an end by SIGINT, ``smet-bench`` without the ``reports`` extra as one line naming it,
and ``python -m bench.stability`` as ``smet-bench stability``."""

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import usage_error

from smet_kernels.train import cli
from smet_kernels.train.trainer import ConfigError


def interrupted_commands(monkeypatch) -> list:
    """``(signal, handler)`` and ``(pid, signal)`` calls that :func:`cli.end_interrupted` makes, recorded instead."""
    calls = []
    monkeypatch.setattr(cli.signal, "signal", lambda *args: calls.append(args))
    monkeypatch.setattr(cli.os, "kill", lambda *args: calls.append(args))
    return calls


def test_an_interrupted_run_says_so_in_one_line_and_ends_by_sigint_so_that_a_shell_loop_stops(monkeypatch, capsys):
    def interrupted(config, on_ready=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["smet-train", "--config", "tiny", "--max-steps", "1", "--update-interval", "1"])
    calls = interrupted_commands(monkeypatch)
    with pytest.raises(SystemExit) as raised:
        cli.console_main()
    assert raised.value.code == 130 and calls == [(signal.SIGINT, signal.SIG_DFL), (os.getpid(), signal.SIGINT)]
    assert capsys.readouterr().err == ("smet-train: interrupted; the checkpoints written so far are kept: continue "
                                       "with --resume and the run's --out-dir\n")


def test_a_warning_of_the_library_is_one_line_and_one_from_elsewhere_is_passed_on_as_it_was(monkeypatch, capsys):
    """The library's by its category or the name its message begins with, not by the file that reports it: a torch
    warning a library call triggers stays torch's."""
    library_file = str(Path(cli.__file__).parents[1] / "functional.py")

    def warns(config, on_ready=None):
        warnings.warn("smet_kernels: fell back to the reference ops", RuntimeWarning)
        warnings.warn_explicit("a torch deprecation", UserWarning, library_file, 7)
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "train", warns)
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match="^a torch deprecation$"):  # passed on as it was
        cli.main(["--config", "tiny"])
    assert capsys.readouterr().err.splitlines() == ["smet-train: warning: fell back to the reference ops",
                                                    "smet-train: error: stop here"]


def test_a_data_folder_with_files_left_out_and_repeated_evaluation_windows_warn_in_one_line_each(monkeypatch, capsys,
                                                                                                  tmp_path):
    """Both warnings printed in Python's two-line format, with the library file that raised them."""
    from smet_kernels.train.build import prepare_data

    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_bytes(bytes(range(32, 127)) * 160)  # 15200 bytes: 304 of validation
    (data / "plot.png").write_bytes(b"PNG")

    def prepares(config, on_ready=None):
        prepare_data(config, torch.device("cpu"))
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "train", prepares)
    with pytest.raises(SystemExit):
        cli.main(["--data", str(data), "--seq-len", "32"])
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[:3] for line in err] == [["smet-train", " warning", " data folder '" + str(data) + "'"],
                                                     ["smet-train", " warning", " --eval-batches 4 x --batch-size 8 = "
                                                      "32 evaluation windows, but the validation split holds 9"],
                                                     ["smet-train", " error", " stop here"]], err


def test_smet_bench_prints_a_warning_of_the_library_in_one_line_too_and_ends_an_interrupt_by_sigint(monkeypatch,
                                                                                                    capsys):
    import bench.cli

    def warns(argv):
        warnings.warn("sparsify: the realised density is 0.5", RuntimeWarning)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.cli, "_main", warns)
    monkeypatch.setattr(sys, "argv", ["smet-bench", "report", "--out-dir", "x"])
    calls = interrupted_commands(monkeypatch)
    with pytest.raises(SystemExit) as raised:
        bench.cli.console_main()
    assert raised.value.code == 130 and calls == [(signal.SIGINT, signal.SIG_DFL), (os.getpid(), signal.SIGINT)]
    assert capsys.readouterr().err == ("smet-bench: warning: sparsify: the realised density is 0.5\nsmet-bench: "
                                       "interrupted; the rows and runs finished so far are kept: rerun the same "
                                       "command to continue\n")


def test_smet_bench_imports_no_smet_kernels_before_its_main_has_routed_the_triton_interpreter():
    """smet_kernels imported first (by the console wrapper) had Triton's interpreter off on a CPU machine: every
    Triton case of ``smet-bench run`` and ``gpu-check`` failed with 'cannot run on device cpu'."""
    script = ("import sys, bench.cli\n"
              "bench.cli.main = lambda argv: print('imported' if 'smet_kernels' in sys.modules else 'not imported')\n"
              "bench.cli.console_main(['report'])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.stdout == "not imported\n", result.stderr[-2000:]


def test_without_the_reports_extra_every_command_ends_with_one_line_naming_it(monkeypatch, capsys):
    import bench.cli

    find_spec = bench.cli.importlib.util.find_spec
    monkeypatch.setattr(bench.cli.importlib.util, "find_spec", lambda name: None if name == "pandas" else
                        find_spec(name))
    error = usage_error(bench.cli.main, ["--help"], capsys)
    assert error == 'smet-bench: error: needs the reports extra (pandas not installed): pip install -e ".[reports]"'


def test_python_m_bench_stability_is_smet_bench_stability_with_its_console_behaviour(tmp_path):
    import subprocess

    missing = tmp_path / "missing"
    done = subprocess.run([sys.executable, "-m", "bench.stability", "report", "--out-dir", str(missing)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"smet-bench: error: --out-dir {str(missing)!r} is not a folder\n"
