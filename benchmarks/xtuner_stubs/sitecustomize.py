"""Run at start-up by every python of the XTuner side (benchmarks/xtuner_stubs is on its PYTHONPATH).

XTuner 0.2.0 calls ``torch.cpu.is_bf16_supported()`` when it chooses the attention implementation on
a machine without CUDA (``SupervisedFinetune._prepare_for_flash_attn``). torch has no such function
(only ``torch.cuda`` has one), so XTuner cannot build a model on a CPU at all. This answers False:
XTuner then keeps the config's dtype and uses sdpa attention, as it does on a GPU without flash-attn.
Every XTuner process imports torch anyway, so importing it here costs nothing extra.
"""

try:
    import torch
except ImportError:  # not the XTuner environment
    torch = None

if torch is not None and not hasattr(torch.cpu, "is_bf16_supported"):
    torch.cpu.is_bf16_supported = lambda: False
