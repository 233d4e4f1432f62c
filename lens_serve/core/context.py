"""Working contexts: what the model sees, their invariants, and the canonical tilings.

A `WorkingContext` is an ordered list of entries (lod, start) tiling a contiguous stretch of the
timeline that ends at the newest token; an LOD0 entry is one token (one row), an LOD k entry is the
gist of tree node (k, start // B**k) (`gist_rows` rows). A WC that holds a gist also takes the
GistNet's `frame_rows` (tokens around its gists, see gistnet.py). docs/design.md §2 lists the
invariants; `check_invariants` enforces them.

A `Tiling` is the same thing at block granularity, used by the policies that cover the whole
lifetime: a list of units (lod, index) where lod 0 means block `index` shown raw (B token rows) and
lod k >= 1 means the gist of node (k, index), plus the raw tokens of the trailing partial block.
A tiling always counts the frame's rows, so an edit's cost never depends on the other units.

A *recall* unit (RECALL, index) is a raw copy of an older block placed out of timeline order: a
continuing session shows what a new question asks for there, just before the question, so the
rows before it (the cached prefix) stay as they were. Its entries are raw tokens whose start lies
before the timeline's frontier at their place (`WorkingContext.recalled`); they are not part of
the contiguous timeline that invariant 1 speaks of."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from lens_serve.errors import InvalidRequest, InvariantViolation

Unit = tuple[int, int]  # (lod, index); lod 0 = a raw block, RECALL = a raw copy of an older block
RECALL = -1


@dataclass(frozen=True)
class Span:
    """A run of entries of one LOD covering tokens [start, end), taking `rows` rows."""

    start: int
    end: int
    lod: int
    rows: int
    score: float = 0.0
    recalled: bool = False  # raw copies of older text, out of timeline order


@dataclass(frozen=True)
class WorkingContext:
    lods: np.ndarray  # (E,) int8
    starts: np.ndarray  # (E,) int64, first token of each entry
    lifetime: int
    block_size: int
    gist_rows: int
    policy: str
    scores: np.ndarray | None = None  # (E,) float32 LensNet scores, when a LensNet chose it
    lens_version: str = ""
    frame_rows: int = 0  # rows around the gists, when there are any

    @property
    def ends(self) -> np.ndarray:
        ends: np.ndarray = self.starts + np.power(self.block_size, self.lods.astype(np.int64))
        return ends

    @property
    def recalled(self) -> np.ndarray:
        """(E,) bool: entries that copy text from before the timeline's frontier at their place."""
        if not len(self.starts):
            return np.zeros(0, dtype=bool)
        frontier = np.maximum.accumulate(self.ends)  # (E,) furthest token covered so far
        out: np.ndarray = np.r_[False, self.starts[1:] < frontier[:-1]]
        return out

    @property
    def entry_rows(self) -> np.ndarray:
        return np.where(self.lods == 0, 1, self.gist_rows)

    @property
    def rows(self) -> int:
        framed = self.frame_rows if bool((self.lods > 0).any()) else 0
        return int(self.entry_rows.sum()) + framed

    @property
    def start(self) -> int:
        """The first token covered."""
        return int(self.starts[0]) if len(self.starts) else self.lifetime

    @property
    def gist_covered_tokens(self) -> int:
        gist = self.lods > 0
        return int((self.ends[gist] - self.starts[gist]).sum())

    def spans(self) -> list[Span]:
        """Run-length view: consecutive entries of one LOD merged into one span (a jump in the
        timeline, as at a recalled block, starts a new span)."""
        if not len(self.lods):
            return []
        ends, rows, recalled = self.ends, self.entry_rows, self.recalled
        jumps = (
            (np.diff(self.lods.astype(np.int64)) != 0)
            | (self.starts[1:] != ends[:-1])
            | (recalled[1:] != recalled[:-1])
        )
        breaks = np.flatnonzero(jumps) + 1
        bounds = [0, *breaks.tolist(), len(self.lods)]
        out = []
        for a, b in itertools.pairwise(bounds):
            score = float(self.scores[a:b].mean()) if self.scores is not None else 0.0
            out.append(
                Span(
                    int(self.starts[a]),
                    int(ends[b - 1]),
                    int(self.lods[a]),
                    int(rows[a:b].sum()),
                    score,
                    bool(recalled[a]),
                )
            )
        return out

    def signature(self) -> bytes:
        """Identity of the choice (for de-duplicating variants)."""
        return self.lods.tobytes() + self.starts.tobytes()


def validate_budget(budget: int, tail: int) -> None:
    """Request-time checks of the two knobs, with messages naming the field."""
    if budget < 1:
        raise InvalidRequest("wc_budget", f"must be >= 1, got {budget}")
    if tail < 0:
        raise InvalidRequest("tail", f"must be >= 0, got {tail}")
    if tail >= budget:
        raise InvalidRequest(
            "wc_budget", f"must exceed the raw tail of {tail} tokens, got {budget}"
        )


def check_invariants(
    wc: WorkingContext, budget: int, tail: int, node_counts: list[int] | None = None
) -> None:
    """Raise InvariantViolation unless `wc` holds docs/design.md §2 invariants 1-3.

    node_counts[k] (if given) is the number of complete nodes at level k, to check that every gist
    is a real tree node."""
    n, b = wc.lifetime, wc.block_size
    recalled = wc.recalled
    _check_recalled(wc, recalled)
    timeline = ~recalled
    lods, starts, ends = wc.lods[timeline].astype(np.int64), wc.starts[timeline], wc.ends[timeline]
    if n == 0:
        if len(lods):
            raise InvariantViolation("an empty lifetime must give an empty working context")
        return
    if not len(lods) or ends[-1] != n:
        raise InvariantViolation(f"working context must end at the newest token {n}")
    if starts[0] < 0 or np.any(starts[1:] != ends[:-1]):
        raise InvariantViolation("working context has a gap or an overlap")
    if wc.rows > budget:
        raise InvariantViolation(f"working context takes {wc.rows} rows > budget {budget}")
    if np.any((ends > n - tail) & (lods > 0)):
        raise InvariantViolation(f"a gist overlaps the raw tail of {tail} tokens")
    span = np.power(b, lods)
    if np.any(starts % span):
        raise InvariantViolation("a gist is not block-aligned")
    if node_counts is not None:
        for lod in np.unique(lods[lods > 0]).tolist():
            index = starts[lods == lod] // b**lod
            if lod >= len(node_counts) or index.max() >= node_counts[lod]:
                raise InvariantViolation(f"a gist at LOD{lod} is not a complete tree node")


def _check_recalled(wc: WorkingContext, recalled: np.ndarray) -> None:
    """Recalled entries are whole raw blocks, each copied from text before its place."""
    if not recalled.any():
        return
    b = wc.block_size
    at = np.flatnonzero(recalled)
    if np.any(wc.lods[at] != 0):
        raise InvariantViolation("a recalled entry is not a raw token")
    frontier = np.maximum.accumulate(wc.ends)  # (E,)
    for run in np.split(at, np.flatnonzero(np.diff(at) != 1) + 1):
        if len(run) % b:
            raise InvariantViolation("recalled entries are not whole blocks")
        blocks = wc.starts[run].reshape(-1, b)  # (K, B)
        if np.any(blocks[:, 0] % b) or np.any(np.diff(blocks, axis=1) != 1):
            raise InvariantViolation("recalled entries are not whole aligned blocks")
        if blocks.max() + 1 > frontier[run[0] - 1]:
            raise InvariantViolation("a recalled block is not older than its place")


@dataclass
class Tiling:
    """Whole-lifetime tiling at block granularity (see the module docstring)."""

    units: list[Unit]
    lifetime: int
    block_size: int
    gist_rows: int
    scores: list[float] = field(default_factory=list)  # per unit, when a LensNet scored it
    frame_rows: int = 0

    def with_units(self, units: list[Unit]) -> Tiling:
        """Another tiling of the same lifetime (no scores)."""
        return Tiling(
            units, self.lifetime, self.block_size, self.gist_rows, frame_rows=self.frame_rows
        )

    def unit_rows(self, unit: Unit) -> int:
        return self.block_size if unit[0] <= 0 else self.gist_rows

    def unit_span(self, unit: Unit) -> tuple[int, int]:
        size = self.block_size ** max(unit[0], 1)
        return unit[1] * size, (unit[1] + 1) * size

    @property
    def loose_start(self) -> int:
        """First token of the trailing partial block (always raw, never a unit)."""
        return self.lifetime - self.lifetime % self.block_size

    @property
    def rows(self) -> int:
        raw_blocks = sum(1 for lod, _ in self.units if lod <= 0)  # recalled blocks are raw too
        gists = len(self.units) - raw_blocks
        loose = self.lifetime % self.block_size
        return raw_blocks * self.block_size + gists * self.gist_rows + loose + self.frame_rows

    def to_working_context(self, policy: str, lens_version: str = "") -> WorkingContext:
        b = self.block_size
        lods = np.array([u[0] for u in self.units], dtype=np.int8)  # (U,)
        index = np.array([u[1] for u in self.units], dtype=np.int64)  # (U,)
        per_unit = np.where(lods <= 0, b, 1)  # entries per unit
        unit_start = index * np.power(b, np.maximum(lods, 1).astype(np.int64))  # (U,)
        entry_lods = np.repeat(np.maximum(lods, 0), per_unit)  # (E,) a recalled block is raw
        first_entry = np.cumsum(per_unit) - per_unit  # (U,)
        offset = np.arange(int(per_unit.sum())) - np.repeat(first_entry, per_unit)  # (E,)
        entry_starts = np.repeat(unit_start, per_unit) + offset  # raw blocks step by one token
        loose = np.arange(self.loose_start, self.lifetime, dtype=np.int64)
        scores = None
        if self.scores:
            unit_scores = np.asarray(self.scores, dtype=np.float32)
            scores = np.concatenate([np.repeat(unit_scores, per_unit), np.zeros(len(loose))])
            scores = scores.astype(np.float32)
        return WorkingContext(
            lods=np.concatenate([entry_lods, np.zeros(len(loose), dtype=np.int8)]),
            starts=np.concatenate([entry_starts, loose]),
            lifetime=self.lifetime,
            block_size=b,
            gist_rows=self.gist_rows,
            policy=policy,
            scores=scores,
            lens_version=lens_version,
            frame_rows=self.frame_rows,
        )


def raw_from(lifetime: int, tail: int, block_size: int) -> int:
    """First token of the raw region: the block holding the oldest tail token, and onwards."""
    return (max(lifetime - tail, 0) // block_size) * block_size


def staircase(start: int, stop: int, top_level: int, block_size: int) -> list[Unit]:
    """Largest aligned nodes (level <= top_level) tiling [start, stop); both block-aligned."""
    units: list[Unit] = []
    p = start
    while p < stop:
        level = 1
        while (
            level < top_level
            and p % block_size ** (level + 1) == 0
            and p + block_size ** (level + 1) <= stop
        ):
            level += 1
        units.append((level, p // block_size**level))
        p += block_size**level
    return units


def tiling_at_level(
    lifetime: int, tail: int, top_level: int, block_size: int, gist_rows: int, frame_rows: int = 0
) -> Tiling:
    """Older text as the largest aligned nodes of level <= top_level (>= 1), the rest raw."""
    first_raw = raw_from(lifetime, tail, block_size)
    units = staircase(0, first_raw, max(top_level, 1), block_size)
    units += [(0, i) for i in range(first_raw // block_size, lifetime // block_size)]
    return Tiling(units, lifetime, block_size, gist_rows, frame_rows=frame_rows)


def coarsest_tiling(
    lifetime: int, tail: int, levels: int, block_size: int, gist_rows: int, frame_rows: int = 0
) -> Tiling:
    """The fewest-rows whole-lifetime tiling the tree allows; no budget below its rows works."""
    return tiling_at_level(lifetime, tail, levels, block_size, gist_rows, frame_rows)


def expansion_cost(unit: Unit, block_size: int, gist_rows: int) -> int:
    """Rows added by expanding a gist unit into its children."""
    child_rows = block_size if unit[0] == 1 else block_size * gist_rows
    return child_rows - gist_rows


def children(unit: Unit, block_size: int) -> list[Unit]:
    lod, index = unit
    if lod == 1:
        return [(0, index)]
    return [(lod - 1, index * block_size + j) for j in range(block_size)]


def fill_newest_first(tiling: Tiling, budget: int) -> Tiling:
    """Expand gists, newest first (depth-first from the tail), while the budget allows."""
    b, r = tiling.block_size, tiling.gist_rows
    slack = budget - tiling.rows
    pending = list(tiling.units)  # popped from the end: newest first
    done: list[Unit] = []
    while pending:
        unit = pending.pop()
        if unit[0] >= 1 and expansion_cost(unit, b, r) <= slack:
            slack -= expansion_cost(unit, b, r)
            pending.extend(children(unit, b))
        else:
            done.append(unit)
    done.reverse()
    return tiling.with_units(done)


def extend_tiling(tiling: Tiling, lifetime: int) -> Tiling:
    """The same choice after the lifetime grew: new complete blocks join as raw units."""
    b = tiling.block_size
    new_blocks = [(0, i) for i in range(tiling.lifetime // b, lifetime // b)]
    return Tiling(
        tiling.units + new_blocks, lifetime, b, tiling.gist_rows, frame_rows=tiling.frame_rows
    )


def levels_for(lifetime: int, block_size: int) -> int:
    """How many gist levels a tree over `lifetime` tokens has (level k needs B**k tokens)."""
    levels = 0
    while block_size ** (levels + 1) <= lifetime:
        levels += 1
    return levels
