#!/usr/bin/env bash
# Set up (torch pinned to the CPU build) and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# pytest exits 5 when it collected no test: that must fail, never pass silently.
python -m pytest tests "$@"
