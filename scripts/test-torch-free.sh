#!/usr/bin/env bash
# The test suite in the production install: the base package plus [serve,test,cuda-check] in a fresh virtual
# environment with no PyTorch, so a torch import on the production path (runtime, serve, generate, the CLI's
# torch-free commands) fails here. The engine folders the fixtures would export (torch) are exported first, in this
# environment, into $DDT_TEST_ARTIFACTS (tests/make_artifacts.py); the tests that need PyTorch itself skip with the
# reason.
# [cuda-check] (no torch either): the device loop imports cuda.bindings and NVRTC, so its kernel and the TensorRT /
# CUDA names are checked here too; under CI=1 those tests fail rather than skip when the extra is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ART=${DDT_TEST_ARTIFACTS:-.test-artifacts}
VENV=${VENV:-.venv-torch-free}
"$PY" tests/make_artifacts.py "$ART"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[serve,test,cuda-check]"
"$VENV/bin/python" -c "import importlib.util, sys; sys.exit('torch is installed in $VENV' if importlib.util.find_spec('torch') else 0)"
DDT_TEST_ARTIFACTS="$ART" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
