"""A dict with attribute access: what a loaded config and its nested dicts are."""

from __future__ import annotations

from typing import Any


class ConfigDict(dict):
    """``dict`` whose keys can also be read and written as attributes.

    Nested plain dicts are converted on assignment, so ``cfg.model.llm.lr`` works
    at any depth. It stays a real ``dict`` so every callable that takes a dict
    (``BitsAndBytesConfig(**cfg)``, ``json.dumps``) accepts it unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    @staticmethod
    def _wrap(value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, ConfigDict):
            return ConfigDict(value)
        if isinstance(value, list):
            return [ConfigDict._wrap(v) for v in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(ConfigDict._wrap(v) for v in value)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, self._wrap(value))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def copy(self) -> ConfigDict:
        return ConfigDict(self)

    def __deepcopy__(self, memo: dict) -> ConfigDict:
        import copy

        out = ConfigDict()
        memo[id(self)] = out
        for key, value in self.items():
            dict.__setitem__(out, copy.deepcopy(key, memo), copy.deepcopy(value, memo))
        return out

    def to_dict(self) -> dict:
        """A plain nested ``dict`` copy (lists and tuples walked too)."""

        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            if isinstance(value, tuple) and not hasattr(value, "_fields"):
                return tuple(plain(v) for v in value)
            return value

        return plain(self)
