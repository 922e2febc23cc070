"""Shared fixtures: tiny HF models from configs (moecompile.hf_zoo) and hand-written modules (handwritten.py)."""
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

# Under pytest-xdist (the README's command: one worker per core) each worker gets its share of the cores: torch's
# OpenMP threads spinning in every worker made the suite 1.8x the CPU time of one process.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if WORKERS:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
import torch  # noqa: E402

if WORKERS:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before moecompile (triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tile tables a user tuned on this machine (~/.cache/moecompile/tuned) must not change what the tests run: each
# process reads an empty directory of its own unless a test points it elsewhere.
os.environ["MOECOMPILE_TUNED_DIR"] = tempfile.mkdtemp(prefix="moecompile-tuned-")

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*experts_implementation.*")


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def mixtral():
    """A tiny Mixtral (two layers) built from its config, experts_implementation="grouped_mm"."""
    from moecompile import hf_zoo

    return hf_zoo.build("mixtral", "grouped_mm")


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """An empty directory of user-tuned tile tables (kernels/configs.py), forgotten before and after the test."""
    from moecompile.kernels import configs

    monkeypatch.setenv(configs.TUNED_DIR_ENV, str(tmp_path))
    configs.forget_user_tables()
    yield tmp_path
    configs.forget_user_tables()
