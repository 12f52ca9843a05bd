#!/usr/bin/env bash
# Sets up a fresh machine: torch (only when none is importable, and then the local CPU build),
# the other requirements, and kvpo built in place against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -r requirements.txt -c constraints.txt
# --no-build-isolation: build against the torch above, never a registry torch in an isolated env.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
