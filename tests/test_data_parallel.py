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
    return ranks(out_dir, phase if isinstance(phase, str) else phase[0])


def ranks(out_dir, phase):
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
    return out, launch(out, ["equal", "model_train"])  # one launch (model_train sets DATA_PARALLEL: last)


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


def test_algorithm_callback_under_model_train_data_parallel(equal_run, graph):
    """PLD and LRP through AlgorithmCallback in Model.train, parallel_mode=DATA_PARALLEL with
    gradients_mean=True, each worker on half of every global batch: the final weights (LRP pruned
    at the end) equal a single-process Model.train on the global batches."""
    out = equal_run[0]
    heads = [r["heads"] for r in ranks(out, "model_train")]
    assert heads[0] == heads[1]
    final = [dict(np.load(out / f"model_train_rank{r}.npz")) for r in (0, 1)]
    assert weights_relative(final[1], final[0]) == 0.0
    model = worker.model_train(dict(np.load(out / "model_train_init.npz")))
    assert heads[0] == model.heads_per_layer()
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


def test_the_train_command_under_msrun_equals_one_process(tmp_path, graph):
    """``ms-prune train RECIPE.yaml`` (the installed console script) as two msrun workers and in
    this process: the same losses, evaluation perplexity, pruned heads and saved weights; worker 0
    alone wrote the report and the model."""
    import sys
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from ms_prune import cli
    console_script = os.path.join(os.path.dirname(sys.executable), "ms-prune")
    if not os.path.isfile(console_script):
        pytest.skip("the ms-prune console script is not installed next to this Python (pip install .)")
    words = "the quick brown fox jumps over a lazy dog while wise owls watch the quiet river".split()
    rng = np.random.default_rng(0)
    (tmp_path / "train.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(80)))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "."] + sorted(set(words)))},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    def recipe(output):
        path = tmp_path / f"{output}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"type": "gpt2", "config": {"vocab_size": 32, "n_positions": 16, "n_embd": 32, "n_layer": 2,
                                                 "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                 "attn_pdrop": 0.0}},
            "data": {"train": str(tmp_path / "train.txt"), "eval": str(tmp_path / "train.txt"),
                     "tokenizer": str(tmp_path), "seq_len": 16, "batch_size": 4, "eval_batches": 2},
            "trainer": {"max_steps": 4, "lr": 0.003, "log_interval": 2, "checkpoint_interval": 2},
            "algorithms": {"pld": {"theta": 0.5, "gamma": 0.1}, "lrp": {"target_heads": 5, "warmup_steps": 2}},
            "output": str(tmp_path / output)}))
        return path

    run_two_workers(console_script, tmp_path, args=["train", recipe("two")])
    with open(tmp_path / "two" / "train_report.json") as f:
        two = json.load(f)
    one = cli.run(["train", str(recipe("one"))])
    assert (two["workers"], one["workers"]) == (2, 1)
    assert two["heads_per_layer"] == one["heads_per_layer"] and sum(one["heads_per_layer"]) == 5
    loss_error = relative([r["loss"] for r in two["history"]], [r["loss"] for r in one["history"]])
    perplexity_error = relative([two["history"][-1]["perplexity"]], [one["history"][-1]["perplexity"]])
    from ms_prune.models.gpt2 import GPT2LMHeadModel
    saved = worker.weights(GPT2LMHeadModel.from_pretrained(two["model"]))
    weight_error = weights_relative(saved, worker.weights(GPT2LMHeadModel.from_pretrained(one["model"])))
    print(f"ms-prune train: max relative difference, losses {loss_error:.2e}, perplexity {perplexity_error:.2e}, "
          f"weights {weight_error:.2e}")
    assert loss_error < TOLERANCE and perplexity_error < TOLERANCE and weight_error < TOLERANCE
