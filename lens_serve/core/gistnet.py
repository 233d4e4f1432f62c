"""GistNet: what stands for a block in the working context.

One interface, three kinds:
- `tokens`: training-free. A gist shows the block's own tokens with the highest BPE merge rank (a
  later merge is a longer, rarer piece of text, so it carries more of the block's content), in
  text order. `gist_config` lays them out as a bracketed keyword list a frozen model can read:
  the last rows // 2 rows are the model's `,` (`separator_id`), a pick that is only a piece of a
  word shows `,` too (`whole_words`), and the assembly puts `frame_open` before a working
  context's first gist and `frame_close` after its last. 1-row gists of an essay's blocks read
  `[ liquor addictive cures, opium,, colloquial, ...]\n\n`.
  Keyword salad costs a frozen model more than dropping the text; this list is not measurably
  worse than dropping at any compression (bench/gists.py). It is the default until a trained
  GistNet is published.
- `mean`: the naive soft baseline: the mean of the children's embeddings (per row, a contiguous
  1/rows share of them). A frozen model never learned to read these; kept as a measured baseline.
- `transformer`: the `tokens` rows (keywords then separators; no frame, every word piece shown)
  plus a learned residual (learned queries attending over the children). The residual's output
  layer starts at zero, so an untrained net equals that `tokens` gist and distillation through the
  frozen model (`lens-trainer gistnet`) starts from a safe gist.

For LOD1 the children are a block's `block_size` token rows; for LOD k>1 they are the `rows` rows
of each of `block_size` child gists. Every kind returns `rows` rows per gist plus, per row, the
token id it shows (-1 for a soft row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lens_serve.core import checkpoint
from lens_serve.core.attention import Block
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gist_kinds import GIST_KINDS, GistKind

CHECKPOINT_STEM = "gistnet"


@dataclass(frozen=True)
class GistNetConfig:
    kind: GistKind = "tokens"
    """Which representation (see the module docstring)."""
    block_size: int = 32
    """Children per gist: tokens per LOD1 gist, gists per LOD2 gist."""
    rows: int = 1
    """Working-context rows per gist. The budget counts rows, so more rows = less compression."""
    hidden_size: int = 576
    """The base model's embedding width."""
    width: int = 256
    """transformer only: internal width."""
    layers: int = 2
    """transformer only: self-attention layers."""
    heads: int = 4
    """transformer only: attention heads."""
    seed: int = 0
    """transformer only: initialisation seed."""
    separator_id: int = -1
    """tokens and transformer: the token shown in the last rows // 2 rows of each gist, after its
    keywords (-1: none, all rows are keywords). Needs rows >= 2, or `whole_words`."""
    whole_words: bool = field(default=False, metadata=checkpoint.ADDED_LATER)
    """tokens only: a keyword that does not begin a word shows the separator instead."""
    frame_open: tuple[int, ...] = field(default=(), metadata=checkpoint.ADDED_LATER)
    """tokens only: token ids shown before a working context's first gist."""
    frame_close: tuple[int, ...] = field(default=(), metadata=checkpoint.ADDED_LATER)
    """tokens only: token ids shown after a working context's last gist."""

    def __post_init__(self) -> None:
        if self.kind not in GIST_KINDS:
            raise ValueError(f"gist kind must be one of {GIST_KINDS}, got {self.kind!r}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if not 1 <= self.rows <= self.block_size or self.block_size % self.rows:
            raise ValueError(f"rows must divide block_size {self.block_size}, got {self.rows}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        # json gives lists; tuples keep the config hashable and equal to the one it was saved from
        object.__setattr__(self, "frame_open", tuple(self.frame_open))
        object.__setattr__(self, "frame_close", tuple(self.frame_close))
        if self.separator_id >= 0 and not (
            shows_separator(self.kind, self.rows) or self.whole_words
        ):
            raise ValueError(
                f"separator_id needs rows >= 2 (or whole_words) and kind tokens or transformer, "
                f"got rows {self.rows}, kind {self.kind!r}"
            )
        if self.kind != "tokens" and (self.whole_words or self.frame_open or self.frame_close):
            raise ValueError(f"whole_words and frames are for kind tokens, got {self.kind!r}")
        if self.whole_words and self.separator_id < 0:
            raise ValueError("whole_words needs a separator_id to show in place of word pieces")

    @property
    def frame_rows(self) -> int:
        """Rows the frame adds to a working context that holds a gist."""
        return len(self.frame_open) + len(self.frame_close)

    @property
    def keywords(self) -> int:
        """Rows per gist that show one of the block's tokens; the rest show the separator."""
        return self.rows - self.rows // 2 if self.separator_id >= 0 else self.rows


def shows_separator(kind: str, rows: int) -> bool:
    """Whether a gist of this kind and size has room for a separator after its keywords."""
    return rows >= 2 and kind != "mean"


def gist_config(
    table: EmbeddingTable, kind: GistKind = "tokens", block_size: int = 32, rows: int = 1
) -> GistNetConfig:
    """The config for `table`'s model: its width; for `tokens`, the keyword-list layout its
    tokenizer allows (module docstring); for `transformer` with rows >= 2, `,` as separator."""
    marks = table.list_tokens
    if marks is not None and kind == "tokens":
        return GistNetConfig(
            kind,
            block_size,
            rows,
            hidden_size=table.hidden_size,
            separator_id=marks.separator,
            whole_words=True,
            frame_open=marks.opener,
            frame_close=marks.closer,
        )
    separator = marks.separator if marks is not None and shows_separator(kind, rows) else -1
    return GistNetConfig(
        kind, block_size, rows, hidden_size=table.hidden_size, separator_id=separator
    )


class Gists(NamedTuple):
    token_ids: torch.Tensor  # (N, R) int64: the token a row shows, -1 for a soft row
    embeds: torch.Tensor  # (N, R, D)


class GistNet(nn.Module):
    """Base class: `forward(child_ids, child_embeds) -> Gists`."""

    separator_embed: torch.Tensor  # (D,): the separator's embedding, set by build_gistnet

    def __init__(self, config: GistNetConfig) -> None:
        super().__init__()
        self.config = config
        if config.separator_id >= 0:
            self.register_buffer("separator_embed", torch.zeros(config.hidden_size))

    def forward(self, child_ids: torch.Tensor, child_embeds: torch.Tensor) -> Gists:
        """child_ids (N, C) int64 (-1 = soft row), child_embeds (N, C, D) -> R rows per gist."""
        raise NotImplementedError

    def from_tokens(self, token_ids: torch.Tensor, table: EmbeddingTable) -> Gists:
        """LOD1 gists of blocks of token ids (N, B). Kinds that need only some children's
        embeddings override this: ingest speed is dominated by embedding lookups."""
        gists: Gists = self(token_ids, table(token_ids))
        return gists

    def _with_separators(self, gists: Gists) -> Gists:
        """(N, keywords) rows -> (N, R): the separator in each gist's last rows."""
        n, k = gists.token_ids.shape
        extra = self.config.rows - k
        if extra == 0:
            return gists
        ids = torch.full((n, extra), self.config.separator_id, dtype=torch.long)
        embeds = self.separator_embed.to(gists.embeds.dtype).expand(n, extra, -1)  # (N, S, D)
        return Gists(
            torch.cat([gists.token_ids, ids], dim=1), torch.cat([gists.embeds, embeds], dim=1)
        )

    def _token_gists(self, child_ids: torch.Tensor, child_embeds: torch.Tensor) -> Gists:
        """The `tokens` gist: keywords (N, K) gathered from the children, then separators."""
        config = self.config
        chosen = _chosen(child_ids, config.keywords, config.separator_id)  # (N, K)
        ids = child_ids.gather(1, chosen)  # (N, K)
        n, k, d = chosen.shape[0], chosen.shape[1], child_embeds.shape[-1]
        embeds = child_embeds.gather(1, chosen.unsqueeze(-1).expand(n, k, d))  # (N, K, D)
        return self._with_separators(Gists(ids, embeds))

    @property
    def version(self) -> str:
        """Content-addressed: a tree built with one version is never mixed with another's gists."""
        return checkpoint.content_version(
            f"gist-{self.config.kind}", self.config, checkpoint.weights_bytes(self)
        )


def _chosen(child_ids: torch.Tensor, keywords: int, separator_id: int) -> torch.Tensor:
    """(N, C) ids -> (N, K) positions of the shown tokens, in text order."""
    c = child_ids.shape[1]
    # Rank by BPE merge rank; among equal ids the later position wins (index added as a
    # fraction < 1 keeps the order of ids). Soft rows (-1) and separators (a child gist's own
    # separator rows at LOD >= 2) rank below every token.
    position = torch.arange(c, dtype=torch.float64) / c  # (C,)
    ids = child_ids.masked_fill(child_ids == separator_id, -1) if separator_id >= 0 else child_ids
    score = ids.to(torch.float64) + position  # (N, C)
    return score.topk(keywords, dim=1).indices.sort(dim=1).values  # (N, K)


class TokenGistNet(GistNet):
    def forward(self, child_ids: torch.Tensor, child_embeds: torch.Tensor) -> Gists:
        return self._token_gists(child_ids, child_embeds)

    def from_tokens(self, token_ids: torch.Tensor, table: EmbeddingTable) -> Gists:
        config = self.config
        ids = token_ids.gather(1, _chosen(token_ids, config.keywords, config.separator_id))
        if config.whole_words:  # (LOD >= 2 gists choose among these, so they are words too)
            if table.list_tokens is None:
                raise ValueError("whole_words needs an embedding table with its tokenizer's words")
            ids = ids.where(table.list_tokens.word_starts[ids], config.separator_id)  # (N, K)
        return self._with_separators(Gists(ids, table(ids)))  # only shown tokens are embedded


class MeanGistNet(GistNet):
    def forward(self, child_ids: torch.Tensor, child_embeds: torch.Tensor) -> Gists:
        n, c, d = child_embeds.shape
        rows = self.config.rows
        groups = child_embeds.reshape(n, rows, c // rows, d)  # (N, R, C/R, D)
        embeds = groups.float().mean(dim=2).to(child_embeds.dtype)  # (N, R, D)
        ids = torch.full((n, rows), -1, dtype=torch.long)
        return Gists(ids, embeds)

    def from_tokens(self, token_ids: torch.Tensor, table: EmbeddingTable) -> Gists:
        n, b = token_ids.shape
        rows = self.config.rows
        groups = token_ids.reshape(n * rows, b // rows)  # (N*R, B/R): one bag per row
        embeds = F.embedding_bag(groups, table.weight, mode="mean")  # (N*R, D), no (N, B, D)
        ids = torch.full((n, rows), -1, dtype=torch.long)
        return Gists(ids, embeds.view(n, rows, -1))


class TransformerGistNet(GistNet):
    """`tokens` rows plus a residual read by learned queries from the children. Starting from
    real token rows keeps the output at token-embedding scale and never worse than `tokens`."""

    def __init__(self, config: GistNetConfig) -> None:
        super().__init__(config)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            c, w = config.block_size * config.rows, config.width
            self.inp = nn.Linear(config.hidden_size, w)
            self.child_pos = nn.Parameter(torch.randn(c, w) * 0.02)  # (C, W)
            self.queries = nn.Parameter(torch.randn(config.rows, w) * 0.02)  # (R, W)
            self.blocks = nn.ModuleList(Block(w, config.heads) for _ in range(config.layers))
            self.norm = nn.LayerNorm(w)
            self.out = nn.Linear(w, config.hidden_size)
            nn.init.zeros_(self.out.weight)  # step 0 is exactly its `tokens` rows
            nn.init.zeros_(self.out.bias)
            # How much of the token rows to keep: one number lets training fade out text
            # fragments that mislead the model (in the README's 360-step run it stayed near 1).
            self.token_scale = nn.Parameter(torch.ones(()))
        finally:
            torch.random.set_rng_state(generator_state)

    def forward(self, child_ids: torch.Tensor, child_embeds: torch.Tensor) -> Gists:
        n, c, _ = child_embeds.shape
        rows = self.config.rows
        x = child_embeds.float()  # (N, C, D)
        h = self.inp(x) + self.child_pos[:c]  # (N, C, W)
        h = torch.cat([self.queries.expand(n, rows, -1), h], dim=1)  # (N, R + C, W)
        for block in self.blocks:
            h = block(h)
        base = self._token_gists(child_ids, x).embeds  # (N, R, D)
        out = self.token_scale * base + self.out(self.norm(h[:, :rows]))  # (N, R, D)
        ids = torch.full((n, rows), -1, dtype=torch.long)
        return Gists(ids, out.to(child_embeds.dtype))


_KINDS: dict[str, type[GistNet]] = {
    "tokens": TokenGistNet,
    "mean": MeanGistNet,
    "transformer": TransformerGistNet,
}


def build_gistnet(config: GistNetConfig, table: EmbeddingTable | None = None) -> GistNet:
    """A GistNet for `config`; one with a separator takes the separator's embedding from `table`
    (a loaded checkpoint brings its own)."""
    net = _new(config)
    if config.separator_id >= 0:
        if table is None or config.separator_id >= table.vocab_size:
            raise ValueError(
                f"separator_id {config.separator_id} needs the embedding table that holds it"
            )
        net.separator_embed.copy_(table(torch.tensor(config.separator_id)))
    return net


def _new(config: GistNetConfig) -> GistNet:
    net = _KINDS[config.kind](config)
    net.eval()
    return net


def save_gistnet(net: GistNet, directory: Path) -> None:
    checkpoint.write_files(directory, CHECKPOINT_STEM, net.config, checkpoint.weights_bytes(net))


def load_gistnet(directory: Path) -> GistNet:
    raw, weights = checkpoint.read_files(directory, CHECKPOINT_STEM)
    return gistnet_from_bytes(raw, weights)


def gistnet_from_bytes(raw_config: dict[str, object], weights: bytes) -> GistNet:
    net = _new(checkpoint.config_from_dict(GistNetConfig, raw_config))
    checkpoint.load_state(net, weights)  # brings the separator's embedding too
    return net
