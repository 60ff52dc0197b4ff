"""Building objects from ``dict(type=callable, **kwargs)`` config entries.

Every lmtune component that takes a sub-component accepts either the built
object or its config dict, and calls :func:`build` when it needs the object.
Third-party callables (``AutoModelForCausalLM.from_pretrained``,
``BitsAndBytesConfig``...) cannot build lmtune's dicts, so for them nested
``type`` dicts in the keyword arguments are built first; lmtune's own
components receive nested dicts unbuilt and build them late themselves.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from lmtune.core.errors import ConfigError, nearest

# Stand-ins for what a config names: each route takes ``(fn, kwargs)`` and returns what to call instead,
# or None. The model layer registers one when it is imported (``lmtune.model.ports``: transformers' own
# implementation for a hub-code family's ``Auto*.from_pretrained``, so that no repository code runs). The
# config layer knows no model: it only calls the routes it was given.
CALL_ROUTES: list[Callable[[Callable, dict], Callable | None]] = []


def route_calls(route: Callable[[Callable, dict], Callable | None]) -> None:
    """Let ``route(fn, kwargs)`` replace the callable of every ``build`` (once per route)."""
    if route not in CALL_ROUTES:
        CALL_ROUTES.append(route)


def is_type_dict(value: Any) -> bool:
    return isinstance(value, dict) and "type" in value


def resolve_callable(ref: Any, key: str | None = None) -> Callable:
    """The callable a ``type=`` value names: the object itself or a dotted path."""
    if callable(ref):
        return ref
    if isinstance(ref, str):
        obj = import_dotted(ref) if "." in ref else registry_name(ref)
        if obj is not None:
            return obj
    where = f" at {key!r}" if key else ""
    raise ConfigError(
        f"type={ref!r}{where} is not a callable or an importable dotted path "
        "(write the class or function itself, e.g. type=AutoTokenizer.from_pretrained)"
    )


# Where a bare name in ``type="LinearLR"`` (an MMEngine registry name, as some XTuner configs write it)
# is looked up: lmtune's components under the names MMEngine registers.
REGISTRY_MODULES = ("lmtune.engine.optim", "lmtune.engine.hooks", "lmtune.engine.runner", "lmtune.dataset",
                    "lmtune.model", "torch.optim")


def registry_name(name: str) -> Any | None:
    """The lmtune component an MMEngine registry name such as ``'LinearLR'`` or ``'AdamW'`` stands for."""
    for module_name in REGISTRY_MODULES:
        obj = getattr(importlib.import_module(module_name), name, None)
        if callable(obj):
            return obj
    return None


def import_dotted(path: str) -> Any | None:
    """Import ``pkg.mod.Obj.attr`` by trying the longest importable module prefix."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _is_own(fn: Callable) -> bool:
    target = getattr(fn, "__self__", None) or fn
    module = getattr(target, "__module__", "") or ""
    return module == "lmtune" or module.startswith("lmtune.")


def _build_nested(value: Any, key: str) -> Any:
    if is_type_dict(value):
        return build(value, key=key)
    if isinstance(value, dict):
        return {k: _build_nested(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_build_nested(v, f"{key}.{i}") for i, v in enumerate(value))
    return value


def _takes(fn: Callable, name: str) -> bool:
    try:
        check_kwargs(fn, {name: None}, None)
    except ConfigError:
        return False
    return True


def check_kwargs(fn: Callable, kwargs: dict, key: str | None) -> None:
    """Reject keyword arguments ``fn`` does not accept, naming the nearest one it does."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in kwargs:
        if name not in accepted:
            where = f"{key}.{name}" if key else name
            raise ConfigError(
                f"unknown key {where!r}: {getattr(fn, '__qualname__', fn)} takes no argument "
                f"{name!r}{nearest(name, accepted)}"
            )


def _check_local_path(fn: Callable, kwargs: dict, key: str | None) -> None:
    """``from_pretrained`` of a path that looks local but is missing: say so, not 'bad repo id'."""
    from lmtune.core.paths import check_model_path

    if getattr(fn, "__name__", "") == "from_pretrained":
        check_model_path(kwargs.get("pretrained_model_name_or_path"), key or "from_pretrained",
                         "set pretrained_model_name_or_path to a local model dir or a hub id")


# Arguments a library has since removed, as older configs (XTuner's) still pass them: (module, function) ->
# {old name: (new name or None to drop, how a value becomes the new one)}. Each is replaced with one warning.
RETIRED_ARGUMENTS: dict[tuple[str, str], dict[str, tuple[str | None, Callable[[Any], Any]]]] = {
    ("datasets.load", "load_dataset"): {
        "ignore_verifications": ("verification_mode", lambda v: "no_checks" if v else "basic_checks"),
        "use_auth_token": ("token", lambda v: v),
        "task": (None, lambda v: v),
    },
}


def _replace_retired(fn: Callable, kwargs: dict, key: str | None) -> dict:
    """``kwargs`` with the arguments ``fn``'s library removed replaced by their successors (one warning each)."""
    retired = RETIRED_ARGUMENTS.get((getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")))
    if not retired or not set(kwargs) & set(retired):
        return kwargs
    from lmtune.core.device import warn_once

    kwargs = dict(kwargs)
    for old in sorted(set(kwargs) & set(retired)):
        new, convert = retired[old]
        value = kwargs.pop(old)
        where = f"{key}." if key else ""
        if new is None:
            warn_once(f"{where}{old}={value!r} is dropped: {fn.__qualname__} no longer takes it")
        elif new not in kwargs:
            kwargs[new] = convert(value)
            warn_once(f"{where}{old}={value!r} is passed as {new}={kwargs[new]!r}: {fn.__qualname__} renamed it")
        else:
            warn_once(f"{where}{old}={value!r} is dropped: {fn.__qualname__} no longer takes it and {new} is set")
    return kwargs


def build(cfg: Any, key: str | None = None, **defaults: Any) -> Any:
    """Build ``cfg`` if it is a ``dict(type=...)``; return anything else unchanged.

    ``defaults`` fill arguments the config does not set (a runner passes the
    optimizer to a scheduler this way); a default the callable does not take is
    left out. ``key`` is the config path used in
    error messages, e.g. ``'model.llm'``.
    """
    if not is_type_dict(cfg):
        return cfg
    kwargs = dict(cfg)
    fn = resolve_callable(kwargs.pop("type"), key)
    if not _is_own(fn):
        kwargs = {k: _build_nested(v, f"{key}.{k}" if key else k) for k, v in kwargs.items()}
    for name, value in defaults.items():
        if name not in kwargs and _takes(fn, name):
            kwargs[name] = value
    kwargs = _replace_retired(fn, kwargs, key)
    check_kwargs(fn, kwargs, key)
    _check_local_path(fn, kwargs, key)
    call = next((c for c in (route(fn, kwargs) for route in CALL_ROUTES) if c is not None), fn)
    try:
        return call(**kwargs)
    except (TypeError, ValueError) as exc:
        # raised by the callable for the values it was given: a config mistake, reported with its key
        name = getattr(fn, "__qualname__", repr(fn))
        raise ConfigError(f"{key or name}: {name} rejected its arguments: {type(exc).__name__}: {exc}") from exc
