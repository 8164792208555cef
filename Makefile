# Two commands do everything on a fresh machine:
#   make lab    create .venv, install the course, open JupyterLab on it
#   make test   the same set-up, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LAB_ARGS ?=
# JupyterLab refuses to run as root without this flag (containers, CI).
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=300

.PHONY: setup test-setup git-filter grade lab test test-ui test-fast test-mixed-backend bench exercises clean

# jupyter-events asks for jsonschema's IRI format check, rfc3987-syntax, whose import builds ~30
# Earley parsers (2.5 s) in every process that imports nbformat: JupyterLab, the grader, the
# build, nbval. Nothing here validates IRIs, and jsonschema skips the check without it.
SLIM := $(PY) -m pip uninstall --disable-pip-version-check -y -q rfc3987-syntax > /dev/null 2>&1 || true

# pip byte-compiles every file it installs, one after another (about a minute for torch and
# JupyterLab); compileall does the same on every core. (Not skipped: with PYTHONDONTWRITEBYTECODE
# set, as on CI machines, nothing would ever be compiled and each process would recompile torch.)
# course_lib too: every kernel, grader and test worker imports it (0.15 s of CPU each when
# compiled from source); a file edited later is compiled afresh, as Python checks its date.
COMPILE := $(PY) -m compileall -q -j 0 course_lib $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null 2>&1 || true

setup: $(VENV)/.installed

# Create the venv if needed and install the course with the extras $(1) ("" or "[test]") in one
# pip run, logging to $(2). On a fresh machine `make test` installs everything in one pass
# (a second pass only to add the test extra cost ~25 s: pip's resolution and compileall again).
define INSTALL
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "could not create a venv: on Debian/Ubuntu run: sudo apt install python3-venv"; exit 1; }
	$(if $(TORCH_INDEX_URL),$(PY) -m pip install --disable-pip-version-check --no-compile torch==2.13.0 --index-url $(TORCH_INDEX_URL) > $(VENV)/pip-torch.log 2>&1 || { tail -20 $(VENV)/pip-torch.log; exit 1; })
	$(PY) -m pip install --disable-pip-version-check --no-compile -e ".$(1)" > $(VENV)/$(2) 2>&1 \
		|| { tail -40 $(VENV)/$(2); echo "pip install failed: see $(VENV)/$(2)"; exit 1; }
	$(SLIM)
	$(COMPILE)
	$(PY) -c "import torch, jupyterlab, ipywidgets, jupytext, course_lib; print('course installed: torch', torch.__version__)"
endef

# Reinstall only when the dependencies change; a second `make lab` reuses the venv.
$(VENV)/.installed: pyproject.toml
	$(call INSTALL,,pip.log)
	touch $@
	@$(MAKE) --no-print-directory git-filter

# The test extra (pytest, nbval, hypothesis, playwright), on top of what a learner needs; it
# installs the course too, so it also counts as `setup` done.
test-setup: $(VENV)/.installed-test

$(VENV)/.installed-test: pyproject.toml
	$(call INSTALL,[test],pip-test.log)
	touch $(VENV)/.installed $@
	@$(MAKE) --no-print-directory git-filter

# Outputs a learner's run leaves in a committed notebook are not a change to git (JupyterLab
# saves them into the .ipynb): a clean filter strips them, as `build --check` ignores them.
git-filter:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		git config filter.course-outputs.clean "$(abspath $(PY)) -m course_lib.build --strip-outputs"; \
		git config filter.course-outputs.smudge cat; fi

lab: setup
	@$(PY) -m course_lib.workspace
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) --notebook-dir=. $(LAB_ARGS)

LINTED := course_lib tests benchmarks notebooks/*.py

# build --check: exercises/ and every .ipynb match their sources; ruff: lint and format.
# pytest, two workers (ranks and kernels wait much of the time; three were slower here): unit tests of course_lib, then every lesson run top to bottom: in a real
# browser (tests/ui, which also moves each lesson's widget) where Chromium is installed, as CI
# does, else under nbval. Either way a cell that raises, or a lesson claim that is false (each is
# an assert), fails. Solutions and untouched exercises are executed by the grader in
# tests/test_course.py: every solution passes every exercise with no cell raising, and every
# untouched exercise reads "not attempted".
LESSON_RUN := $(shell command -v chromium >/dev/null 2>&1 && echo tests/ui || echo notebooks)
test: test-setup
	$(PY) -m course_lib.build --check
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m pytest $(NBVAL) -n 2 --dist loadscope --no-loadscope-reorder -rs tests $(LESSON_RUN) \
		$(if $(filter notebooks,$(LESSON_RUN)),--ignore=tests/ui) --durations=15

# A real browser (Debian's chromium, driven by Playwright) runs a chapter in JupyterLab.
# Skips, saying why, when there is no chromium; `.ci/run` installs it first.
test-ui: test-setup
	$(PY) -m pytest tests/ui -rs

test-fast: test-setup
	$(PY) -m pytest tests --ignore=tests/ui

# Every lesson and solution in a process group with a backend per device type, as "auto"
# starts on GPUs (cpu:gloo,cuda:nccl), with gloo standing in for NCCL (~4 min on 2 cores).
test-mixed-backend: test-setup
	COURSE_BACKEND=cpu:gloo,cuda:gloo $(PY) -m pytest $(NBVAL) notebooks solutions

exercises: setup
	$(PY) -m course_lib.build

# Grade your notebooks in my_exercises/ (what CI's grader would say).
grade: setup
	$(PY) -m course_lib.grade

bench: test-setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .grade grade-report.json ui-artifacts
