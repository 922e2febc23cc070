"""Shared fixtures: tiny HF models from configs (moecompile.hf_zoo) and hand-written modules (handwritten.py)."""
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before moecompile (triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*experts_implementation.*")


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
