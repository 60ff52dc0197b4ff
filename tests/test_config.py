"""Config files: loading, overrides, unknown keys, dumping, build() and error locations."""

from __future__ import annotations

import math
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lmtune.config import Config, ConfigDict, ConfigError, build, dumps, is_type_dict, parse_overrides
from lmtune.config.config import parse_value
from lmtune.dataset import process_hf_dataset
from lmtune.engine.optim import AmpOptimWrapper

# A config in the XTuner shape: settings on top, everything below derived from them.
EXPERIMENT = """\
import os
import os.path as osp
from math import pi

import torch
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR
from transformers import AutoModelForCausalLM, AutoTokenizer

_private_scale = 3
pretrained_model_name_or_path = 'a'
lr = 2e-4
betas = (0.9, 0.999)
max_epochs = 3
warmup_ratio = 0.1

tokenizer = dict(type=AutoTokenizer.from_pretrained,
                 pretrained_model_name_or_path=pretrained_model_name_or_path, padding_side='right')
model = dict(llm=dict(type=AutoModelForCausalLM.from_pretrained,
                      pretrained_model_name_or_path=pretrained_model_name_or_path,
                      torch_dtype=torch.float16))
optim_wrapper = dict(optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=0.0),
                     accumulative_counts=1)
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, begin=0, end=warmup_ratio * max_epochs),
    dict(type=CosineAnnealingLR, eta_min=0.0, begin=warmup_ratio * max_epochs, end=max_epochs),
]
train_cfg = dict(max_epochs=max_epochs)
"""

EXPERIMENT_KEYS = {"pretrained_model_name_or_path", "lr", "betas", "max_epochs", "warmup_ratio", "tokenizer",
                   "model", "optim_wrapper", "param_scheduler", "train_cfg"}


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def experiment(tmp_path) -> Path:
    return write(tmp_path, "experiment.py", EXPERIMENT)


def load(path: Path, *overrides: str) -> Config:
    return Config.fromfile(path, parse_overrides(list(overrides)))


# ----------------------------------------------------------------------------- 1. loading


def test_top_level_names_become_keys_imports_and_private_names_do_not(experiment):
    cfg = load(experiment)
    assert set(cfg) == EXPERIMENT_KEYS
    for name in ("os", "osp", "pi", "torch", "AdamW", "LinearLR", "AutoTokenizer", "_private_scale", "__file__"):
        assert name not in cfg
    assert cfg.filename == str(experiment.resolve())
    # Attribute access at any depth, and the values are the objects the file wrote.
    assert cfg.optim_wrapper.optimizer.type is torch.optim.AdamW
    assert cfg.param_scheduler[1].type is torch.optim.lr_scheduler.CosineAnnealingLR
    assert cfg.model.llm.torch_dtype is torch.float16
    assert cfg.betas == (0.9, 0.999) and isinstance(cfg.betas, tuple)
    assert cfg.tokenizer.type == AutoTokenizer.from_pretrained
    assert cfg.tokenizer.type.__func__ is AutoTokenizer.from_pretrained.__func__


def test_type_values_stay_callables_and_nothing_is_built_at_load(tmp_path):
    # The helper module sits next to the config: the config's directory is importable while it runs.
    helper = f"cfg_helper_{uuid.uuid4().hex}"
    write(tmp_path, f"{helper}.py", """\
        BUILT = []

        class Boom:
            def __init__(self, size=1):
                BUILT.append(size)
                raise AssertionError("built at config load")
        """)
    path = write(tmp_path, "cfg.py", f"""\
        from {helper} import Boom

        model = dict(type=Boom, size=2)
        hooks = [dict(type=Boom, size=3)]
        """)
    try:
        cfg = Config.fromfile(path)
        module = sys.modules[helper]
        assert cfg.model.type is module.Boom
        assert cfg.hooks[0].type is module.Boom
        assert is_type_dict(cfg.model)
        assert module.BUILT == []
        assert set(cfg) == {"model", "hooks"}
    finally:
        sys.modules.pop(helper, None)
    assert str(tmp_path) not in sys.path


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.fromfile(tmp_path / "nope.py")


# ----------------------------------------------------------------------------- 2. top-level overrides


def test_defaults_before_any_override(experiment):
    cfg = load(experiment)
    assert cfg.optim_wrapper.optimizer.lr == 2e-4
    assert cfg.param_scheduler[0].end == pytest.approx(0.3)
    assert cfg.param_scheduler[1].begin == pytest.approx(0.3)
    assert cfg.param_scheduler[1].end == 3
    assert cfg.model.llm.pretrained_model_name_or_path == "a"


def test_top_level_override_reevaluates_derived_values(experiment):
    cfg = load(experiment, "lr=1e-4", "max_epochs=1", "pretrained_model_name_or_path=/x")
    assert cfg.lr == 1e-4
    assert cfg.optim_wrapper.optimizer.lr == 1e-4
    assert cfg.max_epochs == 1
    assert cfg.train_cfg.max_epochs == 1
    assert cfg.param_scheduler[0].end == pytest.approx(0.1)
    assert cfg.param_scheduler[1].begin == pytest.approx(0.1)
    assert cfg.param_scheduler[1].end == 1
    assert cfg.pretrained_model_name_or_path == "/x"
    assert cfg.tokenizer.pretrained_model_name_or_path == "/x"
    assert cfg.model.llm.pretrained_model_name_or_path == "/x"
    # Untouched settings keep their values.
    assert cfg.warmup_ratio == 0.1
    assert cfg.tokenizer.padding_side == "right"
    # The file itself is not modified by an override.
    assert "lr = 2e-4" in experiment.read_text()


def test_top_level_override_with_an_object_value(experiment):
    cfg = load(experiment, "betas=(0.8, 0.95)")
    assert cfg.optim_wrapper.optimizer.betas == (0.8, 0.95)
    assert isinstance(cfg.optim_wrapper.optimizer.betas, tuple)


def test_top_level_override_of_a_name_bound_inside_a_block(tmp_path):
    path = write(tmp_path, "cfg.py", """\
        import os

        if os.sep:
            lr = 0.1
        else:
            lr = 0.2
        for steps in [10]:
            pass
        optimizer = dict(lr=lr, steps=steps)

        def helper():
            hidden = 1
            return hidden
        """)
    cfg = load(path, "lr=5", "steps=7")
    assert cfg.optimizer == {"lr": 5, "steps": 7}
    # A name bound only inside a function body is not a setting of the file.
    with pytest.raises(ConfigError, match="hidden"):
        load(path, "hidden=2")


# ----------------------------------------------------------------------------- 3. nested overrides, values


def test_nested_override_sets_only_that_key(experiment):
    cfg = load(experiment, "optim_wrapper.optimizer.lr=0.5")
    assert cfg.optim_wrapper.optimizer.lr == 0.5
    assert cfg.lr == 2e-4
    assert cfg.optim_wrapper.optimizer.betas == (0.9, 0.999)


def test_nested_override_wins_over_a_top_level_one(experiment):
    cfg = load(experiment, "lr=1e-4", "optim_wrapper.optimizer.lr=0.5")
    assert cfg.lr == 1e-4
    assert cfg.optim_wrapper.optimizer.lr == 0.5


def test_list_index_overrides(experiment):
    cfg = load(experiment, "param_scheduler.0.start_factor=0.1", "param_scheduler.-1.eta_min=1e-6")
    assert cfg.param_scheduler[0].start_factor == 0.1
    assert cfg.param_scheduler[1].eta_min == 1e-6
    assert cfg.param_scheduler[1].begin == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="list of 2"):
        load(experiment, "param_scheduler.2.begin=0")
    with pytest.raises(ConfigError, match="not a valid index"):
        load(experiment, "param_scheduler.first.begin=0")


def test_nested_override_with_a_dotted_importable_name(experiment):
    cfg = load(experiment, "optim_wrapper.optimizer.type=torch.optim.SGD", "model.llm.torch_dtype=torch.bfloat16")
    assert cfg.optim_wrapper.optimizer.type is torch.optim.SGD
    assert cfg.model.llm.torch_dtype is torch.bfloat16


@pytest.mark.parametrize(("text", "expected"), [
    ("None", None),
    ("True", True),
    ("False", False),
    ("3", 3),
    ("-2", -2),
    ("1e-4", 1e-4),
    ("0.5", 0.5),
    ("(0.8, 0.9)", (0.8, 0.9)),
    ("(1,)", (1,)),
    ("[1, 2]", [1, 2]),
    ("{'max_norm': 1}", {"max_norm": 1}),
    ("'quoted'", "quoted"),
    ("nf4", "nf4"),
    ("/data/train.jsonl", "/data/train.jsonl"),
    ("no_such_module_xyz.Thing", "no_such_module_xyz.Thing"),
    ("torch.no_such_attr", "torch.no_such_attr"),
    ("hello world", "hello world"),
])
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_value_imports_dotted_names():
    assert parse_value("torch.optim.SGD") is torch.optim.SGD
    assert parse_value("torch.float16") is torch.float16


def test_parse_overrides():
    assert parse_overrides(["lr=1e-4", " a.b = x ", "path=k=v"]) == {"lr": 1e-4, "a.b": "x", "path": "k=v"}
    assert parse_overrides(None) == {}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["=1"])


# ----------------------------------------------------------------------------- 4. unknown keys


def test_unknown_top_level_key_names_the_nearest(experiment):
    with pytest.raises(ConfigError) as err:
        load(experiment, "lrr=1")
    assert "'lrr'" in str(err.value)
    assert "did you mean 'lr'" in str(err.value)


def test_unknown_nested_key_names_the_nearest(experiment):
    with pytest.raises(ConfigError) as err:
        load(experiment, "optim_wrapper.optimzer.lr=1")
    assert "optim_wrapper.optimzer.lr" in str(err.value)
    assert "did you mean 'optimizer'" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'max_epochs'"):
        load(experiment, "train_cfg.max_epoch=1")
    with pytest.raises(ConfigError, match="did you mean 'optim_wrapper'"):
        load(experiment, "optim_wraper.optimizer.lr=1")


def test_new_key_allowed_when_the_type_takes_it(experiment):
    cfg = load(experiment, "optim_wrapper.optimizer.eps=1e-6")
    assert cfg.optim_wrapper.optimizer.eps == 1e-6
    assert cfg.optim_wrapper.optimizer.lr == 2e-4
    # ... but not an argument AdamW does not take; the hint comes from AdamW's arguments.
    with pytest.raises(ConfigError, match="did you mean 'eps'"):
        load(experiment, "optim_wrapper.optimizer.epss=1e-6")
    # A dict without a type takes no new keys at all.
    with pytest.raises(ConfigError):
        load(experiment, "optim_wrapper.clip_grad=1")


def test_cannot_reach_inside_a_key_the_config_does_not_set(experiment):
    # from_pretrained takes **kwargs, so quantization_config is accepted, but there is nothing to walk into.
    with pytest.raises(ConfigError, match="quantization_config"):
        load(experiment, "model.llm.quantization_config.load_in_4bit=True")
    cfg = load(experiment, "model.llm.quantization_config={'load_in_4bit': True}")
    assert cfg.model.llm.quantization_config == {"load_in_4bit": True}


def test_override_inside_a_scalar_is_an_error(experiment):
    with pytest.raises(ConfigError, match="float"):
        load(experiment, "lr.value=1")


# ----------------------------------------------------------------------------- 5. dump


ROUND_TRIP = """\
import torch
from peft import LoraConfig, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lmtune.dataset import process_hf_dataset
from lmtune.engine.optim import AmpOptimWrapper

path = '/models/llama'
lr = 1e-4
betas = (0.9, 0.98)
one = (1,)
empty = ()
nothing = None
flags = [True, False, -3, 2.5]
max_norm = float('inf')
tokenizer = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=path, padding_side='right')
model = dict(
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=path,
        torch_dtype=torch.float16,
        quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type='nf4')),
    lora=dict(type=LoraConfig, r=64, lora_alpha=16, target_modules=('q_proj', 'v_proj'),
              task_type=TaskType.CAUSAL_LM))
train_dataset = dict(type=process_hf_dataset, tokenizer=tokenizer, max_length=2048,
                     template={'SYSTEM': '<|system|>{system}\\n', 'stop words': ['</s>'], 1: "it's"})
optim_wrapper = dict(type=AmpOptimWrapper, optimizer=dict(type=torch.optim.AdamW, lr=lr, betas=betas),
                     clip_grad=dict(max_norm=max_norm), extra={'class': 1, 'lambda': [dict(a=1)]})
"""


@pytest.fixture
def round_trip(tmp_path) -> tuple[Config, Config, str]:
    cfg = Config.fromfile(write(tmp_path, "orig.py", ROUND_TRIP))
    text = dumps(cfg)
    dumped = write(tmp_path, "dumped.py", text)
    return cfg, Config.fromfile(dumped), text


def test_dump_loads_back_equal(round_trip):
    cfg, back, text = round_trip
    assert set(back) == set(cfg)
    assert back == cfg
    assert dumps(back) == text
    # The dump names callables by dotted path, not by the config's local names.
    assert "process_hf_dataset" in text and "import lmtune.dataset" in text


def test_dump_keeps_objects_identical(round_trip):
    _, back, _ = round_trip
    assert back.train_dataset.type is process_hf_dataset
    assert back.optim_wrapper.type is AmpOptimWrapper
    assert back.optim_wrapper.optimizer.type is torch.optim.AdamW
    assert back.model.llm.quantization_config.type is BitsAndBytesConfig
    assert back.model.lora.type is LoraConfig
    # Bound class methods are re-created on each access, so compare what they are bound to.
    llm_type = back.model.llm.type
    assert llm_type.__self__ is AutoModelForCausalLM
    assert llm_type.__func__ is AutoModelForCausalLM.from_pretrained.__func__
    assert back.tokenizer.type.__self__ is AutoTokenizer
    assert back.model.llm.torch_dtype is torch.float16
    assert back.model.llm.quantization_config.bnb_4bit_compute_dtype is torch.bfloat16
    assert back.model.lora.task_type is TaskType.CAUSAL_LM


def test_dump_keeps_containers_and_scalars(round_trip):
    _, back, _ = round_trip
    assert back.betas == (0.9, 0.98) and type(back.betas) is tuple
    assert back.one == (1,) and type(back.one) is tuple
    assert back.empty == () and type(back.empty) is tuple
    assert back.model.lora.target_modules == ("q_proj", "v_proj")
    assert type(back.model.lora.target_modules) is tuple
    assert back.nothing is None
    assert back.flags == [True, False, -3, 2.5]
    assert [type(v) for v in back.flags] == [bool, bool, int, float]
    assert math.isinf(back.optim_wrapper.clip_grad.max_norm)
    assert back.train_dataset.template == {"SYSTEM": "<|system|>{system}\n", "stop words": ["</s>"], 1: "it's"}
    assert back.optim_wrapper.extra == {"class": 1, "lambda": [{"a": 1}]}
    assert back.train_dataset.tokenizer == back.tokenizer


def test_dump_writes_the_effective_config(experiment, tmp_path):
    cfg = load(experiment, "lr=1e-4", "optim_wrapper.optimizer.lr=0.5", "max_epochs=1")
    out = tmp_path / "effective.py"
    cfg.dump(out)
    back = Config.fromfile(out)
    assert back == cfg
    assert back.lr == 1e-4
    assert back.optim_wrapper.optimizer.lr == 0.5
    assert back.param_scheduler[1].end == 1
    assert back.param_scheduler[0].type is torch.optim.lr_scheduler.LinearLR


def test_dump_refuses_objects_without_an_importable_name():
    with pytest.raises(ConfigError, match="cannot write"):
        dumps({"fn": lambda x: x})

    def local_map_fn(example):
        return example

    with pytest.raises(ConfigError, match="cannot write"):
        dumps({"dataset": {"map_fn": local_map_fn}})


# ----------------------------------------------------------------------------- 6. build


class Quant:
    """Stands in for BitsAndBytesConfig with a strict signature."""

    def __init__(self, bits: int = 4, group_size: int = 64) -> None:
        self.bits = bits
        self.group_size = group_size


class FakeModel:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, quantization_config=None, torch_dtype=None,
                        callbacks=(), options=None):
        return dict(path=pretrained_model_name_or_path, quantization_config=quantization_config,
                    torch_dtype=torch_dtype, callbacks=callbacks, options=options)


def test_build_passes_non_type_values_through():
    obj = Quant()
    assert build(obj) is obj
    plain = {"a": 1}
    assert build(plain) is plain
    items = [dict(type=Quant)]
    assert build(items) is items
    assert build(None) is None


def test_build_calls_the_type():
    built = build(dict(type=Quant, bits=8))
    assert isinstance(built, Quant)
    assert (built.bits, built.group_size) == (8, 64)


def test_build_third_party_builds_nested_type_dicts_first():
    cfg = dict(type=FakeModel.from_pretrained, pretrained_model_name_or_path="m", torch_dtype=torch.float16,
               quantization_config=dict(type=Quant, bits=4, group_size=32),
               callbacks=[dict(type=Quant, bits=2)], options=dict(inner=dict(type=Quant)))
    out = build(cfg, key="model.llm")
    assert out["path"] == "m"
    assert out["torch_dtype"] is torch.float16
    assert isinstance(out["quantization_config"], Quant)
    assert out["quantization_config"].group_size == 32
    assert isinstance(out["callbacks"], list) and isinstance(out["callbacks"][0], Quant)
    assert out["callbacks"][0].bits == 2
    assert isinstance(out["options"]["inner"], Quant)
    # The config itself is not changed by building it.
    assert is_type_dict(cfg["quantization_config"])


def test_build_real_bitsandbytes_config_nested():
    out = build(dict(type=FakeModel.from_pretrained, pretrained_model_name_or_path="m",
                     quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True,
                                              bnb_4bit_compute_dtype=torch.float16)))
    assert isinstance(out["quantization_config"], BitsAndBytesConfig)
    assert out["quantization_config"].load_in_4bit is True


def test_build_own_callables_receive_nested_dicts_unbuilt():
    built = build(dict(type=ConfigDict, inner=dict(type=Quant, bits=3)))
    assert isinstance(built, ConfigDict)
    assert is_type_dict(built["inner"]) and built["inner"]["type"] is Quant

    def component(sub=None):
        return sub

    component.__module__ = "lmtune.fake_component"
    sub = build(dict(type=component, sub=dict(type=Quant)))
    assert sub == {"type": Quant}
    # The same function outside lmtune gets the built object.
    component.__module__ = "elsewhere"
    assert isinstance(build(dict(type=component, sub=dict(type=Quant))), Quant)


def test_build_unknown_argument_names_the_nearest_and_the_key_path():
    with pytest.raises(ConfigError) as err:
        build(dict(type=FakeModel.from_pretrained, pretrained_model_name_or_pat="m"), key="model.llm")
    message = str(err.value)
    assert "model.llm.pretrained_model_name_or_pat" in message
    assert "did you mean 'pretrained_model_name_or_path'" in message

    with pytest.raises(ConfigError) as err:
        build(dict(type=FakeModel.from_pretrained, pretrained_model_name_or_path="m",
                   quantization_config=dict(type=Quant, bitz=4)), key="model.llm")
    assert "model.llm.quantization_config.bitz" in str(err.value)
    assert "did you mean 'bits'" in str(err.value)


def test_build_type_as_dotted_string():
    layer = build(dict(type="torch.nn.Linear", in_features=2, out_features=3))
    assert isinstance(layer, torch.nn.Linear)
    assert tuple(layer.weight.shape) == (3, 2)
    with pytest.raises(ConfigError, match="no_such_pkg_xyz"):
        build(dict(type="no_such_pkg_xyz.Thing"), key="model")
    with pytest.raises(ConfigError):
        build(dict(type=3))


def test_build_defaults_fill_only_missing_accepted_arguments():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = build(dict(type=torch.optim.SGD, lr=0.1), params=[param], not_an_sgd_argument=1)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["params"][0] is param
    assert build(dict(type=Quant, bits=8), bits=2).bits == 8
    assert build(dict(type=Quant), bits=2).bits == 2


# ----------------------------------------------------------------------------- 7. errors with file:line


def test_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.py", """\
        lr = 1e-4
        model = dict(
            llm=dict(type=None,)
        optim = 3
        """)
    with pytest.raises(ConfigError) as err:
        Config.fromfile(path)
    message = str(err.value)
    assert f"{path}:" in message
    assert "syntax error" in message
    line = int(message.split(f"{path}:", 1)[1].split(":", 1)[0])
    assert 2 <= line <= 4


def test_exception_while_running_names_file_and_line(tmp_path):
    path = write(tmp_path, "raises.py", """\
        lr = 1e-4
        max_epochs = 3

        warmup = lr / (max_epochs - 3)
        """)
    with pytest.raises(ConfigError) as err:
        Config.fromfile(path)
    assert f"{path}:4:" in str(err.value)
    assert "ZeroDivisionError" in str(err.value)


def test_exception_inside_a_library_call_names_the_config_line(tmp_path, monkeypatch):
    write(tmp_path, "called.py", """\
        import json

        x = 1
        rows = json.loads('{not json')
        """)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        Config.fromfile("called.py")
    assert "called.py:4:" in str(err.value)
    assert "JSONDecodeError" in str(err.value)


def test_override_of_a_config_that_fails_still_names_the_line(experiment):
    # The override is injected into the file, so the line reported is where the bad value is used.
    with pytest.raises(ConfigError) as err:
        load(experiment, "max_epochs=None")
    text = experiment.read_text().splitlines()
    line = next(i for i, s in enumerate(text, 1) if "end=warmup_ratio * max_epochs" in s)
    assert f"{experiment}:{line}:" in str(err.value)
    assert "TypeError" in str(err.value)


def test_override_values_name_no_callable_outside_the_config_packages(tmp_path):
    """--cfg-options values are literals or components of lmtune, torch, transformers, peft, datasets,
    bitsandbytes or deepspeed: a value naming os.system is refused before anything could call it."""
    from lmtune.config import parse_overrides

    mark = tmp_path / "ran"
    for item in (f"custom_hooks=[{{'type': 'os.system', 'command': 'touch {mark}'}}]",
                 "optim_type=subprocess.getoutput", "model.llm.type=os.system"):
        with pytest.raises(ConfigError, match="may name classes and functions of bitsandbytes, datasets"):
            parse_overrides([item])
    assert not mark.exists()
    ok = parse_overrides(["model.llm.torch_dtype=torch.bfloat16", "optim_type=torch.optim.SGD",
                          "custom_hooks=[{'type': 'lmtune.engine.hooks.ThroughputHook'}]", "data_files=data.jsonl",
                          "data_path=tatsu-lab/alpaca"])
    assert ok["model.llm.torch_dtype"] is torch.bfloat16 and ok["optim_type"] is torch.optim.SGD
    assert ok["data_files"] == "data.jsonl"
