"""Names of torchvision.transforms that fail when used (see the package docstring)."""

from . import functional  # noqa: F401


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"torchvision.transforms.{name} is a benchmark stub: torchvision is not usable here")

    _Unavailable.__name__ = name
    return _Unavailable
