"""The `lens-trainer` command line.

    lens-trainer run [--redis-url URL] [--model NAME|PATH] [--min-records N]
                     [--steps-per-version K] [--offline-dump FILE] ...
    lens-trainer dump --out FILE [--redis-url URL]
    lens-trainer gistnet [--model NAME|PATH] [--rows R] [--lod1-steps N] [--lod2-steps M]
                         [--tail T] [--horizon H] [--validation-tokens N]
                         [--out DIR] [--resume | --init DIR] [--redis-url URL]

Every `run` flag is also settable as `LENS_TRAINER_<FLAG>`; flags override the environment."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lens_serve.log import configure_logging, is_log_json_env
from trainer.distill import DistillConfig

logger = logging.getLogger(__name__)

# (flag, settings field, type, help). Types follow TrainerSettings; None defaults mean "not given".
_RUN_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--redis-url", "redis_url", str, "Redis URL (required unless --offline-dump)"),
    ("--model", "model", str, "base model name or directory (default smollm2-135m)"),
    ("--models-dir", "models_dir", Path, "prepared models root"),
    ("--min-records", "min_records", int, "usable records before the first step"),
    ("--steps-per-version", "steps_per_version", int, "gate/publish every K steps"),
    ("--batch-size", "batch_size", int, "records per step"),
    ("--lr", "lr", float, "AdamW learning rate"),
    ("--temperature", "temperature", float, "loss temperature (scores are divided by it)"),
    ("--pair-weight", "pair_weight", float, "weight of the pairwise loss term (0 = listwise only)"),
    ("--sign-weight", "sign_weight", float, "weight of the sign loss term (0 = order only)"),
    ("--residual-weight", "residual_weight", float, "weight of the residual term (0 = free)"),
    ("--seed", "seed", int, "initial LensNet and sampling seed"),
    ("--claim-idle-ms", "claim_idle_ms", int, "claim entries pending this long"),
    ("--lock-ttl-ms", "lock_ttl_ms", int, "trainer lock lease"),
    ("--held-out-every", "held_out_every", int, "hold out one record in this many"),
    ("--min-held-out", "min_held_out", int, "held-out records the gate needs to publish"),
    ("--max-drift", "max_drift", float, "the gate's bound on residual drift (unmeasured units)"),
    (
        "--restart-after-refusals",
        "restart_after_refusals",
        int,
        "restart from the current version after N refused gates in a row (0 = never)",
    ),
    ("--min-nll-std", "min_nll_std", float, "per-record value std floor (nats)"),
    ("--replay-size", "replay_size", int, "replay buffer size (records)"),
    ("--max-steps", "max_steps", int, "stop after this many steps (0 = never)"),
    ("--offline-dump", "offline_dump", Path, "train from a dump file instead of the stream"),
    ("--log-every-s", "log_every_s", float, "seconds between progress lines"),
    ("--metrics-port", "metrics_port", int, "serve Prometheus /metrics on this port (0 = off)"),
)

# Transient Redis errors are retried with exponential backoff (capped at 2 s, 6 tries); anything
# else, or an outage that outlasts the retries, ends the run: unacknowledged records stay pending
# and the next trainer claims them.
_RETRY_ON = [RedisConnectionError, RedisTimeoutError]


def _redis(url: str) -> Redis:
    from lens_serve.store.redis_url import connect  # every URL form, Sentinel included

    return connect(
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=6),
        retry_on_error=_RETRY_ON,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=is_log_json_env(),
        help="one JSON object per log line (env LENS_LOG_JSON=1, as for lens-serve)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="train LensNet from the preference stream")
    for flag, dest, kind, text in _RUN_FLAGS:
        run.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    run.set_defaults(func=_run)
    dump = commands.add_parser("dump", help="write the stream's records to a file")
    dump.add_argument("--out", type=Path, required=True, help="output file")
    dump.add_argument("--redis-url", dest="redis_url", default=None, help="Redis URL")
    dump.set_defaults(func=_dump)
    gist = commands.add_parser("gistnet", help="distil a GistNet through the frozen base model")
    gist.add_argument("--model", default="smollm2-135m", help="base model name or directory")
    gist.add_argument("--models-dir", type=Path, default=None, help="prepared models root")
    gist.add_argument("--out", type=Path, default=None, help="checkpoint dir (default: "
                      "<models dir>/gistnet/<model>-r<rows>)")  # fmt: skip
    start = gist.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    start.add_argument("--init", type=Path, default=None,
                       help="start from this trained GistNet directory (fine-tune)")  # fmt: skip
    gist.add_argument(
        "--redis-url", default=None, help="publish the result as lens:gistnet:current"
    )
    gist.add_argument("--max-tokens", type=int, default=400_000, help="training text (tokens)")
    for field in dataclasses.fields(DistillConfig):
        gist.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                          default=field.default, help=f"default {field.default}")  # fmt: skip
    gist.set_defaults(func=_gistnet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(args.log_level, json=args.log_json)
    except ValueError as e:
        sys.stderr.write(f"lens-trainer: {e}\n")
        return 2
    status: int = args.func(args)
    return status


def _settings(args: argparse.Namespace) -> Any:
    from trainer.config import TrainerSettings

    given = {dest: getattr(args, dest) for _, dest, _, _ in _RUN_FLAGS}
    return TrainerSettings(**{k: v for k, v in given.items() if v is not None})


def _run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValidationError as e:
        sys.stderr.write(f"lens-trainer: invalid settings:\n{e}\n")
        return 2
    logger.info("lens-trainer settings (non-default): %s", settings.non_defaults())
    return asyncio.run(_run_async(settings))


async def _run_async(settings: Any) -> int:
    # Imported here so that `--help` and bad flags answer without loading torch.
    from lens_serve.assets.model_dirs import resolve_model
    from lens_serve.core.embedding import EmbeddingTable
    from trainer.lock import LockLost
    from trainer.loop import Trainer

    try:
        model_dir = resolve_model(settings.model, settings.models_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"lens-trainer: model: {e}\n")
        return 2
    table = await asyncio.to_thread(EmbeddingTable.from_checkpoint, model_dir)
    if settings.metrics_port:
        from trainer.metrics import serve

        serve(settings.metrics_port)
        logger.info("metrics on port %d", settings.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _request_stop, stop, sig)
    redis = _redis(settings.redis_url) if settings.redis_url else None
    try:
        trainer = Trainer(settings, redis, table)
        result = await trainer.run(stop)
    except LockLost as e:
        logger.error("%s", e)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if redis is not None:
            await redis.aclose()
    logger.info(
        "done: %d steps, %d records, %d published, %.1f steps/s",
        result.steps,
        result.records,
        len(result.published),
        result.steps_per_s,
    )
    return 0


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    logger.info("%s: finishing the current step, then stopping", sig.name)
    stop.set()


def _dump(args: argparse.Namespace) -> int:
    import os

    url = args.redis_url or os.environ.get("LENS_TRAINER_REDIS_URL", "")
    if not url:
        sys.stderr.write("lens-trainer: redis_url: give --redis-url or LENS_TRAINER_REDIS_URL\n")
        return 2
    return asyncio.run(_dump_async(url, args.out))


async def _dump_async(url: str, out: Path) -> int:
    from trainer.data import dump

    redis = _redis(url)
    try:
        count = await dump(redis, out)
    finally:
        await redis.aclose()
    logger.info("wrote %d records to %s", count, out)
    return 0


def _gistnet(args: argparse.Namespace) -> int:
    import torch

    from lens_serve.assets.model_dirs import models_dir, resolve_model
    from lens_serve.assets.reference import load_causal_lm
    from lens_serve.core.embedding import EmbeddingTable
    from lens_serve.core.gistnet import load_gistnet
    from trainer.distill import distill
    from trainer.gist_data import training_tokens

    config = DistillConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)}
    )
    try:
        model_dir = resolve_model(args.model, args.models_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"lens-trainer: model: {e}\n")
        return 2
    out = (
        args.out
        or (args.models_dir or models_dir()) / "gistnet" / f"{model_dir.name}-r{config.rows}"
    )
    torch.manual_seed(config.seed)
    tokens = training_tokens(model_dir, args.max_tokens)
    table = EmbeddingTable.from_checkpoint(model_dir)
    try:
        init = load_gistnet(args.init) if args.init else None
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"lens-trainer: --init: {e}\n")
        return 2
    try:
        result = distill(
            load_causal_lm(model_dir), table, tokens, config, out, resume=args.resume, init=init
        )
    except ValueError as e:  # a config that cannot train: bad --init layout, too little text
        sys.stderr.write(f"lens-trainer: gistnet: {e}\n")
        return 2
    recent = result.history[-10:]
    metrics: dict[str, object] = {
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "kl_last10": sum(h["kl"] for h in recent) / max(len(recent), 1),
        "gain_over_dropped_last10": sum(h["gain_over_dropped"] for h in recent)
        / max(len(recent), 1),
        "best_validation_nll_gain": result.best_validation,
        "config": dataclasses.asdict(config),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("GistNet %s: %d steps in %.0f s, written to %s",
                result.net.version, result.steps, result.seconds, out)  # fmt: skip
    net = result.net
    if result.best_validation is not None:  # publish what did best on held-out text
        net = load_gistnet(out / "best")
        logger.info("best on held-out text: %s in %s, NLL gain over dropped %+.4f",
                    net.version, out / "best", result.best_validation)  # fmt: skip
    if args.redis_url:
        from lens_serve.store.registry import GISTNET

        async def publish() -> str:
            redis = _redis(args.redis_url)
            try:
                return await GISTNET.publish(redis, net, metrics=metrics)
            finally:
                await redis.aclose()

        logger.info("published %s", asyncio.run(publish()))
    return 0
