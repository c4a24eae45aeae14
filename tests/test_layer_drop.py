"""Progressive layer dropping: the schedule against its formula, per-layer keep probabilities,
the 1/p scaling (unbiased in expectation), real skipping in GRAPH_MODE and PyNative, theta
changing inside a compiled step, save/restore, conversion errors and data parallelism."""
import json
import math
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_prune.engine import AlgorithmCallback, Trainer
from ms_prune.layer_drop import (PLDLayer, ProgressiveLayerDrop, ProgressiveLayerDropping, apply_progressive_layer_drop,
                                 convert_to_pld, expected_layers_run, keep_probabilities, pld_layers, pld_noise,
                                 pld_theta, remove_pld, remove_progressive_layer_drop)
from ms_prune.models.bert import BertConfig, BertForSequenceClassification, BertModel
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.training import LMLoss, make_train_step, set_context, write_parameter

from conftest import run_two_workers

# The device must be chosen before the first kernel runs (the schedule tests run ops eagerly).
set_context("pynative")

HERE = os.path.dirname(os.path.abspath(__file__))
BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, pre_layer_norm=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
GPT2 = dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)


def bert_model(**changes):
    ms.set_seed(0)
    return BertModel(BertConfig(**{**BERT, **changes}))


def ids(batch=2, seq=8, seed=1):
    return Tensor(np.random.default_rng(seed).integers(0, 50, (batch, seq)), ms.int32)


def runs(model):
    return np.array([int(layer.runs.asnumpy()) for layer in pld_layers(model)])


# ---- schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("theta_bar,gamma", [(0.5, 0.001), (0.2, 0.05), (1.0, 0.01)])
def test_schedule_follows_the_formula(theta_bar, gamma):
    pld = ProgressiveLayerDrop(theta=theta_bar, gamma=gamma)
    assert pld.get_theta() == 1.0
    assert pld.get_state() == {"progressive_layer_drop": True, "pld_theta": 1.0}
    previous = 1.0
    for step in (0, 1, 10, 100, 1000, 10000):
        pld.update_state(step)
        expected = (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar
        assert pld.get_theta() == pytest.approx(expected, rel=1e-12)
        assert pld.get_state()["pld_theta"] == pld.get_theta()
        assert float(pld.theta_parameter.asnumpy()) == pytest.approx(expected, rel=1e-6)
        assert theta_bar <= pld.get_theta() <= previous
        previous = pld.get_theta()
    assert pld_theta(10 ** 6, theta_bar, gamma) == pytest.approx(theta_bar)


@pytest.mark.parametrize("kwargs,error", [
    (dict(theta=0.0), ValueError), (dict(theta=-0.5), ValueError), (dict(theta=1.5), ValueError),
    (dict(theta=float("nan")), TypeError), (dict(theta="0.5"), TypeError), (dict(theta=True), TypeError),
    (dict(gamma=-0.001), ValueError), (dict(gamma=float("inf")), TypeError), (dict(gamma=None), TypeError)])
def test_bad_schedule_arguments_are_clear_errors(kwargs, error):
    with pytest.raises(error, match="theta" if "theta" in kwargs else "gamma"):
        ProgressiveLayerDrop(**kwargs)


@pytest.mark.parametrize("step,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_step_is_an_error(step, error):
    with pytest.raises(error, match="global_step"):
        ProgressiveLayerDrop().update_state(step)


def test_keep_probabilities_are_one_based():
    p = keep_probabilities(0.5, 12)
    assert p == pytest.approx([1.0 - (l / 12) * 0.5 for l in range(1, 13)])
    assert p[0] < 1.0  # the first layer can be dropped too (DeepSpeed never drops it)
    assert p[-1] == pytest.approx(0.5)  # the last layer is kept with probability theta
    assert expected_layers_run(0.5, 12) == pytest.approx(8.75)
    assert keep_probabilities(1.0, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="num_layers"):
        keep_probabilities(0.5, 0)


def test_state_dict_round_trip():
    pld = ProgressiveLayerDrop(theta=0.4, gamma=0.01)
    pld.update_state(123)
    state = json.loads(json.dumps(pld.state_dict()))  # survives a JSON checkpoint
    restored = ProgressiveLayerDrop()
    restored.load_state_dict(state)
    assert restored.state_dict() == pld.state_dict()
    assert restored.get_theta() == pld.get_theta()
    assert float(restored.theta_parameter.asnumpy()) == pytest.approx(pld.get_theta())
    restored.update_state(124)
    pld.update_state(124)
    assert restored.get_theta() == pld.get_theta()
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state_dict({"theta": 0.5})


def test_callback_follows_model_train_step_count():
    """As a mindspore Callback: Model.train numbers steps from 1 at on_train_step_begin."""
    class Args:
        cur_step_num = 11

    class Context:
        def original_args(self):
            return Args()

    pld = ProgressiveLayerDrop(theta=0.5, gamma=0.01)
    pld.on_train_step_begin(Context())
    assert pld.global_step == 10
    assert pld.get_theta() == pytest.approx(pld_theta(10, 0.5, 0.01))


# ---- the wrapper --------------------------------------------------------------------------------
def test_kept_layer_is_scaled_dropped_layer_is_skipped(mode):
    """Layer l=2 of L=4 at theta=0.2 keeps with p = 1 - 0.5 * 0.8 = 0.6: every training output is
    exactly x (and the in-branch counter does not move) or x + (layer(x) - x) / 0.6 (counter +1);
    evaluation always runs the layer unscaled."""
    model = bert_model()
    layer = model.encoder.layer[1]
    pld = ProgressiveLayerDrop()
    pld.set_theta(0.2)
    wrapped = PLDLayer(layer, 2, 4, pld.theta_parameter, seed=3, count_runs=True)
    x = Tensor(np.random.default_rng(0).normal(size=(2, 8, 32)).astype(np.float32))
    bias = Tensor(np.zeros((2, 1, 1, 8), np.float32))
    full = layer(x, bias).asnumpy()
    kept_output = x.asnumpy() + (full - x.asnumpy()) / 0.6
    wrapped.set_train(True)
    outcomes = []
    for _ in range(12):
        before = int(wrapped.runs.asnumpy())
        out = wrapped(x, bias)
        ran = int(wrapped.runs.asnumpy()) - before
        if ran:
            np.testing.assert_allclose(out.asnumpy(), kept_output, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(out.asnumpy(), x.asnumpy())
        outcomes.append(ran)
    assert 0 < sum(outcomes) < len(outcomes), outcomes
    wrapped.set_train(False)
    before = int(wrapped.runs.asnumpy())
    np.testing.assert_allclose(wrapped(x, bias).asnumpy(), full, rtol=1e-5, atol=1e-6)
    assert int(wrapped.runs.asnumpy()) == before


def test_keep_frequencies_match_p_and_output_is_unbiased():
    """Per-layer keep frequencies over many steps match p_l, and the mean training output of a
    layer matches its evaluation output (E[x + B * delta / p] = x + delta). GRAPH_MODE only: the
    draws are identical in PyNative (test_same_draws_in_both_modes), just slower to take."""
    set_context("graph")
    try:
        model = bert_model()
        pld = convert_to_pld(model, count_runs=True)
        pld.set_theta(0.1)
        model.set_train(True)
        data = ids()
        steps = 400
        for _ in range(steps):
            model(data)[0].asnumpy()
        p = np.array(keep_probabilities(0.1, 4))
        freq = runs(model) / steps
        sigma = np.sqrt(p * (1 - p) / steps)
        assert np.all(np.abs(freq - p) < 4.5 * sigma), (freq, p)
        # unbiased output of one layer (l=4: p = theta = 0.1, the hardest case)
        layer = pld_layers(model)[3]
        x = Tensor(np.random.default_rng(2).normal(size=(2, 8, 32)).astype(np.float32))
        bias = Tensor(np.zeros((2, 1, 1, 8), np.float32))
        total = np.zeros((2, 8, 32), np.float64)
        for _ in range(steps):
            total += layer(x, bias).asnumpy()
        layer.set_train(False)
        delta = layer(x, bias).asnumpy() - x.asnumpy()
        error = total / steps - x.asnumpy() - delta
        # the mean is x + delta * (kept / steps) / p: its relative error is binomial
        rel = np.abs(error).sum() / np.abs(delta).sum()
        assert rel < 4.5 * math.sqrt((1 - 0.1) / (0.1 * steps)), rel
    finally:
        set_context("pynative")


def test_same_draws_in_both_modes():
    """The keep decisions depend only on (seed, layer index): GRAPH_MODE and PyNative agree step by
    step, which is also what keeps data-parallel workers on one sub-network."""
    sequences = {}
    for mode in ("graph", "pynative"):
        set_context(mode)
        model = bert_model(num_hidden_layers=2)
        pld = convert_to_pld(model, seed=5, count_runs=True)
        pld.set_theta(0.3)
        model.set_train(True)
        seen, last = [], runs(model)
        for _ in range(8):
            model(ids())[0].asnumpy()
            now = runs(model)
            seen.append(tuple(now - last))
            last = now
        sequences[mode] = seen
    set_context("pynative")
    assert sequences["graph"] == sequences["pynative"]
    assert len(set(sequences["graph"])) > 1


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_dropped_layer_gets_no_update_and_theta_changes_inside_a_compiled_step(mode, family):
    """One compiled train step (make_train_step) keeps running while theta moves: at theta ~ 0 the
    last layer (p_L = theta) is skipped, so its weights do not move (SGD, no decay) and its in-branch
    counter stays; at theta = 1 every layer runs and is updated."""
    ms.set_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**{**BERT, "num_hidden_layers": 2}))
        loss_net = nn.WithLossCell(model, nn.CrossEntropyLoss())
        batch = (ids(), Tensor(np.array([0, 1], np.int32)))
    else:
        model = GPT2LMHeadModel(GPT2Config(**GPT2))
        loss_net = LMLoss(model)
        batch = (ids(), ids(seed=2))
    pld = convert_to_pld(model, seed=1, count_runs=True)
    model.set_train(True)
    optimizer = nn.SGD(model.trainable_params(), learning_rate=0.1)
    step = make_train_step(loss_net, optimizer)
    last = pld_layers(model)[-1]

    def last_weights():
        return [p.asnumpy().copy() for p in last.trainable_params()]

    pld.set_theta(1e-7)
    for _ in range(3):
        before, count = last_weights(), int(last.runs.asnumpy())
        assert np.isfinite(float(step(*batch).asnumpy()))
        assert int(last.runs.asnumpy()) == count
        for a, b in zip(before, last_weights()):
            np.testing.assert_array_equal(a, b)
    pld.set_theta(1.0)
    before = last_weights()
    counts = runs(model)
    step(*batch)
    assert np.all(runs(model) == counts + 1)
    assert any(not np.array_equal(a, b) for a, b in zip(before, last_weights()))


def test_layers_still_drop_under_recomputation():
    """DeepSpeed silently turns PLD off under activation checkpointing. Here recomputing the
    wrappers leaves the drops and the losses exactly as without it."""
    set_context("graph")
    try:
        results = {}
        for how in ("none", "wrapper"):
            ms.set_seed(0)
            model = BertForSequenceClassification(BertConfig(**BERT))
            pld = convert_to_pld(model, seed=3, count_runs=True)
            pld.set_theta(0.3)
            for layer in pld_layers(model):
                if how == "wrapper":
                    layer.recompute()
            model.set_train(True)
            step = nn.TrainOneStepCell(nn.WithLossCell(model, nn.CrossEntropyLoss()),
                                       nn.SGD(model.trainable_params(), 0.1))
            step.set_train(True)
            losses = [float(step(ids(4, 12), Tensor(np.array([0, 1, 0, 1], np.int32))).asnumpy()) for _ in range(4)]
            results[how] = (losses, runs(model).tolist())
        assert 0 < sum(results["none"][1]) < 4 * 4  # layers were dropped
        assert results["wrapper"] == results["none"]
    finally:
        set_context("pynative")


# ---- conversion ---------------------------------------------------------------------------------
def test_post_ln_bert_is_refused():
    with pytest.raises(ValueError, match="post-LN.*pre_layer_norm=True"):
        convert_to_pld(bert_model(pre_layer_norm=False))


def test_bad_conversions_are_clear_errors():
    with pytest.raises(TypeError, match="does not declare the ms_prune model protocol"):
        convert_to_pld(nn.Dense(3, 3))
    model = bert_model()
    with pytest.raises(TypeError, match="ProgressiveLayerDrop"):
        convert_to_pld(model, pld=0.5)
    convert_to_pld(model)
    with pytest.raises(ValueError, match="already converted"):
        convert_to_pld(model)
    pld = ProgressiveLayerDrop()
    layer = model.encoder.layer[0].layer
    with pytest.raises(ValueError, match="1-based"):
        PLDLayer(layer, 0, 4, pld.theta_parameter)
    with pytest.raises(TypeError, match="theta Parameter"):
        PLDLayer(layer, 1, 4, 0.5)
    with pytest.raises(ValueError, match="already wrapped"):
        PLDLayer(model.encoder.layer[0], 1, 4, pld.theta_parameter)


def test_conversion_keeps_checkpoints_and_eval_outputs(tmp_path):
    """Wrapping renames nothing and adds no tensor: a converted model saves a checkpoint that a
    plain model loads strictly, with the same evaluation outputs; remove_pld gives the layers back."""
    model = bert_model()
    names = [name for name, _ in model.parameters_and_names()]
    model.set_train(False)
    reference = model(ids())[0].asnumpy()
    convert_to_pld(model)
    assert [name for name, _ in model.parameters_and_names()] == names
    assert len(model.attention_layers()) == 4  # the zoo's accessors still see through the wrappers
    model.set_train(False)
    np.testing.assert_allclose(model(ids())[0].asnumpy(), reference, rtol=1e-5, atol=1e-6)
    model.save_pretrained(str(tmp_path))
    plain = BertModel.from_pretrained(str(tmp_path))
    plain.set_train(False)
    np.testing.assert_allclose(plain(ids())[0].asnumpy(), reference, rtol=1e-5, atol=1e-6)
    remove_pld(model)
    assert not pld_layers(model)
    assert [name for name, _ in model.parameters_and_names()] == names


# ---- data parallelism ---------------------------------------------------------------------------
def test_data_parallel_two_workers(tmp_path):
    """msrun, two CPU workers with different data: both draw the same keep decisions each step,
    losses are finite and fall, and the parameters end identical (gradients were all-reduced:
    without the all-reduce, different data would give different weights)."""
    run_two_workers(os.path.join(HERE, "dist_pld_worker.py"), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["size"] == 2
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    decisions = np.array(ranks[0]["decisions"])
    assert 0 < decisions.sum() < decisions.size  # some layers were really dropped
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the workers saw different data
    np.testing.assert_allclose(ranks[0]["fingerprint"], ranks[1]["fingerprint"], rtol=1e-6)
    for rank in ranks:
        assert np.all(np.isfinite(rank["losses"]))
        assert rank["losses"][-1] < rank["losses"][0]


# ---- host noise and the engine ------------------------------------------------------------------
def test_host_noise_decides_which_layers_run(mode):
    """With host noise, layer l runs exactly when noise[l - 1] < p_l: the written uniforms, not an
    in-graph kernel, decide. The noise is not a parameter of the model."""
    model = bert_model()
    names = [name for name, _ in model.parameters_and_names()]
    pld = convert_to_pld(model, count_runs=True, host_noise=True)
    assert [name for name, _ in model.parameters_and_names()] == names
    pld.set_theta(0.5)  # p = [0.875, 0.75, 0.625, 0.5]
    model.set_train(True)
    noise = pld_noise(model)
    for uniforms, expected in (([0.9, 0.1, 0.7, 0.4], [0, 1, 0, 1]), ([0.0, 0.8, 0.6, 0.6], [1, 0, 1, 0]),
                               ([0.9, 0.1, 0.7, 0.4], [0, 1, 0, 1])):
        write_parameter(noise, uniforms)
        before = runs(model)
        model(ids())[0].asnumpy()
        assert (runs(model) - before).tolist() == expected


def test_functional_form_and_argument_errors():
    model = bert_model(num_hidden_layers=2)
    schedule = apply_progressive_layer_drop(model, theta=0.4, gamma=0.01, seed=3).schedule
    assert isinstance(schedule, ProgressiveLayerDrop) and schedule.theta_bar == 0.4
    assert len(pld_layers(model)) == 2 and pld_noise(model) is None  # in-graph draws by default
    remove_progressive_layer_drop(model)
    assert not pld_layers(model)
    with pytest.raises(ValueError, match="no PLD layers"):
        remove_progressive_layer_drop(model)
    with pytest.raises(ValueError, match=r"apply_progressive_layer_drop: theta must be in \(0.0, 1.0\]"):
        apply_progressive_layer_drop(model, theta=0.0)
    with pytest.raises(ValueError, match="ProgressiveLayerDropping: gamma"):
        ProgressiveLayerDropping(gamma=-1.0)
    with pytest.raises(TypeError, match="ProgressiveLayerDropping: theta"):
        ProgressiveLayerDropping(theta="0.5")
    algorithm = ProgressiveLayerDropping(theta=0.5, gamma=0.01)
    with pytest.raises(ValueError, match="differs"):
        algorithm.load_state_dict(ProgressiveLayerDrop(theta=0.3, gamma=0.01).state_dict())


def classification_batch(step):
    rng = np.random.default_rng(step % 3)
    inputs = rng.integers(0, 50, (4, 8)).astype(np.int32)
    return inputs, (inputs[:, 0] % 2).astype(np.int32)


def pld_trainer(max_steps, checkpoint_dir, **kwargs):
    ms.set_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**BERT, "num_hidden_layers": 3}))
    algorithm = ProgressiveLayerDropping(theta=0.3, gamma=0.5)
    trainer = Trainer(model, nn.CrossEntropyLoss(), classification_batch, max_steps, algorithms=[algorithm],
                      lr=1e-2, log_interval=0, checkpoint_dir=checkpoint_dir, **kwargs)
    return trainer, algorithm


def test_algorithm_under_trainer_trains_and_resumes_exactly(mode, tmp_path):
    """Under the Trainer theta follows the schedule and the keep draws are the run's RNG draws, so
    a run resumed from its step-3 checkpoint gives the uninterrupted run's losses."""
    trainer, algorithm = pld_trainer(6, str(tmp_path), checkpoint_interval=3)
    losses = [record["loss"] for record in trainer.fit()]
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)
    assert algorithm.schedule.get_theta() == pytest.approx(pld_theta(5, 0.3, 0.5))
    assert float(algorithm.schedule.theta_parameter.asnumpy()) == pytest.approx(pld_theta(5, 0.3, 0.5), rel=1e-6)
    rng = np.random.default_rng(0)  # the Trainer's seed: one uniform per layer per step
    uniforms = [rng.random(3) for _ in range(6)][-1]
    np.testing.assert_allclose(pld_noise(trainer.state.model).asnumpy(), uniforms, rtol=1e-6)
    assert pld_layers(trainer.state.model)  # FIT_END leaves the wrappers

    resumed, _ = pld_trainer(6, str(tmp_path / "resumed"), resume_from=str(tmp_path / "step_3"))
    assert [record["loss"] for record in resumed.fit()] == losses[3:]


def train_with_model_train(seed, steps=4):
    """Model.train (non-sink) of a 2-layer pre-LN BERT with PLD through AlgorithmCallback(seed)."""
    import mindspore.dataset as ds
    from mindspore.train import Callback, Model
    ms.set_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**BERT, "num_hidden_layers": 2}))
    algorithm = ProgressiveLayerDropping(theta=0.3, gamma=0.5)
    callback = AlgorithmCallback(model, [algorithm], seed=seed)
    assert len(pld_layers(model)) == 2
    losses = []

    class Record(Callback):
        def on_train_step_end(self, run_context):
            losses.append(float(run_context.original_args().net_outputs.asnumpy()))

    data = ds.GeneratorDataset([classification_batch(t) for t in range(steps)], ["ids", "labels"], shuffle=False)
    trainer = Model(model, nn.CrossEntropyLoss(), nn.AdamWeightDecay(model.trainable_params(), 1e-3))
    trainer.train(1, data, callbacks=[callback, Record()], dataset_sink_mode=False)
    return losses, algorithm, callback, model


def test_algorithm_under_model_train_callback(mode):
    """In mindspore's Model.train (one compiled graph for the run), AlgorithmCallback writes theta
    and the keep draws before every step, and the compiled graph follows them: the same run with
    another seed (same weights, same data) drops other layers and gives other losses."""
    losses, algorithm, callback, model = train_with_model_train(seed=1)
    assert algorithm.schedule.global_step == 3
    assert float(algorithm.schedule.theta_parameter.asnumpy()) == pytest.approx(pld_theta(3, 0.3, 0.5), rel=1e-6)
    rng = np.random.default_rng(1)
    np.testing.assert_allclose(pld_noise(model).asnumpy(), [rng.random(2) for _ in range(4)][-1], rtol=1e-6)
    assert [event for _, event, _ in callback.engine.trace].count("batch_start") == 4
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert train_with_model_train(seed=2)[0] != losses


def test_wrapper_passes_further_inputs_to_a_llama_layer(mode):
    """A layer with a third input (Llama's position_ids) gets it through the wrapper: with host
    noise 0 the layer runs (scaled by 1/p), with noise 1 it is skipped."""
    from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
    ms.set_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    layer = model.transformer_layers()[1]
    pld = ProgressiveLayerDrop()
    pld.set_theta(0.5)  # p_2 = 0.5
    noise = ms.Parameter(Tensor(np.zeros(2, np.float32)), name="noise", requires_grad=False)
    wrapped = PLDLayer(layer, 2, 2, pld.theta_parameter, noise=noise)
    x = Tensor(np.random.default_rng(0).normal(size=(2, 8, 16)).astype(np.float32))
    bias = Tensor(np.zeros((2, 1, 8, 8), np.float32))
    positions = Tensor(np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8)).copy())
    full = layer(x, bias, positions).asnumpy()
    wrapped.set_train(True)
    np.testing.assert_allclose(wrapped(x, bias, positions).asnumpy(), x.asnumpy() + (full - x.asnumpy()) / 0.5,
                               rtol=1e-4, atol=1e-5)
    write_parameter(noise, [1.0, 1.0])
    np.testing.assert_array_equal(wrapped(x, bias, positions).asnumpy(), x.asnumpy())
