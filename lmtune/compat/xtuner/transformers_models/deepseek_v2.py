"""``DeepseekV2ForCausalLM`` under XTuner's import path, backed by transformers' own implementation.

XTuner's configs pass ``moe_implementation`` and ``expert_in_one_shard`` (options of XTuner's
sharded-expert kernels). transformers' DeepSeek-V2 has its own expert implementation, so those
two arguments are accepted and ignored, with one warning.
"""

from __future__ import annotations

from typing import Any

from transformers import DeepseekV2ForCausalLM as _DeepseekV2ForCausalLM

from lmtune.core.device import warn_once

_XTUNER_ONLY = ("moe_implementation", "expert_in_one_shard")


class DeepseekV2ForCausalLM(_DeepseekV2ForCausalLM):
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        ignored = [name for name in _XTUNER_ONLY if kwargs.pop(name, None) is not None]
        if ignored:
            warn_once(f"DeepseekV2ForCausalLM: {', '.join(ignored)} (XTuner's expert kernels) ignored; "
                      "transformers' DeepSeek-V2 implementation is used")
        kwargs["trust_remote_code"] = False  # the native class, not the hub's remote code
        return _DeepseekV2ForCausalLM.from_pretrained.__func__(_DeepseekV2ForCausalLM, *args, **kwargs)


__all__ = ["DeepseekV2ForCausalLM"]
