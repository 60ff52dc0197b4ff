"""XTuner hooks that lmtune does not need, accepted so that XTuner configs run unchanged."""

from __future__ import annotations

from lmtune.core.hook import Hook


class VarlenAttnArgsToMessageHubHook(Hook):
    """Accepted for XTuner configs. lmtune passes variable-length attention arguments in the
    batch itself (``position_ids``, ``cumulative_len``), so nothing needs relaying."""


__all__ = ["VarlenAttnArgsToMessageHubHook"]
