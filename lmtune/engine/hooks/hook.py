"""The hook interface, where hooks and user code have always imported it from (it lives in lmtune.core.hook)."""

from lmtune.core.hook import PRIORITIES, Hook, RunView, priority_value

__all__ = ["PRIORITIES", "Hook", "RunView", "priority_value"]
