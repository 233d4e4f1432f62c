"""Long-context task suite through the real server (gRPC, Redis, vLLM), RULER-style, generated here.

Tasks (facts placed at 10-80% depth of a haystack of held-out essays; the question at the tail):
- single: one fact "The special magic number for <key> is <value>."
- multikey: that fact and 3 of the same template with other keys and values.
- multivalue: two facts with their own keys; one question each.
- paraphrase: the fact in other words ("... the code that opens <key>'s safe ..."): the
  question shares only the key with it.
- twohop: "<A> always uses the same locker as <B>." and "The number on <B>'s locker is <value>."
  asked "What is the number on <A>'s locker?".
Keys are made-up names (syllables drawn by seed), values 5-digit numbers.

Per lifetime (4k, 8k, 32k, 128k tokens; 4k is where `full` fits), W = 1024, every policy runs on
its own session of the same tokens: `Generate` (greedy, prompt = question + answer prefix) gives
the exact match (the value appears in the completion), `Score` the answer's NLL (nats/token).
The ceiling: the same facts placed just before the question, under `recency` (what the model can
do at all). `--split dev` draws other samples than `--split test` (the one reported): choose
settings on dev, report test.

    python bench/longctx.py [--split test] [--samples 6] [--lifetimes 4096 8192 32768 131072]
        [--lens-records bench/out/loop_records.bin ...]

`--lens-records` trains LensNet offline on dumps of preference records (`lens-trainer run
--offline-dump` on them merged, the gate included) and serves the published version as `lens`.

Writes the JSON (and a PNG: exact match against lifetime per task, one line per policy)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lens_serve.assets import corpus
from lens_serve.assets.model_dirs import TOKENIZER_NAME, resolve_model
from lens_serve.client import LensClient
from lens_serve.engine.vllm import VllmEngine
from lens_serve.service.config import Settings
from lens_serve.service.inprocess import Stack, serving_stack
from lens_serve.store.embedded import EmbeddedRedis
from trainer.data import read_dump, write_dump

TASKS = ("single", "multikey", "multivalue", "paraphrase", "twohop")
POLICIES = ("lens", "retrieval", "recency", "uniform", "random", "full")
CEILING = "ceiling"
SPLIT_SEEDS = {"dev": 0, "test": 100_000}
SYLLABLES = (
    "ka", "ro", "mi", "ten", "zu", "vel", "dor", "ash", "qui", "bri",
    "lon", "sa", "mer", "tho", "gal", "pen", "fis", "nor", "ula", "cre",
)  # fmt: skip
MAX_TOKENS = 12


@dataclass(frozen=True)
class Probe:
    question: str
    """The prompt's question line."""
    prefix: str
    """The answer's opening words; the model continues with the value."""
    value: str


@dataclass(frozen=True)
class Sample:
    task: str
    facts: tuple[str, ...]
    probes: tuple[Probe, ...]


def name(rng: np.random.Generator) -> str:
    parts = rng.choice(len(SYLLABLES), size=3, replace=False)
    return "".join(SYLLABLES[i] for i in parts).capitalize()


def value(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10_000, 100_000)))


def magic(key: str, number: str) -> str:
    return f"The special magic number for {key} is {number}."


def magic_probe(key: str, number: str) -> Probe:
    return Probe(
        f"What is the special magic number for {key}?",
        f"The special magic number for {key} is",
        number,
    )


def make_sample(task: str, rng: np.random.Generator) -> Sample:
    keys: list[str] = []
    while len(keys) < 4:
        key = name(rng)
        if key not in keys:
            keys.append(key)
    values = [value(rng) for _ in keys]
    if task == "single":
        return Sample(task, (magic(keys[0], values[0]),), (magic_probe(keys[0], values[0]),))
    if task == "multikey":
        facts = tuple(magic(k, v) for k, v in zip(keys, values, strict=True))
        return Sample(task, facts, (magic_probe(keys[0], values[0]),))
    if task == "multivalue":
        facts = (magic(keys[0], values[0]), magic(keys[1], values[1]))
        probes = (magic_probe(keys[0], values[0]), magic_probe(keys[1], values[1]))
        return Sample(task, facts, probes)
    if task == "paraphrase":
        fact = f"Whenever {keys[0]} opens the old safe, the code that works is {values[0]}."
        return Sample(task, (fact,), (magic_probe(keys[0], values[0]),))
    if task == "twohop":
        a, b = keys[0], keys[1]
        facts = (
            f"{a} always uses the same locker as {b}.",
            f"The number on {b}'s locker is {values[0]}.",
        )
        probe = Probe(
            f"What is the number on {a}'s locker?", f"The number on {a}'s locker is", values[0]
        )
        return Sample(task, facts, (probe,))
    raise ValueError(f"task: unknown {task!r}")


def prompt_text(probe: Probe) -> str:
    return f"\n\nQuestion: {probe.question}\nAnswer: {probe.prefix}"


class Haystack:
    """Essays (held-out ones unless said otherwise) as one token stream (cycled for long
    lifetimes), with sentence ends."""

    def __init__(self, tokenizer: Tokenizer, held_out: bool = True) -> None:
        text = "\n\n".join(corpus.split(corpus.essays(), held_out=held_out).values())
        self.ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
        vocab = tokenizer.get_vocab()
        ends = {i for token, i in vocab.items() if token.rstrip("Ċ").endswith(".")}
        self.sentence_end = np.isin(self.ids, sorted(ends))

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """`length` tokens from `start` (cycling), and which of them end a sentence."""
        at = (start + np.arange(length)) % len(self.ids)
        return self.ids[at], self.sentence_end[at]


def place(
    tokenizer: Tokenizer,
    haystack: Haystack,
    facts: Sequence[str],
    lifetime: int,
    rng: np.random.Generator,
    at_end: bool,
) -> list[int]:
    """`lifetime` tokens: haystack with each fact inserted after a sentence end at a random depth
    in 10-80% (or, `at_end`, all facts just before the end: the ceiling)."""
    fact_ids = [tokenizer.encode(" " + fact).ids for fact in facts]
    room = lifetime - sum(len(f) for f in fact_ids)
    tokens, ends = haystack.window(int(rng.integers(len(haystack.ids))), room)
    if at_end:
        return [int(t) for t in tokens] + [t for f in fact_ids for t in f]
    depths = sorted(rng.uniform(0.1, 0.8, size=len(facts)))
    order = rng.permutation(len(facts))  # which fact goes to which depth
    candidates = np.flatnonzero(ends)
    cuts = [
        int(candidates[min(np.searchsorted(candidates, d * room), len(candidates) - 1)]) + 1
        for d in depths
    ]
    out: list[int] = []
    previous = 0
    for cut, k in zip(cuts, order, strict=True):
        out += [int(t) for t in tokens[previous:cut]] + fact_ids[k]
        previous = cut
    return out + [int(t) for t in tokens[previous:]]


async def ask(
    client: LensClient,
    tokens: list[int],
    probe: Probe,
    policy: str,
    budget: int,
    seed: int,
) -> dict[str, Any]:
    """One fresh session of `tokens`; Score the answer, then Generate (which appends)."""
    session = (await client.create_session()).session_id
    try:
        await client.append(session, token_ids=tokens)
        prompt = prompt_text(probe)
        scored = await client.score(
            " " + probe.value, session_id=session, context=prompt, wc_budget=budget,
            policy=policy, query=prompt,
        )  # fmt: skip
        text, usage = "", None
        # Greedy: the seed only picks the `random` policy's choice. (vLLM 0.32's CPU engine dies
        # when a seeded request's prefill is chunked, as `full`'s 4k rows are.)
        async for chunk in client.generate(
            prompt, session_id=session, max_tokens=MAX_TOKENS, temperature=0.0,
            seed=seed if policy == "random" else 0, wc_budget=budget, policy=policy,
        ):  # fmt: skip
            text += chunk.text
            if chunk.HasField("usage"):
                usage = chunk.usage
        assert usage is not None
        return {
            "match": probe.value in text,
            "nll": scored.mean_nll,
            "completion": text,
            "wc_rows": usage.wc_rows,
            "choice_ms": usage.wc_choice_ms,
            "query_source": usage.query_source,
        }
    finally:
        await client.delete_session(session)


async def run_cell(
    client: LensClient,
    tokenizer: Tokenizer,
    haystack: Haystack,
    task: str,
    lifetime: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every policy (and the ceiling) on `args.samples` samples of one task and lifetime."""
    runs: dict[str, list[dict[str, Any]]] = {}
    base = SPLIT_SEEDS[args.split] + 1000 * TASKS.index(task) + lifetime % 997
    for i in range(args.samples):
        seed = base + i
        sample = make_sample(task, np.random.default_rng(seed))
        tokens = place(
            tokenizer, haystack, sample.facts, lifetime, np.random.default_rng(seed), False
        )
        at_end = place(
            tokenizer, haystack, sample.facts, lifetime, np.random.default_rng(seed), True
        )
        for probe in sample.probes:
            for policy in args.policies:
                budget = args.budget
                if policy == "full":
                    if lifetime + args.budget > args.max_model_len - 2 * MAX_TOKENS - 64:
                        continue
                    budget = lifetime + 96  # everything raw: the lifetime, the question, slack
                result = await ask(client, tokens, probe, policy, budget, seed)
                runs.setdefault(policy, []).append(result)
            result = await ask(client, at_end, probe, "recency", args.budget, seed)
            runs.setdefault(CEILING, []).append(result)
    return {
        policy: {
            "exact_match": statistics.mean(r["match"] for r in results),
            "answer_nll": statistics.mean(r["nll"] for r in results),
            "n": len(results),
            "runs": results,
        }
        for policy, results in runs.items()
    }


def summary_lines(cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for key, cell in cells.items():
        parts = [
            f"{policy} {c['exact_match']:.2f}/{c['answer_nll']:.2f}" for policy, c in cell.items()
        ]
        lines.append(f"{key}: " + ", ".join(parts))
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["config"]["tasks"]
    lifetimes = sorted(result["config"]["lifetimes"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), sharey=True)
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        for policy in [*result["config"]["policies"], CEILING]:
            xs, ys = [], []
            for lifetime in lifetimes:
                cell = result["cells"].get(f"{task}/{lifetime}", {}).get(policy)
                if cell is not None:
                    xs.append(lifetime)
                    ys.append(cell["exact_match"])
            style = "k--" if policy == CEILING else "o-"
            ax.plot(xs, ys, style, label=policy, markersize=3)
        ax.set(title=task, xscale="log", xlabel="lifetime (tokens)", ylim=(-0.05, 1.05))
        ax.set_xticks(lifetimes, [f"{x // 1024}k" for x in lifetimes])
    np.atleast_1d(axes)[0].set(ylabel="exact match (greedy Generate)")
    np.atleast_1d(axes)[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SmolLM2-135M, W={result['config']['budget']}, split {result['config']['split']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
    haystack = Haystack(tokenizer)
    settings_kw: dict[str, Any] = dict(
        model=str(model_dir), port=0, wc_budget=args.budget, max_wc_budget=args.max_model_len - 64,
        max_model_len=args.max_model_len, max_session_tokens=max(args.lifetimes) + 10_000,
        shadow_rate=0.0, kv_cache_gib=args.kv_cache_gib, prewarm_next_turn=False,
    )  # fmt: skip
    engine_config = Settings(**settings_kw, redis_url="redis://unused").engine_config(model_dir)
    engine = await VllmEngine.create(replace(engine_config, max_num_seqs=4))
    cells: dict[str, dict[str, Any]] = {}
    lens: dict[str, Any] = {"version": "initial (untrained)"}
    began = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data)) as redis_server:
            settings = Settings(**settings_kw, redis_url=redis_server.url)
            async with serving_stack(settings, engine) as stack, LensClient(stack.target) as client:
                if args.lens_records is not None:
                    lens = await trained_lens(args, model_dir, redis_server.url, stack)
                for lifetime in args.lifetimes:
                    for task in args.tasks:
                        key = f"{task}/{lifetime}"
                        cells[key] = await run_cell(
                            client, tokenizer, haystack, task, lifetime, args
                        )
                        print(summary_lines({key: cells[key]})[0], flush=True)
                        partial = {
                            "config": _config(args), "lens": lens, "cells": cells,
                            "complete": False,
                        }  # fmt: skip
                        args.out.write_text(json.dumps(partial, indent=1))  # survives a stop
    finally:
        await engine.shutdown()
    seconds = time.perf_counter() - began
    return {
        "config": _config(args), "lens": lens, "seconds": seconds, "cells": cells, "complete": True
    }  # fmt: skip


async def trained_lens(
    args: argparse.Namespace, model_dir: Path, redis_url: str, stack: Stack
) -> dict[str, Any]:
    """Train LensNet on `args.lens_records` (dumps, merged) with the trainer's offline run, and
    wait until the server swaps in the version it published; its gate report goes into the
    results."""
    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "records.bin"
        write_dump(merged, [e for path in args.lens_records for e in read_dump(path)])
        cmd = [
            sys.executable, "-m", "trainer", "--log-level", "WARNING", "run",
            "--offline-dump", str(merged), "--redis-url", redis_url,
            "--model", str(model_dir), "--min-records", "1", "--max-steps", str(args.lens_steps),
            "--batch-size", "8", "--held-out-every", "5",
        ]  # fmt: skip
        done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    reports = [json.loads(x.removeprefix("report ")) for x in lines if x.startswith("report ")]
    published = [x.removeprefix("published ") for x in lines if x.startswith("published ")]
    if done.returncode != 0 or not published:
        raise SystemExit(
            f"--lens-records: the trainer published nothing (exit {done.returncode}): "
            f"{reports[-1] if reports else done.stderr[-2000:]}"
        )
    deadline = time.monotonic() + 60
    while stack.service.weights.version != published[-1]:
        if time.monotonic() > deadline:
            raise SystemExit(f"--lens-records: the server never swapped in {published[-1]}")
        await asyncio.sleep(0.2)
    sources = [str(p) for p in args.lens_records]
    print(f"lens: {published[-1]}, trained on {sources}", flush=True)
    return {"version": published[-1], "records": sources, "gate": reports[-1]}


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(json.dumps(vars(args), default=str))  # paths as strings
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="test")
    parser.add_argument("--samples", type=int, default=6, help="samples per task and lifetime")
    parser.add_argument("--budget", type=int, default=1024, help="W, working-context rows")
    parser.add_argument("--lifetimes", type=int, nargs="+", default=[4096, 8192, 32768, 131072])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/longctx.json"))
    parser.add_argument(
        "--lens-records", type=Path, nargs="+", default=None,
        help="serve as `lens` a LensNet trained offline on these dumps of preference records",
    )  # fmt: skip
    parser.add_argument("--lens-steps", type=int, default=1000, help="offline training steps")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print("\n".join(summary_lines(result["cells"])))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
