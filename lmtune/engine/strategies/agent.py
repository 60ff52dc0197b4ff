"""torchrun's agent as ``lmtune`` runs it: ``python -m lmtune.engine.strategies.agent <torchrun arguments>``.

The agent of ``torch.distributed.run`` starts and watches the workers; here it also dies with ``lmtune``
(``supervise.die_with_parent``) and, when the run ends, answers once for all workers: the message of the
worker whose error (or stop) ended the run, with that worker's exit code. torchrun's own report of a
failed child (a traceback and a table, exit code 1) is not printed; a worker killed by a signal is named
in one line, with the exit code 128 + signal that a shell reports for a killed process.
"""

from __future__ import annotations

import logging
import os
import sys

from lmtune.engine.strategies.supervise import RESULTS_ENV, answer, die_with_parent, read_results


def _killed(rank: int, failure) -> tuple[int, str] | None:
    code = int(failure.exitcode)
    if code >= 0:
        return None
    # "Signal 6 (SIGABRT)": torchrun's wording, which tests and users search for
    what = f"Signal {-code} ({failure.signal_name()})"
    return 128 - code, f"lmtune: rank {rank} (pid {failure.pid}) died of {what}"


def stopping_signal(exc: BaseException, signal_exception: type) -> int | None:
    """The signal that ``exc`` stands for: that of a ``SignalException`` it is, or that it was raised while handling
    (torch's metrics wrapper raises an UnboundLocalError of its own when the signal lands on its first line)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, signal_exception):
            return int(exc.sigval)
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from lmtune.engine.runner.stop import EXIT_STOPPED

    die_with_parent(parent_pid=int(os.environ["LMTUNE_LAUNCHER_PID"]) if os.environ.get("LMTUNE_LAUNCHER_PID")
                    else None)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    code, killed = 0, None
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        killed = _killed(rank, failure)
        code = killed[0] if killed else int(failure.exitcode) or 1
    except Exception as exc:  # the agent was told to stop (it passed the signal on and waited), or it failed
        signum = stopping_signal(exc, SignalException)
        if signum is None:
            raise
        code = 128 + signum
    results = answer(read_results(os.environ[RESULTS_ENV]), EXIT_STOPPED) if os.environ.get(RESULTS_ENV) else None
    if killed:
        print(killed[1], file=sys.stderr)
        return code
    if results:
        code, message = results
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
