"""What a fresh clone needs for the README's first command: no tracked .venv, an install script that
replaces a stale one, and a CI that runs the README's two commands exactly as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".ci"))
from readme_commands import opening_commands  # noqa: E402

FIX_VENV = REPO / "scripts" / "replace_stale_venv.sh"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_no_venv_is_tracked_and_any_form_of_it_is_ignored():
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    assert _git("ls-files", "--", ".venv").stdout == ""
    for path in (".venv", ".venv/bin/python", ".venv.moved-20260101-000000"):
        assert _git("check-ignore", "--no-index", "-q", path).returncode == 0, path


def test_ci_runs_the_readmes_two_opening_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = opening_commands(readme)
    assert commands == ["bash scripts/install.sh && .venv/bin/lmtune train demo", ".venv/bin/python -m pytest -q"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_commands.py README.md" in ci
    assert "rm " not in ci and "venv" not in ci  # no preparation a user would not do


def test_opening_commands_stop_at_the_first_prose():
    text = "# t\n\n```bash\na\n```\n\n```bash\nb\n```\n\nprose\n\n```bash\nc\n```\n"
    assert opening_commands(text) == ["a", "b"]
    assert opening_commands("# t\n\nprose first\n\n```bash\na\n```\n") == []


def _fix(root: Path) -> str:
    done = subprocess.run(["bash", str(FIX_VENV), str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_venv_link_is_replaced_and_its_target_left_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / ".venv").symlink_to(target)
    assert "link" in _fix(tmp_path / "repo")
    assert not os.path.lexists(tmp_path / "repo" / ".venv")
    assert (target / "keep.txt").read_text() == "x"


def test_a_dangling_venv_link_is_replaced(tmp_path):
    (tmp_path / ".venv").symlink_to(tmp_path / "gone")
    _fix(tmp_path)
    assert not os.path.lexists(tmp_path / ".venv")


def test_a_venv_whose_python_does_not_start_is_made_anew(tmp_path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /nonexistent\n")
    (venv / "bin" / "python").symlink_to("/nonexistent/python3")
    assert "does not start" in _fix(tmp_path)
    assert not venv.exists()


def test_a_working_venv_is_kept(tmp_path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = x\n")
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert _fix(tmp_path) == ""
    assert (venv / "pyvenv.cfg").is_file()


def test_something_else_named_venv_is_moved_aside_not_deleted(tmp_path):
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "notes.txt").write_text("mine")
    assert "moved to" in _fix(tmp_path)
    (aside,) = tmp_path.glob(".venv.moved-*")
    assert (aside / "notes.txt").read_text() == "mine"
    assert not (tmp_path / ".venv").exists()
