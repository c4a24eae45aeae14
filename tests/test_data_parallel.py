"""The Trainer under msrun (two CPU workers, GRAPH_MODE) equals a single-process run on the same
global batches: losses and final weights, for a plain model, with accumulation and clipping, and
for every row of the generic algorithm suite; a killed data-parallel run resumes to the
uninterrupted losses; AlgorithmCallback under Model.train in DATA_PARALLEL mode equals the
single-process Model.train. The workers are tests/dist_trainer_worker.py; the single-process
references run here, with the worker's own functions, from the weights worker 0 started with."""
import json
import os

import numpy as np
import pytest

import dist_trainer_worker as worker
from conftest import load_script, run_two_workers
from ms_prune.training import set_context

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_trainer_worker.py")
TOLERANCE = 1e-5


def launch(out_dir, phase):
    (out_dir / "phase.json").write_text(json.dumps({"phase": phase}))
    run_two_workers(WORKER, out_dir)
    return [json.loads((out_dir / f"{phase}_rank{r}.json").read_text()) for r in (0, 1)]


def relative(a, b):
    """max |a - b| / |b| elementwise, for losses."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def weights_relative(saved, reference):
    """max |a - b| over every weight, relative to the model's weight scale (max |b| over every
    weight). Not per tensor: a BERT key bias has a zero gradient in exact arithmetic, so its
    values are rounding noise (about 1e-8) that Adam's per-element normalisation turns into steps
    of its own, which no two summation orders share."""
    assert sorted(saved) == sorted(reference)  # the same surgery: the same tensors and shapes
    error = max(float(np.max(np.abs(saved[n].astype(np.float64) - reference[n]), initial=0.0)) for n in reference)
    scale = max(float(np.max(np.abs(reference[n]), initial=0.0)) for n in reference)
    return error / scale


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_parallel_equal")
    return out, launch(out, "equal")


@pytest.fixture
def graph():
    set_context("graph", seed=0)
    yield
    set_context("pynative")


CASES = worker.CASES
# one worker process runs this module: its tests share one msrun launch (equal_run)
pytestmark = pytest.mark.xdist_group("data_parallel")


@pytest.mark.parametrize("name", CASES)
def test_two_workers_equal_one_process(equal_run, graph, name):
    out, ranks = equal_run
    assert [r["size"] for r in ranks] == [2, 2]
    got = [r[name] for r in ranks]
    assert got[0]["share"] == got[1]["share"]
    assert [[s[0] * 2] + s[1:] for s in got[0]["share"]] == got[0]["global"]  # each worker took half the rows
    assert got[0]["rng"] == got[1]["rng"]  # the host draws were the same on both workers
    final = [dict(np.load(out / f"{name}_rank{r}.npz")) for r in (0, 1)]
    assert got[0]["losses"] == got[1]["losses"] and weights_relative(final[1], final[0]) == 0.0
    init = dict(np.load(out / f"{name}_init.npz"))
    trainer, losses = worker.train(name, init)
    reference = worker.weights(trainer.state.model)
    loss_error, weight_error = relative(got[0]["losses"], losses), weights_relative(final[0], reference)
    print(f"{name}: max relative difference, losses {loss_error:.2e}, weights {weight_error:.2e}")
    assert loss_error < TOLERANCE, (got[0]["losses"], losses)
    assert weight_error < TOLERANCE


def test_killed_run_resumes_to_the_uninterrupted_losses(tmp_path):
    """Two workers train with checkpoints every 2 steps and stop before step 4, as if killed
    (nothing saved after step 2); a second msrun launch resumes from 'latest' and gives the
    uninterrupted run's losses from step 3 on, bit for bit."""
    killed = launch(tmp_path, "kill")
    assert [r["stopped_at"] for r in killed] == [3, 3]
    uninterrupted = [r["uninterrupted"] for r in killed]
    assert uninterrupted[0] == uninterrupted[1]
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["latest", "step_2"]  # worker 0 alone wrote, nothing half-written
    resumed = launch(tmp_path, "resume")
    assert [r["resumed_at"] for r in resumed] == [2, 2]
    for rank in resumed:
        assert rank["resumed"] == uninterrupted[0][2:]


def test_algorithm_callback_under_model_train_data_parallel(tmp_path, graph):
    """PLD and LRP through AlgorithmCallback in Model.train, parallel_mode=DATA_PARALLEL with
    gradients_mean=True, each worker on half of every global batch: the final weights (LRP pruned
    at the end) equal a single-process Model.train on the global batches."""
    ranks = launch(tmp_path, "model_train")
    assert ranks[0]["heads"] == ranks[1]["heads"]
    final = [dict(np.load(tmp_path / f"model_train_rank{r}.npz")) for r in (0, 1)]
    assert weights_relative(final[1], final[0]) == 0.0
    model = worker.model_train(dict(np.load(tmp_path / "model_train_init.npz")))
    assert ranks[0]["heads"] == model.heads_per_layer()
    error = weights_relative(final[0], worker.weights(model))
    print(f"Model.train: max weight difference relative to the weight scale {error:.2e}")
    assert error < TOLERANCE


TINY_SAMPLE = """
model: {n_layer: 2, n_embd: 32, n_head: 4}
seq_len: 32
batch_size: 8
steps: 6
quick_steps: 6
lr: 0.002
algorithms:
  progressive_layer_drop: {theta: 0.5, gamma: 0.1}
  lrp: {target_heads: 6, warmup_steps: 3, gate_lr: 0.1}
eval_batches: 2
log_every: 2
seed: 0
"""


def test_sample_under_msrun_equals_one_process(tmp_path, graph):
    """samples/data_parallel.py (PLD + LRP, pruned at the end) as two msrun workers and in this
    process: the same losses, validation perplexity and pruned heads."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SAMPLE)
    argv = ["--quick", "--config", str(config), "--json"]
    (tmp_path / "phase.json").write_text(json.dumps({"phase": "sample", "argv": argv + [str(tmp_path / "two.json")]}))
    run_two_workers(WORKER, tmp_path)
    two = json.loads((tmp_path / "two.json").read_text())
    one = load_script("data_parallel").main(argv + [str(tmp_path / "one.json")])
    assert (two["workers"], one["workers"]) == (2, 1)
    assert two["heads_per_layer"] == one["heads_per_layer"] and sum(one["heads_per_layer"]) == 6
    loss_error = relative(two["losses"], one["losses"])
    perplexity_error = relative([two["perplexity"]], [one["perplexity"]])
    print(f"sample: max relative difference, losses {loss_error:.2e}, perplexity {perplexity_error:.2e}")
    assert loss_error < TOLERANCE and perplexity_error < TOLERANCE
