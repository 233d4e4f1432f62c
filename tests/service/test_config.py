"""Settings: field constraints, the cross-field `_check`, LENS_* env vars and derived values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest

import lens_serve.service.config as config_module
from lens_serve.core.gist_kinds import GIST_KINDS
from lens_serve.engine.config import EngineConfig
from lens_serve.service.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_lens_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read LENS_* from the environment: start every test without any."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"LENS_{name.upper()}", raising=False)


def messages(error: pydantic.ValidationError) -> list[str]:
    """The errors' own messages (str(error) also shows the input, which names fields too)."""
    return [e["msg"] for e in error.errors()]


def locations(error: pydantic.ValidationError) -> list[tuple[int | str, ...]]:
    return [tuple(e["loc"]) for e in error.errors()]


def make(**fields: Any) -> Settings:
    """Settings from keyword fields (mypy sees pydantic's Field defaults as required arguments)."""
    return Settings(**fields)


def refused(**fields: Any) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as info:
        make(**fields)
    return info.value


# -- _check: one test per rule, each with a bad and a good combination --------------------------


def test_check_refuses_tail_when_not_below_wc_budget() -> None:
    for tail in (64, 65, 1000):
        (msg,) = messages(refused(wc_budget=64, tail=tail))
        assert "tail" in msg and "wc_budget" in msg and f"({tail})" in msg


def test_check_accepts_tail_when_below_wc_budget() -> None:
    assert make(wc_budget=64, tail=63).tail == 63
    assert make(wc_budget=64, tail=0).tail == 0


def test_check_refuses_wc_budget_when_above_max_wc_budget() -> None:
    (msg,) = messages(refused(wc_budget=2048, max_wc_budget=1024, tail=8))
    assert "wc_budget (2048)" in msg and "max_wc_budget" in msg


def test_check_accepts_wc_budget_when_equal_to_max_wc_budget() -> None:
    settings = make(wc_budget=1024, max_wc_budget=1024)
    assert (settings.wc_budget, settings.max_wc_budget) == (1024, 1024)


def test_check_refuses_max_wc_budget_when_not_below_max_model_len() -> None:
    for max_model_len in (4096, 2048):
        (msg,) = messages(refused(max_wc_budget=4096, max_model_len=max_model_len))
        assert "max_wc_budget (4096)" in msg and f"max_model_len ({max_model_len})" in msg


def test_check_accepts_max_wc_budget_when_below_max_model_len() -> None:
    assert make(max_wc_budget=4096, max_model_len=4097).max_model_len == 4097


def test_check_refuses_gist_kind_when_unknown() -> None:
    (msg,) = messages(refused(gist_kind="attention"))
    assert "gist_kind" in msg and "'attention'" in msg


@pytest.mark.parametrize("kind", GIST_KINDS)
def test_check_accepts_gist_kind_when_known(kind: str) -> None:
    assert make(gist_kind=kind).gist_kind == kind


def test_check_refuses_gist_rows_when_not_dividing_block_size() -> None:
    (msg,) = messages(refused(block_size=32, gist_rows=3))
    assert "gist_rows (3)" in msg and "block_size" in msg


def test_check_accepts_gist_rows_when_dividing_block_size() -> None:
    for rows in (1, 2, 4, 8, 16, 32):
        assert make(block_size=32, gist_rows=rows).gist_rows == rows


@pytest.mark.parametrize("given", ["tls_cert", "tls_key"])
def test_check_refuses_tls_when_only_one_of_cert_and_key(given: str) -> None:
    (msg,) = messages(refused(**{given: Path("/etc/lens/tls.pem")}))
    assert "tls_cert" in msg and "tls_key" in msg


def test_check_accepts_tls_when_cert_and_key_together_or_neither() -> None:
    settings = make(tls_cert=Path("/c.pem"), tls_key=Path("/k.pem"))
    assert (settings.tls_cert, settings.tls_key) == (Path("/c.pem"), Path("/k.pem"))
    assert make().tls_cert is None and make().tls_key is None


def test_check_accepts_defaults_when_nothing_is_set() -> None:
    settings = make()
    assert (settings.wc_budget, settings.max_wc_budget, settings.tail) == (1024, 4096, 128)
    assert (settings.block_size, settings.gist_rows, settings.gist_kind) == (32, 1, "tokens")


# -- field constraints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 65536),
        ("port", -1),
        ("metrics_port", 70000),
        ("wc_budget", 1),
        ("max_wc_budget", 1),
        ("tail", -1),
        ("block_size", 1),
        ("gist_rows", 0),
        ("max_tokens", 0),
        ("max_model_len", 15),
        ("max_message_bytes", 1023),
        ("drain_seconds", -0.5),
        ("dtype", "int8"),
        ("kv_cache_gib", 0.0),
        ("gpu_memory_utilization", 0.0),
        ("gpu_memory_utilization", 1.01),
        ("step_rows", -1),
        ("shadow_rate", 1.5),
        ("shadow_rate", -0.1),
        ("shadow_target", "answer"),
        ("shadow_target_tokens", 0),
        ("shadow_guided_share", 2.0),
        ("shadow_queue", 0),
        ("prefs_maxlen", 0),
        ("lens_poll_seconds", 0.0),
    ],
)
def test_field_refused_when_out_of_range(field: str, value: object) -> None:
    assert (field,) in locations(refused(**{field: value}))


def test_settings_refuse_unknown_field_when_given() -> None:
    assert ("wc_budgett",) in locations(refused(wc_budgett=64))


# -- environment variables ---------------------------------------------------------------------


def test_env_overrides_defaults_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_WC_BUDGET", "512")
    monkeypatch.setenv("LENS_TAIL", "16")
    monkeypatch.setenv("LENS_SHADOW_RATE", "0.25")
    monkeypatch.setenv("LENS_SHADOW_TARGET", "prompt")
    monkeypatch.setenv("LENS_PREWARM_NEXT_TURN", "false")
    monkeypatch.setenv("LENS_TLS_CERT", "/c.pem")
    monkeypatch.setenv("LENS_TLS_KEY", "/k.pem")
    monkeypatch.setenv("LENS_MODEL", "tiny")
    settings = make()
    assert (settings.wc_budget, settings.tail, settings.shadow_rate) == (512, 16, 0.25)
    assert settings.shadow_target == "prompt" and settings.prewarm_next_turn is False
    assert (settings.tls_cert, settings.tls_key) == (Path("/c.pem"), Path("/k.pem"))
    assert settings.model == "tiny"


def test_env_yields_to_explicit_values_when_both_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_WC_BUDGET", "512")
    assert make(wc_budget=256).wc_budget == 256


def test_env_refused_when_not_parseable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_PORT", "http")
    assert ("port",) in locations(refused())


def test_env_refused_when_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_SHADOW_RATE", "2")
    assert ("shadow_rate",) in locations(refused())


def test_env_refused_when_breaking_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_TAIL", "1024")  # == the default wc_budget
    (msg,) = messages(refused())
    assert "tail (1024)" in msg and "wc_budget (1024)" in msg


def test_env_refused_when_tls_cert_lacks_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENS_TLS_CERT", "/c.pem")
    (msg,) = messages(refused())
    assert "tls_cert" in msg and "tls_key" in msg


# -- derived values ----------------------------------------------------------------------------


def test_non_defaults_empty_when_nothing_is_set() -> None:
    assert make().non_defaults() == {}


def test_non_defaults_masks_secrets_when_set() -> None:
    settings = make(api_tokens="alpha,beta", admin_token="root-secret", wc_budget=512)
    assert settings.non_defaults() == {"api_tokens": "***", "admin_token": "***", "wc_budget": 512}
    assert "alpha" not in repr(settings.non_defaults())
    assert "root-secret" not in repr(settings.non_defaults())


def test_tokens_split_and_strip_when_comma_separated() -> None:
    assert make(api_tokens=" alpha , beta,,gamma ,alpha, ").tokens == frozenset(
        {"alpha", "beta", "gamma"}
    )


def test_tokens_empty_when_no_token_given() -> None:
    assert make().tokens == frozenset()
    assert make(api_tokens=" , ,").tokens == frozenset()


def test_engine_config_maps_settings_when_all_explicit() -> None:
    settings = make(
        dtype="float16",
        max_model_len=2048,
        max_wc_budget=1024,
        kv_cache_gib=3.5,
        kv_block_size=16,
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        step_rows=256,
        shared_step_rows=64,
    )
    assert settings.engine_config(Path("/models/tiny")) == EngineConfig(
        model="/models/tiny",
        dtype="float16",
        max_model_len=2048,
        kv_cache_gib=3.5,
        kv_block_size=16,
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        max_num_batched_tokens=256,
        long_prefill_tokens=64,
    )


def test_engine_config_leaves_step_caps_to_vllm_when_zero() -> None:
    config = make(dtype="float32", kv_block_size=16).engine_config(Path("/m"))
    assert config.max_num_batched_tokens is None and config.long_prefill_tokens is None
    assert (config.model, config.max_model_len, config.kv_cache_gib) == ("/m", 8192, 4.0)
    assert config.gpu_memory_utilization == 0.85 and config.enforce_eager is False


def test_engine_config_picks_cpu_dtype_and_kv_block_when_auto_without_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config_module, "_on_gpu", lambda: False)
    config = make().engine_config(Path("/m"))
    assert (config.dtype, config.kv_block_size) == ("float32", 32)


def test_engine_config_picks_gpu_dtype_and_kv_block_when_auto_with_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config_module, "_on_gpu", lambda: True)
    config = make().engine_config(Path("/m"))
    assert (config.dtype, config.kv_block_size) == ("bfloat16", None)


def test_settings_refuse_assignment_when_frozen() -> None:
    settings = make()
    with pytest.raises(pydantic.ValidationError) as info:
        settings.tail = 3
    assert info.value.errors()[0]["type"] == "frozen_instance"
    assert settings.tail == 128


def test_import_skips_torch_when_loading_config() -> None:
    code = "import sys, lens_serve.service.config; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "False"
