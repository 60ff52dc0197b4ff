"""Weight conversions that transformers' conversion mapping does not ship, as reversible ``ConversionOps``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming


def _only(value):
    return value[0] if isinstance(value, list) else value


class GroupedQKVSplit(ConversionOps):
    """A fused projection whose rows are grouped by key/value head (InternLM2's ``wqkv``) <-> q, k, v.

    With ``G = num_attention_heads / num_key_value_heads`` query heads per key/value head and head
    width ``D``, the fused rows run, for each key/value head in turn: its ``G`` query heads, then its
    key head, then its value head, ``D`` rows each. Query head ``kv * G + g`` is thus the ``g``-th of
    group ``kv``, the order in which transformers repeats key/value heads for grouped attention, so
    the split is a reshape. ``inverse=True`` fuses q, k, v back (the op run on save).
    """

    def __init__(self, inverse: bool = False) -> None:
        self.inverse = inverse

    @staticmethod
    def _shape(config) -> tuple[int, int, int]:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, kv_heads, head_dim

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        heads, kv_heads, head_dim = self._shape(config)
        groups = heads // kv_heads
        if not self.inverse:
            fused = _only(next(iter(input_dict.values())))
            rest = fused.shape[1:]
            rows = fused.reshape(kv_heads, groups + 2, head_dim, *rest)
            q = rows[:, :groups].reshape(heads * head_dim, *rest)
            k = rows[:, groups].reshape(kv_heads * head_dim, *rest)
            v = rows[:, groups + 1].reshape(kv_heads * head_dim, *rest)
            return {t: x.contiguous() for t, x in zip(target_patterns, (q, k, v))}
        q, k, v = (_only(input_dict.pop(p)) for p in source_patterns)
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest),
                           v.reshape(kv_heads, 1, head_dim, *rest)], dim=1)
        return {target_patterns[0]: fused.reshape((heads + 2 * kv_heads) * head_dim, *rest).contiguous()}

    @property
    def reverse_op(self) -> ConversionOps:
        return GroupedQKVSplit(inverse=not self.inverse)


def hub_mapping(renames: list[tuple[str, str]], fused_qkv: str, make_split: Callable[[], ConversionOps],
                kinds: tuple[str, ...] = ("weight", "bias")) -> list:
    """A port's checkpoint conversion: the hub's names renamed (``(pattern, replacement)`` pairs), and its fused
    attention projection ``fused_qkv`` (e.g. ``"attention.wqkv"``) split by a ``make_split()`` op into Llama's q/k/v
    projections, for each of ``kinds`` (weight, bias); transformers reverses both on save."""
    mapping: list = [WeightRenaming(source, target) for source, target in renames]
    for kind in kinds:
        mapping.append(WeightConverter(
            source_patterns=f"{fused_qkv}.{kind}",
            target_patterns=[f"self_attn.q_proj.{kind}", f"self_attn.k_proj.{kind}", f"self_attn.v_proj.{kind}"],
            operations=[make_split()]))
    return mapping
