# One-command entry points. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The capital of France is

.PHONY: setup demo chat test test-slow test-all lint lock clean

setup: $(VENV)/.installed

# constraints.txt pins the tested versions of every package (`make lock` rewrites it).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,peers]' -c constraints.txt
	touch $@

demo: setup  ## real text from the default model (SmolLM2-135M-Instruct)
	$(PY) scripts/generate.py --prompt "$(PROMPT)" --temperature 0 --max_new_tokens 24
	$(PY) scripts/generate.py --chat --prompt "What are three uses of a paperclip?" \
		--temperature 0 --max_new_tokens 96

# Two workers, whole files each (module fixtures load a model once).
test: setup  ## the default run: every test not marked slow
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=15

test-slow: setup  ## the tests marked slow (CI runs them after `make test`)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow --durations=15

test-all: test test-slow  ## what CI runs

lint: setup
	$(VENV)/bin/ruff check jaxinfer scripts tests

lock:  ## after upgrading packages in .venv: pin what it now holds (then run the tests)
	{ sed -n '1,/^# Regenerate/p' constraints.txt; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//' | LC_ALL=C sort -f; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
