"""The base model's input-embedding table, read straight from its safetensors checkpoint.

GistNet, LensNet and assembly need only this table, never the full model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

EMBEDDING_KEY = "model.embed_tokens.weight"
# Byte-level BPE spellings: "Ġ" is a leading space, "Ċ" a newline.
SEPARATOR_TOKEN = ","
FRAME_TOKENS = (("[",), ("Ġ...", "]", "ĊĊ"))  # a run of `tokens` gists reads "[kw, kw ...]\n\n"
WORD_START = "Ġ"


@dataclass(frozen=True, eq=False)  # eq would compare a tensor
class ListTokens:
    """What the tokenizer lends `tokens` gists to read as a bracketed keyword list."""

    separator: int  # ","
    opener: tuple[int, ...]  # "["
    closer: tuple[int, ...]  # " ...]\n\n"
    word_starts: torch.Tensor  # (V,) bool: tokens that begin a word


class EmbeddingTable:
    """Token id -> embedding row lookup for one base model."""

    def __init__(self, weight: torch.Tensor, list_tokens: ListTokens | None = None) -> None:
        if weight.ndim != 2:
            raise ValueError(f"embedding weight must be 2-D, got shape {tuple(weight.shape)}")
        self.weight = weight  # (V, D), the checkpoint's dtype
        self.list_tokens = list_tokens  # None: no tokenizer known, `tokens` gists are bare

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> EmbeddingTable:
        """Load only the embedding tensor from `model_dir` (single or sharded safetensors)."""
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            shard = json.loads(index.read_text())["weight_map"][EMBEDDING_KEY]
            path = model_dir / shard
        else:
            path = model_dir / "model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no safetensors checkpoint at {path}")
        with safe_open(str(path), framework="pt") as f:
            if EMBEDDING_KEY not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                raise KeyError(f"{path} has no tensor {EMBEDDING_KEY!r}")
            weight = f.get_tensor(EMBEDDING_KEY)
        return cls(weight, _list_tokens(model_dir / "tokenizer.json", int(weight.shape[0])))

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(...,) int ids -> (..., D) embeddings in the checkpoint's dtype."""
        return self.weight[token_ids.long()]


def _list_tokens(tokenizer_json: Path, vocab_size: int) -> ListTokens | None:
    """The list tokens of a byte-level BPE tokenizer.json; None if it lacks any of them."""
    if not tokenizer_json.exists():
        return None
    vocab: dict[str, int] = json.loads(tokenizer_json.read_text()).get("model", {}).get("vocab", {})
    needed = (SEPARATOR_TOKEN, *FRAME_TOKENS[0], *FRAME_TOKENS[1])
    if any(vocab.get(token, vocab_size) >= vocab_size for token in needed):
        return None
    word_starts = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
    word_starts[[i for t, i in vocab.items() if t.startswith(WORD_START) and i < vocab_size]] = True
    return ListTokens(
        separator=vocab[SEPARATOR_TOKEN],
        opener=tuple(vocab[t] for t in FRAME_TOKENS[0]),
        closer=tuple(vocab[t] for t in FRAME_TOKENS[1]),
        word_starts=word_starts,
    )
