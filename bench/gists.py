"""Can the frozen model read the gists? NLL of the next tokens on held-out essays with old text
dropped, raw, or collapsed to gists of each kind, at several compressions; plus a needle test.

    lens-trainer gistnet --rows 4 ...       # -> models/gistnet/smollm2-135m-r4 (README)
    lens-trainer gistnet --rows 1 ...       # -> models/gistnet/smollm2-135m-r1
    python bench/gists.py [--windows 32] [--stride 576] [--offset 0] [--trained-r4 DIR]
                          [--trained-r1 DIR]

A window is [old: 1024 tokens][recent: 64 raw tokens][target: 64 tokens]. The old text is
`dropped` (the recent tokens only), `raw` (the upper bound), or gists of its 32 blocks: `8x` (LOD1,
4 rows per block: 128 rows), `16x` (LOD1, 2 rows: 64), `32x` (LOD1, 1 row: 32 rows), `lod2` (one
LOD2 gist of 4 rows). Gist kinds at a compression use equal rows, plus the 4 rows of the served
`tokens` layout's frame; `recency` spends the `tokens` rows on more raw recent tokens instead (the
fair "drop" at equal WC rows), and `excerpt@k` on the old text's raw tokens from offset k: what a
gist with as many rows could tell the model if its rows were the text itself, and `separators` on
the `tokens` layout with every gist row the tokenizer's `,`: what the rows cost with nothing in
them, which a gist's content must pay back to beat dropping. The needle test puts a
fact at the start of the old text and asks for it after the recent text; the answer's NLL is
reported per condition. Windows differ far more than conditions do, so each condition is also
reported as its paired per-window difference from `dropped`. The default windows overlap by
half: 16 windows 1152 apart and 16 more shifted by 576 disagreed by 0.05 nats/token on `tokens`
gists, so one set of 16 is too few to call a sign.

`tokens` is the served layout (lens_serve/core/gistnet.py): a bracketed list, `[` before the
first gist
and ` ...]\n\n` after the last; each gist's keywords then `,` in its last rows // 2 rows (4 rows:
2 keywords, 2 `,`); a keyword that is a piece of a word shown as `,`. The layouts before it:
`tokens-unframed` (keywords then `,`, no frame, every piece shown) and `tokens-unseparated`
(keywords only).
Trained gists come from `lens-trainer gistnet` checkpoints (`trained` = their `transformer` kind).
Writes bench/out/gists.json and bench/out/gists.png; lower NLL is better."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens_serve.assets.model_dirs import models_dir, resolve_model
from lens_serve.assets.reference import continuation_nll, load_causal_lm, paired_difference
from lens_serve.core.assembly import assemble
from lens_serve.core.context import WorkingContext
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNet, GistNetConfig, build_gistnet, gist_config, load_gistnet
from lens_serve.core.tree import LifetimeTree
from lens_serve.tools.demo import held_out_tokens

OLD, RECENT, TARGET = 1024, 64, 64
# compression -> (gist rows per block, tree level shown)
COMPRESSIONS = {"8x": (4, 1), "16x": (2, 1), "32x": (1, 1), "lod2": (4, 2)}
EXCERPT_OFFSETS = (0, 256, 512, 768)
NEEDLE = "Remember this: the secret code word is {word}. "
QUESTION = " Question: what is the secret code word? Answer: the secret code word is"
WORDS = ("pelican", "sapphire", "lantern", "quartz", "meadow", "trombone", "glacier", "saffron")


def gist_rows(net: GistNet, table: EmbeddingTable, old: list[int], level: int) -> torch.Tensor:
    """The old text as a server shows it at `level`: its gists and any frame (rows, D)."""
    tree = LifetimeTree(net, table)
    tree.append(old)
    nodes = tree.node_count(level)
    wc = WorkingContext(
        lods=np.full(nodes, level, dtype=np.int8),
        starts=np.arange(nodes, dtype=np.int64) * tree.block_size**level,
        lifetime=len(old),
        block_size=tree.block_size,
        gist_rows=tree.gist_rows,
        policy="bench",
        frame_rows=tree.frame_rows,
    )
    return assemble(tree, wc)


def contexts(
    nets: dict[str, dict[str, GistNet]], table: EmbeddingTable, old: list[int], recent: list[int]
) -> dict[str, torch.Tensor]:
    """condition name -> (rows, D) context rows."""
    recent_rows = table(torch.tensor(recent))  # (RECENT, D)
    out = {
        "dropped": recent_rows,
        "raw": table(torch.tensor(old + recent)),
    }
    for name, (_, level) in COMPRESSIONS.items():
        for kind, net in nets[name].items():
            out[f"{name}/{kind}"] = torch.cat([gist_rows(net, table, old, level), recent_rows])
        n = out[f"{name}/tokens"].shape[0]
        out[f"{name}/recency"] = table(torch.tensor((old + recent)[-n:]))
        config = nets[name]["tokens"].config
        if config.separator_id >= 0:  # the served layout with every gist row a separator
            separators = out[f"{name}/tokens"].clone()  # (n, D): frame, gists, frame, recent
            gists = slice(len(config.frame_open), n - RECENT - len(config.frame_close))
            separators[gists] = table(torch.tensor(config.separator_id))
            out[f"{name}/separators"] = separators
        if level == 1:
            for offset in EXCERPT_OFFSETS:
                excerpt = table(torch.tensor(old[offset : offset + n - RECENT]))
                out[f"{name}/excerpt@{offset}"] = torch.cat([excerpt, recent_rows])
    return out


def load_nets(table: EmbeddingTable, trained: dict[int, Path]) -> dict[str, dict[str, GistNet]]:
    nets: dict[str, dict[str, GistNet]] = {}
    for name, (rows, _) in COMPRESSIONS.items():
        nets[name] = {
            kind: build_gistnet(gist_config(table, kind, rows=rows), table)
            for kind in ("tokens", "mean")
        }
        served = nets[name]["tokens"].config
        if served.frame_rows:  # the layouts before: keywords and separators unframed, then bare
            if rows >= 2:
                unframed = GistNetConfig(
                    rows=rows, hidden_size=table.hidden_size, separator_id=served.separator_id
                )
                nets[name]["tokens-unframed"] = build_gistnet(unframed, table)
            plain = GistNetConfig(rows=rows, hidden_size=table.hidden_size)
            nets[name]["tokens-unseparated"] = build_gistnet(plain)
        if rows in trained:
            nets[name]["trained"] = load_gistnet(trained[rows])
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--needles", type=int, default=8)
    parser.add_argument("--stride", type=int, default=576)
    parser.add_argument(
        "--offset", type=int, default=0, help="first window's start (other windows, same text)"
    )
    parser.add_argument("--trained-r4", type=Path, default=None)
    parser.add_argument("--trained-r1", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/out/gists.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))  # share the cores
    model_dir = resolve_model(args.model)
    default_dir = models_dir() / "gistnet"
    trained = {
        rows: path
        for rows, path in (
            (4, args.trained_r4 or default_dir / f"{model_dir.name}-r4"),
            (1, args.trained_r1 or default_dir / f"{model_dir.name}-r1"),
        )
        if (path / "gistnet.json").exists()
    }
    span = OLD + RECENT + TARGET
    ids = held_out_tokens(model_dir, args.offset + span + args.stride * (args.windows - 1))
    ids = ids[args.offset :]
    table = EmbeddingTable.from_checkpoint(model_dir)
    model = load_causal_lm(model_dir)
    nets = load_nets(table, trained)
    runs: dict[str, list[float]] = {}
    for w in range(args.windows):
        window = ids[w * args.stride : w * args.stride + span]
        old, recent = window[:OLD], window[OLD : OLD + RECENT]
        target = torch.tensor(window[OLD + RECENT :])
        for name, rows in contexts(nets, table, old, recent).items():
            runs.setdefault(name, []).append(float(continuation_nll(model, rows, target).mean()))
        print(f"window {w}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in runs.items()), flush=True)
    needles = needle_test(model, model_dir, table, nets, ids, args.needles)
    summary = {k: statistics.mean(v) for k, v in runs.items()}
    needle_summary = {k: statistics.mean(v) for k, v in needles.items()}
    paired = {k: paired_difference(v, runs["dropped"]) for k, v in runs.items()}
    for name in runs:
        d = paired[name]
        print(
            f"{name:18s} next-{TARGET} NLL {summary[name]:.3f}  vs dropped {d['mean']:+.3f} "
            f"(se {d['se']:.3f}, worse in {d['worse']}/{len(runs[name])})  "
            f"needle {needle_summary[name]:.3f}"
        )
    report = {
        "config": {"old": OLD, "recent": RECENT, "target": TARGET, "windows": args.windows,
                   "stride": args.stride, "offset": args.offset,
                   "needles": args.needles, "trained": {str(k): str(v) for k, v in trained.items()},
                   "versions": {f"{c}/{k}": n.version for c, d in nets.items()
                                for k, n in d.items()}},
        "nll": summary,
        "vs_dropped": paired,
        "needle_nll": needle_summary,
        "runs": runs,
        "needle_runs": needles,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(summary, needle_summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def needle_test(
    model: Any,
    model_dir: Path,
    table: EmbeddingTable,
    nets: dict[str, dict[str, GistNet]],
    ids: list[int],
    count: int,
) -> dict[str, list[float]]:
    """A fact at the start of the old text; NLL of its answer after the recent text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out: dict[str, list[float]] = {}
    spacing = (len(ids) - OLD - RECENT) // count  # haystacks spread over the held-out text
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        fact: list[int] = tokenizer(NEEDLE.format(word=word))["input_ids"]
        question: list[int] = tokenizer(QUESTION)["input_ids"]
        answer = torch.tensor(tokenizer(" " + word)["input_ids"])
        hay = ids[i * spacing : i * spacing + OLD + RECENT]
        old = (fact + hay)[:OLD]
        recent = hay[-(RECENT - len(question)) :] + question
        for name, rows in contexts(nets, table, old, recent).items():
            out.setdefault(name, []).append(float(continuation_nll(model, rows, answer).mean()))
    return out


def plot(summary: dict[str, float], needles: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, values, title in ((axes[0], summary, f"next {TARGET} tokens"),
                              (axes[1], needles, "needle answer")):  # fmt: skip
        ax.barh(names, [values[n] for n in names])
        ax.set_title(f"{title}: NLL (nats/token, lower is better)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
