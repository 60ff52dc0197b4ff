"""Experiment trackers for the training scalars, under MMEngine's names.

An XTuner or MMEngine config may say::

    from mmengine.visualization import Visualizer, TensorboardVisBackend
    visualizer = dict(type=Visualizer, vis_backends=[dict(type=TensorboardVisBackend)])

While a config loads, ``mmengine.visualization`` means this module. The Runner builds the
visualizer with :func:`build_visualizer`; the LoggerHook then sends it every scalar it logs
(loss, lr, grad norm, time, memory, throughput) with the iteration as the step, and the run's
config before training starts. Only rank 0 writes.

Backends:

* ``LocalVisBackend``: the scalars file. ``<log_dir>/scalars.jsonl`` is always written by the
  LoggerHook (and the config by the Runner), so inside a run this backend adds nothing.
* ``TensorboardVisBackend``: event files in ``<log_dir>/vis_data`` (``torch.utils.tensorboard``,
  or ``tensorboardX``; ``pip install tensorboard``).
* ``WandbVisBackend``: Weights & Biases; ``init_kwargs`` go to ``wandb.init`` as they are
  (``project``, ``name``, ``config``, ``mode='offline'``...; ``WANDB_MODE=offline`` works too).
* ``MLflowVisBackend``: MLflow; the tracking URI defaults to ``<work_dir>/mlruns``.

A backend whose package is missing is a ConfigError when the visualizer is built, before any
data or weights load. A backend that fails later, while training runs, is switched off with a
warning: a tracker never stops a run (``scalars.jsonl`` keeps everything).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from lmtune.core.dist import is_main_process
from lmtune.core.errors import ConfigError, nearest
from lmtune.engine.logging.backends import (
    BACKENDS,
    BaseVisBackend,
    LocalVisBackend,
    MLflowVisBackend,
    TensorboardVisBackend,
    WandbVisBackend,
    _number,
    config_hparams,
)

logger = logging.getLogger("lmtune")

__all__ = ["BaseVisBackend", "LocalVisBackend", "MLflowVisBackend", "TensorboardVisBackend", "Visualizer",
           "WandbVisBackend", "build_visualizer", "config_hparams"]


def _resolve(ref: Any, known: dict[str, Any], key: str) -> Any:
    """A ``type=`` value: the class itself, its MMEngine name (``'TensorboardVisBackend'``) or a dotted path."""
    if callable(ref):
        return ref
    if isinstance(ref, str):
        short = ref.rsplit(".", 1)[-1]
        if ref in known or (ref.startswith("mmengine.visualization.") and short in known):
            return known[short]
        if "." in ref:
            from lmtune.config.build import import_dotted

            obj = import_dotted(ref)
            if callable(obj):
                return obj
        raise ConfigError(f"{key}: unknown type {ref!r}; lmtune provides {', '.join(known)}{nearest(short, known)}")
    raise ConfigError(f"{key}: type={ref!r} is not a class")


def _build_backend(cfg: Any, key: str) -> Any:
    from lmtune.config.build import build

    if not isinstance(cfg, dict):
        if callable(getattr(cfg, "add_scalars", None)):
            return cfg  # an already built backend
        raise ConfigError(f"{key} must be dict(type=...), e.g. dict(type=TensorboardVisBackend); got {cfg!r}")
    if "type" not in cfg:
        raise ConfigError(f"{key} has no type (e.g. dict(type=TensorboardVisBackend))")
    cfg = dict(cfg)
    cfg["type"] = _resolve(cfg["type"], BACKENDS, key)
    return build(cfg, key=key)


class Visualizer:
    """MMEngine's Visualizer, for scalars and the config: sends them to each backend, on rank 0 only.

    ``vis_backends`` is one ``dict(type=...)`` or a list of them (or built backends). Backends without
    their own ``save_dir`` write to ``<save_dir>/vis_data``; in a run ``save_dir`` is the log dir.
    ``image``, ``fig_save_cfg`` and ``fig_show_cfg`` are accepted for MMEngine configs (lmtune draws no
    images).
    """

    _current: Visualizer | None = None

    def __init__(self, name: str = "visualizer", image: Any = None, vis_backends: Any = None,
                 save_dir: str | None = None, fig_save_cfg: dict | None = None,
                 fig_show_cfg: dict | None = None) -> None:
        self.name = name
        self._save_dir = Path(save_dir) if save_dir is not None else None
        if vis_backends is None:
            cfgs: list = []
        elif isinstance(vis_backends, (list, tuple)):
            cfgs = list(vis_backends)
        else:
            cfgs = [vis_backends]
        self._backends = [_build_backend(c, f"visualizer.vis_backends.{i}") for i, c in enumerate(cfgs)]
        self._failed: set[int] = set()
        self._closed = False
        self._atexit = False
        if self._save_dir is not None:
            self.bind(self._save_dir)
        Visualizer._current = self

    @classmethod
    def get_current_instance(cls) -> Visualizer | None:
        """The visualizer built last (MMEngine's accessor for hooks)."""
        return cls._current

    @property
    def backends(self) -> list:
        return list(self._backends)

    def get_backend(self, name: str) -> Any:
        """The backend of class ``name`` (e.g. ``'WandbVisBackend'``), or None."""
        return next((b for b in self._backends if type(b).__name__ == name), None)

    def bind(self, save_dir: str | Path | None = None, log_dir: str | Path | None = None,
             work_dir: str | Path | None = None, cfg: Any = None) -> None:
        """Where this run's files go: backends write to ``<save_dir>/vis_data`` unless they name a dir."""
        if save_dir is not None:
            self._save_dir = Path(save_dir)
        vis_data = self._save_dir / "vis_data" if self._save_dir is not None else None
        for backend in self._backends:
            if hasattr(backend, "bind"):
                backend.bind(vis_data, Path(log_dir) if log_dir else None, Path(work_dir) if work_dir else None,
                             cfg)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._closed or not is_main_process():
            return
        if not self._atexit:  # a run that dies still flushes what its trackers hold
            atexit.register(self.close)
            self._atexit = True
        for i, backend in enumerate(self._backends):
            if i in self._failed:
                continue
            try:
                getattr(backend, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops a training run
                self._failed.add(i)
                logger.warning(f"visualizer: {type(backend).__name__}.{method} failed ({type(exc).__name__}: "
                               f"{exc}); this backend is off for the rest of the run (scalars.jsonl in the "
                               "log dir still has every scalar)")

    def add_config(self, cfg_text: str, **kwargs: Any) -> None:
        """The run's config (Python text) to every backend."""
        self._each("add_config", cfg_text)

    def add_scalars(self, scalars: dict[str, Any], step: int = 0, **kwargs: Any) -> None:
        """Scalars of iteration ``step`` to every backend; values that are not numbers are skipped."""
        numeric = {k: v for k, v in scalars.items() if _number(v) is not None}
        if numeric:
            self._each("add_scalars", numeric, int(step))

    def add_scalar(self, name: str, value: Any, step: int = 0, **kwargs: Any) -> None:
        self.add_scalars({name: value}, step)

    def close(self) -> None:
        """Flush and close every backend; later calls do nothing."""
        if self._closed:
            return
        if is_main_process():
            for i, backend in enumerate(self._backends):
                if i in self._failed:
                    continue
                try:
                    backend.close()
                except Exception as exc:  # noqa: BLE001
                    logger.warning(f"visualizer: closing {type(backend).__name__} failed ({exc})")
        self._closed = True
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False


VISUALIZERS = {"Visualizer": Visualizer}


def build_visualizer(cfg_visualizer: Any, log_dir: str | Path, cfg: Any = None) -> Visualizer | None:
    """The run's visualizer from the config's ``visualizer`` entry; None when that is None.

    ``save_dir`` defaults to the log dir (backends write to ``<log_dir>/vis_data``); the work dir is
    the log dir's parent. Every rank builds it (a missing package fails everywhere alike, as a
    ConfigError); only rank 0 writes."""
    if cfg_visualizer is None:
        return None
    log_dir = Path(log_dir)
    if isinstance(cfg_visualizer, dict):
        from lmtune.config.build import build

        spec = dict(cfg_visualizer)
        spec["type"] = _resolve(spec.get("type", Visualizer), VISUALIZERS, "visualizer")
        spec.setdefault("save_dir", str(log_dir))
        visualizer = build(spec, key="visualizer")
    elif callable(getattr(cfg_visualizer, "add_scalars", None)):
        visualizer = cfg_visualizer
    else:
        raise ConfigError(f"visualizer must be None or dict(type=Visualizer, vis_backends=[...]); "
                          f"got {cfg_visualizer!r}")
    if hasattr(visualizer, "bind"):
        save_dir = getattr(visualizer, "_save_dir", None) or log_dir
        visualizer.bind(save_dir, log_dir, log_dir.parent, cfg)
    return visualizer
