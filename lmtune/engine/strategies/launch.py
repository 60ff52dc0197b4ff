"""Starting several processes: re-launching under torchrun, Slurm's environment, process groups.

``NPROC_PER_NODE=N lmtune train cfg.py`` re-runs the same command under
``torch.distributed.run`` (with this Python interpreter), adding
``--launcher pytorch``; ``NNODES``, ``NODE_RANK``, ``ADDR`` and ``PORT`` describe a
multi-node job. Under ``srun`` (``--launcher slurm``) every task is one rank and
the rendezvous comes from Slurm's variables. Either way ``init_distributed``
then creates the process group: gloo on the CPU, nccl on GPUs.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from collections.abc import Mapping

import torch

from lmtune.core.errors import ConfigError

# set in the workers torchrun starts: such a process never re-launches itself
_TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    if number < (0 if name == "NODE_RANK" else 1):
        raise ConfigError(f"environment variable {name}={value!r} is out of range")
    return number


def wants_relaunch(launcher: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``lmtune`` should start itself again under torchrun (NPROC_PER_NODE or NNODES above 1)."""
    environ = os.environ if environ is None else environ
    if launcher != "none" or any(name in environ for name in _TORCHRUN_VARS):
        return False
    return _env_int(environ, "NPROC_PER_NODE", 1) > 1 or _env_int(environ, "NNODES", 1) > 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def torchrun_command(argv: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """The torchrun command line that runs ``lmtune <argv> --launcher pytorch`` on this node."""
    environ = os.environ if environ is None else environ
    nproc = _env_int(environ, "NPROC_PER_NODE", 1)
    nnodes = _env_int(environ, "NNODES", 1)
    node_rank = _env_int(environ, "NODE_RANK", 0)
    if node_rank >= nnodes:
        raise ConfigError(f"NODE_RANK={node_rank} but NNODES={nnodes}: node ranks go from 0 to NNODES-1")
    addr = environ.get("ADDR") or "127.0.0.1"
    port = environ.get("PORT")
    if not port:
        if nnodes > 1:
            raise ConfigError("a multi-node run needs PORT (and ADDR, the address of node 0) set to the same "
                              "value on every node")
        port = str(free_port())
    if nnodes > 1 and not environ.get("ADDR"):
        raise ConfigError("a multi-node run needs ADDR: the address of the node with NODE_RANK=0")
    return [sys.executable, "-m", "lmtune.engine.strategies.agent", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}", "--max_restarts=0",
            # passed on to the workers (SIGUSR1: Slurm's --signal warning); the agent's own default lacks it
            "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "-m", "lmtune.cli", *argv, "--launcher", "pytorch"]


def relaunch(argv: list[str]) -> int:
    """Run ``lmtune <argv>`` under torchrun's agent and return the exit code a single process would give.

    The agent stops every worker when one fails (SIGTERM, then SIGKILL after its 30 s), so a rank that
    raises ends the whole run instead of leaving the others waiting in a collective. SIGTERM, SIGUSR1 and
    Ctrl-C are passed on: the workers save and stop (``supervise``). ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
    (default 300 s) is how long the agent waits for that save before it kills them.
    """
    import shutil
    import tempfile

    from lmtune.engine.strategies.supervise import RESULTS_ENV, run_supervised

    command = torchrun_command(argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _env_int(env, "NPROC_PER_NODE", 1))))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    env["LMTUNE_LAUNCHER_PID"] = str(os.getpid())
    results = tempfile.mkdtemp(prefix="lmtune-ranks-")
    env[RESULTS_ENV] = results
    try:
        return run_supervised(command, env)
    finally:
        shutil.rmtree(results, ignore_errors=True)


# ------------------------------------------------------------------ Slurm

def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03,07],gpu5``) as host names."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-", 1)
                width = len(start)
                hosts.extend(f"{prefix}{n:0{width}d}" for n in range(int(start), int(end) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from Slurm's variables."""
    missing = [name for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST") if not environ.get(name)]
    if missing:
        raise ConfigError(f"--launcher slurm: {', '.join(missing)} not set; start lmtune with srun "
                          "(srun ... lmtune train cfg.py --launcher slurm)")
    hosts = expand_nodelist(environ["SLURM_NODELIST"])
    if not hosts:
        raise ConfigError(f"--launcher slurm: cannot read a host from SLURM_NODELIST={environ['SLURM_NODELIST']!r}")
    local = environ.get("SLURM_LOCALID")
    if local is None:
        ntasks_node = int(environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
        local = str(int(environ["SLURM_PROCID"]) % max(ntasks_node, 1))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": local,
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or environ.get("PORT") or "29500",
    }


# ------------------------------------------------------------------ process group

def init_distributed(launcher: str, timeout_minutes: float = 30.0) -> bool:
    """Create the process group for ``launcher`` ('pytorch', 'slurm'; 'none' inside torchrun too).

    Returns whether this process is part of a multi-process run.
    """
    import torch.distributed as dist

    if launcher == "slurm":
        os.environ.update(slurm_environment(os.environ))
    elif launcher == "none" and _env_int(os.environ, "WORLD_SIZE", 1) <= 1:
        return False
    elif launcher == "pytorch" and "RANK" not in os.environ:
        raise ConfigError("--launcher pytorch: RANK/WORLD_SIZE are not set; start lmtune with torchrun, or set "
                          "NPROC_PER_NODE=N and leave --launcher out")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent: end (after a save) if it dies
        from lmtune.engine.strategies.supervise import die_with_parent

        die_with_parent()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                              "start as many processes per node as it has GPUs")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = datetime.timedelta(minutes=float(os.environ.get("LMTUNE_DIST_TIMEOUT_MIN", timeout_minutes)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_world_size() > 1


def init_single_process() -> None:
    """A process group of one, for engines that need one (FSDP2, DeepSpeed) in a plain ``lmtune train``."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def destroy_distributed(finished: bool = False) -> None:
    """Tear the process group down. After a ``finished`` run every rank first waits for the others, so no
    rank closes its connections while a peer still talks on them (gloo then aborts that peer in C++, after
    its work is saved but with a failed exit); after a failure nobody waits for a rank that is gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
