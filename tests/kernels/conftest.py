"""Fixtures of the kernel tests: poisoned buffers, and grouped_mm forced on."""
from __future__ import annotations

import pytest
from cases import record_calls

from moecompile.kernels.settings import settings


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels allocate starts as NaN (floats) or 2**30 (indices): an element no kernel wrote
    shows up in the output or as an out-of-range access."""
    monkeypatch.setattr(settings, "poison_buffers", True)


@pytest.fixture
def grouped_mm_always(monkeypatch):
    """Every call whose layout grouped_mm reads takes it (the row threshold off); yields the calls that did."""
    from moecompile.kernels import grouped

    monkeypatch.setattr(settings, "grouped_mm_min_rows", 0.0)
    taken = []
    record_calls(monkeypatch, grouped, "expert_rows", lambda *a: taken.append(a[2].shape[0]))
    return taken
