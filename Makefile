# Two commands set up and run everything on a fresh machine: `make bench` and `make test`.
# Each creates .venv with pip if needed. It reuses an already installed torch (such as a GPU
# image's); otherwise it installs torch==2.13.0 and triton==3.6.0.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: venv bench test gpu clean

$(VPY):
	@if $(PY) -c "import torch, triton" 2>/dev/null; then \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(VPY) -m pip install -q torch==2.13.0 triton==3.6.0; \
	fi
	$(VPY) -m pip install -q "numpy<2.4" pytest hypothesis pytest-xdist matplotlib tqdm transformers==5.17.0 accelerate==1.15.0 \
		|| echo "note: could not install the test/plot extras (offline?); using what is there"
	$(VPY) -m pip install -q --no-deps -e . || echo "note: editable install failed; use PYTHONPATH=src"

venv: $(VPY)

# The benchmark on a GPU (seed grid; pass ARGS="--quick" or "--models llama-8b"); on a
# machine without one it prints the grid's plans and runs a small interpreter check.
bench: $(VPY)
	$(VPY) -m skattn.cli bench $(ARGS)

# CPU tests (CI): planner, fastdiv, references, and the Triton kernels under the interpreter.
test: $(VPY)
	$(VPY) -m pytest -q -n 2 -m "not gpu" tests

# GPU tests and the benchmark in one go (what scripts/gpu_run.sh runs on the device).
gpu:
	bash scripts/gpu_run.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
