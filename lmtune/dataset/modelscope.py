"""``process_ms_dataset``: a ModelScope hub dataset through ``process_hf_dataset``.

``dataset`` is what XTuner configs pass, ``dict(type=MsDataset.load, dataset_name=...)``,
or just the dataset's name; either is loaded with the ``modelscope`` package, which
lmtune does not require: without it, building the dataset (not loading the config)
stops with a ConfigError saying how to install it. An already loaded dataset (a
ModelScope dataset, a dict of splits, or a ``datasets`` Dataset) is used as it is.
The chosen ``split`` is converted to a Hugging Face dataset and processed by
:func:`~lmtune.dataset.huggingface.process_hf_dataset` with the remaining arguments.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from lmtune.config.build import build, check_kwargs, is_type_dict
from lmtune.core.errors import ConfigError
from lmtune.dataset.huggingface import process_hf_dataset

INSTALL_HINT = "pip install modelscope"


def _from_modelscope(dataset: Any) -> bool:
    """True when loading ``dataset`` takes the modelscope package."""
    if isinstance(dataset, str):
        return True
    if not is_type_dict(dataset):
        return False
    ref = dataset["type"]
    if isinstance(ref, str):
        return ref.split(".")[0] == "modelscope"
    owner = getattr(ref, "__self__", None) or ref
    return str(getattr(owner, "__module__", "")).split(".")[0] == "modelscope"


def _require_modelscope() -> None:
    if importlib.util.find_spec("modelscope") is None:
        raise ConfigError(f"process_ms_dataset loads its data from ModelScope, which needs the modelscope package: "
                          f"{INSTALL_HINT}")


def process_ms_dataset(dataset: Any, split: str = "train", *args: Any, **kwargs: Any):
    """Load (if needed) a ModelScope dataset, take ``split`` and process it like ``process_hf_dataset``;
    the other arguments are ``process_hf_dataset``'s (tokenizer, max_length, dataset_map_fn, ...)."""
    check_kwargs(process_hf_dataset, kwargs, "train_dataset")
    if _from_modelscope(dataset):
        _require_modelscope()
        if isinstance(dataset, str):
            from modelscope.msdatasets import MsDataset

            dataset = MsDataset.load(dataset)
        else:
            dataset = build(dataset, key="train_dataset.dataset")
    else:
        dataset = build(dataset, key="train_dataset.dataset")
    if isinstance(dataset, Mapping):
        if split not in dataset:
            raise ConfigError(f"the ModelScope dataset has no split {split!r} (it has {list(dataset)}); "
                              "set split=...")
        dataset = dataset[split]
    if hasattr(dataset, "to_hf_dataset"):
        dataset = dataset.to_hf_dataset()
    return process_hf_dataset(dataset, *args, split=split, **kwargs)
