#!/usr/bin/env bash
# On a CUDA machine: build and install llmdist, check that CUDA is picked, run the runtime tests
# and the device check (bytes of every transfer kind, then figures against same-run baselines).
# A few minutes; the figures land in gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q '.[test,plot]'
export LLMDIST_RUNTIME=cuda
python3 -c "import json, llmdist; print(json.dumps(llmdist.runtime_info()['runtimes']['cuda']))"
python3 -m pytest tests/test_runtimes.py tests/test_types.py -q -p no:cacheprovider
python3 bench/gpu_check.py local cluster --json gpu_check.json --plot gpu_check.png
