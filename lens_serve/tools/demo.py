"""`lens-serve demo`: the core on the real model, without a server (`demo_configs.DEMO_DOC`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from lens_serve.assets import corpus
from lens_serve.assets.model_dirs import resolve_model
from lens_serve.assets.reference import continuation_nll, load_causal_lm
from lens_serve.core.assembly import assemble
from lens_serve.core.context import Span, WorkingContext
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import build_gistnet, gist_config
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import POLICIES, ContextChooser
from lens_serve.core.tree import LifetimeTree
from lens_serve.tools.demo_configs import DemoConfig


def held_out_tokens(model_dir: Path, n_tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join(corpus.split(corpus.essays(), held_out=True).values())
    ids: list[int] = tokenizer(text)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"lifetime: the held-out essays have only {len(ids)} tokens")
    return ids[:n_tokens]


def span_map(wc: WorkingContext) -> str:
    def label(s: Span) -> str:
        kind = "raw " if s.lod == 0 else f"LOD{s.lod}"
        return f"{kind} [{s.start:>5}, {s.end:>5}) {s.rows:>4} rows"

    return "\n".join(f"    {label(s)}" for s in wc.spans())


def run(config: DemoConfig, out: TextIO = sys.stdout) -> dict[str, float]:
    write = out.write
    model_dir = resolve_model(config.model)
    tokens = held_out_tokens(model_dir, config.lifetime + config.continuation)
    context, target = tokens[: config.lifetime], torch.tensor(tokens[config.lifetime :])
    table = EmbeddingTable.from_checkpoint(model_dir)
    tree = LifetimeTree(build_gistnet(gist_config(table), table), table)
    tree.append(context)
    model = load_causal_lm(model_dir)
    chooser = ContextChooser(
        LensNet(LensNetConfig(hidden_size=table.hidden_size, seed=config.seed))
    )
    write(
        f"lifetime {tree.lifetime} tokens (held-out essays), tree levels {tree.levels}, "
        f"gists: {tree.gistnet_version}, LensNet {chooser.lens_version} (initial)\n"
        f"NLL of the next {config.continuation} tokens, budget W={config.budget} rows, "
        f"raw tail {config.tail}\n"
    )
    results: dict[str, float] = {}
    for policy in POLICIES:
        budget = tree.lifetime if policy == "full" else config.budget
        choice = chooser.choose(tree, policy, budget, config.tail, seed=config.seed)
        wc = choice.working_context
        nll = float(continuation_nll(model, assemble(tree, wc), target).mean())
        results[policy] = nll
        write(
            f"\n{policy:8s} NLL {nll:.3f} nats/token  rows {wc.rows:>5}  covers "
            f"[{wc.start}, {wc.lifetime})  gist-covered {wc.gist_covered_tokens} tokens  "
            f"chosen in {choice.choice_ms:.1f} ms\n{span_map(wc)}\n"
        )
    return results
