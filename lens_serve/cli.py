"""The ``lens-serve`` command line.

Each top-level command is registered by a function in COMMANDS that adds its sub-parser and sets
``func`` (a handler taking the parsed namespace and returning the exit status). To add ``serve`` or
``demo``, write ``_add_serve(subparsers)`` in the same shape and append it to COMMANDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from lens_serve import models

logger = logging.getLogger(__name__)

Handler: TypeAlias = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_models(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="prepare and list local model directories",
        description="Build the local model directories lens-serve runs (no model hub needed).",
    )
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    names = ", ".join(models.model_names())
    prepare = actions.add_parser(
        "prepare",
        help="build a model directory (idempotent)",
        description=f"Build <models-dir>/<name>. Names: {names}.",
    )
    prepare.add_argument("name", metavar="NAME", help=f"model name ({names})")
    _add_models_dir(prepare)
    prepare.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"weight seed for random-weight models (default {models.DEFAULT_SEED})",
    )
    prepare.add_argument(
        "--force", action="store_true", help="rebuild even if a complete build exists"
    )
    prepare.set_defaults(func=_models_prepare)

    listing = actions.add_parser("list", help="list known models and whether they are prepared")
    _add_models_dir(listing)
    listing.set_defaults(func=_models_list)


def _add_models_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"models root (default ${models.MODELS_DIR_ENV}, else ./models)",
    )


def _models_prepare(args: argparse.Namespace) -> int:
    path = models.prepare_model(args.name, args.models_dir, seed=args.seed, force=args.force)
    sys.stdout.write(f"{path}\n")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    root: Path = args.models_dir if args.models_dir is not None else models.models_dir()
    for name in models.model_names():
        manifest = models.read_manifest(root / name)
        status = "prepared" if manifest is not None else "not prepared"
        sys.stdout.write(
            f"{name}\t{status}\t{root / name}\t{models.model_spec(name).description}\n"
        )
    return 0


# Each entry adds one top-level command to the parser and sets its handler with set_defaults(func=).
def _add_demo(subparsers: SubParsers) -> None:
    from lens_serve import demo

    parser = subparsers.add_parser(
        "demo",
        help="the working-context core on the real model, no server",
        description=demo.__doc__,
    )
    for field in dataclasses.fields(demo.DemoConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)

    def run(args: argparse.Namespace) -> int:
        names = [f.name for f in dataclasses.fields(demo.DemoConfig)]
        demo.run(demo.DemoConfig(**{name: getattr(args, name) for name in names}))
        return 0

    parser.set_defaults(func=run)


COMMANDS: list[Callable[[SubParsers], None]] = [
    _add_models,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-serve",
        description="Long-context LLM serving at constant cost (vLLM + a LensNet working context).",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (default INFO), logs go to stderr"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lens-serve`` and ``python -m lens_serve``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    handler: Handler = args.func
    try:
        return handler(args)
    except (
        models.ModelPrepareError,
        models.ModelNotPreparedError,
        models.UnknownModelError,
    ) as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
