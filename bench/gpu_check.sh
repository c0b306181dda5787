#!/usr/bin/env bash
# On a CUDA machine: build and install llmdist, check that CUDA is picked, run the runtime tests
# and the device check (correctness of every transfer kind, device bandwidth). A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q '.[test]'
export LLMDIST_RUNTIME=cuda
python3 -c "import json, llmdist; print(json.dumps(llmdist.runtime_info()['runtimes']['cuda']))"
python3 -m pytest tests/test_runtimes.py tests/test_types.py -q -p no:cacheprovider
python3 bench/gpu_check.py --runtime cuda --reps 10
