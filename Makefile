# The two commands of the README. Both set up .venv on a fresh machine first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/demo
SEED   ?= 7
EXTENT ?= city
PORT   ?= 8501
RETRAIN ?=

.PHONY: demo test lint bench

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/stadsbeeld demo --seed $(SEED) --extent $(EXTENT) --out $(DATA) --if-missing
	$(VENV)/bin/stadsbeeld demo-runs --data $(DATA) --queue-embeddings true
	$(VENV)/bin/stadsbeeld dashboard --data $(DATA) --port $(PORT) $(if $(RETRAIN),--retrain true)

test: $(VENV)/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m bench
