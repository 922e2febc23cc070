"""Shared fixtures: tiny HF models from configs (moecompile.hf_zoo) and hand-written modules (handwritten.py)."""
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*experts_implementation.*")


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
