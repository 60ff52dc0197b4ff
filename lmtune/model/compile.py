"""Decoder layers of a causal LM, and compiling them with ``torch.compile``.

``torch.compile`` is applied per decoder layer ("regional" compilation): every
layer of a model runs the same code, so one compiled graph serves them all and
compilation takes seconds rather than minutes, while the embedding, the output
head and the chunked loss stay eager. Attention over packed rows
(``PACKED_SDPA``) is left out of the graphs: its per-sample boundaries change
with every batch and would recompile each time.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmtune.core.errors import ConfigError


def decoder_layers(causal_lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``causal_lm``, found by the class names of its ``_no_split_modules``."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or [])
    return [m for m in causal_lm.modules() if type(m).__name__ in names]


def compile_options(value: Any) -> dict | None:
    """``torch_compile`` of the model config: False/None (off), True (defaults), or torch.compile's kwargs."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        allowed = {"backend", "mode", "dynamic", "fullgraph", "options"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ConfigError(f"model.torch_compile: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        return dict(value)
    raise ConfigError(f"model.torch_compile must be True, False or a dict of torch.compile options, got {value!r}")


def compile_decoder_layers(causal_lm: nn.Module, options: dict) -> int:
    """Compile each decoder layer's forward in place; returns how many were compiled."""
    import torch

    from lmtune.model import packed_attention

    layers = decoder_layers(causal_lm)
    if not layers:
        raise ConfigError(f"model.torch_compile: cannot find the decoder layers of {type(causal_lm).__name__} "
                          "(its _no_split_modules is empty); set torch_compile=False")
    options = {"dynamic": True, **options}  # packed rows and padded batches change length every step
    packed_attention.exclude_from_compile()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(**options)
    return len(layers)
