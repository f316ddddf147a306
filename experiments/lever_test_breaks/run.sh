#!/usr/bin/env bash
# Do the lever tests catch a hook that drops a lever? (run from the repository root)
set -euo pipefail
.venv/bin/python experiments/lever_test_breaks/breaks.py
