# make demo | make test | make bench — each creates .venv when missing and installs into it.
# make test-compat — the same checks of the kernels and the HF interop under the versions the GPU
# machines run, in a second virtualenv, .venv-compat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# torch is pinned here (a CPU build sits on the dev machines' disk); pyproject keeps a range.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The GPU machines run Triton 3.6 and transformers 5.17 (CI's .venv gets the newest allowed), so the
# kernel interpreter tests, the HF interop tests and the AOT compile table run under those too.
# numpy<2.4: Triton 3.6's interpreter turns a scalar computed in a kernel (`hi = tl.minimum(N, 8)`
# then `for i in range(0, hi)`) into a 1-element array, and NumPy 2.4 refuses int() of it ("only
# 0-dimensional arrays can be converted to Python scalars"); NumPy 2.3.5 runs the same kernel, and
# Triton 3.9 is fine with NumPy 2.4.
COMPAT := .venv-compat
COMPAT_PY := $(COMPAT)/bin/python
COMPAT_STAMP := $(COMPAT)/.installed
COMPAT_PINS := torch==2.13.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
# The AOT compile table (tests/test_compile.py) runs here too: both Triton versions' ptxas must
# compile every build without spills (they differ: kernels/attention.py's config table says how).
COMPAT_TESTS := tests/test_attention.py tests/test_layernorm.py tests/test_rmsnorm.py tests/test_rope.py \
	tests/test_swiglu.py tests/test_linear_cross_entropy.py tests/test_custom_ops.py tests/test_hf.py tests/test_compile.py \
	tests/test_device_sampling.py

# The pins and the project in one install: pip keeps the pins or stops with a conflict against
# pyproject's ranges, never swaps one for another version.
$(COMPAT_STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q -e ".[dev]" $(COMPAT_PINS)
	touch $(COMPAT_STAMP)

.PHONY: install demo test test-compat bench clean
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llm-engine demo

# -n auto --dist loadgroup: the tests run on every core (pytest-xdist), each file in one process
# (module fixtures such as the AOT table run once) except the long ones tests/conftest.py spreads; the AOT compile table (tests/test_compile.py)
# is split between the two Triton versions, sm_80 here and sm_90 under test-compat (the GPU
# machines' arch and Triton), which halves its cold cost; `python -m kernels.compile` builds both.
test: $(STAMP)
	LLM_ENGINE_AOT_ARCHS=80 $(PY) -m pytest -q -n auto --dist loadgroup --durations=25

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c "import numpy, torch, transformers, triton; print('test-compat: torch', torch.__version__, \
		'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
	LLM_ENGINE_AOT_ARCHS=90 $(COMPAT_PY) -m pytest -q -n auto --dist loadgroup --durations=15 $(COMPAT_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/cpu_suite.py

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info engine/_sampler*.so engine/_decode_attention*.so
