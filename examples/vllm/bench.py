"""The vLLM benchmark, `llmdist bench vllm` (llmdist/bench/vllm.py): the same requests through
vLLM's NixlConnector and LLMDistConnector (pull, push, layerwise) on the same CPU engines, with
per mode the decode's TTFT and the transfer time and their ratios to NixlConnector.

    python examples/vllm/bench.py --repeat 5 --json out.json

is `python -m llmdist bench vllm --repeat 5 --json out.json`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from llmdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "vllm", *sys.argv[1:]]))
