"""The tracker backends under MMEngine's names (local scalars, TensorBoard, Weights & Biases, MLflow); the
``Visualizer`` that drives them and what each does are described in ``lmtune.engine.logging.visualization``."""

from __future__ import annotations

import importlib
import json
import math
import numbers
from pathlib import Path
from typing import Any

from lmtune.core.errors import ConfigError


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


__all__ = ["BACKENDS", "BaseVisBackend", "LocalVisBackend", "MLflowVisBackend", "TensorboardVisBackend",
           "WandbVisBackend", "config_hparams"]
