"""Configs written for XTuner run unchanged: their xtuner.* / mmengine.* imports resolve to lmtune.

The configs here are written by the test in the shape of XTuner v0.2.0's configs (the same import
lines and five parts); XTuner's own files are not part of the repository.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import lmtune
from lmtune.config import Config, ConfigError
from lmtune.engine import checkpoint as ckpt
from lmtune.engine.runner import Runner

REFERENCE = Path(lmtune.__file__).parent / "configs" / "internlm" / "internlm2_chat_7b_qlora_oasst1_e3.py"

# the import block of XTuner's QLoRA configs, as they write it
XTUNER_IMPORTS = """\
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import oasst1_map_fn, template_map_fn_factory
from xtuner.engine.hooks import (DatasetInfoHook, EvaluateChatHook,
                                 VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.parallel.sequence import SequenceParallelSampler
from xtuner.utils import PROMPT_TEMPLATE
"""


def xtuner_shaped(tmp_path: Path, extra: str = "", name: str = "xtuner_cfg.py") -> Path:
    """The reference config with XTuner's import lines instead of lmtune's."""
    text = REFERENCE.read_text()
    start = text.index("import torch")
    end = text.index("# PART 1")
    text = text[:start] + XTUNER_IMPORTS + "\nsequence_parallel_size = 1\n\n" + text[end:] + extra
    path = tmp_path / name
    path.write_text(text)
    return path


def test_neither_xtuner_nor_mmengine_is_installed_here():
    # the point of the aliases: configs load without those packages
    assert importlib.util.find_spec("xtuner") is None and importlib.util.find_spec("mmengine") is None


def test_an_xtuner_config_runs_unchanged(tmp_path, tiny_model_dir, oasst1_dir):
    path = xtuner_shaped(tmp_path)
    cfg = Config.fromfile(path, {"pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir,
                                 "max_length": 64, "max_epochs": 1, "evaluation_inputs": ["Hi"],
                                 "train_cfg.max_epochs": None, "train_cfg.max_iters": 2,
                                 "model.llm.quantization_config": None, "custom_hooks.1.max_new_tokens": 2})
    from lmtune.engine.hooks import CheckpointHook
    from lmtune.engine.optim import AmpOptimWrapper
    from lmtune.model import SupervisedFinetune

    assert cfg.model.type is SupervisedFinetune and cfg.optim_wrapper.type is AmpOptimWrapper
    assert cfg.default_hooks.checkpoint.type is CheckpointHook
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    runner.train()
    assert ckpt.find_latest(runner.work_dir).name == "iter_2"
    # the effective config names lmtune's components, so it loads back without the aliases
    dumped = (runner.work_dir / "xtuner_cfg.py").read_text()
    assert "xtuner." not in dumped and "mmengine" not in dumped
    assert Config.fromfile(runner.work_dir / "xtuner_cfg.py").model.type is SupervisedFinetune


def test_the_aliases_exist_only_while_a_config_loads(tmp_path):
    Config.fromfile(xtuner_shaped(tmp_path))
    assert "xtuner" not in sys.modules and "mmengine" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        import xtuner  # noqa: F401


def test_configs_written_for_an_older_lmtune_layout_still_load(tmp_path):
    from lmtune.core.constants import IGNORE_INDEX
    from lmtune.dataset import PROMPT_TEMPLATE

    path = tmp_path / "old.py"
    path.write_text("from lmtune.utils import PROMPT_TEMPLATE, IGNORE_INDEX\n"
                    "from lmtune.utils.templates import SYSTEM_TEMPLATE\n"
                    "template = PROMPT_TEMPLATE.internlm2_chat\nignore = IGNORE_INDEX\n"
                    "system = SYSTEM_TEMPLATE.alpaca\n")
    cfg = Config.fromfile(path)
    assert cfg.template == PROMPT_TEMPLATE.internlm2_chat and cfg.ignore == IGNORE_INDEX and cfg.system
    with pytest.raises(ModuleNotFoundError):
        import lmtune.utils  # noqa: F401  (only configs get the old path)


def test_a_name_lmtune_lacks_is_reported_with_its_line(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("x = 1\nfrom xtuner.dataset import NoSuchDataset\n")
    with pytest.raises(ConfigError, match=r"cfg.py:2: .*NoSuchDataset.*xtuner.dataset"):
        Config.fromfile(path)
    path.write_text("from mmengine.fileio import load\n")
    with pytest.raises(ConfigError, match=r"cfg.py:1: .*mmengine.fileio"):
        Config.fromfile(path)


def test_every_name_xtuner_sft_configs_import_resolves(tmp_path):
    """The names XTuner v0.2.0's text SFT configs import (counted from its config tree)."""
    imports = {
        "mmengine.dataset": ["DefaultSampler"],
        "mmengine.hooks": ["CheckpointHook", "DistSamplerSeedHook", "IterTimerHook", "LoggerHook",
                           "ParamSchedulerHook"],
        "mmengine.optim": ["AmpOptimWrapper", "OptimWrapper", "CosineAnnealingLR", "LinearLR", "ConstantLR"],
        "mmengine.config": ["read_base"],
        "xtuner.dataset": ["process_hf_dataset", "ConcatDataset"],
        "xtuner.dataset.collate_fns": ["default_collate_fn"],
        "xtuner.dataset.map_fns": [
            "alpaca_map_fn", "alpaca_zh_map_fn", "oasst1_map_fn", "pretrain_map_fn", "openai_map_fn",
            "code_alpaca_map_fn", "crime_kg_assitant_map_fn", "law_reference_map_fn", "sql_map_fn",
            "arxiv_map_fn", "colors_map_fn", "tiny_codes_map_fn", "openorca_map_fn", "medical_map_fn",
            "msagent_react_map_fn", "template_map_fn_factory"],
        "xtuner.engine": ["DatasetInfoHook", "EvaluateChatHook", "VarlenAttnArgsToMessageHubHook"],
        "xtuner.engine.hooks": ["DatasetInfoHook", "EvaluateChatHook", "VarlenAttnArgsToMessageHubHook",
                                "HFCheckpointHook"],
        "xtuner.engine.runner": ["TrainLoop"],
        "xtuner.model": ["SupervisedFinetune"],
        "xtuner.parallel.sequence": ["SequenceParallelSampler"],
        "xtuner.utils": ["PROMPT_TEMPLATE", "SYSTEM_TEMPLATE"],
    }
    lines = [f"from {module} import {', '.join(names)}" for module, names in imports.items()]
    lines.append("found = [" + ", ".join(n for names in imports.values() for n in names) + "]")
    path = tmp_path / "names.py"
    path.write_text("\n".join(lines) + "\n")
    found = Config.fromfile(path).found
    assert len(found) == sum(len(v) for v in imports.values())
    assert all(value is not None for value in found)


def test_read_base_and_base_list_inheritance(tmp_path):
    base = tmp_path / "_base_"
    base.mkdir()
    (base / "schedule.py").write_text("from mmengine.optim import LinearLR\nlr = 1e-4\nmax_epochs = 3\n"
                                      "param_scheduler = [dict(type=LinearLR, start_factor=0.1, end=10)]\n"
                                      "optim_wrapper = dict(optimizer=dict(lr=lr, weight_decay=0.1))\n")
    child = tmp_path / "child.py"
    child.write_text("from mmengine.config import read_base\n\nwith read_base():\n"
                     "    from ._base_.schedule import *\n\nlr = 2e-4\noptim_wrapper['optimizer']['lr'] = lr\n")
    cfg = Config.fromfile(child)
    from lmtune.engine.optim import LinearLR

    assert cfg.lr == 2e-4 and cfg.max_epochs == 3 and cfg.param_scheduler[0]["type"] is LinearLR
    assert cfg.optim_wrapper.optimizer.lr == 2e-4 and cfg.optim_wrapper.optimizer.weight_decay == 0.1

    old_style = tmp_path / "old.py"
    old_style.write_text("_base_ = ['./_base_/schedule.py']\nmax_epochs = 1\n"
                         "optim_wrapper = dict(optimizer=dict(lr=5e-5))\n")
    cfg = Config.fromfile(old_style)
    assert cfg.max_epochs == 1 and cfg.optim_wrapper.optimizer == {"lr": 5e-5, "weight_decay": 0.1}
    missing = tmp_path / "missing.py"
    missing.write_text("_base_ = ['./nowhere.py']\n")
    with pytest.raises(ConfigError, match="nowhere.py"):
        Config.fromfile(missing)


def test_mmengine_inheritance_beyond_merging(tmp_path):
    """What MMEngine gives a child config: attribute access on inherited dicts, ``_base_.name`` and
    ``{{_base_.name}}`` references to the merged base config."""
    base = tmp_path / "_base_"
    base.mkdir()
    (base / "schedule.py").write_text("lr = 1e-4\nmax_epochs = 3\ntokenizer = dict(padding_side='right')\n"
                                      "model = dict(tokenizer=tokenizer, lora=dict(r=8))\n"
                                      "optim_wrapper = dict(optimizer=dict(lr=lr, weight_decay=0.1))\n")
    new_style = tmp_path / "new.py"
    new_style.write_text("from mmengine.config import read_base\n\nwith read_base():\n"
                         "    from ._base_.schedule import *\n\n"
                         "optim_wrapper.optimizer.lr = 5e-4\ntokenizer.padding_side = 'left'\n")
    cfg = Config.fromfile(new_style)
    assert cfg.optim_wrapper.optimizer == {"lr": 5e-4, "weight_decay": 0.1}
    assert cfg.model.tokenizer.padding_side == "left"  # one dict, shared as in the base file
    old_style = tmp_path / "old.py"
    old_style.write_text("_base_ = ['./_base_/schedule.py']\n"
                         "optim_wrapper = dict(optimizer=dict(lr=_base_.lr * 2))\n"
                         "lora = {{_base_.model.lora}}\nepochs = '{{ _base_.max_epochs }}'\n"
                         "_base_.model.lora.r = 16\n")
    cfg = Config.fromfile(old_style)
    assert cfg.optim_wrapper.optimizer == {"lr": 2e-4, "weight_decay": 0.1}
    assert cfg.lora == {"r": 16} and cfg.epochs == 3 and cfg.model.lora.r == 16  # the value, not a string
    alone = tmp_path / "alone.py"
    alone.write_text("x = 1\ny = {{_base_.x}}\n")
    with pytest.raises(ConfigError, match=r"alone.py:2: \{\{_base_.x\}\} refers to a base config, but the file "
                                          r"sets no _base_"):
        Config.fromfile(alone)


def test_sequence_parallel_over_too_few_processes_stops_before_any_work(tmp_path, tiny_model_dir, oasst1_dir):
    cfg = Config.fromfile(xtuner_shaped(tmp_path), {"pretrained_model_name_or_path": tiny_model_dir,
                                                    "data_path": oasst1_dir, "sequence_parallel_size": 4})
    with pytest.raises(ConfigError, match="sequence_parallel_size=4"):
        Runner.from_config(cfg, work_dir=str(tmp_path / "work"))
    assert not list((tmp_path / "work").glob("iter_*"))


def test_mmengine_registry_names_batch_sampler_and_missing_hub_packages(tmp_path, tiny_model_dir, oasst1_dir):
    # what XTuner's InternLM-repo and ModelScope configs write: a string scheduler type, an MMEngine
    # batch_sampler dict, and a top-level import of ModelScope (not installed here)
    extra = """
from torch.utils.data import BatchSampler
from modelscope.msdatasets import MsDataset
train_dataloader['batch_sampler'] = dict(type=BatchSampler, drop_last=True, batch_size=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
                   dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=False, begin=2, end=4)]
ms_loader = MsDataset.load
"""
    assert importlib.util.find_spec("modelscope") is None
    cfg = Config.fromfile(xtuner_shaped(tmp_path, extra), {
        "pretrained_model_name_or_path": tiny_model_dir, "data_path": oasst1_dir, "max_length": 64,
        "train_cfg.max_epochs": None, "train_cfg.max_iters": 4, "model.llm.quantization_config": None,
        "custom_hooks": []})
    with pytest.raises(ConfigError, match="pip install modelscope"):
        cfg.ms_loader("some/dataset")
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    from lmtune.engine.optim import CosineAnnealingLR, LinearLR

    assert [type(s) for s in runner.param_schedulers] == [LinearLR, CosineAnnealingLR]
    batch_sampler = runner.train_dataloader.batch_sampler
    assert batch_sampler.batch_size == 2 and batch_sampler.drop_last
    assert len(runner.train_dataloader) == len(runner.train_dataloader.dataset) // 2
    runner.train()
    assert ckpt.find_latest(runner.work_dir).name == "iter_4"


def test_xtuner_model_names_and_transformers_4_loading_flags(tmp_path, tiny_model_dir):
    path = tmp_path / "cfg.py"
    path.write_text("from xtuner.model.transformers_models.deepseek_v2 import DeepseekV2ForCausalLM\n"
                    "llm = dict(type=DeepseekV2ForCausalLM.from_pretrained, moe_implementation='shard')\n")
    from transformers import DeepseekV2ForCausalLM

    assert issubclass(Config.fromfile(path).llm["type"].__self__, DeepseekV2ForCausalLM)
    # `load_in_8bit=True` passed to from_pretrained (transformers 4 style) becomes a quantization_config
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from lmtune.model import SupervisedFinetune

    model = SupervisedFinetune(llm=dict(type=AutoModelForCausalLM.from_pretrained,
                                        pretrained_model_name_or_path=tiny_model_dir, load_in_8bit=True),
                               lora=dict(type="peft.LoraConfig", r=4), use_activation_checkpointing=False)
    assert model.quantized and any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def test_lora_with_dropout_on_fused_moe_experts(tmp_path):
    # XTuner's Mixtral configs put LoRA (dropout 0.1) on w1/w2/w3; transformers 5 fuses the experts into
    # 3-D weights that peft adapts only without dropout: lmtune sets it to 0 (with a warning) and trains
    import torch
    from tiny_archs import make_tiny_model
    from transformers import AutoModelForCausalLM

    from lmtune.model import SupervisedFinetune

    path = make_tiny_model(tmp_path / "mixtral", "mixtral", "mistral")
    model = SupervisedFinetune(
        llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(path),
                 dtype=torch.float32),
        lora=dict(type="peft.LoraConfig", r=4, lora_alpha=8, lora_dropout=0.1,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
        use_activation_checkpointing=False)
    expert_adapters = [n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n]
    assert expert_adapters
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids)["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in expert_adapters)
