# The two commands: `make run` (set up + the main job on generated data) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= outputs

.PHONY: run run-full run-timed test venv venv-ray bench clean format

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Optional: Ray, for `--executor ray` and its test (skipped without it). CI installs it (.ci/run).
$(VENV)/.installed-ray: requirements-ray.txt | $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-ray.txt
	touch $@

venv-ray: $(VENV)/.installed-ray

# End to end on generated data: data -> features -> folds -> 4 members -> blend -> gateway -> score -> report.
# The quick profile (config.PROFILES, docs/SETTINGS.md) sizes every member for about ten minutes on a 2-core
# CPU, install included; `make run CMI_PROFILE=full` (or `make run-full`) trains at the defaults.
run: venv
	CMI_PROFILE=$${CMI_PROFILE:-quick} $(BIN)/python main.py run --out $(OUT) $(RUN_ARGS)

run-full: venv
	CMI_PROFILE=full $(BIN)/python main.py run --out $(OUT) $(RUN_ARGS)

# Lint and format checks first (seconds), then the whole suite; `$(BIN)/python -m pytest -m "not slow"` is the quick loop.
# `make run` timed, install included (run it in a fresh clone): the wall seconds go to $(OUT)/make_run_wall.json,
# which `python main.py results --snapshot $(OUT)` copies beside the run's other figures.
run-timed:
	@start=$$(date +%s); $(MAKE) run; status=$$?; end=$$(date +%s); \
	mkdir -p $(OUT); printf '{"make_run_wall_s": %d, "exit_status": %d}\n' $$((end - start)) $$status > $(OUT)/make_run_wall.json; \
	exit $$status

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python main.py bench --out $(OUT)/bench

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(OUT) .pytest_cache
