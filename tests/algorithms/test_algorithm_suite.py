"""The generic suite every algorithm passes (rows in ``algorithm_settings.py``), in GRAPH_MODE and
PyNative: it trains with a finite, changing loss; a checkpoint resumes to the identical next
loss; the functional form keeps the model's tensor names; its inverse restores the outputs; and
it runs under ``mindspore.train.Model.train`` or is refused there, naming the Trainer."""
import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model

from ms_prune.engine import AlgorithmCallback, Trainer
from ms_prune.engine.trainer import ModelLoss

from .algorithm_settings import ALGORITHM_SETTINGS

ROWS = sorted(ALGORITHM_SETTINGS)


def build(row, steps, **kwargs):
    ms.set_seed(0)
    s = ALGORITHM_SETTINGS[row]
    return Trainer(s["model"](), s["loss_fn"], s["data"], max_steps=steps, algorithms=[s["algorithm"]()],
                   log_interval=0, **kwargs)


_RUNS = {}  # (row, mode) -> the uninterrupted run both tests below check (one fit, not two)


@pytest.fixture
def uninterrupted(row, mode, tmp_path_factory):
    """(losses, engine trace, checkpoint folder) of the row's full run, with a checkpoint halfway."""
    if (row, mode) not in _RUNS:
        folder = tmp_path_factory.mktemp(f"{row}_{mode}")
        trainer = build(row, ALGORITHM_SETTINGS[row]["steps"], checkpoint_dir=str(folder),
                        checkpoint_interval=ALGORITHM_SETTINGS[row]["steps"] // 2)
        _RUNS[row, mode] = ([r["loss"] for r in trainer.fit()], list(trainer.engine.trace), folder)
    return _RUNS[row, mode]


@pytest.mark.parametrize("row", ROWS)
def test_trains_with_a_finite_changing_loss(row, mode, uninterrupted):
    losses, trace, _ = uninterrupted
    assert np.all(np.isfinite(losses)), losses
    assert len(set(losses)) > 1, losses
    assert any(event == "init" for _, event, _ in trace)


@pytest.mark.parametrize("row", ROWS)
def test_resume_gives_the_identical_next_loss(row, mode, uninterrupted):
    uninterrupted, _, folder = uninterrupted
    k = ALGORITHM_SETTINGS[row]["steps"] // 2
    resumed = build(row, ALGORITHM_SETTINGS[row]["steps"], checkpoint_dir=str(folder),
                    resume_from=str(folder / f"step_{k}"))
    assert resumed.state.step == k
    again = [r["loss"] for r in resumed.fit()]
    assert again[0] == uninterrupted[k], (again, uninterrupted)
    np.testing.assert_allclose(again, uninterrupted[k:], rtol=1e-5)


def eval_outputs(model, batch, num_inputs):
    model.set_train(False)
    outputs = model(*[Tensor(x) for x in batch[:num_inputs]])
    return (outputs[0] if isinstance(outputs, tuple) else outputs).asnumpy()


@pytest.mark.parametrize("row", ROWS)
def test_functional_form_keeps_names_and_its_inverse_restores_outputs(row, mode):
    s = ALGORITHM_SETTINGS[row]
    ms.set_seed(0)
    model = s["model"]()
    batch = s["data"](0)
    before = eval_outputs(model, batch, len(batch) - 1)
    names = {n: p for n, p in model.parameters_and_names()}
    s["apply"](model)
    after = dict(model.parameters_and_names())
    assert all(n in after and after[n] is p for n, p in names.items()), "the functional form renamed tensors"
    extra = sorted(set(after) - set(names))
    if s["adds_tensors"] is None:
        assert not extra, extra
    else:
        assert all(s["adds_tensors"](n) for n in extra), extra
    s["remove"](model)
    assert sorted(n for n, _ in model.parameters_and_names()) == sorted(names)
    np.testing.assert_allclose(eval_outputs(model, batch, len(batch) - 1), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sink", [False, True], ids=["no_sink", "sink"])
@pytest.mark.parametrize("row", ROWS)
def test_runs_under_model_train_or_is_refused(row, sink, mode):
    if sink and mode == "pynative":
        pytest.skip("dataset sinking is a GRAPH_MODE feature")
    s = ALGORITHM_SETTINGS[row]
    ms.set_seed(0)
    model = s["model"]()
    if not s["model_train"]:
        with pytest.raises(ValueError, match="Trainer"):
            AlgorithmCallback(model, [s["algorithm"]()])
        return
    callback = AlgorithmCallback(model, [s["algorithm"]()])
    loss_net = callback.loss_net(ModelLoss(model, s["loss_fn"], -1))
    optimizer = nn.AdamWeightDecay(callback.param_groups(), learning_rate=1e-3)
    batches = [s["data"](i) for i in range(s["steps"])]
    columns = [f"c{i}" for i in range(len(batches[0]))]
    dataset = ds.GeneratorDataset(batches, column_names=columns, shuffle=False)
    losses = []

    class Record(ms.train.Callback):
        def on_train_step_end(self, run_context):
            losses.append(float(run_context.original_args().net_outputs.asnumpy()))

    model.set_train(True)
    Model(network=nn.TrainOneStepCell(loss_net, optimizer)).train(
        1, dataset, callbacks=[callback, Record()], dataset_sink_mode=sink)
    assert losses and np.all(np.isfinite(losses)), losses
    starts = [e for _, e, _ in callback.engine.trace].count("batch_start")
    # an algorithm that only builds the loss (distillation) acts at INIT alone
    per_step = s.get("acts_per_step", True)
    if not sink:  # the algorithms acted between the steps of the one compiled graph
        assert len(losses) == s["steps"] and starts == (s["steps"] if per_step else 0), callback.engine.trace
    else:  # MindSpore calls back once per sink chunk
        assert starts >= 1 or not per_step, callback.engine.trace
