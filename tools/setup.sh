#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine: system packages, a venv from Debian's
# python3 with the pinned stack, privatekeras itself, and its compiled secure kernels.
# Re-running it only does what is missing. Used by `make setup` (and so by demo/test/CI).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

say() { printf 'setup: %s\n' "$*" >&2; }

# --- system packages (Debian) -------------------------------------------------------------
APT_PACKAGES=(python3 python3-venv python3-dev g++ make pkg-config libsodium-dev
              dataset-fashion-mnist
              stunnel4 iproute2)  # TLS links between workers on separate hosts; network namespaces in tests
if [ -f "$ROOT/DESCRIPTION" ] && [ "${PRIVATEKERAS_SKIP_R:-0}" != 1 ]; then
  APT_PACKAGES+=(r-base-core r-cran-reticulate r-cran-testthat r-cran-knitr r-cran-rmarkdown
                 pandoc r-cran-processx r-cran-callr r-cran-roxygen2)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# --- the virtualenv (from Debian's python3: immune to R's LD_LIBRARY_PATH libpython trap) ---
if [ ! -x "$PY" ]; then
  say "creating virtualenv $VENV from /usr/bin/python3"
  /usr/bin/python3 -m venv "$VENV"
fi

stamp="$VENV/.privatekeras-stack"
want="$(cat "$ROOT/inst/python/requirements.txt" "$ROOT/inst/python/requirements-nodeps.txt" \
          "$ROOT/inst/python/requirements-test.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  say "installing the pinned Python stack (TensorFlow, TF Encrypted, ...): a few minutes"
  "$PY" -m pip install -q --upgrade "pip==24.3.1"
  "$PY" -m pip install -q -r "$ROOT/inst/python/requirements.txt"
  "$PY" -m pip install -q --no-deps -r "$ROOT/inst/python/requirements-nodeps.txt"
  # The test runner is not part of the runtime lock (R's install_privatekeras() skips it).
  "$PY" -m pip install -q -r "$ROOT/inst/python/requirements-test.txt"
  echo "$want" > "$stamp"
fi

# --- privatekeras itself (editable: the package lives in inst/python) ----------------------
if ! "$PY" -c "import privatekeras.kernels" >/dev/null 2>&1; then
  say "installing privatekeras (editable)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
fi

# --- the secure kernels, compiled against this TensorFlow ----------------------------------
if ! "$PY" -m privatekeras kernels check >/dev/null 2>&1; then
  "$PY" -m privatekeras kernels build
fi
say "ready: $PY"
