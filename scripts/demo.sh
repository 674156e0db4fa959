#!/usr/bin/env bash
# Run the main job on the embedded default (SQLite under $ASTRA_HOME, default ./astra-demo) and print
# what was recorded. Extra arguments go to `astra demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
export ASTRA_HOME="${ASTRA_HOME:-$REPO/astra-demo}"
exec astra demo "$@"
