#!/bin/bash
# Do the sequential-statistics tests catch deliberate breaks of the code? Each break is
# patched into the source, tests/test_sequential.py runs, and the source is restored.
source "$(dirname "$0")/../common.sh"
$PY experiments/sequential_test_breaks/breaks.py
