# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY := .venv/bin/python
PIP := .venv/bin/pip
# DeepSpeed JIT-builds a small CPU op on first use: cache it inside the venv.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions
# Ask torch (not nvidia-smi, which can exist where no GPU is usable) whether CUDA works;
# recursive (=), so it is asked once the venv exists.
export DS_ACCELERATOR ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
DEMO_DATA := data/mnist_demo
DEMO_RUN := runs/demo_cpu
DEMO_SUBSETS := runs/demo_cpu_subsets

.PHONY: venv demo test test-fast clean

venv: .venv/.installed

.venv/.installed: setup.py
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test,demo]"
	touch $@

$(DEMO_DATA)/.complete: .venv/.installed scripts/make_demo_data.py
	$(PY) scripts/make_demo_data.py --out $(DEMO_DATA)
	touch $@

# A rerun moves the previous demo run aside (--overwrite: runs/demo_cpu.old-<time>/), never
# deletes it; `make clean` removes runs/ and data/.
demo: .venv/.installed $(DEMO_DATA)/.complete
	$(PY) train.py --config configs/demo_cpu.yaml --deepspeed_config ds_configs/zero0_fp32.json \
		eval.knn_every_steps=124 --overwrite
	$(PY) scripts/make_subsets.py $(DEMO_DATA)/train --per-class 1 2 5 --splits 3 --seed 0 --out $(DEMO_SUBSETS)
	$(PY) scripts/demo_eval.py --weights $(DEMO_RUN)/demo-target.safetensors --root $(DEMO_DATA) --subsets $(DEMO_SUBSETS)

test: .venv/.installed
	$(PY) -m pytest -q tests

# The in-process tests only: no test that launches processes, and not the GPU tests (which
# skip on a CPU machine anyway); two pytest workers (pytest-xdist).
test-fast: .venv/.installed
	$(PY) -m pytest -q -n 2 -m "not slow and not gpu" tests

clean:
	rm -rf .venv runs data
