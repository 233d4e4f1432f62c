"""The GistNet kinds, apart from gistnet.py so that settings can name them without importing
torch."""

from __future__ import annotations

from typing import Literal, get_args

GistKind = Literal["tokens", "mean", "transformer"]
GIST_KINDS: tuple[GistKind, ...] = get_args(GistKind)
