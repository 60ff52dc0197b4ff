"""Saving a ported model in its hub repository's own layout.

A port keeps, on its config, the hub ``config.json`` it was made from and where that came from
(``config.hub_layout = {"config": {...}, "source": "<dir or hub id>"}``). ``save_pretrained`` then
writes what the original code reads: the weights under their hub names (transformers' conversion
mapping, reverted on save), the hub ``config.json`` (with the values that can change in training,
such as the vocabulary size, brought up to date), and the repository's code files beside them
(``modeling_*.py``, ``configuration_*.py``...), so that the hub code, LMDeploy and vLLM load the
result as they load the original.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CODE_SUFFIX = ".py"


def hub_code_files(hub_config: dict) -> list[str]:
    """The ``.py`` files a hub config's ``auto_map`` names (``"modeling_x.Cls"`` -> ``modeling_x.py``)."""
    names: list[str] = []
    for ref in (hub_config.get("auto_map") or {}).values():
        for item in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(item, str) and "." in item:
                module = item.split("--")[-1].rsplit(".", 1)[0]  # "repo--modeling_x.Cls" refers to another repo
                if "--" not in item and module + CODE_SUFFIX not in names:
                    names.append(module + CODE_SUFFIX)
    return names


def _local_file(source: str, name: str) -> Path | None:
    """``name`` of a local dir or a hub repository (from the cache, or downloaded), or None."""
    path = Path(source) / name
    if path.is_file():
        return path
    if Path(source).is_dir():
        return None
    try:
        from transformers.utils import cached_file

        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def copy_code_files(source: str, hub_config: dict, save_dir: Path) -> list[str]:
    """Copy the repository's code files next to a saved model: those its ``auto_map`` names, and for a
    local source every other ``.py`` beside its ``config.json`` (helpers the modeling file imports)."""
    names = hub_code_files(hub_config)
    if Path(source).is_dir():
        names += sorted(p.name for p in Path(source).glob("*" + CODE_SUFFIX) if p.name not in names)
    copied = []
    for name in names:
        found = _local_file(source, name)
        if found is not None and found.resolve() != (save_dir / name).resolve():
            shutil.copyfile(found, save_dir / name)
            copied.append(name)
    return copied


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class HubLayoutMixin:
    """``save_pretrained`` in the hub layout for the model classes of lmtune's ports.

    A family fills ``hub_config_updates`` with the hub keys whose values follow the model (the
    vocabulary size after ``resize_token_embeddings``...)."""

    def hub_config_updates(self) -> dict[str, Any]:
        return {"vocab_size": self.config.vocab_size}

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        result = super().save_pretrained(save_directory, *args, **kwargs)
        layout = getattr(self.config, "hub_layout", None)
        is_main = kwargs.get("is_main_process", True)
        if not layout or not is_main:
            return result
        save_dir = Path(save_directory)
        hub = dict(layout["config"])
        hub.update(self.hub_config_updates())
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        if dtype is not None:  # the dtype the weights were saved in, under the key transformers 4 reads
            hub["torch_dtype"] = _dtype_name(dtype)
        (save_dir / "config.json").write_text(json.dumps(hub, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        copy_code_files(str(layout["source"]), hub, save_dir)
        return result
