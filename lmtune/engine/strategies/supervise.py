"""Keeping the processes of a multi-process run together, and one answer from them.

``NPROC_PER_NODE=N lmtune train`` starts torchrun's agent (``agent``) as a child, and the agent the
workers. Three rules hold the tree together:

- A child dies with its parent: the agent and every worker ask the kernel for SIGTERM when their parent
  goes (``die_with_parent``), so killing the launcher, or the agent with ``kill -9``, never leaves workers
  training unsupervised. SIGTERM makes a worker save and stop like any other stop request.
- Signals reach each process once: the agent runs in its own session (the terminal's Ctrl-C reaches only
  ``lmtune``), and ``lmtune`` passes SIGTERM, SIGINT and SIGUSR1 on. A second Ctrl-C kills the whole tree.
- One answer: each worker that ends with an error or a stop writes ``rank<R>.json`` (exit code and message)
  into ``RESULTS_ENV``'s directory instead of printing it; the agent prints the one that ended the run and
  exits with its code, the code a single process would have given.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULTS_ENV = "LMTUNE_RESULTS_DIR"
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Have the kernel send ``signum`` to this process when its parent exits (Linux; elsewhere a no-op).

    ``parent_pid``, recorded by the parent before it started this process, catches a parent that died
    before the request took effect (comparing with 1 would not: in a container the parent may be pid 1)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (from ``/proc``; empty where there is none)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            todo.extend(children)
    return found


def run_supervised(command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` in its own session, dying with this process, with SIGTERM/SIGINT passed on; returns
    its exit code. A second SIGINT kills it and everything below it."""
    parent = os.getpid()
    proc = subprocess.Popen(command, env=env, start_new_session=True,
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))
    interrupts = 0

    def forward(signum: int, frame) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                for pid in [*descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if interrupts > 1:
        print("lmtune: interrupted (the processes were killed without saving)", file=sys.stderr)
        return 130
    return code if code >= 0 else 128 - code


# ------------------------------------------------------------------ the workers' answers

def report_result(code: int, message: str) -> bool:
    """In a supervised worker, record how it ended for the agent to tell (True); elsewhere False, and the
    caller prints the message itself."""
    directory = os.environ.get(RESULTS_ENV)
    if not directory:
        return False
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "code": int(code), "message": message, "time": time.time()}
    path = Path(directory) / f"rank{rank}.json"
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def read_results(directory: str | os.PathLike) -> list[dict]:
    """The workers' records, in the order they were written."""
    records = []
    for path in Path(directory).glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: (r.get("time", 0), r.get("rank", 0)))


def answer(records: list[dict], stop_code: int) -> tuple[int, str] | None:
    """The exit code and message of the run from its workers' records: the first error, else (every rank
    stopped on request) rank 0's stop message; messages of other ranks that differ are added once."""
    if not records:
        return None
    errors = [r for r in records if r["code"] != stop_code]
    first = errors[0] if errors else min(records, key=lambda r: r["rank"])
    everywhere = any(r["rank"] == 0 and r["message"] == first["message"] for r in records)  # not one rank's own
    lines = [first["message"] if everywhere or not errors else f"(rank {first['rank']}) {first['message']}"]
    seen = {first["message"]}
    for record in errors[1:]:  # another rank's own error of the same kind (its peers' lost connections are not)
        if record["code"] == first["code"] and record["message"] not in seen:
            seen.add(record["message"])
            lines.append(f"(rank {record['rank']}) {record['message']}")
    return first["code"], "\n".join(lines)
