"""Training text for GistNet distillation: the training split of the essays and of Python's
standard-library sources (`lens_serve.assets.corpus`), tokenized into one stream."""

from __future__ import annotations

from pathlib import Path

import torch

from lens_serve.assets import corpus


def training_tokens(
    model_dir: Path, max_tokens: int, essays_root: Path | None = None
) -> torch.Tensor:
    """(T,) int64 token ids: essays then stdlib sources (training splits), at most `max_tokens`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    documents = {**corpus.split(corpus.essays(essays_root), held_out=False)}
    documents.update(corpus.split(corpus.stdlib_sources(), held_out=False))
    ids: list[int] = []
    for text in documents.values():
        ids += tokenizer(text)["input_ids"]
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)
