"""PLD, random-LTD and LRP gates on one model in one run, in GRAPH_MODE and PyNative, in either
wrapping order: it trains, keeps the model's tensor names, compiles one step per kept length,
prunes to the target, and resumes to the identical next loss."""
import numpy as np
import pytest
import mindspore as ms

from ms_prune import protocol
from ms_prune.engine import Trainer
from ms_prune.heads import LRP
from ms_prune.layer_drop import ProgressiveLayerDropping, convert_to_pld, pld_noise
from ms_prune.token_drop import RandomLTD, convert_to_random_ltd
from ms_prune.training import write_parameter

from .algorithm_settings import lm_batch, lm_loss, tiny_gpt2


def algorithms(order):
    ltd = RandomLTD(min_value=8, max_value=16, require_steps=4, seq_per_step=4)
    pld = ProgressiveLayerDropping(theta=0.5, gamma=0.1)
    lrp = LRP(target_heads=6, warmup_steps=3)
    return ([ltd, pld] if order == "ltd_first" else [pld, ltd]) + [lrp]


def run(order, steps, **kwargs):
    ms.set_seed(0)
    model = tiny_gpt2()
    trainer = Trainer(model, lm_loss, lm_batch, max_steps=steps, algorithms=algorithms(order), log_interval=0,
                      **kwargs)
    return model, trainer


@pytest.mark.parametrize("order", ["ltd_first", "pld_first"])
def test_pld_random_ltd_and_lrp_compose(order, mode):
    model, trainer = run(order, 6)
    names = sorted(n for n, _ in model.parameters_and_names())
    losses = [r["loss"] for r in trainer.fit()]
    assert np.all(np.isfinite(losses)) and len(set(losses)) > 1
    assert sum(model.heads_per_layer()) == 6
    ltd = trainer.state.algorithms[0 if order == "ltd_first" else 1]
    # kept lengths 8, 12, 16: one compiled step each (LRP prunes at FIT_END, after the last step)
    assert trainer.compilations == len(ltd.scheduler.distinct_lengths(6)) == 3
    gate_free = sorted(n for n, _ in model.parameters_and_names())
    assert gate_free == sorted(n for n in names if ".head_gate." not in n)


def test_composed_run_resumes_to_the_identical_next_loss(mode, tmp_path):
    _, first = run("ltd_first", 6, checkpoint_dir=str(tmp_path), checkpoint_interval=3)
    uninterrupted = [r["loss"] for r in first.fit()]
    _, resumed = run("ltd_first", 6, checkpoint_dir=str(tmp_path), resume_from=str(tmp_path / "step_3"))
    again = [r["loss"] for r in resumed.fit()]
    assert again[0] == uninterrupted[3], (again, uninterrupted)


def test_the_gate_penalty_does_not_depend_on_which_layers_ran():
    """LRP's L0 term is read from the gates, so a layer PLD skips keeps its gates' penalty."""
    ms.set_seed(0)
    model, trainer = run("ltd_first", 1)
    lrp = trainer.state.algorithms[2]
    gates = protocol.gates_of(model, "head")
    expected = sum(g.expected_open() for g in gates) / 12  # the plain penalty, normalised by the heads
    objective = lrp.objective
    objective.set_step(10 ** 6)  # the target reached
    target = float(objective.target.asnumpy())
    lambda_2 = 0.7
    objective.lambda_2.set_data(ms.Tensor(np.float32(lambda_2)))
    np.testing.assert_allclose(float(lrp.term().asnumpy()), lambda_2 * (expected - target) ** 2, rtol=1e-5)


@pytest.mark.parametrize("order", ["ltd_first", "pld_first"])
def test_composed_wrappers_follow_set_train(order, mode):
    """The inner wrapper is held by the outer one, not registered: set_train must still reach it,
    so both act in training and neither in evaluation (random-LTD inside PLD once never dropped a
    token on a fresh model, and after set_train(True) kept dropping during evaluation)."""
    ms.set_seed(0)
    model = tiny_gpt2()
    ids = ms.Tensor(lm_batch(0)[0])
    model.set_train(False)
    reference = model(ids).asnumpy()
    convert = [lambda: convert_to_random_ltd(model, kept_length=4),
               lambda: convert_to_pld(model, host_noise=True)]
    for step in (convert if order == "ltd_first" else convert[::-1]):
        step()
    protocol.refresh(model)
    noise = pld_noise(model)
    wrappers = [c for _, c in model.cells_and_names() if isinstance(c, protocol.LayerWrapper)]
    inner = [w.layer for w in wrappers if isinstance(w.layer, protocol.LayerWrapper)]
    assert len(inner) == 1 and inner[0] not in wrappers  # unregistered: what set_train must reach anyway

    def run(train, keep):
        write_parameter(noise, np.full(noise.shape, 0.0 if keep else 1.0, np.float32))  # 1.0: every layer drops
        model.set_train(train)
        assert all(w.training == train for w in wrappers + inner)
        return model(ids).asnumpy()

    np.testing.assert_array_equal(run(False, keep=False), reference)  # evaluation: every layer, every token
    assert not np.allclose(run(True, keep=True), reference, atol=1e-4)  # random-LTD drops tokens
    dropped = run(True, keep=False)  # PLD skips every layer: the drawn tokens do not matter
    np.testing.assert_array_equal(dropped, run(True, keep=False))
    assert not np.allclose(dropped, reference, atol=1e-4)
    np.testing.assert_array_equal(run(False, keep=False), reference)
