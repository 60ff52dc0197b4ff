"""``lmtune plot``: loss, learning rate, gradient norm and throughput curves of a run, as a PNG.

The curves come from the ``scalars.jsonl`` the LoggerHook writes in each log dir
(``<work_dir>/<timestamp>/``). A resumed run has several log dirs; they are joined in
iteration order: each later part replaces what the earlier parts logged from its resume
point on, so iterations trained twice (after the checkpoint, before the crash) appear once,
with the values of the run that went on. A log dir that started from scratch ends the chain:
earlier runs in the same work dir are not mixed in.

matplotlib is optional (``pip install matplotlib``); without it the end-of-training plot is
skipped and this command says what to install.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmtune.core.errors import ConfigError

SCALARS_FILE = "scalars.jsonl"
CURVES_FILE = "curves.png"
MATPLOTLIB_HINT = "pip install matplotlib"  # or: pip install 'lmtune[plot]'

# panels: (key in scalars.jsonl, title, log scale for the y axis). The fourth shows the throughput where a
# ThroughputHook logged it, else the time per iteration, which every run logs.
PANELS = (("loss", "loss", False), ("lr", "learning rate", False), ("grad_norm", "gradient norm", True),
          ("tokens_per_sec", "throughput (tokens/s)", False),
          # preference training and reward models
          ("rewards/margins", "reward margin (chosen - rejected)", False),
          ("rewards/accuracies", "reward accuracy (chosen > rejected)", False))
SPEED_FALLBACK = ("time", "time per iteration (s)", False)
# drawn on the panel of the training quantity they measure: (key, legend)
OVERLAYS = {"loss": ("val/loss", "validation")}

_LOG_DIR_NAME = re.compile(r"^(\d{8}_\d{6})(?:_(\d+))?$")
_RESUMED = re.compile(r"Resumed from .* at iteration (\d+)")  # the Runner logs it before training starts
RESUME_SCAN_LINES = 5000


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ reading

def read_scalars(log_dir: Path) -> list[dict]:
    """The rows of ``<log_dir>/scalars.jsonl`` that have an iteration; a torn last line (a run killed while
    writing) is skipped."""
    path = Path(log_dir) / SCALARS_FILE
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            rows.append(row)
    return rows


def _log_dir_key(path: Path) -> tuple:
    match = _LOG_DIR_NAME.match(path.name)
    if match:  # 20240101_120000 < 20240101_120000_1 < 20240101_120000_2 < 20240101_120000_10
        return (0, match.group(1), int(match.group(2) or 0), "")
    return (1, "", path.stat().st_mtime, path.name)


def log_dirs(work_dir: Path) -> list[Path]:
    """The log dirs of a work dir that hold scalars, oldest first."""
    found = [p for p in Path(work_dir).iterdir() if p.is_dir() and (p / SCALARS_FILE).is_file()]
    return sorted(found, key=_log_dir_key)


def resume_iter(log_dir: Path) -> int | None:
    """The iteration a log dir's run resumed at: 0 if its log shows a fresh start, None if it has no log."""
    logs = sorted(Path(log_dir).glob("*.log"))
    if not logs:
        return None
    for log in logs:
        with open(log, encoding="utf-8", errors="replace") as fh:
            for _, line in zip(range(RESUME_SCAN_LINES), fh):
                match = _RESUMED.search(line)
                if match:
                    return int(match.group(1))
    return 0


def run_parts(path: str | Path) -> list[Path]:
    """The log dirs of the run at ``path`` (a work dir: its newest run; a log dir: the run ending there),
    oldest first: that log dir and, while it was resumed, the log dirs before it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist (give a work dir or one of its log dirs)")
    if (path / SCALARS_FILE).is_file():
        candidates = log_dirs(path.parent)
        if path.resolve() not in [c.resolve() for c in candidates]:
            return [path]
        candidates = candidates[: [c.resolve() for c in candidates].index(path.resolve()) + 1]
    else:
        candidates = log_dirs(path) if path.is_dir() else []
        if not candidates:
            raise ConfigError(f"no {SCALARS_FILE} in {path} or its log dirs: nothing to plot (the LoggerHook "
                              "writes it while a run trains)")
    chain = [candidates[-1]]
    for earlier in reversed(candidates[:-1]):
        if not _resumed(chain[0], earlier):
            break
        chain.insert(0, earlier)
    return chain


def _resumed(later: Path, earlier: Path) -> bool:
    """Whether the run of ``later`` continues that of ``earlier``."""
    start = resume_iter(later)
    if start is not None:
        return start > 0
    later_rows, earlier_rows = read_scalars(later), read_scalars(earlier)
    if not later_rows or not earlier_rows:
        return False
    # no log file: a continuation starts after where the earlier part started
    return later_rows[0]["iter"] > earlier_rows[0]["iter"]


def merge_parts(parts: list[tuple[int | None, list[dict]]]) -> list[dict]:
    """Join the rows of a run's parts, oldest first, into one row per iteration in iteration order (a training
    row and the evaluation row of the same iteration become one).

    Each part is ``(resume_iter, rows)``: rows logged before a later part after its resume point are
    dropped (that stretch was trained again); with no resume point known, everything from the later part's
    first iteration on is replaced."""
    merged: dict[int, dict] = {}
    for start, rows in parts:
        if not rows:
            continue
        cut = start if start is not None else rows[0]["iter"] - 1
        merged = {it: row for it, row in merged.items() if it <= cut}
        for row in rows:
            merged.setdefault(row["iter"], {}).update(row)
    return [merged[it] for it in sorted(merged)]


def collect(path: str | Path) -> tuple[list[dict], list[Path], list[int]]:
    """``(rows, log_dirs, resume_points)`` of the run at ``path``: one row per logged iteration, in
    order; the log dirs joined; the iterations where a later part took over."""
    dirs = run_parts(path)
    parts = [(resume_iter(d), read_scalars(d)) for d in dirs]
    rows = merge_parts(parts)
    resumes = [start if start is not None else r[0]["iter"] - 1 for start, r in parts[1:] if r]
    return rows, dirs, resumes


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The iterations and values of ``key`` in ``rows`` (rows without it, or with a non-number, skipped)."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(row["iter"])
            ys.append(float(value))
    return xs, ys


# ------------------------------------------------------------------ drawing

def panels_of(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """The panels ``rows`` fill: those of ``PANELS`` with data, the time per iteration standing in for an
    unmeasured throughput (so a 2 x 2 figure has no empty corner)."""
    panels = [(key, name, log) for key, name, log in PANELS if series(rows, key)[0]]
    if panels and not series(rows, "tokens_per_sec")[0] and series(rows, SPEED_FALLBACK[0])[0]:
        panels.append(SPEED_FALLBACK)
    return panels


def draw(rows: list[dict], out: str | Path, title: str | None = None, resumes: list[int] = ()) -> Path:
    """Write the curves of ``rows`` to ``out`` (PNG): one panel per logged quantity of ``PANELS``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(f"plotting needs matplotlib, which is not installed: {MATPLOTLIB_HINT}") from None
    panels = panels_of(rows)
    if not panels:
        raise ConfigError("the scalars hold none of loss, lr, grad_norm or tokens_per_sec: nothing to plot")
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.6 * nrows), squeeze=False)
    try:
        for ax, (key, name, log) in zip(axes.flat, panels):
            xs, ys = series(rows, key)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2, label="train")
            overlay = OVERLAYS.get(key)
            if overlay is not None and series(rows, overlay[0])[0]:  # validation on the training quantity's axis
                vx, vy = series(rows, overlay[0])
                ax.plot(vx, vy, marker="o", linewidth=1.2, label=overlay[1])
                ax.legend(loc="best", fontsize="small")
            ax.set_title(name)
            ax.set_xlabel("iteration")
            ax.grid(True, alpha=0.3)
            if log and all(y > 0 for y in ys) and max(ys) > 10 * min(ys):  # spikes: a log scale shows both
                ax.set_yscale("log")
            for at in resumes:
                ax.axvline(at, color="grey", linestyle="--", linewidth=0.8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def plot_run(path: str | Path, out: str | Path | None = None) -> tuple[Path, list[dict], list[Path]]:
    """Draw the run at ``path`` (work dir or log dir); the PNG goes to ``out`` or ``<newest log dir>/curves.png``.

    Returns ``(png, rows, log_dirs)``."""
    rows, dirs, resumes = collect(path)
    if not rows:
        raise ConfigError(f"{dirs[-1] / SCALARS_FILE} has no rows yet: nothing to plot")
    target = Path(out) if out is not None else dirs[-1] / CURVES_FILE
    title = f"{dirs[-1].parent.name}/{dirs[-1].name}"
    if len(dirs) > 1:
        title += f" (resumed: {len(dirs)} log dirs)"
    return draw(rows, target, title, resumes), rows, dirs
