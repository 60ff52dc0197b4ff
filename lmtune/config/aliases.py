"""XTuner and MMEngine names for configs: what ``from xtuner... import X`` means while a config runs.

A config written for XTuner imports ``xtuner.*`` and a few ``mmengine.*`` modules. While
lmtune runs a config file, its ``import`` statements go through ``config_import``: those
names resolve to lmtune's own implementations, whether or not xtuner or mmengine is
installed. Nothing outside config loading changes: ``import xtuner`` elsewhere still means
the real package (or fails). Relative imports in a config (``from ._base_.x import *``
inside ``with read_base():``) load the named config files, as MMEngine does.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Where a name imported from an XTuner/MMEngine module is found in lmtune, in order.
MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "xtuner": ("lmtune",),
    "xtuner.dataset": ("lmtune.dataset",),
    "xtuner.dataset.collate_fns": ("lmtune.dataset.collate_fns", "lmtune.dataset.preference"),
    "xtuner.dataset.collate_fns.preference_collate_fn": ("lmtune.dataset.preference",),
    "xtuner.dataset.preference_dataset": ("lmtune.dataset.preference",),
    "xtuner.dataset.map_fns": ("lmtune.dataset.map_fns",),
    "xtuner.dataset.samplers": ("lmtune.dataset.samplers",),
    "xtuner.engine": ("lmtune.engine.hooks", "lmtune.engine.runner"),
    "xtuner.engine.hooks": ("lmtune.engine.hooks",),
    "xtuner.engine.runner": ("lmtune.engine.runner",),
    "xtuner.model": ("lmtune.model",),
    "xtuner.model.dpo": ("lmtune.model.preference",),
    "xtuner.model.orpo": ("lmtune.model.preference",),
    "xtuner.model.reward": ("lmtune.model.reward",),
    "xtuner.parallel": ("lmtune.compat.xtuner.parallel",),
    "xtuner.model.transformers_models": ("lmtune.compat.xtuner.transformers_models",),
    "xtuner.evaluation": ("lmtune.engine.evaluation",),
    "xtuner.evaluation.metrics": ("lmtune.engine.evaluation",),
    "xtuner.model.transformers_models.deepseek_v2": ("lmtune.compat.xtuner.transformers_models.deepseek_v2",),
    "xtuner.parallel.sequence": ("lmtune.compat.xtuner.parallel.sequence",),
    "xtuner.utils": ("lmtune.compat.xtuner.utils", "lmtune.core.constants", "lmtune.dataset.templates"),
    "xtuner.utils.templates": ("lmtune.compat.xtuner.utils", "lmtune.dataset.templates"),
    "mmengine.dataset": ("lmtune.dataset.samplers", "lmtune.dataset"),
    "mmengine.hooks": ("lmtune.engine.hooks",),
    "mmengine.optim": ("lmtune.engine.optim",),
    "mmengine.runner": ("lmtune.engine.runner",),
    "mmengine.visualization": ("lmtune.engine.logging.visualization",),
    "mmengine.config": ("lmtune.config.aliases",),
}

ALIASED_PACKAGES = ("xtuner", "mmengine")

# lmtune's own module paths that moved: configs written against an older lmtune keep loading
LEGACY_MODULES: dict[str, tuple[str, ...]] = {
    "lmtune.utils": ("lmtune.core.constants", "lmtune.dataset.templates"),
    "lmtune.utils.constants": ("lmtune.core.constants",),
    "lmtune.utils.templates": ("lmtune.dataset.templates",),
}
MODULE_ALIASES.update(LEGACY_MODULES)

# Optional download/hub packages some configs import at the top. When one is not installed the config
# still loads; what it names fails when it is built (called), saying what to install.
OPTIONAL_PACKAGES = {"modelscope": "pip install modelscope", "openmind": "pip install openmind",
                     "openmind_hub": "pip install openmind_hub"}


class _Missing:
    """Stands for a name from an optional package that is not installed; calling it explains."""

    def __init__(self, dotted: str, hint: str) -> None:
        self._dotted, self._hint = dotted, hint

    def __getattr__(self, name: str) -> _Missing:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self._dotted}.{name}", self._hint)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from lmtune.core.errors import ConfigError

        raise ConfigError(f"{self._dotted} is needed by this config but its package is not installed: "
                          f"{self._hint}")

    def __repr__(self) -> str:
        return f"<{self._dotted} (not installed)>"


def _optional_module(name: str, fromlist: Any) -> Any:
    """What ``import`` gives for a missing optional package: names that explain themselves when called."""
    top = name.split(".")[0]
    hint = OPTIONAL_PACKAGES[top]
    if not fromlist:  # `import modelscope`: attribute chains such as modelscope.msdatasets.MsDataset work
        return _Missing(top, hint)
    shim = types.ModuleType(name)
    for attr in fromlist:
        setattr(shim, attr, _Missing(f"{name}.{attr}", hint))
    return shim


@contextlib.contextmanager
def read_base() -> Iterator[None]:
    """MMEngine's ``with read_base():`` block: the relative imports inside it load base configs.

    lmtune loads a relative import in a config as a config file wherever it appears, so the
    block itself needs to do nothing."""
    yield


class ConfigImportError(ImportError):
    """An import in a config that lmtune cannot satisfy."""


def _lmtune_modules(name: str) -> list[types.ModuleType]:
    targets = MODULE_ALIASES.get(name)
    if targets is None:
        if name.startswith("xtuner."):  # lmtune mirrors XTuner's module paths
            targets = ("lmtune." + name.removeprefix("xtuner."),)
        else:
            raise ConfigImportError(f"{name} is not available in lmtune configs (lmtune provides: "
                                    f"{', '.join(k for k in MODULE_ALIASES if k.startswith(name.split('.')[0]))})")
    modules = []
    for target in targets:
        try:
            modules.append(importlib.import_module(target))
        except ModuleNotFoundError as exc:
            if exc.name is None or not target.startswith(exc.name):
                raise
    if not modules:
        raise ConfigImportError(f"{name} has no counterpart in lmtune")
    return modules


def alias_module(name: str) -> types.ModuleType:
    """A module object standing for XTuner/MMEngine module ``name``: its attributes are lmtune's."""
    modules = _lmtune_modules(name)
    shim = types.ModuleType(name, f"lmtune's stand-in for {name} (config loading only)")
    for module in reversed(modules):
        for attr in sorted(set(dir(module)) | set(getattr(module, "__all__", ()))):  # __all__: lazy names too
            if not attr.startswith("_"):
                setattr(shim, attr, getattr(module, attr))
    return shim


def _missing(name: str, attr: str) -> ConfigImportError:
    return ConfigImportError(f"cannot import {attr!r} from {name}: lmtune does not provide {name}.{attr} "
                             "(remove it from the config, or replace it with an lmtune component)")


def make_import(config_path: Path, load_base: Callable[[Path], dict[str, Any]]) -> Callable[..., Any]:
    """An ``__import__`` for running the config at ``config_path``.

    ``load_base(path)`` runs another config file and returns its variables; it serves
    relative imports (``from ._base_.models.llama import *``).
    """
    real_import = builtins.__import__

    def config_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                      level: int = 0) -> Any:
        if level > 0:
            base_dir = config_path.parent
            for _ in range(level - 1):
                base_dir = base_dir.parent
            parts = name.split(".") if name else []
            target = base_dir.joinpath(*parts)
            if fromlist and not target.with_suffix(".py").is_file() and target.is_dir():
                # `from . import base_cfg`: each name is a file in the package directory
                shim = types.ModuleType(name or ".")
                for attr in fromlist:
                    setattr(shim, attr, _base_module(target / f"{attr}.py", load_base))
                return shim
            return _base_module(target.with_suffix(".py"), load_base)
        top = name.split(".")[0]
        if top in OPTIONAL_PACKAGES:
            try:
                return real_import(name, globals, locals, fromlist, level)
            except ModuleNotFoundError as exc:
                if exc.name is None or exc.name.split(".")[0] != top:
                    raise
                return _optional_module(name, fromlist)
        if top not in ALIASED_PACKAGES and not (fromlist and name in LEGACY_MODULES):
            return real_import(name, globals, locals, fromlist, level)
        if not fromlist:  # `import xtuner.dataset`: the top-level name, with its submodules as attributes
            root = alias_module(top)
            node = root
            for depth in range(1, len(name.split("."))):
                child_name = ".".join(name.split(".")[: depth + 1])
                child = alias_module(child_name)
                setattr(node, name.split(".")[depth], child)
                node = child
            return root
        shim = alias_module(name)
        for attr in fromlist:
            if attr != "*" and not hasattr(shim, attr):
                child = f"{name}.{attr}"
                try:
                    setattr(shim, attr, alias_module(child))
                except ConfigImportError:
                    raise _missing(name, attr) from None
        return shim

    return config_import


def _base_module(path: Path, load_base: Callable[[Path], dict[str, Any]]) -> types.ModuleType:
    if not path.is_file():
        raise ConfigImportError(f"base config {path} not found")
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    for key, value in load_base(path).items():
        setattr(module, key, value)
    return module


def config_builtins(config_import: Callable[..., Any]) -> dict[str, Any]:
    """The builtins a config runs with: the normal ones, with ``__import__`` replaced."""
    namespace = dict(vars(builtins))
    namespace["__import__"] = config_import
    return namespace
