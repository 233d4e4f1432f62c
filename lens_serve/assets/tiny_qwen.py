"""The ``tiny-qwen`` recipe: a random-weight Qwen3 (hidden 128, 2 layers) with a 4096-token
SentencePiece-style BPE (Metaspace "▁" for spaces, byte fallback) trained locally on Python's own
standard library sources. A second model family and tokenizer style next to ``tiny``'s Llama and
byte-level BPE, so that tests see what depends on either. Weights and tokenizer are bit-identical
for a given seed, Python and library versions; builds in a few seconds.

Qwen3, not Qwen2: for a config of model_type ``qwen2`` transformers (5.x) always loads
Qwen2Tokenizer, which rebuilds a byte-level pipeline over the vocabulary and ignores the
tokenizer.json's own; vLLM would then encode and decode this tokenizer wrongly. For ``qwen3`` it
trusts tokenizer_config.json and loads tokenizer.json as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lens_serve.assets.model_dirs import ModelPrepareError
from lens_serve.assets.recipe_common import (
    BOS_ID,
    EOS_ID,
    MAX_POSITIONS,
    PAD_ID,
    SPECIAL_TOKENS,
    hf,
    init_random,
    save_bf16,
    save_chat_tokenizer,
    stdlib_corpus,
)

logger = logging.getLogger(__name__)

QWEN_VOCAB = 4096
QWEN_HIDDEN = 128
QWEN_LAYERS = 2
QWEN_HEADS = 2
QWEN_KV_HEADS = 1
QWEN_HEAD_DIM = 64  # Qwen3's default is 128; 64 keeps hidden = heads x head size
QWEN_INTERMEDIATE = 384
QWEN_INIT_STD = 0.02
# Half of tiny's corpus: the tokenizer has 256 fewer learned tokens, and the build stays fast.
QWEN_CORPUS_CHARS = 1_000_000
SPACE = "▁"  # SentencePiece's spelling of a space
# SentencePiece's byte-fallback tokens: a character the BPE has no token for is spelled in bytes.
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))


def _train_qwen_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # "first": the dummy space SentencePiece puts before a text, so a text's first word is spelled
    # like any other; split at spaces for training (one word per piece of text).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_VOCAB - len(BYTE_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # The trainer knows no byte fallback: put the byte tokens right after the special ones
    # (SentencePiece's layout) and keep the learned tokens, in their order, and merges.
    trained = json.loads(tok.to_str())["model"]
    learned = sorted(trained["vocab"], key=trained["vocab"].__getitem__)[len(SPECIAL_TOKENS) :]
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, *learned))}
    merges = [tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement=SPACE, prepend_scheme="first")]
    )
    if tok.get_vocab_size() != QWEN_VOCAB:
        raise ModelPrepareError(
            f"tiny-qwen tokenizer training gave {tok.get_vocab_size()} tokens, "
            f"expected {QWEN_VOCAB}"
        )
    return tok


def build_tiny_qwen(out: Path, root: Path, seed: int) -> dict[str, Any]:
    del root

    transformers = hf()
    texts, corpus = stdlib_corpus(QWEN_CORPUS_CHARS)
    logger.info(
        "training a %d-token SentencePiece-style BPE on %d stdlib files (%d chars)",
        QWEN_VOCAB,
        corpus["files"],
        corpus["chars"],
    )
    save_chat_tokenizer(_train_qwen_tokenizer(texts), out)

    config = transformers.Qwen3Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=QWEN_INTERMEDIATE,
        num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=QWEN_HEADS,
        num_key_value_heads=QWEN_KV_HEADS,
        head_dim=QWEN_HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
        initializer_range=QWEN_INIT_STD,
        architectures=["Qwen3ForCausalLM"],
    )
    logger.info("initialising tiny-qwen weights from seed %d", seed)
    model = transformers.Qwen3ForCausalLM(config)
    init_random(model, seed, QWEN_INIT_STD)
    save_bf16(model, out)
    return {"kind": "random", "init_std": QWEN_INIT_STD, "tokenizer_corpus": corpus}
