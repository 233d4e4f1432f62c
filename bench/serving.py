"""Serving benchmark: lens-serve over real gRPC (in this process, embedded redis-server) on a vLLM
engine, against bare vLLM on the same engine.

- multi-turn: sessions of a 4k-token document and 10 question turns at W = 1024: time to first
  token (TTFT) per turn and the share of working-context rows served from vLLM's prefix cache.
  Target: from turn 2 on, TTFT within 1.5x of a prompt made only of the new turn's tokens: the
  tokens the turn adds to the session, i.e. the previous answer and the new question (the answer's
  KV cannot come from vLLM's cache: decoded tokens are keyed by id, prompt rows by embedding).
  The question alone is reported too. While the user reads an answer, the server prefills the
  next turn's prefix (this WC + the answer, `Settings.prewarm_next_turn`; `--no-prewarm` turns it
  off): the next turn and the baselines are sent once that prefill is done, and its time after
  the answer is reported (a reader takes longer than that).
- TTFT with and without a session: the session turns above, those new tokens alone, the question
  alone, and a stateless client resending document + question every time.
- overhead: 16 concurrent streams, lens-serve `Generate` (no session; a 4k-token prompt, W = 1024)
  against bare vLLM `AsyncLLM.generate` of the very rows lens-serve feeds (prepared beforehand).
  Target: p50 latency and throughput within 1.10x. Rounds alternate which side goes first; each
  side's prompts are uncached (fresh windows for lens-serve, a fresh vLLM cache_salt for bare).
- constant cost: p50 latency of a turn in sessions of 4k, 32k and 256k tokens at W = 1024.
  Target: 256k within 1.25x of 4k.

    python bench/serving.py [--model smollm2-135m] [--parts multi_turn ...] [--kv-block-size 128]

Writes the JSON and a PNG next to it. Times are wall clock on this machine; compare ratios taken
within one run."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens_serve.assets import corpus
from lens_serve.assets.model_dirs import resolve_model
from lens_serve.client import LensClient
from lens_serve.core.assembly import assemble
from lens_serve.core.gistnet import build_gistnet, gist_config
from lens_serve.core.tree import LifetimeTree
from lens_serve.engine.vllm import VllmEngine
from lens_serve.service.config import Settings
from lens_serve.service.inprocess import Stack, serving_stack
from lens_serve.service.lens_service import LensService
from lens_serve.store.embedded import EmbeddedRedis
from lens_serve.v1 import lens_serve_pb2 as pb

PARTS = ("multi_turn", "overhead", "constant_cost")
QUESTIONS = (
    "What is the main claim of the text above?",
    "Name one example the author gives.",
    "Who is the intended reader?",
    "What does the author recommend doing?",
    "Which argument is the weakest?",
    "Summarize the second half in one sentence.",
    "What would a critic say?",
    "What is surprising about it?",
    "How does it end?",
    "Give it a short title.",
)


@dataclass(frozen=True)
class Timed:
    ttft_s: float
    latency_s: float
    completion_tokens: int
    prompt_rows: int
    cached_rows: int
    choice_ms: float = 0.0
    token_ids: tuple[int, ...] = ()


async def lens_generate(
    client: LensClient, prompt: str | Sequence[int], budget: int, max_tokens: int, session: str = ""
) -> Timed:
    began = time.perf_counter()
    first: float | None = None
    usage = pb.Usage()
    ids: list[int] = []
    async for chunk in client.generate(
        prompt, session_id=session or None, wc_budget=budget, max_tokens=max_tokens
    ):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        ids += chunk.token_ids
        if chunk.HasField("usage"):
            usage = chunk.usage
    end = time.perf_counter()
    return Timed(
        (first or end) - began, end - began, usage.completion_tokens, usage.wc_rows,
        usage.cached_rows, usage.wc_choice_ms, tuple(ids),
    )  # fmt: skip


async def bare_generate(engine: VllmEngine, rows: torch.Tensor, max_tokens: int) -> Timed:
    """vLLM's own async generation of prompt rows (n, D), with a fresh cache salt (uncached)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA
    )
    prompt = {"prompt_embeds": rows, "cache_salt": uuid.uuid4().hex}
    began = time.perf_counter()
    first: float | None = None
    tokens = cached = 0
    async for out in engine.async_llm.generate(prompt, sampling, uuid.uuid4().hex):
        if first is None and out.outputs[0].token_ids:
            first = time.perf_counter()
        tokens += len(out.outputs[0].token_ids)
        cached = max(cached, int(out.num_cached_tokens or 0))
    end = time.perf_counter()
    return Timed((first or end) - began, end - began, tokens, int(rows.shape[0]), cached)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def text_tokens(engine: VllmEngine, n_tokens: int) -> list[int]:
    """`n_tokens` of essays, then standard-library sources (held-out essays first)."""
    essays = corpus.essays()
    documents = [*corpus.split(essays, True).values(), *corpus.split(essays, False).values()]
    documents += corpus.stdlib_sources(max_files=400).values()
    ids: list[int] = []
    for document in documents:
        ids += engine.encode(document + "\n\n")
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"only {len(ids)} tokens of local text, {n_tokens} needed")


async def multi_turn(
    client: LensClient,
    service: LensService,
    engine: VllmEngine,
    tokens: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    turns: list[list[Timed]] = [[] for _ in range(args.turns)]
    new_tokens: list[Timed] = []
    question: list[Timed] = []
    stateless: list[Timed] = []
    prewarm_s: list[float] = []
    for s in range(args.sessions):
        document = tokens[s * args.document : (s + 1) * args.document]
        session = await client.create_session()
        await client.append(session.session_id, token_ids=document)
        answer: tuple[int, ...] = ()
        for t, text in enumerate(QUESTIONS[: args.turns]):
            turn = f"\n\nQuestion {t + 1}: {text}\nAnswer:"
            timed = await lens_generate(
                client, turn, args.budget, args.max_tokens, session.session_id
            )
            turns[t].append(timed)
            began = time.perf_counter()
            await service.settle_prewarms()  # the user is still reading the answer
            prewarm_s.append(time.perf_counter() - began)
            if t > 0:
                # What this turn adds to the session: the previous answer and the new question.
                # The answer's KV is recomputed in the session too: vLLM keys decoded tokens by id
                # and prompt rows by their embeddings, so the two never match in its cache.
                prompt = [*answer, *engine.encode(turn)]
                new_tokens.append(await lens_generate(client, prompt, args.budget, args.max_tokens))
            # The question alone; the tag keeps it out of the prefix cache.
            question.append(
                await lens_generate(client, f"[{s}.{t}]{turn}", args.budget, args.max_tokens)
            )
            resend = document + engine.encode(turn)
            stateless.append(await lens_generate(client, resend, args.budget, args.max_tokens))
            answer = timed.token_ids
        print(f"multi-turn session {s}: TTFT " + " ".join(f"{x[-1].ttft_s:.3f}" for x in turns))
    later = [r for per_turn in turns[1:] for r in per_turn]
    ttft = {
        "session_turn_2_on": median([r.ttft_s for r in later]),
        "new_tokens_alone": median([r.ttft_s for r in new_tokens]),
        "question_alone": median([r.ttft_s for r in question]),
        "stateless_resend": median([r.ttft_s for r in stateless]),
    }
    return {
        "per_turn": [
            {
                "turn": t + 1,
                "ttft_s_median": median([r.ttft_s for r in rs]),
                "cached_share_median": median([r.cached_rows / r.prompt_rows for r in rs]),
                "wc_rows_median": median([r.prompt_rows for r in rs]),
            }
            for t, rs in enumerate(turns)
        ],
        "ttft_s_median": ttft,
        "prewarm_s_after_answer_median": median(prewarm_s),
        "new_tokens_rows_median": median([r.prompt_rows for r in new_tokens]),
        "question_rows_median": median([r.prompt_rows for r in question]),
        "cached_share_turn_2_on_median": median([r.cached_rows / r.prompt_rows for r in later]),
        "stateless_cached_share_median": median([r.cached_rows / r.prompt_rows for r in stateless]),
        "ratio_turn_2_on_vs_new_tokens": ttft["session_turn_2_on"] / ttft["new_tokens_alone"],
        # Tail latency of a session's turns: a refit or a recall recomputes rows the cache held.
        "ttft_s_p90_turn_2_on": float(np.quantile([r.ttft_s for r in later], 0.9)),
        "ratio_p90_vs_median_turn_2_on": float(np.quantile([r.ttft_s for r in later], 0.9))
        / ttft["session_turn_2_on"],
        "ratio_turn_2_on_vs_question": ttft["session_turn_2_on"] / ttft["question_alone"],
        "target_ratio": 1.5,
    }


async def overhead(
    stack: Stack, client: LensClient, engine: VllmEngine, settings: Settings, tokens: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    table = engine.embedding_table()
    gistnet = build_gistnet(
        gist_config(
            table,
            kind=settings.gist_kind,  # type: ignore[arg-type]  # validated by Settings
            block_size=settings.block_size,
            rows=settings.gist_rows,
        ),
        table,
    )
    if gistnet.version != stack.service.gistnet_version:
        raise RuntimeError("bare vLLM would see other gists than the server")
    chooser = stack.service.weights.chooser
    runs: dict[str, list[Timed]] = {"lens_serve": [], "bare_vllm": []}
    walls: dict[str, list[float]] = {"lens_serve": [], "bare_vllm": []}
    throughput: dict[str, list[float]] = {"lens_serve": [], "bare_vllm": []}
    n = args.streams
    for r in range(args.rounds):
        # Past the multi-turn documents, whose rows the prefix cache still holds.
        base = args.sessions * args.document + (r * n) * args.stride
        windows = [tokens[base + i * args.stride :][: args.document] for i in range(n)]
        rows = []
        for window in windows:  # what the server will feed, chosen the same way
            tree = LifetimeTree(gistnet, table)
            tree.append(window)
            wc = chooser.choose(tree, "lens", args.budget, settings.tail, seed=0).working_context
            rows.append(assemble(tree, wc).to(engine.dtype))
        order = ("lens_serve", "bare_vllm") if r % 2 == 0 else ("bare_vllm", "lens_serve")
        for side in order:
            began = time.perf_counter()
            if side == "lens_serve":
                jobs = [lens_generate(client, w, args.budget, args.max_tokens) for w in windows]
            else:
                jobs = [bare_generate(engine, x, args.max_tokens) for x in rows]
            done = await asyncio.gather(*jobs)
            wall = time.perf_counter() - began
            runs[side] += done
            walls[side].append(wall)
            throughput[side].append(sum(d.completion_tokens for d in done) / wall)
        lens_rows = sorted(d.prompt_rows for d in runs["lens_serve"][-n:])
        if lens_rows != sorted(int(x.shape[0]) for x in rows):
            raise RuntimeError("lens-serve and bare vLLM prompts differ in rows")
        print(
            f"overhead round {r}: wall lens-serve {walls['lens_serve'][-1]:.2f} s, "
            f"bare vLLM {walls['bare_vllm'][-1]:.2f} s"
        )
    summary = {
        side: {
            "latency_s_p50": median([d.latency_s for d in done]),
            "ttft_s_p50": median([d.ttft_s for d in done]),
            "throughput_tok_s_median": median(throughput[side]),
            "completion_tokens_total": sum(d.completion_tokens for d in done),
            "cached_rows_max": max(d.cached_rows for d in done),
            "prompt_rows_median": median([d.prompt_rows for d in done]),
        }
        for side, done in runs.items()
    }
    lens, bare = summary["lens_serve"], summary["bare_vllm"]
    return {
        **summary,
        "latency_ratio_p50": lens["latency_s_p50"] / bare["latency_s_p50"],
        "throughput_ratio": bare["throughput_tok_s_median"] / lens["throughput_tok_s_median"],
        "target_ratio": 1.10,
    }


async def constant_cost(
    client: LensClient, tokens: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    sessions: dict[int, str] = {}
    offset = 0
    for lifetime in args.lifetimes:
        session = await client.create_session()
        await client.append(session.session_id, token_ids=tokens[offset : offset + lifetime])
        offset += lifetime
        sessions[lifetime] = session.session_id
        # First turn builds the tree from the token log: reported, not in the p50.
        first = await lens_generate(
            client, "\n\nQ: Go on.", args.budget, args.max_tokens, sessions[lifetime]
        )
        print(f"constant cost {lifetime}: first turn {first.latency_s:.2f} s")
    runs: dict[int, list[Timed]] = {lifetime: [] for lifetime in args.lifetimes}
    for t in range(args.cost_turns):  # lifetimes interleaved, so machine noise hits all alike
        for lifetime, sid in sessions.items():
            prompt = f"\n\nQuestion {t + 1}: {QUESTIONS[t % len(QUESTIONS)]}\nAnswer:"
            runs[lifetime].append(
                await lens_generate(client, prompt, args.budget, args.max_tokens, sid)
            )
    summary = {
        str(lifetime): {
            "latency_s_p50": median([r.latency_s for r in rs]),
            "ttft_s_p50": median([r.ttft_s for r in rs]),
            "wc_choice_ms_p50": median([r.choice_ms for r in rs]),
            "cached_share_median": median([r.cached_rows / r.prompt_rows for r in rs]),
        }
        for lifetime, rs in runs.items()
    }
    small, large = str(min(args.lifetimes)), str(max(args.lifetimes))
    for name, s in summary.items():
        print(f"constant cost {name}: p50 {s['latency_s_p50']:.3f} s, TTFT {s['ttft_s_p50']:.3f} s")
    return {
        "lifetimes": summary,
        "ratio_largest_vs_smallest": summary[large]["latency_s_p50"]
        / summary[small]["latency_s_p50"],
        "target_ratio": 1.25,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in PARTS if p in result]
    fig, panels = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4), squeeze=False)
    axes = dict(zip(parts, panels[0], strict=True))
    if "multi_turn" in result:
        plot_multi_turn(result["multi_turn"], axes["multi_turn"])
    if "overhead" in result:
        ov = result["overhead"]
        sides = ["lens_serve", "bare_vllm"]
        axes["overhead"].bar(sides, [ov[s]["latency_s_p50"] for s in sides])
        axes["overhead"].set(
            ylabel="p50 latency (s)", title=f"16 streams: ratio {ov['latency_ratio_p50']:.3f}"
        )
    if "constant_cost" in result:
        cc, ax = result["constant_cost"]["lifetimes"], axes["constant_cost"]
        lifetimes = [int(k) for k in cc]
        ax.plot(lifetimes, [v["latency_s_p50"] for v in cc.values()], "o-", label="latency")
        ax.plot(lifetimes, [v["ttft_s_p50"] for v in cc.values()], "s-", label="TTFT")
        ax.set(xscale="log", xlabel="lifetime tokens", ylabel="p50 (s)", ylim=(0, None))
        ax.set_title("constant cost, W=1024")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_multi_turn(mt: dict[str, Any], ax: Any) -> None:
    turns = [p["turn"] for p in mt["per_turn"]]
    ax.plot(turns, [p["ttft_s_median"] for p in mt["per_turn"]], "o-", label="session turn")
    alone = mt["ttft_s_median"]["new_tokens_alone"]
    ax.axhline(alone, color="grey", ls="--", label="new tokens alone (last answer + question)")
    ax.axhline(1.5 * alone, color="red", ls=":", label="target 1.5x")
    question = mt["ttft_s_median"]["question_alone"]
    ax.axhline(question, color="black", ls="-.", label="question alone")
    ax.set(xlabel="turn", ylabel="TTFT (s, median)", yscale="log", title="multi-turn, W=1024")
    share = ax.twinx()
    share.plot(turns, [p["cached_share_median"] for p in mt["per_turn"]], "s-", color="green")
    share.set(ylabel="WC rows from prefix cache (green)", ylim=(0, 1.05))
    ax.legend(fontsize=7, loc="upper center")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    settings_kw: dict[str, Any] = dict(
        model=str(model_dir), port=0, wc_budget=args.budget, max_wc_budget=args.budget,
        max_model_len=args.max_model_len, max_session_tokens=max(args.lifetimes) + 100_000,
        max_concurrency=64, shadow_rate=0.0, kv_cache_gib=args.kv_cache_gib,
        kv_block_size=args.kv_block_size, prewarm_next_turn=args.prewarm,
    )  # fmt: skip
    # The engine starts before Redis does, so it is configured from settings without a URL yet.
    engine_config = Settings(**settings_kw, redis_url="redis://unused").engine_config(model_dir)
    engine = await VllmEngine.create(replace(engine_config, max_num_seqs=args.streams))
    try:
        needed = max(
            args.sessions * args.document
            + (args.rounds * args.streams - 1) * args.stride
            + args.document,
            sum(args.lifetimes),
        )
        tokens = text_tokens(engine, needed)
        with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data)) as redis_server:
            settings = Settings(**settings_kw, redis_url=redis_server.url)
            async with (
                serving_stack(settings, engine) as stack,
                LensClient(stack.target) as client,
            ):
                result: dict[str, Any] = {}
                if "multi_turn" in args.parts:
                    result["multi_turn"] = await multi_turn(
                        client, stack.service, engine, tokens, args
                    )
                if "overhead" in args.parts:
                    result["overhead"] = await overhead(
                        stack, client, engine, settings, tokens, args
                    )
                if "constant_cost" in args.parts:
                    result["constant_cost"] = await constant_cost(client, tokens, args)
    finally:
        await engine.shutdown()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"config": config, "engine_dtype": str(engine.dtype), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=int, default=1024, help="W, working-context rows")
    parser.add_argument("--document", type=int, default=4096, help="tokens per document")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=3, help="multi-turn sessions")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (overhead)")
    parser.add_argument("--rounds", type=int, default=3, help="overhead rounds")
    parser.add_argument("--stride", type=int, default=4096, help="offset between windows")
    parser.add_argument("--lifetimes", type=int, nargs="+", default=[4096, 32768, 262144])
    parser.add_argument("--cost-turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--kv-block-size", type=int, default=0, help="0: auto (32 on CPU)")
    parser.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                        help="do not prefill the next turn's prefix between turns")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=Path("bench/out/serving.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if mt := result.get("multi_turn"):
        ttft = mt["ttft_s_median"]
        print(
            f"multi-turn: TTFT turn>=2 {ttft['session_turn_2_on']:.3f} s; new tokens alone "
            f"{ttft['new_tokens_alone']:.3f} s (ratio {mt['ratio_turn_2_on_vs_new_tokens']:.2f}, "
            f"target <= 1.5); question alone {ttft['question_alone']:.3f} s (ratio "
            f"{mt['ratio_turn_2_on_vs_question']:.2f}); cached share "
            f"{mt['cached_share_turn_2_on_median']:.2f}; stateless resend "
            f"{ttft['stateless_resend']:.3f} s; prewarm done "
            f"{mt['prewarm_s_after_answer_median']:.3f} s after the answer; p90 "
            f"{mt['ttft_s_p90_turn_2_on']:.3f} s ({mt['ratio_p90_vs_median_turn_2_on']:.2f}x the "
            "median, target <= 3)"
        )
    if ov := result.get("overhead"):
        print(
            f"overhead: p50 latency ratio {ov['latency_ratio_p50']:.3f}, throughput ratio "
            f"{ov['throughput_ratio']:.3f} (target <= 1.10)"
        )
    if cc := result.get("constant_cost"):
        print(
            f"constant cost: largest/smallest lifetime p50 ratio "
            f"{cc['ratio_largest_vs_smallest']:.3f} (target <= 1.25)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
