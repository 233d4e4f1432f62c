"""How long a user request waits behind shadow scoring, per engine step setting.

A shadow worker scores variants back to back at low priority, as `lens_serve.shadow.scorer` does:
one
teacher-forced request at a time, each `--rows` context rows of fresh text plus `--target` tokens.
Every `--probe-interval` seconds a probe (a one-row prompt, one generated token, priority 0) is
sent; its latency is what a user request, and the first response on a newly swapped LensNet,
waits. Each step setting gets its own engine, started in turn in this process:

- `default`: vLLM's own step (a shadow variant is prefilled in one step; a probe waits for it);
- `S/L`: at most S rows per step, and at most L rows of one prefill when the step is shared
  (`EngineConfig.max_num_batched_tokens` / `long_prefill_tokens`).

Reports per setting the probe latency (p50/p90) with shadow load and without, and shadow
variants scored per second (the cost of smaller steps).

    python bench/priority.py [--model smollm2-135m] [--settings default 256/128] [--seconds 60]

Writes bench/out/priority.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from lens_serve.assets.model_dirs import resolve_model
from lens_serve.engine.protocol import GenerationParams
from lens_serve.engine.vllm import VllmEngine
from lens_serve.service.config import Settings
from lens_serve.shadow.scorer import SHADOW_PRIORITY
from lens_serve.tools.demo import held_out_tokens


def step_limits(setting: str) -> tuple[int | None, int | None]:
    """`default` or `S/L` -> (max_num_batched_tokens, long_prefill_tokens)."""
    if setting == "default":
        return None, None
    step, long_prefill = (int(x) for x in setting.split("/"))
    return step, long_prefill


async def probe(engine: VllmEngine, row: Any) -> float:
    began = time.perf_counter()
    params = GenerationParams(max_tokens=1, temperature=0.0)
    async for _ in engine.generate(row, params, f"probe-{uuid.uuid4().hex}", priority=0):
        pass
    return time.perf_counter() - began


async def probes_for(engine: VllmEngine, row: Any, seconds: float, interval: float) -> list[float]:
    out = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        out.append(await probe(engine, row))
        await asyncio.sleep(interval)
    return out


async def shadow_load(engine: VllmEngine, ids: list[int], args: argparse.Namespace) -> int:
    """Score fresh windows back to back until cancelled; returns how many were scored."""
    scored, offset, span = 0, 0, args.rows + args.target
    try:
        while True:
            window = ids[offset : offset + span]
            offset = (offset + span) % (len(ids) - span)
            context = engine.embed(window[: args.rows])  # fresh text: no prefix-cache hits
            await engine.score(
                context, window[args.rows :], f"shadow-{uuid.uuid4().hex}", SHADOW_PRIORITY
            )
            scored += 1
    except asyncio.CancelledError:
        return scored


async def measure(setting: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    settings_kw: dict[str, Any] = {"model": str(model_dir)}  # the rest from LENS_* / defaults
    config = Settings(**settings_kw).engine_config(model_dir)
    step, long_prefill = step_limits(setting)
    engine = await VllmEngine.create(
        replace(config, max_num_batched_tokens=step, long_prefill_tokens=long_prefill)
    )
    try:
        row = engine.embed([42])  # (1, D)
        ids = held_out_tokens(model_dir, 16_000)
        idle = await probes_for(engine, row, args.seconds / 4, args.probe_interval)
        loading = asyncio.create_task(shadow_load(engine, ids, args))
        await asyncio.sleep(2.0)  # the first variant is running
        began = time.monotonic()
        loaded = await probes_for(engine, row, args.seconds, args.probe_interval)
        loading.cancel()
        scored = await loading
        elapsed = time.monotonic() - began + 2.0
    finally:
        await engine.shutdown()
    return {
        "max_num_batched_tokens": step,
        "long_prefill_tokens": long_prefill,
        "probe_idle_s": summary(idle),
        "probe_under_shadow_load_s": summary(loaded),
        "shadow_variants_per_s": scored / elapsed,
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


async def main_async(args: argparse.Namespace) -> None:
    model_dir = resolve_model(args.model)
    results = {}
    for setting in args.settings:
        results[setting] = await measure(setting, model_dir, args)
        r = results[setting]
        print(
            f"{setting:>8}: probe p50 {r['probe_under_shadow_load_s']['p50']:.3f} s "
            f"(p90 {r['probe_under_shadow_load_s']['p90']:.3f}) under shadow load, "
            f"{r['probe_idle_s']['p50']:.3f} s idle; "
            f"shadow {r['shadow_variants_per_s']:.2f} variants/s",
            flush=True,
        )
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", nargs="+", default=["default", "256/128"])
    parser.add_argument("--rows", type=int, default=576, help="shadow context rows")
    parser.add_argument("--target", type=int, default=64, help="shadow target tokens")
    parser.add_argument("--seconds", type=float, default=60.0, help="probing under load")
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("bench/out/priority.json"))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
