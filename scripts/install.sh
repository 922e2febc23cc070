#!/usr/bin/env bash
# Installs moecompile with its test and HF extras. torch is pinned first to the CPU wheel (an open range would pull a
# multi-GB CUDA build); on a GPU machine install your CUDA torch (>= 2.11) first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[hf,dev]"
