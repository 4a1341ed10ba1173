"""A tiny, randomly initialised Llama and a byte-level tokenizer, built in code for tests.

Nothing is downloaded. The tokenizer maps text to UTF-8 bytes (one token per byte, no merges), so
it round-trips any string, and the model is a 2-layer Llama small enough for CPU tests in seconds.

    >>> model, tok = build_tiny()                          # doctest: +SKIP
    >>> model(**tok(["hi"], return_tensors="pt")).logits   # doctest: +SKIP
"""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3; the 256 byte symbols follow


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by the ByteLevel pre-tokenizer (GPT-2's
    ``bytes_to_unicode``): printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_tiny_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: ids 0-3 are ``<pad> <s> </s> <unk>``, then one
    token per byte, id = byte + 4 (vocabulary 260). No BOS/EOS is added automatically; padding side defaults to
    right, as for hub tokenizers, and callers set ``padding_side`` as they need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte, symbol in enumerate(_byte_symbols()):  # byte b has id b + 4
        vocab[symbol] = len(SPECIAL_TOKENS) + byte

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_tiny(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    """Return ``(model, tokenizer)``: a float32 ``LlamaForCausalLM`` with random weights, identical
    for the same ``seed`` (the global RNG state is left untouched), and the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = max_position_embeddings
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # scope the seed: restore the caller's CPU RNG after
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval(), tokenizer
