"""The built-in config library (lmtune/configs/library.py: a model table and a renderer).

* The committed files (one model's variants) are what the renderer writes now, and it writes the same
  bytes every time; tools/make_configs.py keeps them so and removes only its own stale files.
* Every built-in config loads, resolves by name, and holds the settings its model, method
  (QLoRA / LoRA / full) and dataset (alpaca / oasst1 / custom OpenAI jsonl) call for.
* Every model's config turns a conversation into the tokens of its prompt template (with a tiny
  tokenizer that has the template's special tokens, as the real one does), the remote-code
  models included.
* Configs train, for real, on a tiny model of the same architecture (transformers' own class,
  2 layers, hidden size 64): every architecture x method combination, each architecture on all
  three datasets. See RUNS for why not every config is trained.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_archs import NATIVE_ARCHS, TOKENIZER_STYLES, make_tiny_model, make_tokenizer

import lmtune
from lmtune import cli
from lmtune.config import Config
from lmtune.config.build import build
from lmtune.configs import library, load_config
from lmtune.core.constants import IGNORE_INDEX
from lmtune.dataset.encode import ConversationEncoder
from lmtune.dataset.templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = Path(lmtune.__file__).parent / "configs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_configs", REPO / "tools" / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_configs", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()  # writes the committed files
LIB = library
MODELS = {m.name: m for m in LIB.MODELS}
# config name -> (model, method, dataset), for every name the library holds (hand-written ones included)
LIBRARY = {LIB.config_name(m, method, data): (m, method, data)
           for m in LIB.MODELS for method in LIB.METHODS for data in LIB.DATASETS}
BUILTIN = cli.builtin_configs()


# ------------------------------------------------------------------ the generator

def test_committed_library_is_what_the_generator_writes(tmp_path):
    assert GEN.check(CONFIG_ROOT) == [], "run: python tools/make_configs.py"
    committed = LIB.library(on_disk_only=True)
    assert committed and all(f"/{LIB.ON_DISK_MODEL}/" in rel for rel in committed)
    # the script itself, everything into a fresh directory: the same bytes as this process renders (another
    # process, another hash seed), the committed files too
    out = tmp_path / "all"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "make_configs.py"), "--all", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.py"))
    rendered = LIB.library()
    assert files == sorted(rendered) and len(files) == len(LIBRARY) - len(LIB.HAND_WRITTEN)
    for rel in files:
        text = (out / rel).read_bytes()
        assert text == rendered[rel].encode(), rel
        if rel in committed:
            assert text == (CONFIG_ROOT / rel).read_bytes(), rel
    # the package holds no other generated file: the rest renders on demand
    assert GEN.generated_files(CONFIG_ROOT) == set(committed)


def test_generator_removes_only_its_own_stale_files(tmp_path):
    GEN.write(tmp_path)
    mine = tmp_path / "llama" / "old_model" / "old_model_lora_alpaca_e3.py"
    mine.parent.mkdir(parents=True)
    mine.write_text(f"{LIB.GENERATED_MARK}\nlr = 1\n")
    theirs = tmp_path / "llama" / "my_own_cfg.py"
    theirs.write_text("lr = 1\n")
    edited = tmp_path / next(iter(LIB.library(on_disk_only=True)))
    edited.write_text(edited.read_text() + "\n# my note\n")
    assert sorted(GEN.check(tmp_path)) == sorted([f"stale: llama/old_model/{mine.name}",
                                                  f"out of date: {edited.relative_to(tmp_path).as_posix()}"])
    changed, removed = GEN.write(tmp_path)
    assert changed == [edited.relative_to(tmp_path).as_posix()] and removed == [f"llama/old_model/{mine.name}"]
    assert not mine.parent.exists() and theirs.is_file() and GEN.check(tmp_path) == []


def test_every_library_name_resolves_once():
    stems = [p.stem for p in CONFIG_ROOT.rglob("*.py") if not p.name.startswith("_")]
    assert len(stems) == len(set(stems)), "two built-in configs share a name"
    for name, (model, _, _) in LIBRARY.items():
        path = cli.resolve_config(name)
        if name in LIB.HAND_WRITTEN:
            assert path == CONFIG_ROOT / LIB.HAND_WRITTEN[name]
        else:
            assert path == CONFIG_ROOT / model.family / model.name / f"{name}.py"
    # every template the table names exists, and the tests know how its models' tokenizers treat it
    for model in LIB.MODELS:
        assert model.template in PROMPT_TEMPLATE and model.template in TOKENIZER_STYLES, model.name


# ------------------------------------------------------------------ every config loads, with the right settings

def _dtype(model) -> torch.dtype:
    return getattr(torch, model.dtype)


def check_settings(cfg: Config, model, method: str, dataset: str) -> None:
    """The settings the library promises for this model, method and dataset."""
    assert cfg.pretrained_model_name_or_path == model.hub_id
    assert cfg.prompt_template == PROMPT_TEMPLATE[model.template]
    assert cfg.max_length == model.max_length == 2048
    assert cfg.pack_to_max_length is True  # hub-code families too: their ports keep packed samples apart
    assert cfg.use_varlen_attn is False and cfg.batch_size == 1 and cfg.max_epochs == LIB.EPOCHS
    assert cfg.lr == (2e-5 if method == "full" else 2e-4)
    assert cfg.accumulative_counts == (2 if method == "full" else 16)
    llm, lora = cfg.model.llm, cfg.model.get("lora")
    assert llm.torch_dtype == _dtype(model) and cfg.optim_wrapper.dtype == model.dtype
    # the library runs no repository's code; XTuner's reference config keeps its trust_remote_code=True
    remote = {"trust_remote_code": True} if LIB.config_name(model, method, dataset) in LIB.HAND_WRITTEN else {}
    assert {k: v for k, v in cfg.tokenizer.items() if k == "trust_remote_code"} == remote
    assert {k: v for k, v in llm.items() if k == "trust_remote_code"} == remote
    quant = llm.get("quantization_config")
    if method == "qlora":
        assert quant.type.__name__ == "BitsAndBytesConfig"
        assert (quant.load_in_4bit, quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant) == (True, "nf4", True)
        assert quant.bnb_4bit_compute_dtype == _dtype(model)
    else:
        assert quant is None
    if method == "full":
        assert lora is None
    else:
        assert (lora.type.__name__, lora.r, lora.lora_alpha, lora.task_type) == ("LoraConfig", 64, 16, "CAUSAL_LM")
        assert lora.get("target_modules") == (list(model.lora_targets) or None)
    data = cfg.train_dataset
    assert data.dataset_map_fn.__name__ == {"alpaca": "alpaca_map_fn", "oasst1": "oasst1_map_fn",
                                            "custom": "openai_map_fn"}[dataset]
    if dataset == "custom":
        assert cfg.data_files == "data/my_data.jsonl"
        assert dict(data.dataset) == {"type": data.dataset.type, "path": "json", "data_files": cfg.data_files}
    else:
        assert cfg.data_path == {"alpaca": "tatsu-lab/alpaca", "oasst1": "timdettmers/openassistant-guanaco"}[dataset]
        assert data.dataset.path == cfg.data_path
    assert cfg.SYSTEM == (SYSTEM_TEMPLATE.alpaca if dataset == "alpaca" else "")
    chat = cfg.custom_hooks[1]
    assert chat.prompt_template == cfg.prompt_template and chat.system == cfg.SYSTEM and chat.evaluation_inputs
    assert cfg.max_new_tokens == chat.max_new_tokens == 256  # a setting of PART 1, not the hook's 600
    assert cfg.train_dataloader.dataset == data


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_config_loads(name):
    cfg = load_config(name)
    assert cfg.model and cfg.train_dataloader and cfg.optim_wrapper
    if name in LIBRARY:
        check_settings(cfg, *LIBRARY[name])


# hub-code models -> the port fixture whose hub-layout repository stands for them
HUB_FIXTURES = {"internlm2_chat_1_8b": "internlm2", "internlm2_chat_7b": "internlm2",
                "internlm2_5_chat_7b": "internlm2", "internlm3_8b_instruct": "internlm3", "chatglm3_6b": "chatglm3",
                "baichuan2_7b_chat": "baichuan2_7b", "baichuan2_13b_chat": "baichuan2_13b",
                "minicpm_2b_sft": "minicpm", "minicpm3_4b": "minicpm3"}


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    """port fixture -> its hub-layout repository (made on first use)."""
    from hub_models import hub_dir_for

    made: dict[str, str] = {}

    def get(fixture: str) -> str:
        if fixture not in made:
            made[fixture] = str(hub_dir_for(tmp_path_factory.mktemp(f"hub_{fixture}"), fixture))
        return made[fixture]

    return get


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_model_and_method_builds_on_the_meta_device(model_name, tiny_models, hub_dirs):
    """Each library model's three methods build (as ``lmtune check`` builds them, on the meta device) on a tiny
    model of its architecture (the port's hub-layout repository for hub-code families): the method's part
    is what trains, quantized where the config says so. The datasets change no model setting
    (test_every_builtin_config_loads checks that), so one dataset per method stands for all three."""
    from lmtune.config.build import build as build_component
    from lmtune.tools.check.model import build_meta_model

    model = MODELS[model_name]
    local = hub_dirs(HUB_FIXTURES[model.name]) if model.hub_code else tiny_models(model.arch, model.template)
    for method in LIB.METHODS:
        cfg = load_config(LIB.config_name(model, method, "custom"), {"pretrained_model_name_or_path": local})
        facts = build_meta_model(cfg, build_component(cfg.tokenizer))
        assert facts.total_params > 0 and facts.layers >= 1, (model_name, method)
        if method == "full":
            assert facts.trainable_params == facts.total_params and not facts.quant_bits
        else:
            assert 0 < facts.trainable_params < facts.total_params and facts.lora_targets, (model_name, method)
            assert set(model.lora_targets) <= set(facts.lora_targets)
            assert facts.quant_bits == (4 if method == "qlora" else None), (model_name, method)


# ------------------------------------------------------------------ every model's template, through its config

# Two rounds with a system message: the template's system part, instruction, suffix and separator all show.
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello!"},
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """template name -> a directory holding a tiny tokenizer of that template's style (made on first use)."""
    made: dict[str, str] = {}

    def get(template: str) -> str:
        if template not in made:
            path = tmp_path_factory.mktemp(f"tok_{template}")
            make_tokenizer(template, TRAIN_TEXTS).save_pretrained(path)
            made[template] = str(path)
        return made[template]

    return get


def assert_template_tokens(tokenizer, template: dict, style: dict, input_ids: list[int], labels: list[int],
                           outputs: list[str]) -> None:
    """``input_ids``/``labels`` of one sample are ``template`` rendered for ``tokenizer``."""
    text = tokenizer.decode(input_ids, skip_special_tokens=False)
    template_text = "".join(str(template.get(k) or "") for k in ("SYSTEM", "INSTRUCTION", "SUFFIX", "SEP"))
    for marker in style["markers"]:  # each special token of the template is there, as one token
        if marker in template_text:
            assert tokenizer.convert_tokens_to_ids(marker) in input_ids, (marker, text)
    for fixed in template["INSTRUCTION"].replace("{system}", "\0").replace("{input}", "\0").split("\0"):
        assert fixed in text, (fixed, text)
    if style["bos"]:
        assert input_ids[0] == tokenizer.bos_token_id and input_ids.count(tokenizer.bos_token_id) == 1
    else:
        assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in input_ids
    # exactly the answers are trained: each with the suffix, and EOS unless the suffix ends the turn
    end = (template.get("SUFFIX") or "") + ("" if template.get("SUFFIX_AS_EOS") else tokenizer.eos_token)
    trained_ids = [t for t, lab in zip(input_ids, labels) if lab != IGNORE_INDEX]
    assert trained_ids == [lab for lab in labels if lab != IGNORE_INDEX]  # a label is its own token
    trained = tokenizer.decode(trained_ids, skip_special_tokens=False)
    assert trained == "".join(out + end for out in outputs), trained


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_model_config_renders_its_template(model_name, tokenizer_dirs):
    """The custom-data config's own map function, template and tokenizer settings, on one conversation."""
    model = MODELS[model_name]
    name = LIB.config_name(model, "lora", "custom")
    cfg = load_config(name, {"pretrained_model_name_or_path": tokenizer_dirs(model.template)})
    data = cfg.train_dataset
    tokenizer = build(cfg.tokenizer)
    rows = build(data.template_map_fn)(data.dataset_map_fn({"messages": CHAT}))
    assert [("Be brief." in turn["input"]) for turn in rows["conversation"]] == [True, False]
    sample = ConversationEncoder(tokenizer, cfg.max_length)(rows)
    assert_template_tokens(tokenizer, cfg.prompt_template, TOKENIZER_STYLES[model.template], sample["input_ids"],
                           sample["labels"], ["Paris.", "Hello!"])
    text = tokenizer.decode(sample["input_ids"])
    assert all(s in text for s in ("Be brief.", "What is the capital of France?", "Say hello."))


# ------------------------------------------------------------------ configs train on tiny models

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
]
OASST1_ROWS = [
    {"text": "### Human: What is the capital of France?### Assistant: The capital of France is Paris."},
    {"text": "### Human: Say hello.### Assistant: Hello!### Human: Again, louder.### Assistant: HELLO!"},
]
CUSTOM_ROWS = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
TRAIN_TEXTS = [json.dumps(r, ensure_ascii=False) for r in ALPACA_ROWS + OASST1_ROWS + CUSTOM_ROWS]


def _runs() -> list[str]:
    """The configs that train.

    For each architecture transformers ships, one run per method, each on a different dataset (so every
    architecture sees all three) and, where the table has several models of the architecture, each of a
    different model; then one LoRA run for each template not trained yet. So every architecture x method,
    every dataset and every natively runnable model's template trains at least once.

    Why not every natively runnable config (9 per model): a run costs one to several seconds on these 2
    shared cores, so 200-odd runs would take far longer than the 3 minutes this file may take. Configs of
    one architecture differ only in settings, which test_every_builtin_config_loads checks for every
    config, and in the template, which test_every_model_config_renders_its_template checks for every model.
    """
    native = [m for m in LIB.MODELS if not m.hub_code]
    runs = []
    archs = [a for a in NATIVE_ARCHS if any(m.arch == a for m in native)]
    for i, arch in enumerate(archs):
        models = [m for m in native if m.arch == arch]
        for j, method in enumerate(LIB.METHODS):
            runs.append(LIB.config_name(models[j % len(models)], method, LIB.DATASETS[(i + j) % 3]))
    trained = {LIBRARY[n][0].template for n in runs}
    untrained = []
    for model in native:
        if model.template not in trained:
            trained.add(model.template)
            untrained.append(model)
    for k, model in enumerate(untrained):
        runs.append(LIB.config_name(model, "lora", LIB.DATASETS[k % 3]))
    return runs


RUNS = _runs()


def test_runs_cover_every_architecture_method_and_dataset():
    combos = {(LIBRARY[n][0].arch, LIBRARY[n][1]) for n in RUNS}
    native = {m.arch for m in LIB.MODELS if not m.hub_code}
    assert native <= set(NATIVE_ARCHS)
    assert combos == {(a, method) for a in native for method in LIB.METHODS}
    for arch in native:
        assert {LIBRARY[n][2] for n in RUNS if LIBRARY[n][0].arch == arch} == set(LIB.DATASETS)
    assert {LIBRARY[n][0].template for n in RUNS} == {m.template for m in LIB.MODELS if not m.hub_code}
    # the remote-code models are exactly the ones left to loading and template checks
    assert {m.arch for m in LIB.MODELS if m.hub_code}.isdisjoint(NATIVE_ARCHS)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("library_data")
    out = {}
    for dataset, rows in (("alpaca", ALPACA_ROWS), ("oasst1", OASST1_ROWS), ("custom", CUSTOM_ROWS)):
        path = root / dataset / "train.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 2), encoding="utf-8")
        out[dataset] = {"data_files": str(path)} if dataset == "custom" else {"data_path": str(path.parent)}
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(architecture, template) -> a tiny saved model with a tokenizer of that template's style."""
    made: dict[tuple[str, str], str] = {}

    def get(arch: str, template: str) -> str:
        if (arch, template) not in made:
            path = tmp_path_factory.mktemp(f"{arch}_{template}")
            made[arch, template] = str(make_tiny_model(path, arch, template, TRAIN_TEXTS))
        return made[arch, template]

    return get


def tiny_run_overrides(model_dir: str, data: dict) -> dict:
    """What points a library config at a tiny local model and data, for two short iterations."""
    return {
        "pretrained_model_name_or_path": model_dir,
        **data,
        "max_length": 128,
        "accumulative_counts": 1,  # one optimizer step per iteration
        "evaluation_inputs": ["Say hello."],
        "custom_hooks.1.max_new_tokens": 2,
        "train_cfg.max_epochs": None,
        "train_cfg.max_iters": 2,
        "default_hooks.logger.interval": 1,
    }


def train_and_check(cfg: Config, work_dir: Path, arch: str, method: str, template: str):
    """Build the runner, check what the method trains, train, check the run; returns the runner."""
    import bitsandbytes as bnb

    from lmtune.engine import checkpoint as ckpt
    from lmtune.engine.runner import Runner

    runner = Runner.from_config(cfg, work_dir=str(work_dir), seed=1)
    model = runner.unwrapped_model
    assert (model.llm.get_base_model() if model.use_lora else model.llm).config.model_type == arch

    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if method == "full":
        assert not model.use_lora and trainable == set(params) and not quantized
    else:
        assert model.use_lora and trainable and all("lora_" in n for n in trainable)
        assert bool(quantized) == (method == "qlora")
    before = {n: p.detach().clone() for n, p in params.items()}

    # the first training row is the template's rendering of the data
    row = runner.train_dataloader.dataset[0]
    style = TOKENIZER_STYLES[template]
    tokenizer = build(cfg.tokenizer)
    text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    for marker in style["markers"]:
        if marker in cfg.prompt_template["INSTRUCTION"]:
            assert tokenizer.convert_tokens_to_ids(marker) in row["input_ids"], (marker, text)
    assert any(lab != IGNORE_INDEX for lab in row["labels"])

    runner.train()

    logged = [json.loads(line) for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in logged)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    if method != "full":
        assert any("lora_B" in n for n in changed)  # B starts at zero: the adapters really learned
    weights = ckpt.load_checkpoint(ckpt.find_latest(runner.work_dir))["weights"]
    assert set(weights) == trainable
    answers = [json.loads(line) for line in (runner.log_dir / "eval_chat.jsonl").read_text().splitlines()]
    assert [a["when"] for a in answers] == ["before training", "after training"]
    return runner


@pytest.mark.parametrize("name", RUNS)
def test_config_trains_on_a_tiny_model_of_its_architecture(name, tmp_path, tiny_models, data_dirs):
    model, method, dataset = LIBRARY[name]
    overrides = tiny_run_overrides(tiny_models(model.arch, model.template), data_dirs[dataset])
    # float32: float16 is no CPU training dtype (lmtune would switch to bfloat16, which is slow on a CPU and
    # whose rounding, on a tiny random model, trips lmtune's check that packed samples stay apart);
    # test_half_precision_config_trains_as_written runs a config's own half-precision settings.
    overrides.update({"model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32"})
    if method == "qlora":
        overrides["model.llm.quantization_config.bnb_4bit_compute_dtype"] = torch.float32
    cfg = load_config(name, overrides)
    train_and_check(cfg, tmp_path / "work", model.arch, method, model.template)


def test_half_precision_config_trains_as_written(tmp_path, tiny_models, data_dirs):
    """A QLoRA config with nothing changed but the model, the data and the run length: 4-bit weights with
    bfloat16 compute, bfloat16 autocast. (Gemma 2 runs eager attention, exact for packed samples in bf16.)"""
    model, method, dataset = LIBRARY["gemma2_2b_it_qlora_alpaca_e3"]
    assert model.dtype == "bfloat16" and method == "qlora"
    cfg = load_config("gemma2_2b_it_qlora_alpaca_e3",
                          tiny_run_overrides(tiny_models(model.arch, model.template), data_dirs[dataset]))
    runner = train_and_check(cfg, tmp_path / "work", model.arch, method, model.template)
    assert runner.optim_wrapper.dtype == torch.bfloat16
    import bitsandbytes as bnb

    layers = [m for m in runner.unwrapped_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)


# the preference configs of the library: (architecture, template) of their model
PREFERENCE = {"qwen2_5_7b_instruct_dpo_qlora_ultrafeedback_e1": ("qwen2", "qwen2_5_chat"),
              "llama3_1_8b_instruct_orpo_qlora_ultrafeedback_e1": ("llama", "llama3_chat")}


@pytest.mark.parametrize("name", sorted(PREFERENCE))
def test_preference_configs_train_on_a_tiny_model_of_their_architecture(name, tmp_path, tiny_models):
    from datasets import load_dataset

    from lmtune.engine.runner import Runner

    assert name in BUILTIN
    arch, template = PREFERENCE[name]
    data = tmp_path / "pairs.jsonl"
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    rows = [{"chosen": prompt + [{"role": "assistant", "content": "Paris." * (1 + k % 3)}],
             "rejected": prompt + [{"role": "assistant", "content": "London, I think."}]} for k in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tiny_run_overrides(tiny_models(arch, template), {})
    # the real models' tokenizers have a chat template, which renders the pairs; the tiny ones get a simple one
    overrides["tokenizer.chat_template"] = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    overrides.update({"train_dataloader.dataset.dataset": dict(type=load_dataset, path="json", data_files=str(data)),
                      "model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32", "lr": 1e-3,
                      "model.llm.quantization_config.bnb_4bit_compute_dtype": torch.float32})
    cfg = load_config(name, overrides)
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    assert runner.unwrapped_model.quantized and runner.unwrapped_model.use_lora
    runner.train()
    logged = [json.loads(line) for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(math.isfinite(s["loss"]) for s in logged)
    assert all("rewards/margins" in s and "rewards/accuracies" in s for s in logged)
    lora_b = [p for n, p in runner.unwrapped_model.named_parameters() if "lora_B" in n]
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # zero at the start: the adapters learned
