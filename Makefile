# One-command entry points. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The capital of France is

.PHONY: setup demo chat test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,peers]'
	touch $@

demo: setup  ## real text from the default model (SmolLM2-135M-Instruct)
	$(PY) scripts/generate.py --prompt "$(PROMPT)" --temperature 0 --max_new_tokens 24
	$(PY) scripts/generate.py --chat --prompt "What are three uses of a paperclip?" \
		--temperature 0 --max_new_tokens 96

# Two workers, whole files each (module fixtures load a model once): ~17 min on 2 cores.
test: setup  ## the whole suite, slow tests included (what CI runs)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: setup
	$(VENV)/bin/ruff check jaxinfer scripts tests

clean:
	rm -rf $(VENV) .pytest_cache
