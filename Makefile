# l7gate developer entry points. Every target that needs the toolchain runs `install` first,
# which is idempotent and cheap when nothing changed.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
BIN := $(VENV)/bin

.PHONY: help install demo test lint bench clean distclean

help: ## show this help
	@echo "l7gate make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: ## install Debian packages, .venv and the project (idempotent)
	@bash scripts/install.sh

ENGINE ?= envoy
demo: install ## run the seed scenario: validate + trace, then real agents (kernel mode as root); ENGINE=h11: the h11 engine instead of Envoy
	@bash scripts/demo.sh
	@echo
	@if [ "$$(id -u)" = 0 ]; then \
		echo "== the seed scenario through the kernel datapath (network namespaces, BPF, L7 proxy: $(ENGINE))"; \
		L7G_ENGINE=$(ENGINE) .venv/bin/python scripts/demo_kernel.py; \
	else \
		echo "== not root: no network namespaces or BPF; running the seed scenario in loopback mode"; \
		L7G_ENGINE=$(ENGINE) bash scripts/demo-loopback.sh; \
	fi

# Every check runs even when an earlier one failed, so one run shows all problems.
# Unit tests are pure and run on both CPUs. Integration tests (loopback addresses of their
# own, unix sockets, free ports) run beside the privileged ones (network namespaces, BPF pins
# and iptables chains of their own), which mostly wait on the kernel and their agents; within
# each tier tests run one at a time, as they share the tier's addresses and pins.
test: install ## import contracts, mypy --strict, then the test suite
	@rc=0; \
	echo "== lint-imports"; $(BIN)/lint-imports || rc=1; \
	echo "== mypy"; $(BIN)/mypy || rc=1; $(BIN)/mypy --strict bench/run.py || rc=1; \
	echo "== pytest: unit tests on two workers"; $(BIN)/pytest -q -n 2 -m "not timing" tests/unit || rc=1; \
	echo "== pytest: unit tests with wall-clock bounds, alone"; $(BIN)/pytest -q -m timing tests/unit || rc=1; \
	echo "== pytest: integration tests, beside the privileged tests (their output follows)"; \
	plog=$$(mktemp /tmp/l7g-privileged-tests.XXXXXX); \
	$(BIN)/pytest -q -p no:cacheprovider tests/privileged >"$$plog" 2>&1 & ppid=$$!; \
	$(BIN)/pytest -q tests/integration || rc=1; \
	wait $$ppid || rc=1; \
	echo "== pytest: privileged tests"; cat "$$plog"; rm -f "$$plog"; \
	if [ $$rc -ne 0 ]; then echo "make test: FAILED (see above)"; fi; \
	exit $$rc

lint: install ## import contracts and mypy only
	@rc=0; \
	echo "== lint-imports"; $(BIN)/lint-imports || rc=1; \
	echo "== mypy"; $(BIN)/mypy || rc=1; $(BIN)/mypy --strict bench/run.py || rc=1; \
	exit $$rc

bench: install ## run benchmarks, write bench/RESULTS.md
	$(BIN)/python bench/run.py

clean: ## remove caches and build artefacts (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .hypothesis .import_linter_cache build dist src/*.egg-info bench/*.tmp
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## also remove .venv
	rm -rf $(VENV)
