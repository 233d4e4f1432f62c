"""Benchmark of the working-context core (no vLLM, no Redis).

- ingest: 1M tokens into a lifetime tree with `mean` gists (target >= 200k tokens/s);
- choose: a `lens` working context with W = 2048 from lifetimes of 64k and 1M tokens
  (target <= 50 ms median, and the 1M median within 1.5x of the 64k one), both for a fresh choice
  and for a session continuing its previous choice after 64 new tokens.

    python bench/context.py [--model smollm2-135m] [--out bench/out/context.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lens_serve.assets.model_dirs import resolve_model
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gist_kinds import GistKind
from lens_serve.core.gistnet import build_gistnet, gist_config
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import ContextChooser
from lens_serve.core.tree import LifetimeTree

BUDGET, TAIL, TURN_TOKENS = 2048, 128, 64


def build_tree(table: EmbeddingTable, kind: GistKind, tokens: np.ndarray) -> LifetimeTree:
    tree = LifetimeTree(build_gistnet(gist_config(table, kind), table), table)
    tree.append(tokens)
    return tree


def bench_ingest(table: EmbeddingTable, n_tokens: int, repeats: int) -> dict[str, float]:
    tokens = np.random.default_rng(0).integers(0, table.vocab_size, n_tokens)
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        build_tree(table, "mean", tokens)
        seconds.append(time.perf_counter() - began)
    median = statistics.median(seconds)
    return {"tokens": n_tokens, "median_s": median, "tokens_per_s": n_tokens / median}


def trained_like_lensnet(hidden: int) -> LensNet:
    """A seeded LensNet whose head is not zero, so the allocator really edits (worst case)."""
    net = LensNet(LensNetConfig(hidden_size=hidden))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=generator))
    return net


def bench_choose(table: EmbeddingTable, lifetime: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(lifetime)
    tree = build_tree(table, "tokens", rng.integers(0, table.vocab_size, lifetime))
    chooser = ContextChooser(trained_like_lensnet(table.hidden_size))
    chooser.choose(tree, "lens", BUDGET, TAIL)  # warm-up (allocations, kernels)
    fresh = [chooser.choose(tree, "lens", BUDGET, TAIL).choice_ms for _ in range(repeats)]
    state = chooser.choose(tree, "lens", BUDGET, TAIL).focus
    continuing = []
    for _ in range(repeats):
        tree.append(rng.integers(0, table.vocab_size, TURN_TOKENS))
        choice = chooser.choose(tree, "lens", BUDGET, TAIL, state=state)
        continuing.append(choice.choice_ms)
        state = choice.focus
    return {
        "lifetime": lifetime,
        "fresh_median_ms": statistics.median(fresh),
        "continuing_median_ms": statistics.median(continuing),
        "units": float(len(state.tiling.units)) if state else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name or directory")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/out/context.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = EmbeddingTable.from_checkpoint(resolve_model(args.model))
    ingest = bench_ingest(table, 1_000_000, repeats=3)
    print(f"ingest 1M tokens (mean gists): {ingest['tokens_per_s']:,.0f} tokens/s")
    choose = [bench_choose(table, n, args.repeats) for n in (65_536, 1_048_576)]
    for c in choose:
        print(
            f"lens W={BUDGET} lifetime={c['lifetime']:>9,}: fresh {c['fresh_median_ms']:.1f} ms, "
            f"continuing {c['continuing_median_ms']:.1f} ms (median of {args.repeats})"
        )
    ratio = choose[1]["continuing_median_ms"] / choose[0]["continuing_median_ms"]
    fresh_ratio = choose[1]["fresh_median_ms"] / choose[0]["fresh_median_ms"]
    print(f"1M / 64k median: continuing {ratio:.2f}x, fresh {fresh_ratio:.2f}x")
    result = {
        "model": args.model,
        "hidden_size": table.hidden_size,
        "threads": torch.get_num_threads(),
        "ingest": ingest,
        "choose": choose,
        "ratio_1m_over_64k": {"continuing": ratio, "fresh": fresh_ratio},
        "targets": {"ingest_tokens_per_s": 200_000, "choose_median_ms": 50, "ratio": 1.5},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
