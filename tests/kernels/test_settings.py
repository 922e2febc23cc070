"""kernels/settings.py: the kernel path's settings change inside configured() and are restored after it (also when
the block raises); an unknown name is refused; a poisoned allocation shows an unwritten element as NaN."""
import pytest
import torch

from moecompile.kernels import launch as kernel_launch
from moecompile.kernels.settings import configured, settings


def test_configured_changes_inside_and_restores_after():
    before = (settings.poison_buffers, settings.grouped_mm_min_rows)
    with pytest.raises(RuntimeError, match="inside"):
        with configured(poison_buffers=True, grouped_mm_min_rows=None):
            assert settings.poison_buffers is True and settings.grouped_mm_min_rows is None
            raise RuntimeError("inside")
    assert (settings.poison_buffers, settings.grouped_mm_min_rows) == before
    with pytest.raises(TypeError, match="unknown kernel settings \\['poison'\\]"):
        with configured(poison=True):
            pass


def test_poisoned_buffers_start_as_nan_or_a_huge_index():
    with configured(poison_buffers=True):
        floats = kernel_launch._empty(4, device=torch.device("cpu"), dtype=torch.float32)
        ints = kernel_launch._empty(4, device=torch.device("cpu"), dtype=torch.int32)
    assert floats.isnan().all() and (ints == 2**30).all()
