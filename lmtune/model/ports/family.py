"""The hub-code families lmtune runs natively, and how a hub ``config.json`` is matched to one."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """A model family whose hub repository ships its own (transformers 4) code.

    ``module`` (under ``lmtune.model.ports``) provides:

    - ``native_config(hub: dict) -> PreTrainedConfig``: the hub ``config.json`` as the config of the
      native implementation (raising ``ConfigError`` for a variant it does not cover);
    - ``model_class(hub: dict) -> type``: the model class (transformers' implementation with the
      hub's weight names converted on load and save, and the hub layout written on save);
    - optionally ``load_tokenizer(path, hub, **kwargs)``: the tokenizer without its remote code
      (default: transformers' own backend built from the repository's SentencePiece model).
    """

    model_type: str
    title: str
    module: str
    implementation: str  # what runs it, for `lmtune check`
    tokenizer_classes: tuple[str, ...] = field(default=())  # tokenizer_config.json's names of its tokenizer
    examples: tuple[str, ...] = field(default=())

    def code(self) -> Any:
        return importlib.import_module(f"lmtune.model.ports.{self.module}")


FAMILIES: tuple[Family, ...] = (
    Family("internlm2", "InternLM2 / InternLM2.5", "internlm",
           "transformers' LlamaForCausalLM; wqkv split into q/k/v on load and fused again on save",
           ("InternLM2Tokenizer", "InternLM2TokenizerFast"),
           ("internlm/internlm2-chat-7b", "internlm/internlm2-chat-1_8b", "internlm/internlm2_5-7b-chat")),
    Family("internlm3", "InternLM3", "internlm", "transformers' InternLM3 (the Llama implementation)",
           ("InternLM3Tokenizer",), ("internlm/internlm3-8b-instruct",)),
    Family("internlm", "InternLM", "internlm", "transformers' LlamaForCausalLM (biased attention projections)",
           ("InternLMTokenizer",), ("internlm/internlm-chat-7b",)),
    Family("baichuan", "Baichuan / Baichuan2", "baichuan",
           "transformers' Llama blocks; W_pack split into q/k/v; Baichuan2's normalised head; ALiBi for 13B",
           ("BaichuanTokenizer",), ("baichuan-inc/Baichuan2-7B-Chat", "baichuan-inc/Baichuan2-13B-Chat")),
    Family("chatglm", "ChatGLM2 / ChatGLM3", "chatglm",
           "transformers' GlmForCausalLM; query_key_value split into q/k/v on load and fused again on save",
           ("ChatGLMTokenizer",), ("THUDM/chatglm3-6b", "THUDM/chatglm3-6b-32k", "THUDM/chatglm2-6b")),
    Family("qwen", "Qwen (1.0)", "qwen",
           "transformers' Qwen2ForCausalLM; c_attn split into q/k/v, w2/w1 as gate/up; Qwen's NTK, log-n attention",
           ("QWenTokenizer",), ("Qwen/Qwen-7B-Chat",)),
    Family("minicpm", "MiniCPM", "minicpm",
           "transformers' GraniteForCausalLM (MiniCPM's embedding and residual scaling; a head that divides its input)",
           (), ("openbmb/MiniCPM-2B-sft-bf16",)),
    Family("minicpm3", "MiniCPM3", "minicpm", "transformers' MiniCPM3ForCausalLM (the hub's weight names)",
           ("MiniCPMTokenizer",), ("openbmb/MiniCPM3-4B",)),
    Family("deepseek", "DeepSeek-MoE", "deepseek",
           "transformers' Llama blocks; DeepSeek-MoE's router and balance loss around DeepSeek-V2's fused experts",
           (), ("deepseek-ai/deepseek-moe-16b-chat",)),
)

BY_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES}


def family_of(hub_config: dict | None) -> Family | None:
    """The family a hub ``config.json`` belongs to, or None when lmtune has no port of it."""
    if not isinstance(hub_config, dict):
        return None
    return BY_TYPE.get(str(hub_config.get("model_type", "")))


def family_of_tokenizer(tokenizer_config: dict | None) -> Family | None:
    """The family whose (remote) tokenizer class a ``tokenizer_config.json`` names, or None."""
    if not isinstance(tokenizer_config, dict):
        return None
    names = {str(tokenizer_config.get("tokenizer_class") or "")}
    for ref in (tokenizer_config.get("auto_map") or {}).get("AutoTokenizer") or []:
        if isinstance(ref, str):
            names.add(ref.rsplit(".", 1)[-1])
    return next((f for f in FAMILIES if names & set(f.tokenizer_classes)), None)


def native_titles() -> str:
    return ", ".join(f.title for f in FAMILIES)
