# DPO with QLoRA: Qwen2.5-7B-Instruct aligned on UltraFeedback preference pairs (argilla's cleaned binarized set).
# One 24 GB GPU (lmtune check says how much it takes). The reference model is the base model with the LoRA
# adapters switched off: no second copy in memory. Pairs are packed (use_varlen_attn), each sequence kept apart.
# Deleting quantization_config gives LoRA DPO; deleting lora too gives full DPO (then the reference is a frozen
# copy of the model: twice the weights). For ORPO set model type=ORPO (no reference model, see the ORPO config).
import torch
from datasets import load_dataset
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lmtune.dataset import PROMPT_TEMPLATE, DefaultSampler, build_preference_dataset, preference_collate_fn
from lmtune.dataset.preference import orpo_dpo_mix_40k_map_fn
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
from lmtune.model import DPO

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = "Qwen/Qwen2.5-7B-Instruct"
use_varlen_attn = True  # pack several pairs into a row (each sequence attends only to itself)
dpo_loss_type = "sigmoid"  # or 'robust', 'hinge', 'ipo', 'sppo_hard', 'nca_pair', 'bco_pair', 'kto_pair'
loss_beta = 0.1
label_smoothing = 0.0

# Data: rows whose chosen and rejected are whole conversations sharing all but the last message
data_path = "argilla/ultrafeedback-binarized-preferences-cleaned"
prompt_template = PROMPT_TEMPLATE.qwen2_5_chat  # for the chat samples; pairs use the tokenizer's chat template
max_length = 2048  # per sequence (prompt + response); longer ones are cut
max_packed_length = max_length * 2

# Scheduler & Optimizer
batch_size = 1  # packed rows per device
accumulative_counts = 16
dataloader_num_workers = 0
max_epochs = 1
optim_type = AdamW
lr = 5e-6
betas = (0.9, 0.999)
weight_decay = 0
max_norm = 1  # gradient clipping
warmup_ratio = 0.1

# Save
save_steps = 500
save_total_limit = 2  # -1 keeps every checkpoint

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = ""
evaluation_inputs = ["Please tell me five scenic spots in Shanghai",
                     "890729 - 425663? Only respond with math and no words."]
max_new_tokens = 256

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    padding_side="right")

model = dict(
    type=DPO,
    use_varlen_attn=use_varlen_attn,
    loss_type=dpo_loss_type,
    beta=loss_beta,
    label_smoothing=label_smoothing,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        torch_dtype=torch.bfloat16,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4")),
    lora=dict(type=LoraConfig, r=64, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=build_preference_dataset,
    dataset=dict(type=load_dataset, path=data_path),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=orpo_dpo_mix_40k_map_fn,
    is_dpo=True,
    is_reward=False,
    use_varlen_attn=use_varlen_attn,
    max_packed_length=max_packed_length,
    shuffle_before_pack=True)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=preference_collate_fn, use_varlen_attn=use_varlen_attn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale="dynamic",
    dtype="bfloat16")

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
# logged each step: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/*
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
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
