"""Two changes to peft's LoRA layers that cost nothing in results and save time on every step.

1. Under autocast, peft casts each adapter's input to the adapter's dtype (fp32
   master weights), and autocast casts it straight back to bf16/fp16 for the
   adapter's matmuls: two copies of the activations per adapted layer for
   nothing (about a fifth of a bf16 LoRA step on a CPU). A pre-hook turns
   peft's cast off while autocast is on, and on again otherwise (without
   autocast it is what lets 16-bit activations meet fp32 adapters).
2. A plain LoRA ``Linear`` computes ``base(x) + B(A(x)) * scaling``: two more
   passes over the layer's output (the scaling and the sum), in the forward,
   the recomputation and the backward. ``FusedLoraLinear`` does the same in one
   ``addmm(base(x), A(x), B^T, alpha=scaling)`` (outside ``torch.compile``, which
   fuses them itself). Layers with anything else
   (DoRA and other variants, a LoRA bias, several active adapters, merged or
   disabled adapters, mixed-adapter batches, DeepSpeed ZeRO-3 partitions, which
   are gathered only when the adapter module itself is called) run peft's own
   forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from lmtune.core.dist import is_sharded


def _match_autocast(module: nn.Module, args: tuple) -> None:
    x = args[0] if args else None
    if torch.is_tensor(x):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)


class FusedLoraLinear(PeftLinear):
    """peft's LoRA ``Linear`` with the adapter's scaling and sum fused into one ``addmm``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [name for name in self.active_adapters if name in self.lora_A]
        # inside torch.compile (model.torch_compile), peft's forward: inductor fuses the scaling and the sum
        # itself, and its bf16 CPU code for this addmm gave NaN gradients of B
        if (torch.compiler.is_compiling() or args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                or active[0] in self.lora_variant or self.lora_bias.get(active[0], False)):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if is_sharded(lora_b.weight):  # ZeRO-3 gathers B's weight only when B itself is called
            return super().forward(x)
        result = self.base_layer(x)
        out_dtype = result.dtype
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        down = lora_a(self.lora_dropout[name](x))
        flat = result.reshape(-1, result.shape[-1])
        if flat.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            flat = flat.to(down.dtype)  # as peft's sum promotes to the adapter's dtype
        fused = torch.addmm(flat, down.reshape(-1, down.shape[-1]), lora_b.weight.t(),
                            alpha=self.scaling[name])
        return fused.reshape(result.shape).to(out_dtype)


def speed_up_lora_layers(model: nn.Module) -> int:
    """Apply both changes to every LoRA layer of ``model``; returns how many plain Linear layers were fused."""
    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(_match_autocast)
        if type(module) is PeftLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused
