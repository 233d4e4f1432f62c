"""Offline model builds (`lens-serve models prepare`): determinism, crash safety, loading,
NLL through `inputs_embeds`, the SmolLM2 GGUF conversion and the command line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_serve.assets import install, model_dirs, smollm2
from lens_serve.assets.install import prepare_model
from lens_serve.assets.model_dirs import (
    EMBED_KEY,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    ModelNotPreparedError,
    ModelPrepareError,
    UnknownModelError,
    UnsupportedModelError,
    read_manifest,
    resolve_model,
    verify_model,
)
from lens_serve.assets.recipe_common import progress
from lens_serve.tools import cli
from tests.fixtures_models import REPO_ROOT, shared_models_dir

NLL_TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nThe quick brown fox jumps over the lazy dog."
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_RENDERED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hf() -> Any:
    import transformers

    return transformers


def _load(model_dir: Path) -> tuple[Any, Any]:
    hf = _hf()
    tokenizer = hf.AutoTokenizer.from_pretrained(model_dir)
    model = hf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _nll_pair(model: Any, tokenizer: Any, model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(NLL_TEXT, return_tensors="pt").input_ids
    # The table GistNet/assembly use: read straight from the safetensors file, as float32.
    with safe_open(str(model_dir / WEIGHTS_NAME), framework="pt") as fh:
        table = fh.get_tensor(EMBED_KEY).float()
    embeds = table[ids]
    assert torch.equal(embeds, model.get_input_embeddings()(ids))
    targets = ids[0, 1:]
    nll: list[torch.Tensor] = []
    for kwargs in ({"input_ids": ids}, {"inputs_embeds": embeds}):
        with torch.no_grad():
            logits = model(**kwargs).logits[0, :-1].float()
        nll.append(-torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0])
    return nll[0], nll[1]


# --------------------------------------------------------------------------- models_dir


def test_models_dir_uses_env_when_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(model_dirs.MODELS_DIR_ENV, str(tmp_path / "m"))
    assert model_dirs.models_dir() == tmp_path / "m"


def test_models_dir_defaults_to_cwd_models_when_env_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(model_dirs.MODELS_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert model_dirs.models_dir() == tmp_path / "models"


# --------------------------------------------------------------------------- names and resolve


def test_every_model_name_has_a_recipe_and_the_catalogue_names_the_wheel() -> None:
    names = ("tiny", "tiny-qwen", "smollm2-135m")
    assert tuple(install._RECIPES) == model_dirs.model_names() == names
    assert smollm2.SMOLLM2_PACKAGE in model_dirs.model_spec("smollm2-135m").description


def test_prepare_model_raises_naming_valid_names_when_name_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model name 'gpt-9'.*tiny, tiny-qwen, smollm2"):
        prepare_model("gpt-9", tmp_path)
    assert not (tmp_path / "gpt-9").exists()


def test_resolve_model_raises_naming_valid_names_when_name_unknown(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"tiny, tiny-qwen, smollm2-135m"):
        resolve_model("gpt-9", tmp_path)


def test_resolve_model_raises_prepare_hint_when_unprepared(tmp_path: Path) -> None:
    with pytest.raises(ModelNotPreparedError, match=r"lens-serve models prepare smollm2-135m"):
        resolve_model("smollm2-135m", tmp_path)


def test_resolve_model_raises_when_build_is_incomplete(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / WEIGHTS_NAME).write_bytes(b"half")
    with pytest.raises(ModelNotPreparedError, match=r"lens-serve models prepare tiny"):
        resolve_model("tiny", tmp_path)


def test_resolve_model_returns_directory_as_is_when_it_holds_a_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert resolve_model(str(tiny_model_dir), tmp_path) == tiny_model_dir


def _model_copy(model_dir: Path, to: Path, **config: Any) -> Path:
    """A copy of `model_dir` (weights linked) with `config` merged into its config.json."""
    to.mkdir()
    for path in model_dir.iterdir():
        (to / path.name).symlink_to(path)
    (to / "config.json").unlink()
    merged = {**json.loads((model_dir / "config.json").read_text()), **config}
    (to / "config.json").write_text(json.dumps(merged))
    return to


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"architectures": ["T5ForConditionalGeneration"]}, r"\['T5ForConditionalGeneration'\]"),
        ({"is_encoder_decoder": True}, r"encoder-decoder"),
        ({"architectures": ["BertModel"]}, r"decoder-only causal LMs"),
        ({"architectures": None}, r"declares architectures \[\]"),
    ],
)
def test_resolve_model_refuses_a_directory_that_is_no_causal_lm(
    tiny_model_dir: Path, tmp_path: Path, config: dict[str, Any], error: str
) -> None:
    other = _model_copy(tiny_model_dir, tmp_path / "other", **config)
    with pytest.raises(UnsupportedModelError, match=error):
        resolve_model(str(other))


def test_resolve_model_refuses_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"no readable config\.json"):
        resolve_model(str(tmp_path))


def test_resolve_model_names_the_tensors_when_the_embedding_table_is_missing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = _model_copy(tiny_model_dir, tmp_path / "gpt2-like")
    (other / WEIGHTS_NAME).unlink()
    tensors = {"transformer.wte.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}
    save_file(tensors, str(other / WEIGHTS_NAME))
    match = rf"holds no '{EMBED_KEY}'.*found: lm_head\.weight, transformer\.wte\.weight"
    with pytest.raises(UnsupportedModelError, match=match):
        resolve_model(str(other))
    (other / WEIGHTS_NAME).unlink()
    with pytest.raises(UnsupportedModelError, match="reads safetensors checkpoints only"):
        resolve_model(str(other))


def test_resolve_model_reads_a_sharded_checkpoint_index(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = _model_copy(tiny_model_dir, tmp_path / "sharded")
    index = {"weight_map": {EMBED_KEY: WEIGHTS_NAME}}
    (other / "model.safetensors.index.json").write_text(json.dumps(index))
    assert resolve_model(str(other)) == other
    index = {"weight_map": {"model.norm.weight": WEIGHTS_NAME}}
    (other / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match=r"found: model\.norm\.weight"):
        resolve_model(str(other))


def test_resolve_model_returns_prepared_dir_when_complete(tiny_model_dir: Path) -> None:
    assert resolve_model("tiny", tiny_model_dir.parent) == tiny_model_dir


# --------------------------------------------------------------------------- build behaviour


@pytest.mark.slow
def test_prepare_tiny_is_bit_identical_when_built_twice(tmp_path: Path) -> None:
    a = prepare_model("tiny", tmp_path / "a")
    b = prepare_model("tiny", tmp_path / "b")
    assert _sha256(a / WEIGHTS_NAME) == _sha256(b / WEIGHTS_NAME)
    assert _sha256(a / "tokenizer.json") == _sha256(b / "tokenizer.json")
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma is not None and mb is not None
    assert ma["files"] == mb["files"]
    assert ma["weights_sha256"] == _sha256(a / WEIGHTS_NAME)
    assert ma["seed"] == 0


def test_prepare_returns_existing_build_when_complete(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_build(out: Path, root: Path, seed: int) -> dict[str, Any]:
        raise AssertionError("a complete build was rebuilt")

    monkeypatch.setitem(install._RECIPES, "tiny", must_not_build)
    before = (tiny_model_dir / WEIGHTS_NAME).stat().st_mtime_ns
    assert prepare_model("tiny", tiny_model_dir.parent) == tiny_model_dir
    assert (tiny_model_dir / WEIGHTS_NAME).stat().st_mtime_ns == before


def test_prepare_leaves_no_partial_build_when_build_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(out: Path, root: Path, seed: int) -> dict[str, Any]:
        (out / WEIGHTS_NAME).write_bytes(b"partial")
        raise RuntimeError("simulated crash")

    monkeypatch.setitem(install._RECIPES, "tiny", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_model("tiny", tmp_path)
    assert not (tmp_path / "tiny").exists()
    assert not list(tmp_path.glob(".tiny.tmp-*"))


@pytest.mark.slow
def test_prepare_rebuilds_when_directory_is_incomplete(tmp_path: Path) -> None:
    stale = tmp_path / "tiny"
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"half a build")
    leftover = tmp_path / ".tiny.tmp-build-killed"  # a SIGKILLed build's temp dir
    leftover.mkdir()
    path = prepare_model("tiny", tmp_path)
    assert path == stale
    assert read_manifest(path) is not None
    verify_model(path)
    assert not leftover.exists()
    assert not list(tmp_path.glob(".tiny.tmp-*"))


@pytest.mark.slow
def test_prepare_tiny_refuses_other_seed_unless_forced(tmp_path: Path) -> None:
    path = prepare_model("tiny", tmp_path)
    first = _sha256(path / WEIGHTS_NAME)
    with pytest.raises(ModelPrepareError, match=r"seed 0, not 1.*--force"):
        prepare_model("tiny", tmp_path, seed=1)
    assert prepare_model("tiny", tmp_path, seed=1, force=True) == path
    manifest = read_manifest(path)
    assert manifest is not None and manifest["seed"] == 1
    assert _sha256(path / WEIGHTS_NAME) != first
    # The tokenizer does not depend on the seed.
    assert manifest["tokenizer_sha256"] == _sha256(path / "tokenizer.json")


def test_verify_model_raises_when_a_file_changed(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    verify_model(copy)
    weights = copy / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: read_manifest still sees a complete build
    weights.write_bytes(bytes(data))
    assert read_manifest(copy) is not None
    with pytest.raises(ModelPrepareError, match="does not match the manifest"):
        verify_model(copy)


# --------------------------------------------------------------------------- tiny contents


def test_tiny_has_expected_files_and_config(tiny_model_dir: Path) -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", WEIGHTS_NAME):
        assert (tiny_model_dir / name).is_file(), name
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        256,
        4,
        4096,
    )
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize(
    "fixture",
    [
        "tiny_model_dir",
        "tiny_qwen_model_dir",
        pytest.param("smollm2_model_dir", marks=pytest.mark.slow),
    ],
)
def test_embedding_table_is_in_safetensors_when_prepared(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / WEIGHTS_NAME), framework="pt") as fh:
        keys = set(fh.keys())
        shape = tuple(fh.get_slice(EMBED_KEY).get_shape())
        dtype = fh.get_slice(EMBED_KEY).get_dtype()
    assert EMBED_KEY == "model.embed_tokens.weight"
    assert shape == (config["vocab_size"], config["hidden_size"])
    assert dtype == "BF16"
    assert "lm_head.weight" not in keys  # tied to the embedding table


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    return _load(tiny_model_dir)


def test_tiny_loads_in_transformers_with_chatml_template(tiny_loaded: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_loaded
    assert model.config.vocab_size == len(tokenizer) == 4096
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        0,
        1,
        2,
    ]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == CHAT_RENDERED
    ids = tokenizer(rendered).input_ids
    assert ids[0] == 1 and ids.count(2) == 2  # specials are single tokens, no BOS added


def test_tiny_tokenizer_round_trips_text(tiny_loaded: tuple[Any, Any]) -> None:
    _, tokenizer = tiny_loaded
    text = NLL_TEXT + "\n  tabs\tand unicode: héllo ✓ 12345"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # the BPE actually merged something


def test_nll_via_inputs_embeds_equals_input_ids_on_tiny(
    tiny_loaded: tuple[Any, Any], tiny_model_dir: Path
) -> None:
    model, tokenizer = tiny_loaded
    by_ids, by_embeds = _nll_pair(model, tokenizer, tiny_model_dir)
    # Observed bit-identical on this CPU; 1e-5 leaves room for other kernels.
    torch.testing.assert_close(by_embeds, by_ids, rtol=0.0, atol=1e-5)


# --------------------------------------------------------------------------- tiny-qwen contents


@pytest.mark.slow
def test_prepare_tiny_qwen_is_bit_identical_when_built_twice(tmp_path: Path) -> None:
    a = prepare_model("tiny-qwen", tmp_path / "a")
    b = prepare_model("tiny-qwen", tmp_path / "b")
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma is not None and mb is not None
    assert ma["files"] == mb["files"] and ma["seed"] == 0


def test_tiny_qwen_is_another_family_with_a_sentencepiece_style_tokenizer(
    tiny_qwen_model_dir: Path,
) -> None:
    config = json.loads((tiny_qwen_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        128,
        2,
        4096,
    )
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    tokenizer = json.loads((tiny_qwen_model_dir / "tokenizer.json").read_text())
    assert tokenizer["pre_tokenizer"]["type"] == "Metaspace"
    assert tokenizer["model"]["byte_fallback"] is True


@pytest.fixture(scope="module")
def tiny_qwen_loaded(tiny_qwen_model_dir: Path) -> tuple[Any, Any]:
    return _load(tiny_qwen_model_dir)


def test_tiny_qwen_tokenizer_round_trips_text_as_vllm_loads_it(
    tiny_qwen_loaded: tuple[Any, Any], tiny_qwen_model_dir: Path
) -> None:
    """vLLM loads the tokenizer with transformers' AutoTokenizer, which for some model types
    replaces the tokenizer.json's pipeline with its own (Qwen2's byte-level one): it must encode
    as tokenizer.json does, or the server's frame ids and text disagree."""
    from tokenizers import Tokenizer

    _, tokenizer = tiny_qwen_loaded
    text = NLL_TEXT + "\n  tabs\tand unicode: héllo ✓ 12345"
    ids = tokenizer(text).input_ids
    raw = Tokenizer.from_file(str(tiny_qwen_model_dir / "tokenizer.json"))
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["▁def"]  # SentencePiece's leading space
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == CHAT_RENDERED


def test_nll_via_inputs_embeds_equals_input_ids_on_tiny_qwen(
    tiny_qwen_loaded: tuple[Any, Any], tiny_qwen_model_dir: Path
) -> None:
    model, tokenizer = tiny_qwen_loaded
    by_ids, by_embeds = _nll_pair(model, tokenizer, tiny_qwen_model_dir)
    torch.testing.assert_close(by_embeds, by_ids, rtol=0.0, atol=1e-5)


# --------------------------------------------------------------------------- smollm2-135m


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_model_dir: Path) -> tuple[Any, Any]:
    return _load(smollm2_model_dir)


@pytest.mark.slow
def test_smollm2_conversion_has_expected_config_and_no_quantization(
    smollm2_loaded: tuple[Any, Any], smollm2_model_dir: Path
) -> None:
    model, _ = smollm2_loaded
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    raw = json.loads((smollm2_model_dir / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw["dtype"] == "bfloat16"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear, name
    manifest = verify_model(smollm2_model_dir)
    assert manifest["source"]["gguf_sha256"] == smollm2.SMOLLM2_GGUF_SHA256


@pytest.mark.slow
def test_smollm2_tokenizer_matches_reference_ids(smollm2_loaded: tuple[Any, Any]) -> None:
    _, tokenizer = smollm2_loaded
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == CHAT_RENDERED


@pytest.mark.slow
def test_smollm2_answers_capital_question_when_greedy(smollm2_loaded: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2_loaded
    inputs = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer


@pytest.mark.slow
def test_nll_via_inputs_embeds_equals_input_ids_on_smollm2(
    smollm2_loaded: tuple[Any, Any], smollm2_model_dir: Path
) -> None:
    model, tokenizer = smollm2_loaded
    by_ids, by_embeds = _nll_pair(model, tokenizer, smollm2_model_dir)
    # Observed bit-identical on this CPU; 1e-5 leaves room for other kernels.
    torch.testing.assert_close(by_embeds, by_ids, rtol=0.0, atol=1e-5)
    assert 0.5 < float(by_ids.mean()) < 5.0  # a real language model, not noise


# --------------------------------------------------------------------------- command line


def test_cli_models_prepare_prints_path_when_prepared(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["models", "prepare", "tiny", "--models-dir", str(tiny_model_dir.parent)])
    assert status == 0
    assert capsys.readouterr().out == f"{tiny_model_dir}\n"


def test_cli_models_list_reports_status(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    assert cli.main(["models", "list", "--models-dir", str(tmp_path)]) == 0
    lines = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
    assert lines == {
        "tiny": "prepared",
        "tiny-qwen": "not prepared",
        "smollm2-135m": "not prepared",
    }


def test_cli_returns_error_when_model_unknown(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # cli.main configures logging itself (to stderr), so read stderr, not pytest's log capture.
    assert cli.main(["models", "prepare", "gpt-9", "--models-dir", str(tmp_path)]) == 1
    assert "valid names: tiny, tiny-qwen, smollm2-135m" in capfd.readouterr().err


def test_cli_exits_with_usage_error_when_command_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_python_m_lens_serve_runs_the_cli_when_invoked(tmp_path: Path) -> None:
    env = {**os.environ, model_dirs.MODELS_DIR_ENV: str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "lens_serve", "models", "list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"tiny\tnot prepared\t{tmp_path / 'tiny'}" in proc.stdout


def test_fixture_models_dir_is_shared(tiny_model_dir: Path) -> None:
    assert tiny_model_dir == shared_models_dir() / "tiny"
    assert (tiny_model_dir / MANIFEST_NAME).is_file()


def test_a_long_preparation_step_reports_that_it_is_alive(caplog: pytest.LogCaptureFixture) -> None:
    logger = "lens_serve.assets.recipe_common"
    with caplog.at_level(logging.INFO, logger=logger), progress("converting", every_s=0.05):
        time.sleep(0.3)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "converting ..." and messages[-1].startswith("converting: done in ")
    assert sum("still running after" in m for m in messages) >= 2
