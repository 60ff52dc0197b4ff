"""Named chat prompt templates (and, re-exported, the default system prompts of ``system_templates``).

``PROMPT_TEMPLATE`` maps a template name to a :class:`ConfigDict` with these fields:

``SYSTEM``
    Format string with ``{system}``. Rendered in a round whose conversation turn carries
    a system message (map functions put it on the first round), and only there.
``INSTRUCTION``
    Format string with ``{input}`` (and optionally ``{round}``, 1-based). It wraps
    each user turn and ends with the header that opens the assistant's turn. When it
    also has ``{system}``, the rendered ``SYSTEM`` goes there (empty in rounds without
    a system message) instead of before it: for formats that put the system text
    inside the first user message (Llama 2, Mistral, Gemma).
``SUFFIX`` (optional)
    Text written right after each assistant output; it is trained.
``SUFFIX_AS_EOS`` (optional, default False)
    True when ``SUFFIX`` already ends the turn, so the tokenizer's EOS token is
    not appended. When False, EOS is appended after output + ``SUFFIX`` and trained.
``SEP`` (optional)
    Text between one round's end and the next round's instruction; not trained.
``STOP_WORDS``
    Strings that end generation.

A conversation ``[(input_1, output_1), (input_2, output_2), ...]`` with an optional
system message renders as::

    [SYSTEM] INSTRUCTION(1) output_1 SUFFIX [EOS] SEP INSTRUCTION(2) output_2 SUFFIX [EOS] ...

The BOS token (or a prefix such as ChatGLM's ``[gMASK]sop``) is never written in a
template: the encoder adds it, as the tokenizer does.

The text is meant to equal what each model's Hugging Face chat template renders,
with these general exceptions (and the ones noted next to an entry):

* The separator a Hugging Face template writes after the *final* turn (for example
  ChatML's trailing ``\\n``) is not rendered; ``SEP`` only goes between rounds.
* Where a template writes one space between the assistant header and the answer
  and the tokenizer is SentencePiece-based (Llama 2, Mistral, Vicuna, ChatGLM3),
  that space is left out: the tokenizer adds it by itself when the answer is
  encoded on its own, and the model's generation prompt ends before it.
* A few formats cannot be expressed with fixed strings (the system text merged
  into the *last* user message, a date header, per-round BOS); each such entry says
  what is rendered instead.

``prompt_template=None`` (or ``'auto'``) renders with the tokenizer's own chat template
instead, exactly (see ``lmtune.dataset.chat_template``).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

from lmtune.config.configdict import ConfigDict
from lmtune.dataset.system_templates import SYSTEM_TEMPLATE

__all__ = ["PROMPT_TEMPLATE", "SYSTEM_TEMPLATE", "get_template"]


def _chatml(stop_words: list[str]) -> dict[str, Any]:
    """The ChatML turn layout shared by Qwen, InternLM2/3, MiniCPM3 and others."""
    return dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=stop_words,
    )


def _llama3(system: str) -> dict[str, Any]:
    """The Llama 3 header layout; ``system`` is the SYSTEM format string."""
    return dict(
        SYSTEM=system,
        INSTRUCTION=(
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        SUFFIX="<|eot_id|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|eot_id|>"],
    )


def _gemma() -> dict[str, Any]:
    """Gemma's turn layout. Gemma has no system role: Gemma 3's template prepends the
    system text (plus a blank line) to the first user message, as here; Gemma 1/2
    templates reject a system message, and the same placement is used for them."""
    return dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="<start_of_turn>user\n{system}{input}<end_of_turn>\n<start_of_turn>model\n",
        SUFFIX="<end_of_turn>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<end_of_turn>"],
    )


# Llama 2 chat and Code Llama Instruct: the <<SYS>> block inside the first [INST], as in
# the Hugging Face template. There every round starts with <s>; here only the first
# does (the encoder adds BOS once). Meta's ' ' before each </s> is not rendered.
_LLAMA2 = dict(
    SYSTEM="<<SYS>>\n{system}\n<</SYS>>\n\n",
    INSTRUCTION="[INST] {system}{input} [/INST]",
    STOP_WORDS=["</s>"],
)

# Vicuna v1.1+ layout (FastChat's conversation template; no HF chat template).
_VICUNA = dict(
    SYSTEM="{system} ",
    INSTRUCTION="USER: {input} ASSISTANT:",
    STOP_WORDS=["</s>"],
)

# DeepSeek LLM chat layout (also DeepSeek-MoE and DeepSeek-V2 chat).
_DEEPSEEK_CHAT = dict(
    SYSTEM="{system}\n\n",
    INSTRUCTION="User: {input}\n\nAssistant: ",
    SUFFIX="<｜end▁of▁sentence｜>",
    SUFFIX_AS_EOS=True,
    STOP_WORDS=["<｜end▁of▁sentence｜>"],
)

PROMPT_TEMPLATE = ConfigDict(
    # Generic format for models without their own chat format; the same role
    # markers as InternLM 1 so checkpoints tuned with it keep working.
    default=dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}\n<|Bot|>:",
        SEP="\n",
        STOP_WORDS=[],
    ),
    # Zephyr (HuggingFaceH4/zephyr-7b-*); every message ends with </s>.
    zephyr=dict(
        SYSTEM="<|system|>\n{system}</s>\n",
        INSTRUCTION="<|user|>\n{input}</s>\n<|assistant|>\n",
        SEP="\n",
        STOP_WORDS=["</s>"],
    ),
    # InternLM 1 chat (internlm-chat-7b). Its v1.1 and 20B releases end the user
    # turn with '\n' instead of '<eoh>\n'; use a custom dict for those.
    internlm_chat=dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}<eoh>\n<|Bot|>:",
        SUFFIX="<eoa>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<eoa>"],
    ),
    # InternLM2 / InternLM2.5 chat: ChatML with <s> as BOS.
    internlm2_chat=_chatml(["<|im_end|>"]),
    # MOSS (fnlp/moss-moon-003-sft). The space MOSS writes after '<|MOSS|>:'
    # belongs to the reply (the model generates it), so it is not in INSTRUCTION.
    moss_sft=dict(
        SYSTEM="{system}\n",
        INSTRUCTION="<|Human|>: {input}<eoh>\n<|MOSS|>:",
        SUFFIX="<eom>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<eoc>", "<eom>"],
    ),
    # Llama 2 chat (see the note on _LLAMA2).
    llama2_chat=_LLAMA2,
    # Code Llama Instruct: the Llama 2 chat format (see the note on _LLAMA2).
    code_llama_chat=_LLAMA2,
    # ChatGLM2. It has no system role, so the system text is written before the
    # first round. Its history format has no EOS between rounds; EOS is appended
    # here so the model learns where an answer stops.
    chatglm2=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="[Round {round}]\n\n问：{input}\n\n答：",
        SEP="\n\n",
        STOP_WORDS=["</s>"],
    ),
    # ChatGLM3. A turn ends where the next role token starts; EOS is appended after
    # each answer here so the model learns to stop (the HF text has none mid-chat).
    chatglm3=dict(
        SYSTEM="<|system|>\n {system}",
        INSTRUCTION="<|user|>\n {input}<|assistant|>\n",
        STOP_WORDS=["<|user|>", "<|observation|>"],
    ),
    # Qwen (1.0) chat: ChatML, no BOS.
    qwen_chat=_chatml(["<|im_end|>", "<|endoftext|>"]),
    # Baichuan-13B-Chat: reserved tokens 195/196 open the user/assistant turns.
    # Its chat code puts no EOS between rounds; EOS is appended here for training.
    baichuan_chat=dict(
        SYSTEM="{system}",
        INSTRUCTION="<reserved_102>{input}<reserved_103>",
        STOP_WORDS=["</s>"],
    ),
    # Baichuan2 chat: same layout, with its own reserved tokens (see baichuan_chat).
    baichuan2_chat=dict(
        SYSTEM="{system}",
        INSTRUCTION="<reserved_106>{input}<reserved_107>",
        STOP_WORDS=["</s>"],
    ),
    # WizardLM 13B/70B V1.2: the Vicuna format.
    wizardlm=_VICUNA,
    # WizardCoder: the Alpaca-style single-turn prompt; SEP joins extra rounds.
    wizardcoder=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="### Instruction:\n{input}\n\n### Response:",
        SEP="\n\n",
        STOP_WORDS=[],
    ),
    # Vicuna v1.1 / v1.3 / v1.5.
    vicuna=_VICUNA,
    # DeepSeek Coder Instruct. Its HF template writes a caller's system text with no
    # newline after it (only its built-in default ends with '\n'); one is added here.
    deepseek_coder=dict(
        SYSTEM="{system}\n",
        INSTRUCTION="### Instruction:\n{input}\n### Response:\n",
        SUFFIX="\n<|EOT|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|EOT|>"],
    ),
    # DeepSeek-MoE 16B chat (DeepSeek LLM chat format).
    deepseek_moe=_DEEPSEEK_CHAT,
    # DeepSeek-V2 / V2-Lite chat (DeepSeek LLM chat format; V2.5 uses deepseek_v3).
    deepseek_v2=_DEEPSEEK_CHAT,
    # Mistral 7B Instruct v0.1/v0.2 (SentencePiece "v1" tokenizer). The token ids equal
    # Mistral's reference encoding (mistral_common), system text in the first [INST]
    # included; the HF template's extra spaces after <s>, </s> and [/INST] are the
    # tokenizer's own prefix.
    mistral=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="[INST] {system}{input} [/INST]",
        STOP_WORDS=["</s>"],
    ),
    # Mixtral 8x7B Instruct: the Mistral v1 format (see mistral).
    mixtral=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="[INST] {system}{input} [/INST]",
        STOP_WORDS=["</s>"],
    ),
    # MiniCPM 1/2 (<用户>/<AI> markers). Its HF template puts nothing after an
    # answer; EOS is appended here for training.
    minicpm=dict(
        SYSTEM="{system}",
        INSTRUCTION="<用户>{input}<AI>",
        STOP_WORDS=["</s>"],
    ),
    # MiniCPM3: ChatML.
    minicpm3=_chatml(["<|im_end|>", "<|endoftext|>"]),
    # Gemma (1.x) instruct (see _gemma for the system text).
    gemma=_gemma(),
    # Cohere Command-R / Command-R+.
    cohere_chat=dict(
        SYSTEM="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        INSTRUCTION=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        ),
        SUFFIX="<|END_OF_TURN_TOKEN|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|END_OF_TURN_TOKEN|>"],
    ),
    # Llama 3 Instruct.
    llama3_chat=_llama3("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"),
    # Phi-3 / Phi-3.5 instruct (the first Phi-3-mini template dropped system turns;
    # HF also ends a finished chat with <|endoftext|>, which is not rendered).
    phi3_chat=dict(
        SYSTEM="<|system|>\n{system}<|end|>\n",
        INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        SUFFIX="<|end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|end|>"],
    ),
    # Qwen2 instruct: ChatML. Without a system message its HF template adds
    # 'You are a helpful assistant.'; here nothing is added.
    qwen2_chat=_chatml(["<|im_end|>", "<|endoftext|>"]),
    # Qwen2.5 instruct: ChatML. Without a system message its HF template adds
    # 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.';
    # here nothing is added (pass that text as the system message to match).
    qwen2_5_chat=_chatml(["<|im_end|>", "<|endoftext|>"]),
    # Qwen3 hybrid-thinking models in non-thinking mode: ChatML plus the empty think
    # block that enable_thinking=False writes. HF writes that block only in the last
    # round's answer; here every round has it. Qwen3 "Instruct-2507" models have no
    # think block: use qwen2_5_chat for them.
    qwen3_chat=dict(
        _chatml(["<|im_end|>", "<|endoftext|>"]),
        INSTRUCTION=(
            "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ),
    ),
    # Llama 3.1 / 3.2 / 3.3 Instruct. Their HF template always opens with a system
    # turn carrying a date header (default date 26 Jul 2024); it is rendered here
    # when a system message is given, and left out otherwise.
    llama3_1_chat=dict(
        _llama3(
            "<|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "{system}<|eot_id|>"
        ),
        STOP_WORDS=["<|eot_id|>", "<|eom_id|>"],
    ),
    # Gemma 2 instruct (see _gemma for the system text).
    gemma2_chat=_gemma(),
    # Gemma 3 instruct (see _gemma for the system text).
    gemma3_chat=_gemma(),
    # Phi-4 (14B). Phi-4-mini uses the phi3_chat layout instead.
    phi4_chat=dict(
        SYSTEM="<|im_start|>system<|im_sep|>{system}<|im_end|>",
        INSTRUCTION="<|im_start|>user<|im_sep|>{input}<|im_end|><|im_start|>assistant<|im_sep|>",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|im_end|>"],
    ),
    # DeepSeek-V3 and V2.5 chat (R1 adds a think block: use a custom dict).
    deepseek_v3=dict(
        SYSTEM="{system}",
        INSTRUCTION="<｜User｜>{input}<｜Assistant｜>",
        SUFFIX="<｜end▁of▁sentence｜>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<｜end▁of▁sentence｜>"],
    ),
    # GLM-4 chat (glm-4-9b-chat). A turn ends where the next role token starts;
    # EOS (<|endoftext|>) is appended after each answer here for training.
    glm4_chat=dict(
        SYSTEM="<|system|>\n{system}",
        INSTRUCTION="<|user|>\n{input}<|assistant|>\n",
        STOP_WORDS=["<|endoftext|>", "<|user|>", "<|observation|>"],
    ),
    # InternLM3 instruct: ChatML with <s> as BOS.
    internlm3_chat=_chatml(["<|im_end|>"]),
    # Mistral v0.3 and later [INST] models (v3 tokenizer: Mistral-7B-Instruct-v0.3,
    # Mixtral-8x22B-Instruct, Codestral). Mistral writes the system text into the *last*
    # user message; here it goes into the first (the same for one round; for several,
    # use prompt_template=None to get Mistral's placement). The space Mistral's HF
    # template writes before each answer is the tokenizer's own prefix.
    mistral_v3=dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="[INST] {system}{input}[/INST]",
        STOP_WORDS=["</s>"],
    ),
    # Plain ChatML, for any model trained on it.
    chatml=_chatml(["<|im_end|>"]),
)

def get_template(name_or_dict: str | Mapping[str, Any]) -> ConfigDict:
    """The prompt template for a name in ``PROMPT_TEMPLATE``, or a mapping as a ConfigDict.

    A name returns a deep copy, so callers may change it freely. An unknown name
    raises ``KeyError`` naming the closest known names.
    """
    if isinstance(name_or_dict, ConfigDict):
        return name_or_dict
    if isinstance(name_or_dict, Mapping):
        return ConfigDict(dict(name_or_dict))
    if not isinstance(name_or_dict, str):
        raise TypeError(
            f"a prompt template is a name or a dict, not {type(name_or_dict).__name__}"
        )
    try:
        return copy.deepcopy(PROMPT_TEMPLATE[name_or_dict])
    except KeyError:
        close = difflib.get_close_matches(name_or_dict, list(PROMPT_TEMPLATE), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown prompt template {name_or_dict!r}{hint} (None or 'auto' use the "
                       f"tokenizer's own chat template)") from None
