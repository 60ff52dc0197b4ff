"""The ``lmtune`` command: version, config resolution, user errors without tracebacks, --debug."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmtune
from lmtune import cli
from lmtune.config import ConfigError

SMALL_CONFIG = """\
lr = 0.1
max_epochs = 2
optim_wrapper = dict(optimizer=dict(lr=lr), accumulative_counts=1)
train_cfg = dict(max_epochs=max_epochs)
"""


@pytest.fixture
def small_config(tmp_path) -> Path:
    path = tmp_path / "small.py"
    path.write_text(SMALL_CONFIG, encoding="utf-8")
    return path


def console_script() -> str:
    beside_python = Path(sys.executable).with_name("lmtune")
    found = str(beside_python) if beside_python.is_file() else shutil.which("lmtune")
    if not found:
        pytest.skip("the lmtune console script is not installed")
    return found


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=120, env=env)


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lmtune: error:")
    for fragment in fragments:
        assert fragment in lines[0]


# ----------------------------------------------------------------------------- 8. version


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmtune {lmtune.__version__}"


def test_version_console_script():
    proc = run_script("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lmtune {lmtune.__version__}"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: lmtune" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 9. missing configs


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "no_such_dir" / "cfg.py"
    assert cli.main(["train", str(missing)]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, str(missing))
    assert captured.out == ""


def test_missing_config_file_console_script(tmp_path):
    missing = tmp_path / "absent.py"
    proc = run_script("train", str(missing))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, str(missing))


def test_unknown_builtin_name_suggests_demo(capsys):
    assert cli.main(["train", "dmo"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'dmo'", "did you mean 'demo'")


# ----------------------------------------------------------------------------- 10. bad overrides


def test_bad_top_level_override(small_config, capsys):
    assert cli.main(["train", str(small_config), "--cfg-options", "lrr=1"]) == 2
    assert_one_line_error(capsys.readouterr().err, "'lrr'", "did you mean 'lr'")


def test_bad_nested_override(small_config, capsys):
    assert cli.main(["train", str(small_config), "--cfg-options", "lr=0.2", "optim_wrapper.optimzer.lr=1"]) == 2
    assert_one_line_error(capsys.readouterr().err, "optim_wrapper.optimzer.lr", "did you mean 'optimizer'")


def test_malformed_override(small_config, capsys):
    assert cli.main(["train", str(small_config), "--cfg-options", "lr"]) == 2
    assert_one_line_error(capsys.readouterr().err, "KEY=VALUE")


def test_config_that_fails_to_run_names_its_line(tmp_path, capsys):
    path = tmp_path / "bad.py"
    path.write_text("lr = 0.1\nmodel = dict(llm=undefined_name)\n", encoding="utf-8")
    assert cli.main(["train", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{path}:2:", "NameError")


def test_debug_lets_the_error_propagate(small_config, capsys):
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        cli.main(["train", str(small_config), "--cfg-options", "lrr=1", "--debug"])


def test_debug_shows_the_traceback_console_script(small_config):
    plain = run_script("train", str(small_config), "--cfg-options", "lrr=1")
    assert plain.returncode == 2
    assert_one_line_error(plain.stderr, "did you mean 'lr'")

    debug = run_script("train", str(small_config), "--cfg-options", "lrr=1", "--debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "ConfigError" in debug.stderr
    assert "did you mean 'lr'" in debug.stderr


def test_unexpected_exception_is_one_line_without_debug(monkeypatch, capsys):
    def crash(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_train", crash)
    assert cli.main(["train", "whatever.py"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "RuntimeError: boom" in err
    assert "--debug" in err
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["train", "whatever.py", "--debug"])


def test_keyboard_interrupt_exit_code(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    assert cli.main(["train", "whatever.py"]) == 130
    assert "interrupted" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 11. config resolution


def test_resolve_builtin_demo():
    path = cli.resolve_config("demo")
    expected = Path(lmtune.__file__).resolve().parent / "configs" / "demo" / "demo.py"
    assert path.resolve() == expected
    assert path.is_file()
    assert cli.builtin_configs()["demo"].resolve() == expected


def test_resolve_a_path_before_a_builtin_name(tmp_path, monkeypatch, small_config):
    assert cli.resolve_config(str(small_config)) == small_config
    # A file in the working directory called like a built-in wins over the built-in.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text(SMALL_CONFIG, encoding="utf-8")
    assert cli.resolve_config("demo") == Path("demo")


def test_resolve_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cli.resolve_config(str(tmp_path / "x.py"))
    with pytest.raises(ConfigError, match="built-in"):
        cli.resolve_config("certainly_not_a_builtin_config")
