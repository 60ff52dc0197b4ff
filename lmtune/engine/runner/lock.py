"""One live run per work dir: ``<dir>/.lmtune.lock``.

Rank 0 holds an exclusive ``flock`` on the file for as long as the run lives and writes its pid, host
and start time into it. The kernel drops the lock when the process ends, however it ends, so a lock
file left by a dead run is stale: the next run takes it over (and says whose it was). A second run,
or a ``--resume``, while the first still lives is refused with the holder's pid and host.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from lmtune.core.errors import ConfigError

LOCK_NAME = ".lmtune.lock"


class WorkDirLock:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None
        self.previous_holder: str | None = None  # a stale lock's owner, when one was taken over

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by a live lmtune run ({holder}); a second run there "
                              "would write alongside it. Wait for it to end (or stop it), or choose another "
                              "--work-dir") from None
        previous = os.pread(fd, 4096, 0)
        self.previous_holder = _describe(previous) if previous.strip() else None
        record = f"pid={os.getpid()}\nhost={socket.gethostname()}\nsince={time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _describe(raw: bytes) -> str:
    fields = dict(line.split("=", 1) for line in raw.decode(errors="replace").splitlines() if "=" in line)
    if not fields:
        return "holder unknown"
    return f"pid {fields.get('pid', '?')} on host {fields.get('host', '?')}, since {fields.get('since', '?')}"
