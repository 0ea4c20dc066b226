# `make demo` builds the environment from nothing (a virtualenv in .venv) and runs the whole
# product on the embedded digits model (convert, prepare, train, sample, export, quality table);
# `make test` runs the whole suite, slow full-size network tests included; `make test-fast`
# leaves those out. `make check-requirements` checks that requirements-tpu.txt resolves on each
# Python of TPU_PYTHONS (uv's resolver against the package index: it needs the network).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCHVISION := $(VENV)/torchvision-models

.PHONY: env demo test test-fast check-requirements lint clean

env: $(STAMP) $(TORCHVISION)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# pytorch-fid is a reference in tests/test_fid.py and tests/test_inception.py; its torchvision
	# (not importable beside the CPU torch) is left out here and installed below, off the path.
	$(PY) -m pip install --quiet --no-deps pytorch-fid==0.3.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# tests build pytorch-fid's Inception-v3 from torchvision, which does not import beside the CPU torch:
# it lives off the path, imported from there with two op schemas defined (tests/helpers/torchvision_models.py)
$(TORCHVISION): | $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/torchvision-models torchvision==0.28.0

# The demo's outputs go to $(DEMO); run again, it resumes (the training from its last checkpoint).
DEMO ?= runs/demo
TEACHER := perflow_jax/demo/digits_teacher

demo: $(STAMP)
	$(PY) -m perflow_jax.convert --from $(TEACHER) --out $(DEMO)/teacher --overwrite
	$(PY) -m perflow_jax.prepare_data --model $(DEMO)/teacher --input digits --out $(DEMO)/data --resolution 32
	$(PY) -m perflow_jax.train --config configs/demo.py --workdir $(DEMO)/work \
		--config.model.path=$(DEMO)/teacher --config.data.path=$(DEMO)/data
	$(PY) -m perflow_jax.sample --model $(DEMO)/work --prompts perflow_jax/demo/prompts.txt --steps 4 --guidance 1 \
		--num-images 10 --out $(DEMO)/digits_4_steps.png
	$(PY) -m perflow_jax.export --to-torch --model $(DEMO)/work --out $(DEMO)/torch --base $(TEACHER) --overwrite
	$(PY) bench/quality.py --teacher $(DEMO)/teacher --workdir $(DEMO)/work --export $(DEMO)/torch \
		--out $(DEMO)/quality.json

# The small-network tests run in TEST_WORKERS processes (pytest-xdist, each test file in one of them:
# module fixtures are built once); the full-size ones after them, one at a time (SDXL's parity test
# alone holds about 17 GB).
TEST_WORKERS ?= 2

test: test-fast
	$(PY) -m pytest -m slow

test-fast: $(STAMP) $(TORCHVISION)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# uv's resolver, not pip's: pip's --python-version leaves environment markers to the running Python
# and takes wheels only (promise, a dependency of tensorflow-datasets, is a source archive). Nothing is
# installed; manylinux_2_35 is Ubuntu 22.04's, the Cloud TPU VM images'. uv: `pip install uv`.
TPU_PYTHONS ?= 3.11 3.12 3.13
UV ?= uv

check-requirements:
	@for version in $(TPU_PYTHONS); do \
		resolved=$$($(UV) pip compile --quiet --no-header --no-annotate --python-version $$version \
			--python-platform x86_64-manylinux_2_35 requirements-tpu.txt) || exit 1; \
		if echo "$$resolved" | grep -q '^torch=='; then echo "requirements-tpu.txt pulls in torch"; exit 1; fi; \
		echo "requirements-tpu.txt resolves on Python $$version:" $$(echo "$$resolved" | grep -E '^(jax|flax)=='); \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check perflow_jax tests bench

clean:
	rm -rf $(VENV) .pytest_cache
