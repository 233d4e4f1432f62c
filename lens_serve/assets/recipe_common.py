"""What the model recipes (assets.tiny, assets.tiny_qwen, assets.smollm2) share: SmolLM2's ChatML
template and special-token layout, the bf16 save, the tokenizer checks and the stdlib corpus the
random-weight models train their tokenizers on. Imported by the recipes and by assets.install,
never the other way round; torch and transformers are imported only when called.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lens_serve.assets.model_dirs import ModelPrepareError

logger = logging.getLogger(__name__)

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

# Special tokens and ids shared by every model (SmolLM2's layout).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2
MAX_POSITIONS = 8192


def hf() -> Any:
    """The transformers module, typed as Any (its classes are untyped for mypy --strict)."""
    return importlib.import_module("transformers")


def save_generation_config(out: Path) -> None:
    hf().GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    ).save_pretrained(out)


def check_special_ids(tokenizer: Any) -> None:
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


def save_bf16(model: Any, out: Path) -> None:
    import torch

    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    save_generation_config(out)


def stdlib_corpus(max_chars: int) -> tuple[list[str], dict[str, Any]]:
    """A deterministic, bounded prefix of the sorted top-level stdlib ``*.py`` files, and what it
    holds (for the manifest)."""
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
            f"found only {total} characters of Python sources in {stdlib}; the random-weight "
            "models train their tokenizers on the standard library sources, which this Python "
            "seems to lack"
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


def save_chat_tokenizer(tokenizer_object: Any, out: Path) -> None:
    """Wrap a locally trained `tokenizers.Tokenizer` with the recipes' special tokens and ChatML
    template, check their ids and save it into `out`."""
    tokenizer = hf().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=IM_START,
        eos_token=IM_END,
        unk_token=ENDOFTEXT,
        pad_token=IM_END,
        model_max_length=MAX_POSITIONS,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    check_special_ids(tokenizer)
    tokenizer.save_pretrained(out)


def init_random(model: Any, seed: int, std: float) -> None:
    """Explicit initialisation, independent of transformers' own init order: N(0, std) for every
    matrix, ones for every 1-D parameter (norm scales), drawn in sorted parameter-name order from
    one generator, so weights are bit-identical for a seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.fill_(1.0)
            elif param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            else:
                raise ModelPrepareError(f"unexpected parameter {pname} of shape {param.shape}")


@contextlib.contextmanager
def progress(step: str, every_s: float = 10.0) -> Iterator[None]:
    """Logs `step` as it starts, every `every_s` seconds while it runs and when it ends: a step of
    minutes (a download, a conversion) must not look like a hung command."""
    began = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            logger.info("%s: still running after %.0f s", step, time.monotonic() - began)

    logger.info("%s ...", step)
    thread = threading.Thread(target=beat, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        logger.info("%s: done in %.1f s", step, time.monotonic() - began)
