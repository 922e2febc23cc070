#!/usr/bin/env bash
# Installs moecompile with its test and HF extras. torch is pinned first to the CPU wheel (an open range would pull a
# multi-GB CUDA build); on a GPU machine install your CUDA torch (>= 2.11) first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[hf,dev]"
# headless Chromium for the pass-log page's browser test (tests/test_report_html.py), where apt-get can install it
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
        (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) ||
        echo "install.sh: chromium could not be installed; the pass-log page's browser test will be skipped"
fi
