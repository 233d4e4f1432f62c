"""The base model's input-embedding table, read straight from its safetensors checkpoint.

GistNet, LensNet and assembly need only this table, never the full model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

EMBEDDING_KEY = "model.embed_tokens.weight"


class EmbeddingTable:
    """Token id -> embedding row lookup for one base model."""

    def __init__(self, weight: torch.Tensor, separator_id: int | None = None) -> None:
        if weight.ndim != 2:
            raise ValueError(f"embedding weight must be 2-D, got shape {tuple(weight.shape)}")
        self.weight = weight  # (V, D), the checkpoint's dtype
        # The tokenizer's ",", which `tokens` gists show after their keywords (None: unknown).
        self.separator_id = separator_id

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
            return cls(f.get_tensor(EMBEDDING_KEY), _comma_id(model_dir / "tokenizer.json"))

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


def _comma_id(tokenizer_json: Path) -> int | None:
    """The id of the token `,` in a byte-level BPE tokenizer.json, None if it has none."""
    if not tokenizer_json.exists():
        return None
    vocab = json.loads(tokenizer_json.read_text()).get("model", {}).get("vocab", {})
    token_id = vocab.get(",")
    return int(token_id) if token_id is not None else None
