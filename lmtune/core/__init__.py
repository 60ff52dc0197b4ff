"""lmtune's ground floor: what every part may import; it imports nothing of lmtune.

- ``errors``: ``UserError`` (a mistake the user can fix: one message, exit 2) and ``nearest`` hints;
- ``constants``: ``IGNORE_INDEX`` and the other values shared by data, model and hooks;
- ``dist``: ``torch.distributed`` helpers that also work in a single process;
- ``device``: the device and training dtype of this process, ``warn_once``.
"""
