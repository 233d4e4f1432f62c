"""The ``tiny`` recipe: a random-weight Llama (hidden 256, 4 layers) with a 4096-token byte-level
BPE trained locally on Python's own standard library sources. Weights and tokenizer are
bit-identical for a given seed, Python and library versions. Builds in a few seconds; for fast
tests.
"""

from __future__ import annotations

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

TINY_VOCAB = 4096
TINY_HIDDEN = 256
TINY_LAYERS = 4
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 688
TINY_INIT_STD = 0.02
TINY_CORPUS_CHARS = 2_000_000  # bounded prefix of the sorted stdlib *.py files


def _train_tiny_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != TINY_VOCAB:
        raise ModelPrepareError(
            f"tiny tokenizer training gave {tok.get_vocab_size()} tokens, expected {TINY_VOCAB}"
        )
    return tok


def build_tiny(out: Path, root: Path, seed: int) -> dict[str, Any]:
    del root

    transformers = hf()
    texts, corpus = stdlib_corpus(TINY_CORPUS_CHARS)
    logger.info(
        "training a %d-token byte-level BPE on %d stdlib files (%d chars)",
        TINY_VOCAB,
        corpus["files"],
        corpus["chars"],
    )
    save_chat_tokenizer(_train_tiny_tokenizer(texts), out)

    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
        initializer_range=TINY_INIT_STD,
        architectures=["LlamaForCausalLM"],
    )
    logger.info("initialising tiny Llama weights from seed %d", seed)
    model = transformers.LlamaForCausalLM(config)
    init_random(model, seed, TINY_INIT_STD)
    save_bf16(model, out)
    return {"kind": "random", "init_std": TINY_INIT_STD, "tokenizer_corpus": corpus}
