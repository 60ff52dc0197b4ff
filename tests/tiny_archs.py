"""Tiny models of the built-in configs' architectures, and tokenizers with their templates' tokens.

A model here has the real architecture's code (transformers' own class), 2 layers and hidden size
64, random weights, and is saved with ``save_pretrained`` so that a config loads it exactly as it
would the hub model. Its tokenizer is a byte-level BPE trained on a small corpus in which each
prompt template's markers (``<|im_start|>``, ``<start_of_turn>``...) are single special tokens,
as they are in the real tokenizer, with the real tokenizer's BOS (added to every encoding, or
not) and EOS tokens.

Remote-code architectures (InternLM2/3, ChatGLM3, Baichuan2, MiniCPM) have no class in
transformers, so only their tokenizer side can be made here.
"""

from __future__ import annotations

from pathlib import Path

# template name -> how the real models' tokenizers treat it: the BOS token they put before every
# encoding (None: none), their EOS token, and the template markers that are one special token each.
# A marker that the real tokenizer splits into ordinary pieces (Llama 2's and Mistral v1's [INST])
# is not listed: it stays ordinary text here too.
TOKENIZER_STYLES: dict[str, dict] = {
    "internlm2_chat": dict(bos="<s>", eos="</s>", markers=["<|im_start|>", "<|im_end|>"]),
    "internlm3_chat": dict(bos="<s>", eos="</s>", markers=["<|im_start|>", "<|im_end|>"]),
    "llama2_chat": dict(bos="<s>", eos="</s>", markers=[]),
    "llama3_chat": dict(bos="<|begin_of_text|>", eos="<|eot_id|>",
                        markers=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "llama3_1_chat": dict(bos="<|begin_of_text|>", eos="<|eot_id|>",
                          markers=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]),
    "qwen_chat": dict(bos=None, eos="<|im_end|>", markers=["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen2_chat": dict(bos=None, eos="<|im_end|>", markers=["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen2_5_chat": dict(bos=None, eos="<|im_end|>", markers=["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen3_chat": dict(bos=None, eos="<|im_end|>",
                       markers=["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]),
    "mistral": dict(bos="<s>", eos="</s>", markers=[]),
    "mixtral": dict(bos="<s>", eos="</s>", markers=[]),
    "mistral_v3": dict(bos="<s>", eos="</s>", markers=["[INST]", "[/INST]"]),
    "gemma": dict(bos="<bos>", eos="<eos>", markers=["<start_of_turn>", "<end_of_turn>"]),
    "gemma2_chat": dict(bos="<bos>", eos="<eos>", markers=["<start_of_turn>", "<end_of_turn>"]),
    "gemma3_chat": dict(bos="<bos>", eos="<eos>", markers=["<start_of_turn>", "<end_of_turn>"]),
    "phi3_chat": dict(bos=None, eos="<|endoftext|>", markers=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi4_chat": dict(bos=None, eos="<|im_end|>", markers=["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "deepseek_coder": dict(bos="<｜begin▁of▁sentence｜>", eos="<|EOT|>", markers=["<|EOT|>"]),
    "deepseek_v2": dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", markers=[]),
    "chatml": dict(bos=None, eos="<|im_end|>", markers=["<|im_start|>", "<|im_end|>"]),
    "chatglm3": dict(bos=None, eos="</s>", markers=["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]),
    "baichuan2_chat": dict(bos=None, eos="</s>", markers=["<reserved_106>", "<reserved_107>"]),
    "minicpm": dict(bos="<s>", eos="</s>", markers=["<用户>", "<AI>"]),
    "minicpm3": dict(bos=None, eos="<|im_end|>", markers=["<|im_start|>", "<|im_end|>"]),
}

PAD = "<pad>"

_CORPUS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request. What is the capital of France? The capital of France is Paris. Hello, how are you? I am "
    "fine, thank you. system user assistant model Human Assistant 0123456789 Please tell me five scenic "
    "spots in Shanghai. 请给我介绍五个上海的景点 The quick brown fox jumps over the lazy dog."
)


def make_tokenizer(template: str, texts: list[str] = (), vocab_size: int = 384):
    """A ``PreTrainedTokenizerFast`` in the style of ``template``'s models (see ``TOKENIZER_STYLES``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    style = TOKENIZER_STYLES[template]
    specials = [PAD, style["eos"]] + ([style["bos"]] if style["bos"] else []) + style["markers"]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS, *texts], trainer=trainer)
    if style["bos"]:
        bos_id = tok.token_to_id(style["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style['bos']} $A", pair=f"{style['bos']} $A $B", special_tokens=[(style["bos"], bos_id)])
    extra = [m for m in style["markers"] if m not in (style["eos"], style["bos"])]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=style["eos"], pad_token=PAD, bos_token=style["bos"],
        additional_special_tokens=extra, clean_up_tokenization_spaces=False)
    return fast


def _arch_config(arch: str, vocab_size: int, bos_id: int | None, eos_id: int, pad_id: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "deepseek_v2":
        common["num_key_value_heads"] = common["num_attention_heads"]  # multi-head latent attention: no GQA
        return tf.DeepseekV2Config(**common, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                                   qk_rope_head_dim=8, v_head_dim=16, head_dim=8, n_routed_experts=4,
                                   num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                                   first_k_dense_replace=1)
    raise KeyError(f"no tiny {arch} model: it needs remote code (not shipped with transformers)")


# The architectures a tiny model can be made of, with transformers' own code.
NATIVE_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3",
                "deepseek_v2")


def make_tiny_model(save_dir: str | Path, arch: str, template: str, texts: list[str] = (), seed: int = 0) -> Path:
    """Save a tiny ``arch`` model and a ``template``-style tokenizer to ``save_dir``; returns it."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(template, list(texts))
    config = _arch_config(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                          tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir
