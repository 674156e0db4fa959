# Shared set-up, sourced by scripts/demo.sh and scripts/test.sh: a virtualenv in .venv with the project,
# its test and documentation tools, and matplotlib for the demo's plots (extras test, docs, demo).
# Re-installs only when pyproject.toml changes.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "astra-provider needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.installed-$(sha1sum "$REPO/pyproject.toml" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "==> installing astra-provider and its dependencies into $VENV (first run: ~2 minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$REPO[test,docs,demo]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
