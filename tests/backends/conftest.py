"""Fixtures of the backend tests."""
import pytest
import torch


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo's caches emptied before and after a test: each compiles from scratch, as a user's first call."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
