# The README's two commands: `make demo` and `make test`. Both run `make setup` first.
# `make bench` measures the private predictions (README, "Performance"); `make stress` runs
# the load, fault and bad-input tests at full size (README, "Many clients, faults").
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV
export TF_CPP_MIN_LOG_LEVEL ?= 2

RLIB := $(CURDIR)/.rlib
R_ENV := R_LIBS=$(RLIB) RETICULATE_PYTHON=$(PY)

.PHONY: setup demo bench stress test test-python test-r r-install r-check docs figures clean

setup:
	@bash tools/setup.sh

demo: setup
	$(PY) demo/run_demo.py

# Latency, throughput, traffic, accuracy and the serving path around the private step,
# Python and R clients, side by side with plaintext Keras and the previous release (a git
# worktree of 1e7b994) in the same run; as root with `ip netns`, also the cost of stunnel
# links between network namespaces (bench/run.py --help). Results in bench/out/.
# BENCH_ARGS="--quick" for a smoke run.
bench: setup r-install
	$(PY) -m pip install -q --disable-pip-version-check -r inst/python/requirements-bench.txt
	$(R_ENV) $(PY) bench/run.py $(BENCH_ARGS)

# Python tests, then R CMD check of the built package, then the R tests (last line:
# `R: N passed, N failed, N skipped`).
test: setup
	@status=0; \
	$(MAKE) --no-print-directory test-python || status=1; \
	$(MAKE) --no-print-directory r-check || status=1; \
	$(MAKE) --no-print-directory test-r || status=1; \
	exit $$status

test-python:
	$(PY) -m pytest tests/python -v -rs --durations=10

# Load (1000 sequential queries, 8 concurrent clients x 50), faults, bad inputs and privacy
# recordings with real processes; ends with the `privatekeras stress summary:` line.
stress: setup
	PRIVATEKERAS_STRESS=1 $(PY) -m pytest tests/python/test_load.py tests/python/test_faults.py \
	  tests/python/test_e2e.py tests/python/test_cluster.py tests/python/test_convert.py \
	  tests/python/test_privacy.py -v -rs -p no:cacheprovider

r-install:
	@mkdir -p $(RLIB)
	R CMD INSTALL --no-test-load -l $(RLIB) . >/dev/null

test-r: r-install
	$(R_ENV) PRIVATEKERAS_TEST_INSTALL=true Rscript tools/run-r-tests.R

# R CMD check on the built tarball. Tests run in test-r (not twice); keras3/keras/tensorflow
# (Suggests) are not installable on Debian, hence _R_CHECK_FORCE_SUGGESTS_=false.
r-check:
	@rm -rf build/rcheck && mkdir -p build/rcheck
	cd build/rcheck && $(R_ENV) R CMD build $(CURDIR)
	cd build/rcheck && $(R_ENV) _R_CHECK_FORCE_SUGGESTS_=false R CMD check --no-manual \
	  --no-tests privatekeras_*.tar.gz
	@grep -q "Status: OK\|Status: [0-9]* NOTE" build/rcheck/privatekeras.Rcheck/00check.log

# The pkgdown site in build/site: the README as its home page, the reference grouped by family
# (cluster, owner, client, set-up), the vignettes as articles (run for real: they need the
# Python environment, as for `make r-check`). Offline (pkgdown.internet = FALSE: CRAN is not
# reachable here). Needs Debian's r-cran-pkgdown, which `make setup` does not install; not part
# of `make test` or CI.
docs: r-install
	@R_LIBS=$(RLIB) Rscript -e 'if (!requireNamespace("pkgdown", quietly = TRUE)) { message("make docs: pkgdown is not installed; install it with: sudo apt-get install r-cran-pkgdown"); quit(status = 1) }'
	$(R_ENV) Rscript -e 'options(pkgdown.internet = FALSE); pkgdown::build_site(".", install = FALSE, new_process = FALSE, preview = FALSE)'
	@# The README's Performance section shows bench/latency.png, outside what pkgdown copies.
	@if [ -f bench/latency.png ]; then mkdir -p build/site/bench && cp bench/latency.png build/site/bench/; fi
	@echo "site written to build/site/index.html"

# The README's picture of the parties (man/figures/parties.svg), drawn by R/figures.R.
figures:
	RETICULATE_PYTHON=$(PY) Rscript tools/make-figures.R

clean:
	rm -rf $(VENV) $(RLIB) build demo-output .pytest_cache
