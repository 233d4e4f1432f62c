"""Learning-loop benchmark on the long-context suite's traffic: requests -> shadow records in
Redis -> `lens-trainer` (a separate process) -> published LensNet versions -> hot swaps.

Traffic: bench/longctx.py's tasks (single, multikey, multivalue, paraphrase, twohop) built from
the *training* essays at `--lifetime` tokens, W = `--budget`; each request is a fresh session and
a prompt that ends with the answer, which the shadow scorer holds out (`shadow_target=prompt`) and
scores after the served working context, after each one-unit change of it (`shadow_units`) and,
for comparison on the same traffic, after random multi-edit variants (`--variants`).

Reports (the JSON, and a PNG of the curve):
- learning curve: at each checkpoint (before training, then every `--checkpoint-seconds` of
  traffic) exact match per task on *held-out* essays (bench/longctx.py's test split) for lens,
  retrieval, recency and uniform, against the records logged so far; and the trainer's held-out
  ranking metric (NDCG of the measured units by gain) at every gate;
- labels: records whose largest per-unit |gain| exceeds 0.5 nats against records whose largest
  random-variant |NLL gap| does, on the same records; score passes per second;
- a 1M-token session: its request's record size, and that the trainer stored it (usable);
- hot swap: publish -> first response on the new version (p50), failed requests, records/s
  appended to Redis.

    python bench/loop.py [--traffic-seconds 1800] [--checkpoint-seconds 900] [--lifetime 32768]
        [--tasks multikey]  # traffic and evaluation on some tasks only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from longctx import SPLIT_SEEDS, TASKS, Haystack, ask, make_sample, place, prompt_text
from redis.asyncio import Redis
from tokenizers import Tokenizer

from lens_serve import metrics
from lens_serve.assets.model_dirs import TOKENIZER_NAME, resolve_model
from lens_serve.client import LensClient
from lens_serve.core.lensnet import LensNet, LensNetConfig
from lens_serve.engine.vllm import VllmEngine
from lens_serve.service.config import Settings
from lens_serve.service.inprocess import Stack, serving_stack
from lens_serve.store import registry
from lens_serve.store.embedded import EmbeddedRedis
from lens_serve.store.preferences import PREFS_STREAM, PreferenceLog, decode_record
from trainer.data import REJECTED_KEY, REPLAY_KEY, dump, read_dump

EVAL_POLICIES = ("lens", "retrieval", "recency", "uniform")
LABEL_NATS = 0.5
MAX_MODEL_LEN = 8192
MILLION = 1_000_000
TRAIN_SEED = 500_000  # training samples: other seeds than longctx's dev and test splits


class SuiteTraffic:
    """Training requests: a task's facts in training essays, and the question with its answer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        lifetime: int,
        answer_tokens: int,
        seed: int,
        tasks: Sequence[str] = TASKS,
    ) -> None:
        self.tokenizer, self.lifetime, self.answer_tokens = tokenizer, lifetime, answer_tokens
        self.haystack = Haystack(tokenizer, held_out=False)
        self.seed = seed
        self.tasks = tuple(tasks)
        self.sent = 0

    def next(self) -> tuple[list[int], list[int]]:
        """(session tokens, prompt ending with the answer), cycling through the tasks."""
        while True:
            seed = self.seed + self.sent
            self.sent += 1
            rng = np.random.default_rng(seed)
            sample = make_sample(self.tasks[seed % len(self.tasks)], rng)
            probe = sample.probes[int(rng.integers(len(sample.probes)))]
            answer = self.tokenizer.encode(" " + probe.value).ids
            if len(answer) != self.answer_tokens:
                continue  # the server holds out a fixed number of tokens
            tokens = place(self.tokenizer, self.haystack, sample.facts, self.lifetime, rng, False)
            return tokens, self.tokenizer.encode(prompt_text(probe)).ids + answer


def answer_tokens(tokenizer: Tokenizer) -> int:
    """How many tokens the suite's answers (" " + a 5-digit value) take: the held-out target."""
    return len(tokenizer.encode(" 12345").ids)


async def exact_match(
    client: LensClient, tokenizer: Tokenizer, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Exact match per task and policy on held-out essays (longctx's test split)."""
    haystack = Haystack(tokenizer, held_out=True)
    out: dict[str, dict[str, float]] = {}
    for task in args.tasks:
        matches: dict[str, list[bool]] = {p: [] for p in EVAL_POLICIES}
        for i in range(args.eval_samples):
            seed = SPLIT_SEEDS["test"] + 1000 * TASKS.index(task) + args.lifetime % 997 + i
            sample = make_sample(task, np.random.default_rng(seed))
            rng = np.random.default_rng(seed)
            tokens = place(tokenizer, haystack, sample.facts, args.lifetime, rng, False)
            for probe in sample.probes:
                for policy in EVAL_POLICIES:
                    result = await ask(client, tokens, probe, policy, args.budget, seed)
                    matches[policy].append(bool(result["match"]))
        out[task] = {p: statistics.mean(m) for p, m in matches.items()}
        print(f"  {task}: " + ", ".join(f"{p} {v:.2f}" for p, v in out[task].items()), flush=True)
    return out


def label_counts(records: Sequence[Any]) -> dict[str, Any]:
    """How many records carry a label worth learning: per-unit gains against random variants."""
    unit, random_, units, variants = 0, 0, 0, 0
    for record in records:
        served = record.variants[0].mean_nll
        gains = [abs(served - g.mean_nll) for g in record.unit_gains]
        gaps = [abs(served - v.mean_nll) for v in record.variants if v.kind == "random"]
        unit += max(gains, default=0.0) > LABEL_NATS
        random_ += max(gaps, default=0.0) > LABEL_NATS
        units += len(gains)
        variants += len(gaps)
    return {
        "records": len(records),
        f"unit_gain_above_{LABEL_NATS}": unit,
        f"random_gap_above_{LABEL_NATS}": random_,
        "ratio": unit / random_ if random_ else float("inf"),
        "unit_changes_measured": units,
        "random_variants_measured": variants,
    }


def dumped_records(path: Path) -> list[Any]:
    return [decode_record({b"record": e.record}) for e in read_dump(path)]


async def million_token_request(
    client: LensClient, stack: Stack, tokenizer: Tokenizer
) -> dict[str, Any]:
    """One request on a 1M-token session: its record's size (the trainer consumes it live)."""
    assert stack.service.shadow is not None
    maker = SuiteTraffic(tokenizer, MILLION, answer_tokens(tokenizer), TRAIN_SEED + 10**6)
    tokens, prompt = maker.next()
    session = (await client.create_session()).session_id
    began = time.perf_counter()
    try:
        for start in range(0, len(tokens), 200_000):
            await client.append(session, token_ids=tokens[start : start + 200_000])
        before = await stack.redis.xlen(PREFS_STREAM)
        async for _ in client.generate(prompt, session_id=session, max_tokens=1):
            pass
        await stack.service.shadow.drain()
    finally:
        await client.delete_session(session)
    entries = await stack.redis.xrevrange(PREFS_STREAM, count=1)
    assert entries and await stack.redis.xlen(PREFS_STREAM) == before + 1, "no record written"
    entry_id, fields = entries[0]
    record = decode_record(fields or {})
    return {
        "entry_id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        "lifetime": record.lifetime,
        "record_bytes": record.ByteSize(),
        "units": len(record.units),
        "unit_gains": len(record.unit_gains),
        "seconds": time.perf_counter() - began,
    }


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


async def trainer_stored(redis: Redis, entry_id: str) -> str:
    """'usable' if the trainer stored the entry for training, 'rejected: why', or 'not seen'."""
    for raw in await redis.lrange(REPLAY_KEY, 0, -1):
        if _text(raw).split("\n", 1)[0] == entry_id:
            return "usable"
    for raw in await redis.lrange(REJECTED_KEY, 0, -1):
        if entry_id in _text(raw):
            return "rejected: " + _text(raw)
    return "not seen"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": median(values), "max": max(values, default=float("nan")), "n": len(values)}


@dataclass
class Probe:
    at: float  # wall clock (time.time), comparable with a version's created_at
    version: str


class Traffic:
    """Suite requests for the shadow scorer, plus small probes that show which version serves."""

    def __init__(self, client: LensClient, stack: Stack, budget: int) -> None:
        self.client, self.stack, self.budget = client, stack, budget
        self.probes: list[Probe] = []
        self.requests = 0
        self.failed = 0

    async def suite(self, maker: SuiteTraffic, stop: float) -> None:
        """Training requests until `stop`: a fresh session of the suite's text per request."""
        assert self.stack.service.shadow is not None
        while time.monotonic() < stop:
            tokens, prompt = maker.next()
            session = (await self.client.create_session()).session_id
            try:
                await self.client.append(session, token_ids=tokens)
                await self._one(prompt, self.budget, session)
                # Paced by the shadow worker: a request whose job were dropped (queue full) would
                # only take engine time from the records.
                await self.stack.service.shadow.drain()
            finally:
                await self.client.delete_session(session)

    async def probes_every(self, interval_s: float, stop: float) -> None:
        while time.monotonic() < stop:
            # One token: too short to hold out a shadow target, so probes add no records.
            version = await self._one([42], 0)
            if version is not None:
                self.probes.append(Probe(time.time(), version))
            await asyncio.sleep(interval_s)

    async def _one(self, prompt: list[int], budget: int, session: str = "") -> str | None:
        self.requests += 1
        try:
            last = None
            async for chunk in self.client.generate(
                prompt, session_id=session, max_tokens=1, wc_budget=budget
            ):
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


class TrainerProcess:
    """The `lens-trainer` subprocess, started again if it exits (as its Deployment would be): a
    trainer whose lock lease ran out stops without publishing, by design. Its stdout is read as
    it is written: a pipe nobody reads fills up (64 KiB, about 50 gate reports) and then blocks
    the trainer's event loop in `write`, lock renewals included."""

    def __init__(self, redis_url: str, model_dir: Path, args: argparse.Namespace) -> None:
        self._cmd = [
            sys.executable, "-m", "trainer", "--log-level", "WARNING", "run",
            "--redis-url", redis_url, "--model", str(model_dir),
            "--min-records", str(args.min_records),
            "--steps-per-version", str(args.steps_per_version),
            "--batch-size", str(args.batch_size), "--held-out-every", "5",
        ]  # fmt: skip
        self.output: list[str] = []
        self.restarts = 0
        self._proc, self._reader = self._start()

    def _start(self) -> tuple[subprocess.Popen[str], threading.Thread]:
        # One thread: the trainer shares the machine's cores with the engine it is training for.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(self._cmd, env=env, stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        reader.start()
        return proc, reader

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line.rstrip("\n"))

    def ensure_running(self) -> None:
        if self._proc.poll() is not None:
            self._reader.join()
            print(f"trainer exited ({self._proc.returncode}): started again", flush=True)
            self.restarts += 1
            self._proc, self._reader = self._start()

    async def stop(self) -> list[str]:
        self._proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self._proc.wait, timeout=120)
        await asyncio.to_thread(self._reader.join)
        return self.output


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = resolve_model(args.model)
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
    settings_kw: dict[str, Any] = dict(
        model=str(model_dir), port=0, wc_budget=args.budget, max_wc_budget=MAX_MODEL_LEN - 64,
        max_model_len=MAX_MODEL_LEN, max_session_tokens=MILLION + 100_000,
        shadow_rate=1.0, shadow_target="prompt", shadow_target_tokens=answer_tokens(tokenizer),
        shadow_units=args.units, shadow_variants=args.variants, lens_poll_seconds=0.2,
        kv_cache_gib=args.kv_cache_gib, prewarm_next_turn=False,
    )  # fmt: skip
    # The engine starts before Redis does, so it is configured from settings without a URL yet.
    engine_settings = Settings(**settings_kw, redis_url="redis://unused")
    engine = await VllmEngine.create(engine_settings.engine_config(model_dir))
    curve: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as data, EmbeddedRedis(Path(data)) as redis_server:
            settings = Settings(**settings_kw, redis_url=redis_server.url)
            # Evaluation runs on a second server over the same engine and Redis, without shadow
            # scoring: held-out questions must leave no records. It follows the same versions.
            quiet = settings.model_copy(update={"shadow_rate": 0.0})
            async with (
                serving_stack(settings, engine) as stack,
                serving_stack(quiet, engine) as evaluator,
                LensClient(stack.target) as client,
                LensClient(evaluator.target) as eval_client,
            ):
                print("checkpoint 0 (before training):", flush=True)
                curve.append(
                    {"records": 0, "version": evaluator.service.weights.version,
                     "exact_match": await exact_match(eval_client, tokenizer, args)}
                )  # fmt: skip
                trainer = TrainerProcess(redis_server.url, model_dir, args)
                traffic = Traffic(client, stack, args.budget)
                maker = SuiteTraffic(
                    tokenizer, args.lifetime, answer_tokens(tokenizer), TRAIN_SEED, args.tasks
                )
                traffic_s = 0.0
                million: dict[str, Any] | None = None
                while traffic_s < args.traffic_seconds:
                    leg = min(args.checkpoint_seconds, args.traffic_seconds - traffic_s)
                    stop = time.monotonic() + leg
                    await asyncio.gather(
                        traffic.suite(maker, stop), traffic.probes_every(args.probe_interval, stop)
                    )
                    traffic_s += leg
                    trainer.ensure_running()
                    if million is None:  # early, so the trainer learns from it with the rest
                        million = await million_token_request(client, stack, tokenizer)
                        print(f"1M-token session: {million}", flush=True)
                    records = await stack.redis.xlen(PREFS_STREAM)
                    print(f"checkpoint after {traffic_s:.0f} s, {records} records:", flush=True)
                    curve.append(
                        {"records": records, "traffic_s": traffic_s,
                         "version": evaluator.service.weights.version,
                         "exact_match": await exact_match(eval_client, tokenizer, args)}
                    )  # fmt: skip
                assert million is not None
                trainer.ensure_running()
                await asyncio.sleep(args.trainer_grace)  # the trainer reads the newest records
                million["trainer"] = await trainer_stored(stack.redis, million["entry_id"])
                trainer_out = await trainer.stop()
                gates = [
                    json.loads(line.removeprefix("report "))
                    for line in trainer_out
                    if line.startswith("report ")
                ]
                dump_path = args.out.with_name("loop_records.bin")
                logged = await dump(stack.redis, dump_path)
                published = sorted(
                    await registry.LENSNET.list_versions(stack.redis), key=lambda v: v.created_at
                )
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
    measured = dumped_records(dump_path)
    passes = sum(len(r.variants) + len(r.unit_gains) for r in measured)
    latencies = swap_latencies([*published, *swapped], traffic.probes)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "config": config,
        "curve": curve,
        "gates": gates,
        "published_versions": [v.version for v in published],
        "labels": label_counts(measured),
        "score_passes_per_s": passes / traffic_s,  # the 1M request's passes included
        "record_bytes": summary([float(r.ByteSize()) for r in measured]),
        "million": million,
        "swap_latency_s": summary(latencies),
        "server_swap_s": summary(swap_latencies(swapped, switches)),
        "requests": traffic.requests,
        "failed_requests": traffic.failed,
        "records_logged": logged,
        "shadow_jobs_dropped": dropped,
        "redis_append": redis_rate,
        "trainer_restarts": trainer.restarts,
        "trainer_output_tail": [line for line in trainer_out if not line.startswith("report ")][
            -5:
        ],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["config"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.0 * (len(tasks) + 1), 3.0))
    records = [c["records"] for c in result["curve"]]
    for ax, task in zip(axes[:-1], tasks, strict=True):
        for policy in EVAL_POLICIES:
            ax.plot(records, [c["exact_match"][task][policy] for c in result["curve"]], "o-",
                    label=policy, markersize=3)  # fmt: skip
        ax.set(title=task, xlabel="records logged", ylim=(-0.05, 1.05))
    axes[0].set(ylabel="held-out exact match")
    axes[0].legend(fontsize=7)
    gates = result["gates"]
    consumed = [g["records"] for g in gates]
    axes[-1].plot(consumed, [g["new"]["ndcg"] for g in gates], "o-", label="candidate")
    axes[-1].plot(consumed, [g["prior"]["ndcg"] for g in gates], "k--", label="prior")
    axes[-1].set(title="held-out NDCG at each gate", xlabel="records consumed")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"lifetime {result['config']['lifetime']}, W={result['config']['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--lifetime", type=int, default=32768)
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="traffic and evaluation"
    )
    parser.add_argument("--units", type=int, default=8, help="shadow_units per record")
    parser.add_argument("--variants", type=int, default=4, help="random variants (comparison)")
    parser.add_argument("--traffic-seconds", type=float, default=1800)
    parser.add_argument("--checkpoint-seconds", type=float, default=900)
    parser.add_argument("--eval-samples", type=int, default=3, help="per task and checkpoint")
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--swaps", type=int, default=8, help="extra versions published")
    parser.add_argument("--swap-spacing", type=float, default=3.0, help="seconds between them")
    parser.add_argument("--min-records", type=int, default=16)
    parser.add_argument("--steps-per-version", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trainer-grace", type=float, default=20.0)
    parser.add_argument("--redis-records", type=int, default=2000)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/loop.json"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    labels, swap = result["labels"], result["swap_latency_s"]
    print(f"labels: {labels}")
    print(
        f"score passes/s {result['score_passes_per_s']:.2f}; record bytes {result['record_bytes']}"
    )
    print(f"1M-token session: {result['million']}")
    print(
        f"publish -> first response on it: p50 {swap['p50']:.3f} s over {swap['n']} versions; "
        f"failed requests {result['failed_requests']} of {result['requests']}; Redis append "
        f"{result['redis_append'].get('concurrent_32_per_s', 0):.0f}/s 32 in flight"
    )
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
