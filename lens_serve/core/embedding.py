"""The base model's input-embedding table, read straight from its safetensors checkpoint, and the
tokens its tokenizer lends `tokens` gists to read as a list.

GistNet, LensNet and assembly need only these, never the full model."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "model.embed_tokens.weight"
# A run of `tokens` gists reads "[kw, kw ...]\n\n": the frame around it and the separator in it.
SEPARATOR_TEXT = ","
FRAME_OPEN_TEXT = "["
FRAME_CLOSE_TEXT = " ...]\n\n"


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
        self.list_tokens = list_tokens  # None: the tokenizer lends no list, `tokens` gists are bare

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> EmbeddingTable:
        """Load only the embedding tensor from `model_dir` (single or sharded safetensors)."""
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            if EMBEDDING_KEY not in weight_map:
                raise KeyError(_missing_embedding(index, weight_map))
            path = model_dir / weight_map[EMBEDDING_KEY]
        else:
            path = model_dir / "model.safetensors"
        if not path.exists():
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            raise FileNotFoundError(
                f"no safetensors checkpoint at {path} (safetensors files there: {found or 'none'})"
            )
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if EMBEDDING_KEY not in keys:
                raise KeyError(_missing_embedding(path, keys))
            weight = f.get_tensor(EMBEDDING_KEY)
        return cls(weight, read_list_tokens(model_dir, int(weight.shape[0])))

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


def _missing_embedding(where: Path, found: Iterable[str]) -> str:
    names = sorted(found)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (
        f"{where} has no tensor {EMBEDDING_KEY!r}, the input-embedding table lens-serve reads "
        f"(a decoder-only model in the Llama/Qwen layout has it); found: {shown or 'none'}"
    )


def read_list_tokens(model_dir: Path, vocab_size: int) -> ListTokens | None:
    """The list tokens of `model_dir`'s tokenizer.json, derived from the tokenizer itself: the ids
    it encodes the separator and the frame to, and the tokens whose text begins with a space.

    None, with a warning that says what is missing, when the tokenizer cannot show the list; then
    `tokens` gists are bare (no frame, every piece of a word shown)."""
    try:
        return _list_tokens(model_dir / "tokenizer.json", vocab_size)
    except ValueError as exc:
        logger.warning(
            "model %s: `tokens` gists cannot read as a list, so they are bare (no frame, word "
            "pieces shown): %s",
            model_dir,
            exc,
        )
        return None


def _list_tokens(path: Path, vocab_size: int) -> ListTokens:
    if not path.exists():
        raise ValueError(f"there is no {path.name}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
        # The frame and the separator stand inside a text; a tokenizer that marks the start of a
        # text with a space (SentencePiece's dummy prefix) would give them that space too.
        in_text = Tokenizer.from_str(
            json.dumps({**spec, **{k: _no_start_space(spec.get(k)) for k in _BEFORE_MODEL}})
        )
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
        raise ValueError(f"the tokenizers library cannot read {path.name}: {exc}") from exc

    ids = in_text.encode(SEPARATOR_TEXT, add_special_tokens=False).ids
    if len(ids) != 1 or ids[0] >= vocab_size or tokenizer.decode(ids) != SEPARATOR_TEXT:
        raise ValueError(f"its tokenizer has no single token for {SEPARATOR_TEXT!r} ({ids})")
    separator = ids[0]

    def reads(token_ids: list[int]) -> str:
        """What `token_ids` read as after the separator, where a decoder keeps a leading space (a
        SentencePiece decoder drops the one a whole text begins with)."""
        decoded: str = tokenizer.decode([separator, *token_ids], skip_special_tokens=False)
        return decoded[len(SEPARATOR_TEXT) :]

    frame = []
    for text in (FRAME_OPEN_TEXT, FRAME_CLOSE_TEXT):
        ids = in_text.encode(text, add_special_tokens=False).ids
        if reads(ids) != text or not all(0 <= i < vocab_size for i in ids):
            raise ValueError(
                f"its tokenizer cannot encode the frame {text!r}: it gives {ids}, which reads "
                f"{reads(ids)!r} (embedding rows: {vocab_size})"
            )
        frame.append(tuple(ids))

    # A token begins a word if its text starts with a space: "Ġ" in byte-level BPE, "▁" in
    # SentencePiece; decoding (after the separator) covers both and any decoder in between.
    known = min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    texts = tokenizer.decode_batch([[separator, i] for i in range(known)])
    word_starts = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
    word_starts[:known] = torch.tensor([t[len(SEPARATOR_TEXT) :].startswith(" ") for t in texts])
    if not word_starts.any():
        raise ValueError("no token of its tokenizer begins with a space")
    return ListTokens(
        separator=separator, opener=frame[0], closer=frame[1], word_starts=word_starts
    )


# The parts of a tokenizer.json that run before its model splits a text into tokens.
_BEFORE_MODEL = ("normalizer", "pre_tokenizer")


def _no_start_space(node: Any) -> Any:
    """A tokenizer.json part with every space it adds at the start of a text turned off."""
    if isinstance(node, list):
        return [_no_start_space(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _no_start_space(v) for k, v in node.items()}
    if node.get("type") == "Metaspace" and "prepend_scheme" in node:
        node["prepend_scheme"] = "never"
    if "add_prefix_space" in node:  # ByteLevel, and Metaspace in older files
        node["add_prefix_space"] = False
    if node.get("type") == "Prepend":  # the normalizer of Llama-2-style files
        node["prepend"] = ""
    return node
