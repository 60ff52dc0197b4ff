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
import importlib
import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any

from lmtune.core.dist import is_main_process
from lmtune.core.errors import ConfigError, nearest

logger = logging.getLogger("lmtune")

__all__ = ["BaseVisBackend", "LocalVisBackend", "MLflowVisBackend", "TensorboardVisBackend", "Visualizer",
           "WandbVisBackend", "build_visualizer", "config_hparams"]


def _require(backend: str, module: str, pip: str) -> Any:
    """Import ``module`` for ``backend``, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"visualizer: {backend} needs the {pip.split()[-1]} package, which cannot be imported "
                          f"({exc}). Install it with `{pip}`, or remove {backend} from visualizer.vis_backends"
                          ) from None


def _number(value: Any) -> float | None:
    """``value`` as a finite-or-not float if it is a plain number (or a one-element tensor), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def config_hparams(cfg: Any, max_len: int = 250) -> dict[str, Any]:
    """The config's top-level plain settings (``lr``, ``batch_size``, ``max_length``, paths...).

    Trackers show them as the run's hyperparameters; objects, dicts and private names are left out,
    and long strings are cut to ``max_len`` characters."""
    hparams: dict[str, Any] = {}
    for key, value in dict(cfg or {}).items():
        if not isinstance(key, str) or key.startswith("_"):
            continue
        if isinstance(value, (bool, int, float)) or value is None:
            hparams[key] = value
        elif isinstance(value, str):
            hparams[key] = value[:max_len]
    return hparams


class BaseVisBackend:
    """A tracker that receives scalars and the config. Subclasses start their writer lazily, on rank 0,
    at the first write (so a run that fails while it is being built leaves no empty tracker run)."""

    def __init__(self, save_dir: str | None = None) -> None:
        self._save_dir = Path(save_dir) if save_dir is not None else None
        self._log_dir: Path | None = None
        self._work_dir: Path | None = None
        self._cfg: Any = None
        self._env: Any = None
        self._started = False

    # -- where the run lives ---------------------------------------------------
    def bind(self, save_dir: Path | None, log_dir: Path | None, work_dir: Path | None, cfg: Any) -> None:
        """Told by the Visualizer where this run's files go; ``save_dir`` set in the config wins."""
        if self._save_dir is None and save_dir is not None:
            self._save_dir = Path(save_dir)
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._cfg = cfg

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def experiment(self) -> Any:
        """The underlying writer (MMEngine's name), started if it was not."""
        self._ensure_started()
        return self._env

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._env = self._init_env()

    # -- what subclasses implement -----------------------------------------------
    def _init_env(self) -> Any:
        return None

    def add_config(self, cfg_text: str, **kwargs: Any) -> None:
        pass

    def add_scalars(self, scalars: dict[str, Any], step: int = 0, **kwargs: Any) -> None:
        pass

    def add_scalar(self, name: str, value: Any, step: int = 0, **kwargs: Any) -> None:
        self.add_scalars({name: value}, step)

    def close(self) -> None:
        pass


class LocalVisBackend(BaseVisBackend):
    """The JSONL scalars file.

    Within a training run the LoggerHook always writes every scalar to ``<log_dir>/scalars.jsonl`` and
    the Runner writes the config into the log dir, so this backend writes nothing more there. Used on its
    own (a Visualizer built outside a run, with a ``save_dir``), it appends ``{..., "step": N}`` lines to
    ``<save_dir>/<scalar_save_file>`` and writes the config to ``<save_dir>/<config_save_file>``.
    """

    def __init__(self, save_dir: str | None = None, img_save_dir: str = "vis_image",
                 config_save_file: str = "config.py", scalar_save_file: str = "scalars.json") -> None:
        """``img_save_dir`` is accepted for MMEngine configs; lmtune draws no images."""
        super().__init__(save_dir)
        self._config_file = config_save_file
        self._scalar_file = scalar_save_file

    @property
    def _in_run(self) -> bool:
        return self._log_dir is not None

    def _init_env(self) -> Any:
        if self._in_run or self._save_dir is None:
            return None
        self._save_dir.mkdir(parents=True, exist_ok=True)
        return self._save_dir

    def add_config(self, cfg_text: str, **kwargs: Any) -> None:
        if self.experiment is not None:
            (self.experiment / self._config_file).write_text(cfg_text, encoding="utf-8")

    def add_scalars(self, scalars: dict[str, Any], step: int = 0, **kwargs: Any) -> None:
        if self.experiment is None:
            return
        row = {k: v for k, v in ((k, _number(v)) for k, v in scalars.items()) if v is not None}
        with open(self.experiment / self._scalar_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**row, "step": int(step)}) + "\n")


class TensorboardVisBackend(BaseVisBackend):
    """TensorBoard event files in ``save_dir`` (``<log_dir>/vis_data`` in a run):
    ``tensorboard --logdir <work_dir>`` shows every run of the work dir."""

    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__(save_dir)
        try:
            self._writer_cls = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        except ImportError:
            self._writer_cls = _require(self.name, "tensorboardX", "pip install tensorboard").SummaryWriter

    def _init_env(self) -> Any:
        if self._save_dir is None:
            raise ConfigError("TensorboardVisBackend has no save_dir")
        self._save_dir.mkdir(parents=True, exist_ok=True)
        return self._writer_cls(log_dir=str(self._save_dir))

    def add_config(self, cfg_text: str, **kwargs: Any) -> None:
        # four-space indentation makes TensorBoard's markdown show the config as code
        self.experiment.add_text("config", "\n".join("    " + line for line in cfg_text.splitlines()))

    def add_scalars(self, scalars: dict[str, Any], step: int = 0, **kwargs: Any) -> None:
        writer = self.experiment
        for key, value in scalars.items():
            number = _number(value)
            if number is not None:
                writer.add_scalar(key, number, int(step))
        writer.flush()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()


class WandbVisBackend(BaseVisBackend):
    """Weights & Biases. ``init_kwargs`` are passed to ``wandb.init`` unchanged (``project``, ``name``,
    ``entity``, ``config``, ``mode``...); without a ``config`` the run gets the config's top-level
    settings (``lr``, ``batch_size``...), and its files go to ``save_dir`` unless ``dir`` is given.
    ``mode='offline'`` (or ``WANDB_MODE=offline``) needs no network: ``wandb sync`` uploads later.
    The config file itself is saved with the run."""

    def __init__(self, save_dir: str | None = None, init_kwargs: dict | None = None,
                 define_metric_cfg: dict | list | None = None, commit: bool = True,
                 log_code_name: str | None = None, watch_kwargs: dict | None = None) -> None:
        """``log_code_name`` and ``watch_kwargs`` are accepted for MMEngine configs and have no effect
        (lmtune does not upload source code or watch the model's gradients)."""
        super().__init__(save_dir)
        self._wandb = _require(self.name, "wandb", "pip install wandb")
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise ConfigError(f"WandbVisBackend: init_kwargs must be a dict, got {init_kwargs!r}")
        self._init_kwargs = dict(init_kwargs or {})
        self._define_metric_cfg = define_metric_cfg
        self._commit = commit

    def _init_env(self) -> Any:
        kwargs = dict(self._init_kwargs)
        if self._save_dir is not None and "dir" not in kwargs:
            self._save_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(self._save_dir)
        kwargs.setdefault("config", config_hparams(self._cfg))
        run = self._wandb.init(**kwargs)
        metrics = self._define_metric_cfg
        if isinstance(metrics, dict):
            for metric, summary in metrics.items():
                run.define_metric(metric, summary=summary)
        elif isinstance(metrics, (list, tuple)):
            for item in metrics:
                run.define_metric(**item)
        return run

    def add_config(self, cfg_text: str, **kwargs: Any) -> None:
        run = self.experiment
        folder = Path(self._save_dir or getattr(run, "dir", ".") or ".")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.py"
        path.write_text(cfg_text, encoding="utf-8")
        run.save(str(path), base_path=str(folder), policy="now")

    def add_scalars(self, scalars: dict[str, Any], step: int = 0, **kwargs: Any) -> None:
        row = {k: v for k, v in ((k, _number(v)) for k, v in scalars.items()) if v is not None}
        self.experiment.log(row, step=int(step), commit=self._commit)

    def close(self) -> None:
        if self._env is not None:
            self._env.finish()


class MLflowVisBackend(BaseVisBackend):
    """MLflow. Runs go to ``tracking_uri`` (default: the ``mlruns`` dir of the work dir, so
    ``mlflow ui --backend-store-uri <work_dir>/mlruns`` shows them), experiment ``exp_name``
    (default ``'Default'``), run ``run_name`` (default: the log dir's name). ``params`` (default: the
    config's top-level settings, or those of ``tracked_config_keys``) are logged as parameters; at the end
    the log dir's files ending in ``artifact_suffix`` (log, config, scalars, curves) become artifacts."""

    def __init__(self, save_dir: str | None = None, exp_name: str | None = None, run_name: str | None = None,
                 tags: dict | None = None, params: dict | None = None, tracking_uri: str | None = None,
                 artifact_suffix: tuple | list = (".json", ".jsonl", ".log", ".py", "yaml", ".png"),
                 tracked_config_keys: list | None = None, artifact_location: str | None = None) -> None:
        super().__init__(save_dir)
        self._mlflow = _require(self.name, "mlflow", "pip install mlflow")
        self._exp_name = exp_name or "Default"
        self._run_name = run_name
        self._tags = dict(tags or {})
        self._params = dict(params) if params is not None else None
        self._tracking_uri = tracking_uri
        self._artifact_suffix = tuple(artifact_suffix)
        self._tracked_keys = list(tracked_config_keys) if tracked_config_keys is not None else None
        self._artifact_location = artifact_location

    def default_tracking_uri(self) -> str:
        base = self._work_dir or self._save_dir or Path.cwd()
        return (Path(base).resolve() / "mlruns").as_uri()

    def _init_env(self) -> Any:
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self._tracking_uri or self.default_tracking_uri())
        if self._artifact_location is not None and mlflow.get_experiment_by_name(self._exp_name) is None:
            mlflow.create_experiment(self._exp_name, artifact_location=self._artifact_location)
        mlflow.set_experiment(self._exp_name)
        run_name = self._run_name or (self._log_dir.name if self._log_dir is not None else None)
        mlflow.start_run(run_name=run_name)
        if self._tags:
            mlflow.set_tags(self._tags)
        params = self._params
        if params is None:
            params = config_hparams(self._cfg)
            if self._tracked_keys is not None:
                params = {k: v for k, v in params.items() if k in self._tracked_keys}
        if params:
            mlflow.log_params(params)
        return mlflow

    def add_config(self, cfg_text: str, **kwargs: Any) -> None:
        self.experiment.log_text(cfg_text, "config.py")

    def add_scalars(self, scalars: dict[str, Any], step: int = 0, **kwargs: Any) -> None:
        row = {k: v for k, v in ((k, _number(v)) for k, v in scalars.items())
               if v is not None and math.isfinite(v)}
        self.experiment.log_metrics(row, step=int(step))

    def close(self) -> None:
        if self._env is None:
            return
        if self._log_dir is not None and self._log_dir.is_dir():
            for path in sorted(self._log_dir.iterdir()):
                if path.is_file() and path.name.endswith(self._artifact_suffix):
                    self._env.log_artifact(str(path))
        self._env.end_run()


BACKENDS = {cls.__name__: cls for cls in (LocalVisBackend, TensorboardVisBackend, WandbVisBackend,
                                          MLflowVisBackend)}


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
