"""Quality gate for defaults: NLL of the next tokens on held-out essays under every policy and
gist kind, against dropping the old text (`recency`) and keeping all of it (`full`).

    python bench/quality.py [--windows 6] [--lifetime 4096] [--budget 1024] [--tail 128]
                            [--gist-rows 1] [--gistnet DIR]

`--gistnet DIR` adds a trained GistNet (a `lens-trainer gistnet` checkpoint) as gist kind `trained`.
Each condition is also reported as its paired per-window difference from `recency`. Writes
bench/out/quality.json; lower NLL is better. A gist kind or policy becomes a default only if it is
not worse than `recency` here."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lens_serve.assets.model_dirs import resolve_model
from lens_serve.assets.reference import continuation_nll, load_causal_lm, paired_difference
from lens_serve.core.assembly import assemble
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gist_kinds import GistKind
from lens_serve.core.gistnet import GistNet, build_gistnet, gist_config, load_gistnet
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.core.policies import ContextChooser
from lens_serve.core.tree import LifetimeTree
from lens_serve.tools.demo import held_out_tokens

GIST_KINDS: tuple[GistKind, ...] = ("tokens", "mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--stride", type=int, default=3000)
    parser.add_argument("--lifetime", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--tail", type=int, default=128)
    parser.add_argument("--gist-rows", type=int, default=1, help="rows per gist (LENS_GIST_ROWS)")
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--gistnet", type=Path, default=None, help="a trained GistNet checkpoint")
    parser.add_argument("--out", type=Path, default=Path("bench/out/quality.json"))
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    span = args.lifetime + args.continuation
    ids = held_out_tokens(model_dir, span + args.stride * (args.windows - 1))
    table = EmbeddingTable.from_checkpoint(model_dir)
    model = load_causal_lm(model_dir)
    chooser = ContextChooser(LensNet(LensNetConfig(hidden_size=table.hidden_size)))
    nets: dict[str, GistNet] = {
        kind: build_gistnet(gist_config(table, kind, rows=args.gist_rows), table)
        for kind in GIST_KINDS
    }
    if args.gistnet is not None:
        nets["trained"] = load_gistnet(args.gistnet)
    runs: dict[str, list[float]] = {}
    for w in range(args.windows):
        window = ids[w * args.stride : w * args.stride + span]
        context, target = window[: args.lifetime], torch.tensor(window[args.lifetime :])
        for kind, net in nets.items():
            tree = LifetimeTree(net, table)
            tree.append(context)
            cases = [("lens", args.budget), ("retrieval", args.budget), ("uniform", args.budget)]
            if kind == "tokens":  # raw-only policies do not depend on the gist kind
                cases += [("recency", args.budget), ("full", args.lifetime)]
            for policy, budget in cases:
                wc = chooser.choose(tree, policy, budget, args.tail).working_context
                nll = float(continuation_nll(model, assemble(tree, wc), target).mean())
                name = policy if policy in ("recency", "full") else f"{policy}/{kind}"
                runs.setdefault(name, []).append(nll)
        print(f"window {w}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in runs.items()), flush=True)
    summary = {
        k: {"mean": statistics.mean(v), "median": statistics.median(v)} for k, v in runs.items()
    }
    paired = {k: paired_difference(v, runs["recency"]) for k, v in runs.items()}
    for name, s in sorted(summary.items(), key=lambda kv: kv[1]["mean"]):
        d = paired[name]
        print(
            f"{name:16s} mean {s['mean']:.3f}  median {s['median']:.3f} nats/token  vs recency "
            f"{d['mean']:+.3f} (se {d['se']:.3f}, worse in {d['worse']}/{len(runs[name])})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    config["versions"] = {kind: net.version for kind, net in nets.items()}
    report = {"config": config, "summary": summary, "vs_recency": paired, "runs": runs}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
