"""Checks for 4-bit (QLoRA) training before any weights are loaded."""

from __future__ import annotations

from lmtune.core.errors import ConfigError

_SWITCH = ("To fine-tune with LoRA instead, set quantization_config=None in the model.llm dict "
           "of your config (or pass --cfg-options model.llm.quantization_config=None).")


def check_4bit_backend(device: str, compute_dtype) -> None:
    """Raise a one-sentence ConfigError when bitsandbytes cannot quantize on ``device``."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.functional import quantize_4bit
    except ImportError:
        raise ConfigError("This config asks for 4-bit QLoRA, but bitsandbytes is not installed "
                          "(pip install 'lmtune[qlora]'). " + _SWITCH) from None
    try:
        probe = torch.ones(64, 64, dtype=compute_dtype or torch.float32, device=device)
        quantize_4bit(probe, quant_type="nf4")
    except Exception as exc:  # noqa: BLE001 - any failure means no usable backend
        raise ConfigError(f"This machine has no bitsandbytes 4-bit backend for the {device} device "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                          + _SWITCH) from None
