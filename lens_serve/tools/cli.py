"""The ``lens-serve`` command line.

Each top-level command is registered by a function in COMMANDS that adds its sub-parser and sets
``func`` (a handler taking the parsed namespace and returning the exit status). To add ``serve`` or
``demo``, write ``_add_serve(subparsers)`` in the same shape and append it to COMMANDS.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from lens_serve.assets import install, model_dirs
from lens_serve.log import configure_logging, is_log_json_env
from lens_serve.tools.demo_configs import (
    DEMO_DOC,
    SERVER_DEMO_DOC,
    DemoConfig,
    ServerDemoConfig,
)

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

    names = ", ".join(model_dirs.model_names())
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
        help=f"weight seed for random-weight models (default {install.DEFAULT_SEED})",
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
        help=f"models root (default ${model_dirs.MODELS_DIR_ENV}, else ./models)",
    )


def _models_prepare(args: argparse.Namespace) -> int:
    path = install.prepare_model(args.name, args.models_dir, seed=args.seed, force=args.force)
    sys.stdout.write(f"{path}\n")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    root: Path = args.models_dir if args.models_dir is not None else model_dirs.models_dir()
    for name in model_dirs.model_names():
        manifest = model_dirs.read_manifest(root / name)
        status = "prepared" if manifest is not None else "not prepared"
        sys.stdout.write(
            f"{name}\t{status}\t{root / name}\t{model_dirs.model_spec(name).description}\n"
        )
    return 0


# Each entry adds one top-level command to the parser and sets its handler with set_defaults(func=).
def _add_config_command(
    subparsers: SubParsers,
    name: str,
    help_text: str,
    doc: str | None,
    config_cls: type[Any],
    run: Callable[[Any], object],
) -> None:
    """A command whose flags are the fields of a config dataclass (`--field`, typed by default)."""
    parser = subparsers.add_parser(name, help=help_text, description=doc)
    fields = dataclasses.fields(config_cls)
    for field in fields:
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)

    def handler(args: argparse.Namespace) -> int:
        run(config_cls(**{f.name: getattr(args, f.name) for f in fields}))
        return 0

    parser.set_defaults(func=handler)


def _add_demo(subparsers: SubParsers) -> None:
    def run(config: DemoConfig) -> None:
        from lens_serve.tools import demo  # torch and transformers: only when the demo runs

        demo.run(config)

    _add_config_command(
        subparsers, "demo", "the working-context core on the real model, no server",
        DEMO_DOC, DemoConfig, run,
    )  # fmt: skip


def _add_demo_server(subparsers: SubParsers) -> None:
    def run(config: ServerDemoConfig) -> None:
        from lens_serve.tools import demo_server

        demo_server.run(config)

    _add_config_command(
        subparsers, "demo-server", "serve SmolLM2, ask about a long essay, show the WC map",
        SERVER_DEMO_DOC, ServerDemoConfig, run,
    )  # fmt: skip


def _add_serve(subparsers: SubParsers) -> None:
    # The server module pulls in gRPC and Redis: imported only when this command is built or run.
    from lens_serve.service.config import Settings

    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC server (and the OpenAI-compatible HTTP endpoint)",
        description=(
            "Serve LensServe/LensAdmin over gRPC and, with --http-port, the OpenAI-compatible HTTP "
            "API. Every flag is also the environment variable LENS_<FLAG> (e.g. --shadow-rate = "
            "LENS_SHADOW_RATE); flags win over the environment. Prints `http listening on "
            "HOST:PORT` once the HTTP endpoint is up, then `listening on HOST:PORT` once health "
            "reports SERVING."
        ),
    )
    docs = _field_docs(Settings)
    metavars = {"model": "NAME|PATH", "host": "H", "redis_url": "URL", "shadow_rate": "P"}
    secrets = ("api_tokens", "admin_token")
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        shown = (
            info.default if name not in secrets else "none; prefer the env var: flags show in ps"
        )
        shown = repr(shown) if shown == "" else shown
        help_text = f"{docs.get(name, '')} [default {shown}; env LENS_{name.upper()}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        if info.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            metavar = metavars.get(name) or _metavar(info.annotation)
            # Values stay strings here: Settings parses and validates them, so a flag and its
            # environment variable are checked by the same rules and errors name the field.
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,  # absent flags leave the field to env / default
                metavar=metavar,
                help=help_text,
            )
    parser.set_defaults(func=_serve)


def _metavar(annotation: object) -> str:
    """N, X, TEXT, PATH or {a,b} (Literal choices) for a Settings field's type."""
    if typing.get_origin(annotation) is typing.Literal:
        return "{" + ",".join(str(choice) for choice in typing.get_args(annotation)) + "}"
    if annotation is Path or Path in typing.get_args(annotation):
        return "PATH"
    if annotation is int:
        return "N"
    return "X" if annotation is float else "TEXT"


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a class (`field: T = x` then a string literal)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. frozen app): help without descriptions
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for field, doc in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def _serve(args: argparse.Namespace) -> int:
    import pydantic

    from lens_serve.service.config import Settings

    names = Settings.model_fields.keys()
    overrides = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        settings = Settings(**overrides)
    except pydantic.ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            where = f"--{field.replace('_', '-')} / LENS_{field.upper()}: " if field else ""
            sys.stderr.write(f"lens-serve serve: invalid setting: {where}{error['msg']}\n")
        return 2

    import asyncio

    from lens_serve.service import server
    from lens_serve.store.embedded import EmbeddedRedisError

    try:
        asyncio.run(server.serve(settings))
    except EmbeddedRedisError as exc:
        logger.error("%s", exc)
        return 1
    return 0


COMMANDS: list[Callable[[SubParsers], None]] = [
    _add_models,
    _add_demo,
    _add_demo_server,
    _add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-serve",
        description="Long-context LLM serving at constant cost (vLLM + a LensNet working context).",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LENS_LOG_LEVEL", "INFO"),
        help="logging level (default INFO; env LENS_LOG_LEVEL), logs go to stderr",
    )
    parser.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=is_log_json_env(),
        help="log one JSON object per line (env LENS_LOG_JSON=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lens-serve`` and ``python -m lens_serve``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, json=args.log_json)
    except ValueError as exc:
        parser.error(str(exc))
    handler: Handler = args.func
    try:
        return handler(args)
    except (
        model_dirs.ModelPrepareError,
        model_dirs.ModelNotPreparedError,
        model_dirs.UnknownModelError,
    ) as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
