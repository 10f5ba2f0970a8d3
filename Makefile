# The two commands of the README. Both set up .venv on a fresh machine first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/demo
SEED   ?= 7
EXTENT ?= city
PORT   ?= 8501
RETRAIN ?=

.PHONY: demo test lint bench

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m train demo --seed $(SEED) --extent $(EXTENT) --out $(DATA) --if-missing
	$(PY) -m train demo-runs --data $(DATA)
	STADSBEELD_DATA=$(DATA) $(if $(RETRAIN),STADSBEELD_RETRAIN=$(RETRAIN)) $(PY) -m streamlit run dashboard/app.py \
		--server.address 127.0.0.1 --server.port $(PORT) --server.headless true \
		--browser.gatherUsageStats false

test: $(VENV)/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m bench
