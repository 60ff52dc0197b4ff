"""Loading, overriding and dumping pure-Python config files.

A config is a Python file. Running it binds names; every top-level name that is
not a module, not bound by an import and not private becomes a config key.
Objects are written as ``dict(type=callable, **kwargs)`` and built later by the
component that needs them (:mod:`lmtune.config.build`).

Overrides: ``lr=1e-4`` (a top-level name) re-runs the file with ``lr`` replaced
right where the file assigns it, so every value derived from it follows.
``optim_wrapper.optimizer.lr=1e-4`` (a nested key) is set after loading.
"""

from __future__ import annotations

import ast
import copy
import enum
import inspect
import keyword
import math
import os
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from lmtune.config.aliases import config_builtins, make_import
from lmtune.config.build import check_kwargs, import_dotted, is_type_dict, resolve_callable
from lmtune.config.configdict import ConfigDict
from lmtune.core.constants import ADDABLE_SETTINGS
from lmtune.core.errors import ConfigError, nearest

_OVERRIDE_VAR = "__lmtune_overrides__"


# Packages whose dotted names (torch.optim.SGD, torch.bfloat16) a command-line value may name. Other
# dotted text stays a string unless its package is already imported: `data.jsonl` must never import
# and run a `data.py` that happens to sit in the working directory.
# The packages whose classes and functions a --cfg-options value may name (``torch.bfloat16``,
# ``type='torch.optim.SGD'``): a value is a literal or names a component of these, never any callable of
# any installed module (``os.system``). A config file itself, being the user's code, may import anything.
VALUE_PACKAGES = {"torch", "transformers", "peft", "datasets", "bitsandbytes", "deepspeed", "lmtune", "math"}


def _foreign_dotted_name(text: str) -> bool:
    """Whether ``text`` is a dotted name of an importable module outside ``VALUE_PACKAGES``."""
    parts = text.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts) or parts[0] in VALUE_PACKAGES:
        return False
    import importlib.util

    try:
        return importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        return False


def _check_value_names(value: Any, where: str) -> None:
    """No string inside an override value names a component outside ``VALUE_PACKAGES`` (build() would import
    and call it)."""
    if isinstance(value, str):
        if _foreign_dotted_name(value):
            raise ConfigError(f"--cfg-options {where}={value!r}: a value may name classes and functions of "
                              f"{', '.join(sorted(VALUE_PACKAGES))} only; set anything else in the config file")
    elif isinstance(value, dict):
        for item in value.values():
            _check_value_names(item, where)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            _check_value_names(item, where)


def read_config_text(path: Path) -> str:
    """A config file's text; one that is not UTF-8 is named with the offending byte's line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: the file is not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save it as UTF-8 (Python source files are UTF-8 by default)") from None


def _literal(node: ast.AST) -> Any:
    """A Python literal, where a dict may also be written ``dict(key=value, ...)`` as configs write them."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" \
            and not node.args and all(kw.arg for kw in node.keywords):
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(item) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    return ast.literal_eval(node)


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (dicts also as ``dict(a=1)``), a dotted name from a known package,
    or a string.

    A value that opens a list, tuple, dict or string literal must be one: ``[0.9,`` (a lost closing
    bracket) is an error, not the string ``'[0.9,'``."""
    try:
        return _literal(ast.parse(text, mode="eval").body)
    except (ValueError, SyntaxError, TypeError) as exc:
        if text and (text[0] in "[({'\"" or text.startswith("dict(")):
            raise ConfigError(f"{text!r} is not a Python value ({type(exc).__name__}: {exc}); close its "
                              "brackets and quotes, or quote the whole value to pass a string") from None
    parts = text.split(".")
    if len(parts) > 1 and all(p.isidentifier() for p in parts) and parts[0] in VALUE_PACKAGES:
        obj = import_dotted(text)
        if obj is not None:
            return obj
    return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``['a.b=1', 'c=x']`` -> ``{'a.b': 1, 'c': 'x'}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--cfg-options expects KEY=VALUE, got {item!r}")
        try:
            parsed = parse_value(value.strip())
        except ConfigError as exc:
            raise ConfigError(f"--cfg-options {key.strip()}: {exc}") from None
        _check_value_names(parsed, key.strip())
        out[key.strip()] = parsed
    return out


class _InjectOverrides(ast.NodeTransformer):
    """After each top-level assignment to an overridden name, re-bind it to the override."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.seen: set[str] = set()

    def visit_Module(self, node: ast.Module) -> ast.Module:
        body: list[ast.stmt] = []
        for stmt in node.body:
            body.append(stmt)
            for name in sorted(_assigned_names(stmt) & self.names):
                self.seen.add(name)
                body.append(ast.parse(f"{name} = {_OVERRIDE_VAR}[{name!r}]").body[0])
        node.body = body
        return ast.fix_missing_locations(node)


_NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
               ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _assigned_names(stmt: ast.AST) -> set[str]:
    """Names a top-level statement binds at module scope (``if``/``for``/``with`` bodies included)."""
    if isinstance(stmt, _NEW_SCOPES):
        return set()
    names: set[str] = set()
    if isinstance(stmt, ast.Name) and isinstance(stmt.ctx, ast.Store):
        names.add(stmt.id)
    for child in ast.iter_child_nodes(stmt):
        names |= _assigned_names(child)
    return names


def _imported_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                names.add((alias.asname or alias.name).split(".")[0])
    return names


class Config(ConfigDict):
    """A loaded config: its keys, plus the file it came from (``cfg.filename``) and that file's text
    (``cfg.source``)."""

    @classmethod
    def fromfile(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return cls.fromtext(read_config_text(path), path, overrides)

    @classmethod
    def fromtext(cls, source: str, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
        """A config from its text, run as if it were the file ``path`` (which need not exist: a config of
        the library, rendered on demand). ``cfg.source`` keeps the text."""
        path = Path(path)
        overrides = dict(overrides or {})
        top = {k: v for k, v in overrides.items() if "." not in k}
        nested = {k: v for k, v in overrides.items() if "." in k}
        namespace = _run_config(path, source, top)
        cfg = cls()
        memo: dict[int, Any] = {}
        for key, value in namespace.items():
            dict.__setitem__(cfg, key, _convert_shared(value, memo))
        dict.__setattr__(cfg, "filename", str(path.resolve()))
        dict.__setattr__(cfg, "source", source)
        for key, value in nested.items():
            cfg.set_nested(key, value)
        return cfg

    def set_nested(self, dotted: str, value: Any) -> None:
        """Set ``a.b.0.c`` to ``value``; an unknown key is an error naming the nearest one."""
        parts = dotted.split(".")
        node: Any = self
        walked: list[str] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(walked) or "<top level>"
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"--cfg-options {dotted}: {where} is a list of {len(node)}; "
                                      f"{part!r} is not a valid index")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if part not in node and not _accepts(node, part):
                    raise ConfigError(f"--cfg-options: unknown key {dotted!r} ({part!r} is not in "
                                      f"{where}{nearest(part, [*node.keys(), *_parameters(node)])})")
                if part not in node and not last:
                    raise ConfigError(f"--cfg-options {dotted}: {where} does not set {part!r} yet, so there "
                                      f"is nothing inside it to change; set it whole, e.g. "
                                      f"{'.'.join([*walked, part])}=\"{{'key': value}}\"")
                if last:
                    node[part] = value
                else:
                    node = node[part]
            else:
                raise ConfigError(f"--cfg-options {dotted}: {where} is a {type(node).__name__}, "
                                  "not a dict or list")
            walked.append(part)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the effective config as Python that :meth:`fromfile` loads back."""
        Path(path).write_text(dumps(self), encoding="utf-8")


def _parameters(node: dict) -> list[str]:
    """The argument names of a ``dict(type=fn)``'s ``fn`` (for did-you-mean hints)."""
    if not is_type_dict(node):
        return []
    try:
        params = inspect.signature(resolve_callable(node["type"])).parameters
    except (ConfigError, TypeError, ValueError):
        return []
    return [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _convert_shared(value: Any, memo: dict[int, Any]) -> Any:
    """Dicts -> ConfigDicts, keeping shared objects shared.

    A config that writes ``tokenizer=tokenizer`` in three places refers to one
    dict; it stays one object, so ``--cfg-options tokenizer.padding_side=left``
    changes it everywhere it is used, as the file's own Python semantics say.
    """
    if isinstance(value, dict) or (isinstance(value, list) and not isinstance(value, tuple)):
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, dict):
            out: Any = ConfigDict()
            memo[id(value)] = out
            for k, v in value.items():
                dict.__setitem__(out, k, _convert_shared(v, memo))
        else:
            out = []
            memo[id(value)] = out
            out.extend(_convert_shared(v, memo) for v in value)
        return out
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_convert_shared(v, memo) for v in value)
    return value


def _accepts(node: dict, key: str) -> bool:
    """A new key is fine in a ``dict(type=fn)`` whose ``fn`` takes that argument."""
    if not is_type_dict(node):
        return False
    try:
        fn = resolve_callable(node["type"])
        check_kwargs(fn, {key: None}, None)
    except ConfigError:
        return False
    return True


_BASE_REFERENCE = re.compile(r"""(['"]?)\{\{\s*_base_\.([\w.]+)\s*\}\}\1""")


def _base_list(path: Path, tree: ast.Module) -> tuple[Any, ast.Module]:
    """MMEngine's ``_base_ = '...'`` / ``[...]`` assignment of a config (None when it has none), and the
    tree without it: the name ``_base_`` then means the merged base config while the file runs."""
    bases, body = None, []
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "_base_" for t in targets):
            try:
                bases = ast.literal_eval(stmt.value)
            except ValueError:
                raise ConfigError(f"{path}:{stmt.lineno}: _base_ must be a file name or a list of file names "
                                  "(literal strings)") from None
            continue
        body.append(stmt)
    tree.body = body
    return bases, tree


def _run_config(path: Path, source: str, overrides: dict[str, Any]) -> dict[str, Any]:
    reference = _BASE_REFERENCE.search(source)
    if reference:  # MMEngine's {{_base_.name}}: the base config's value, inserted as is
        source = _BASE_REFERENCE.sub(lambda m: f"_base_.{m.group(2)}", source)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: syntax error in config: {exc.msg}") from None
    bases, tree = _base_list(path, tree)
    if reference and not bases:
        line = source[: reference.start()].count("\n") + 1
        raise ConfigError(f"{path}:{line}: {reference.group(0)} refers to a base config, but the file sets no "
                          "_base_ = [...]")
    base = _load_bases(path, bases) if bases else None
    injector = _InjectOverrides(set(overrides))
    tree = injector.visit(tree)
    added = {name: overrides[name] for name in set(overrides) - injector.seen if name in ADDABLE_SETTINGS}
    unknown = set(overrides) - injector.seen - set(added)
    if unknown:
        name = sorted(unknown)[0]
        known = {n for s in tree.body for n in _assigned_names(s)}
        raise ConfigError(f"--cfg-options: {path} has no top-level setting {name!r}{nearest(name, known)}")
    namespace: dict[str, Any] = {"__file__": str(path.resolve()), "__name__": "__lmtune_config__",
                                 _OVERRIDE_VAR: overrides}
    if base is not None:
        namespace["_base_"] = base  # _base_.model, _base_.optim_wrapper.optimizer.lr ... as in MMEngine
    # imports of xtuner.* / mmengine.* resolve to lmtune while this file runs; relative imports load base configs
    namespace["__builtins__"] = config_builtins(make_import(path.resolve(), _run_file))
    code = compile(tree, str(path), "exec")
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        exec(code, namespace)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the config line
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        line = f":{frames[-1].lineno}" if frames else ""
        raise ConfigError(f"{path}{line}: error while running the config: "
                          f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    skip = _imported_names(tree)
    result = {k: v for k, v in namespace.items()
              if not k.startswith("_") and k not in skip and not isinstance(v, types.ModuleType)}
    result.update(added)
    if base is not None:  # MMEngine's _base_: this file's settings merged over the bases' (as _base_ left them)
        result = _merge(dict(base), result)
    return result


def _run_file(path: Path) -> dict[str, Any]:
    """The settings of another config file (a base config), run without overrides; its dicts are
    ``ConfigDict``s (attribute access, as MMEngine gives a child config), shared objects kept shared."""
    memo: dict[int, Any] = {}
    return {k: _convert_shared(v, memo) for k, v in _run_config(path, read_config_text(path), {}).items()}


def _load_bases(path: Path, bases: Any) -> ConfigDict:
    """The merged settings of MMEngine's ``_base_`` files (later files merge over earlier ones; dicts merge
    key by key unless the later one has ``_delete_=True``)."""
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file {base} not found (looked at {base_path})")
        merged = _merge(merged, _run_file(base_path))
    out = ConfigDict()
    for key, value in merged.items():
        dict.__setitem__(out, key, value)
    return out


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.get("_delete_"):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and value.get("_delete_"):
            out[key] = {k: v for k, v in value.items() if k != "_delete_"}
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- dumping

def dotted_path(obj: Any) -> str | None:
    """The shortest importable dotted path that resolves back to ``obj``."""
    owner = getattr(obj, "__self__", None)
    if owner is not None and inspect.isclass(owner):
        base = dotted_path(owner)
        return f"{base}.{obj.__name__}" if base else None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    parts = module.split(".")
    for cut in range(1, len(parts) + 1):
        candidate = ".".join(parts[:cut] + [qualname])
        if import_dotted(candidate) is obj:
            return candidate
    return None


class _Dumper:
    def __init__(self) -> None:
        self.imports: set[str] = set()

    def ref(self, path: str) -> str:
        obj_path = path
        while obj_path:
            module = obj_path.rsplit(".", 1)[0] if "." in obj_path else obj_path
            try:
                __import__(module)
                self.imports.add(module)
                return path
            except ImportError:
                obj_path = module if "." in module else ""
        return path

    def expr(self, value: Any, indent: int = 0) -> str:
        pad = " " * (indent + 4)
        if isinstance(value, dict):
            if not value:
                return "dict()"
            if all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k) for k in value):
                items = [f"{pad}{k}={self.expr(v, indent + 4)}" for k, v in value.items()]
                return "dict(\n" + ",\n".join(items) + ")"
            items = [f"{pad}{k!r}: {self.expr(v, indent + 4)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(self.expr(v, indent + 4) for v in value) + "]"
        if isinstance(value, tuple):
            inner = ", ".join(self.expr(v, indent + 4) for v in value)
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        if isinstance(value, enum.Enum):  # before str/int: TaskType.CAUSAL_LM is also a str
            path = dotted_path(type(value))
            if path is None:
                raise ConfigError(f"cannot write {value!r} into a config file: its enum has no importable name")
            return f"{self.ref(path)}.{value.name}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"float({str(value)!r})"
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return repr(value)
        try:
            import torch

            if isinstance(value, torch.dtype):
                self.imports.add("torch")
                return str(value)
        except ImportError:  # pragma: no cover
            pass
        path = dotted_path(value)
        if path is not None:
            return self.ref(path)
        raise ConfigError(f"cannot write {value!r} into a config file: it has no importable name")


def dumps(cfg: dict) -> str:
    """Python source for ``cfg`` (imports first, then one assignment per key)."""
    dumper = _Dumper()
    body = [f"{key} = {dumper.expr(copy.copy(value))}" for key, value in cfg.items()]
    head = ["# Effective config written by lmtune; load it with lmtune.config.Config.fromfile."]
    head += [f"import {m}" for m in sorted(dumper.imports)]
    return "\n".join(head) + "\n\n" + "\n".join(body) + "\n"
