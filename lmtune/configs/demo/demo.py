# lmtune built-in demo: full fine-tuning of a tiny Llama created on this machine, on sample
# alpaca-format rows shipped with lmtune (facts about 60 countries). CPU, no network, about a minute.
# Copy it (or any built-in config), edit the settings in PART 1 and run `lmtune train your_cfg.py`.
import torch
from datasets import load_dataset
from peft import LoraConfig  # noqa: F401  (see the LoRA note in PART 2)
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.dataset import PROMPT_TEMPLATE, SYSTEM_TEMPLATE, DefaultSampler, process_hf_dataset
from lmtune.dataset.collate_fns import default_collate_fn
from lmtune.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from lmtune.engine.hooks import (
    CheckpointHook,
    DatasetInfoHook,
    DistSamplerSeedHook,
    EvaluateChatHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from lmtune.engine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from lmtune.engine.runner import TrainLoop
from lmtune.model import SupervisedFinetune
from lmtune.tools.demo import demo_data_path, demo_model_dir

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model: a local directory or a Hugging Face Hub id. The demo creates its model once and caches it.
pretrained_model_name_or_path = demo_model_dir()
use_varlen_attn = False

# Data
data_path = demo_data_path()  # a jsonl file of alpaca rows: instruction, input, output
prompt_template = PROMPT_TEMPLATE.qwen_chat
max_length = 512
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 1
dataloader_num_workers = 0
max_epochs = 40
optim_type = AdamW
lr = 1e-3
betas = (0.9, 0.98)
weight_decay = 0.0
max_norm = 1  # gradient clipping
warmup_ratio = 0.03

# Save
save_steps = 300
save_total_limit = 2  # -1 keeps every checkpoint

# Evaluate the generation performance during the training
evaluation_freq = 300
SYSTEM = SYSTEM_TEMPLATE.alpaca
evaluation_inputs = ["What is the capital of France?", "Which country has the capital Lima?"]
max_new_tokens = 24  # per answer: the answers are a few words, and an untrained model never stops

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    padding_side="right")

# Full fine-tuning: the tiny model starts from random weights, so every weight must learn.
# For LoRA add `lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.1, task_type='CAUSAL_LM')`;
# for QLoRA also add a BitsAndBytesConfig `quantization_config` to `llm`.
model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    use_activation_checkpointing=False,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        torch_dtype=torch.float32))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path="json", data_files=data_path),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=use_varlen_attn)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale="dynamic",
    dtype="float32")

param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=True, begin=0, end=warmup_ratio * max_epochs,
         convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=warmup_ratio * max_epochs,
         end=max_epochs, convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=evaluation_freq,
         evaluation_inputs=evaluation_inputs, system=SYSTEM, prompt_template=prompt_template,
         max_new_tokens=max_new_tokens),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps, max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
visualizer = None
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)
