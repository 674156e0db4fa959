#!/usr/bin/env bash
# Run the main job end to end: `astra demo` trains The Cannon and runs the APOGEE pipeline through Airflow
# on a synthetic survey with a known truth, then prints a summary (counts, run times, accuracy against the
# truth) and writes plots. Everything goes under $ASTRA_HOME (default ./astra-demo): the embedded SQLite
# astra database, Airflow's home and metadata database, the data, plots and demo.log (Airflow's messages).
# A second run re-uses the data and finds every task already done. Extra arguments go to `astra demo`
# (astra demo --help), e.g.  bash scripts/demo.sh --stars 50 --training-stars 500
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$REPO"
export ASTRA_HOME="${ASTRA_HOME:-$REPO/astra-demo}"
exec astra demo "$@"
