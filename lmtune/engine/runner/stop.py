"""Stopping a run on request: SIGTERM (preemption, ``docker stop``, a scheduler's time limit), SIGUSR1
(Slurm's ``--signal=USR1@secs`` warning) or a first Ctrl-C.

The handler only records the request. The training loop asks at the start of every optimizer step, all
ranks together (the flag travels in the step's token count reduction, so it costs no extra collective),
and stops before that step: the previous step is complete. The runner then saves a checkpoint on every
rank and raises ``RunStopped``; the command line prints how to resume and exits with ``EXIT_STOPPED``.
A second Ctrl-C stops at once (``KeyboardInterrupt``), without saving.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

# EX_TEMPFAIL of sysexits.h: stopped on request, resumable; distinct from errors (1, 2) and from being killed
EXIT_STOPPED = 75


class StopTraining(Exception):
    """Raised inside the loop at a step boundary once every rank knows a stop was requested."""


class RunStopped(Exception):
    """A run that stopped on a signal, after saving ``checkpoint`` (None when no checkpoint could be saved)."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: Path | None, work_dir: Path) -> None:
        self.signal_name, self.iteration, self.checkpoint, self.work_dir = signal_name, iteration, checkpoint, work_dir
        saved = f"checkpoint {checkpoint} saved" if checkpoint else "no new checkpoint could be saved (see above)"
        super().__init__(f"stopped by {signal_name} after iteration {iteration}; {saved}")


class StopRequests:
    """Installs the handlers for the length of a run (main thread only; elsewhere it does nothing)."""

    # SIGUSR1: what Slurm's `--signal=USR1@120` sends ahead of a time limit (as PyTorch Lightning expects)
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested: str | None = None  # the first signal's name
        self._interrupts = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            print(f"lmtune: {self.requested} received: finishing the current step, then saving a checkpoint "
                  "(Ctrl-C again stops at once, without saving)", file=sys.stderr, flush=True)
