"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _quant_tests_one_thread(request):
    """The quantizer tests use small tensors: one torch thread avoids waiting on a busy second core (17x slower
    under load). Other tests keep the default."""
    if not request.module.__name__.rsplit(".", 1)[-1].startswith("test_quant_"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
