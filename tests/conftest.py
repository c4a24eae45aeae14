import os

import pytest

from ms_prune.training import set_context

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    """Run a test in GRAPH_MODE (how users train) and in PyNative."""
    set_context(request.param)
    yield request.param
    set_context("pynative")
