"""LRP head pruning of BERT and GPT-2: gated copies, gated training in both modes, copy/prune
equivalence, whole-layer pruning, targets and bad configurations."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.heads import apply_lrp, remove_lrp
from ms_prune.heads import (AbstractHeadPrunerLRP, HeadPrunerBertLRP, HeadPrunerGPTLRP, lrp_pruner,
                            make_gated_train_step, train_gated)
from ms_prune.models.bert import BertConfig, BertForSequenceClassification, BertModel
from ms_prune.models.gpt2 import GPT2LMHeadModel
from ms_prune.training import set_context

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    set_context(request.param, seed=3)
    yield request.param
    set_context("graph")


def bert_cls():
    return BertForSequenceClassification.from_pretrained(os.path.join(FIXTURES, "bert_tiny_cls"))


def gpt_lm():
    return GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, "gpt2_tiny_lm"))


def bert_inputs(rng, batch=3, seq=10):
    ids = rng.integers(0, 99, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, seq - 3:] = 0
    return Tensor(ids), Tensor(mask)


def first(outputs):
    return (outputs[0] if isinstance(outputs, tuple) else outputs).asnumpy()


def ce(logits, labels):
    return ops.cross_entropy(logits, labels)


def lm_ce(logits, labels):
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_import_paths():
    from ms_prune.models.bert import HeadPrunerBertLRP as bert_pruner
    from ms_prune.models.gpt2 import HeadPrunerGPTLRP as gpt_pruner
    assert bert_pruner is HeadPrunerBertLRP and gpt_pruner is HeadPrunerGPTLRP


def test_gates_on_the_top_model(mode):
    model = bert_cls()
    model.set_train(False)
    inputs = bert_inputs(np.random.default_rng(0))
    plain = model(*inputs).asnumpy()
    gates = apply_lrp(model, l0_penalty=0.5)
    np.testing.assert_array_equal(model(*inputs).asnumpy(), plain)  # gates start open (eval gate exactly 1)
    penalty = sum(float(g.get_penalty().asnumpy()) for g in gates)
    np.testing.assert_allclose(penalty, sum(0.5 * g.expected_open() for g in gates), rtol=1e-5)
    values = [g.gate_values() for g in gates]
    assert [v.shape for v in values] == [(4,), (4,)] and np.all(values[0] == 1.0)
    remove_lrp(model)
    assert protocol.gates_of(model, "head") == [None, None]
    np.testing.assert_array_equal(model(*inputs).asnumpy(), plain)


@pytest.mark.parametrize("make, pruner_cls", [(bert_cls, HeadPrunerBertLRP), (gpt_lm, HeadPrunerGPTLRP)])
def test_decorate_copies_every_tensor(make, pruner_cls):
    set_context("graph")
    model = make()
    pruner = pruner_cls(model)
    gated = pruner.decorate_model()
    assert gated is not model and type(gated) is type(model)
    source = dict(model.parameters_and_names())
    for name, param in gated.parameters_and_names():
        if ".head_gate." in name:  # the gates (log_a, decision and noise buffers) are new
            continue
        np.testing.assert_array_equal(param.asnumpy(), source[name].asnumpy())
        assert param is not source[name]


def test_uncopied_tensor_is_an_error():
    class LossyPruner(HeadPrunerBertLRP):
        def name_mapping(self, names):
            return {n: n for n in names if "pooler" not in n}

    with pytest.raises(ValueError, match="pooler"):
        LossyPruner(bert_cls()).decorate_model()


def close_some_gates(gated, log_as):
    for gate, log_a in zip(protocol.gates_of(gated, "head"), log_as):
        gate.set_log_a(log_a)


@pytest.mark.parametrize("backbone_only", [False, True])
def test_bert_pruned_equals_gated_eval(mode, backbone_only):
    model = BertModel.from_pretrained(os.path.join(FIXTURES, "bert_tiny_base")) if backbone_only else bert_cls()
    pruner = HeadPrunerBertLRP(model)
    gated = pruner.decorate_model()
    # open, half-open (folded into the output projection), and closed heads
    close_some_gates(gated, [[3.0, -3.0, 0.4, -0.1], [0.2, 2.0, -6.0, 1.0]])
    gated.set_train(False)
    inputs = bert_inputs(np.random.default_rng(1))
    want = first(gated(*inputs))
    pruned = pruner.prune_model(gated)
    assert pruned is model
    assert pruned.heads_per_layer() == [2, 3] and pruned.config.pruned_heads == {0: [1, 3], 1: [2]}
    pruned.set_train(False)
    np.testing.assert_allclose(first(pruned(*inputs)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first(gated(*inputs)), want, rtol=1e-6, atol=1e-6)


def test_gpt_whole_layer_pruned_equals_gated_eval_and_reloads(mode, tmp_path):
    model = gpt_lm()
    pruner = HeadPrunerGPTLRP(model)
    gated = pruner.decorate_model()
    close_some_gates(gated, [[-4.0, -4.0, -4.0, -4.0], [0.3, 3.0, -0.5, 5.0]])
    gated.set_train(False)
    ids = Tensor(np.random.default_rng(2).integers(0, 99, (2, 9)).astype(np.int32))
    want = first(gated(ids))
    pruned = pruner.prune_model(gated)
    assert pruned.heads_per_layer() == [0, 3]  # a whole layer closed
    pruned.set_train(False)
    np.testing.assert_allclose(pruned(ids).asnumpy(), want, rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(str(tmp_path))
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    reloaded.set_train(False)
    np.testing.assert_allclose(reloaded(ids).asnumpy(), want, rtol=1e-5, atol=1e-5)


def bert_toy(layers=2, heads=4):
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def toy_batches(seed, batch=16, seq=10):
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.integers(0, 40, (batch, seq)).astype(np.int32)
        yield ids, np.ones_like(ids), (ids[:, 3] % 3).astype(np.int32)


def test_gated_training_step_adds_penalty_and_updates_gate_group(mode):
    ms.set_seed(0)
    model = bert_toy()
    pruner = HeadPrunerBertLRP(model, l0_penalty=2.0)
    gated = pruner.decorate_model()
    groups = pruner.parameter_groups(gated, lr=1e-3, gate_lr=0.2)
    assert [g["lr"] for g in groups] == [1e-3, 0.2] and groups[1]["weight_decay"] == 0.0
    assert all(p.name.endswith("head_gate.log_a") for p in groups[1]["params"]) and len(groups[1]["params"]) == 2
    step = make_gated_train_step(pruner, gated, ce, lr=1e-3, gate_lr=0.2)
    batch = [Tensor(b) for b in next(toy_batches(0))]
    loss_cell = pruner.loss_cell(gated, ce)
    gated.set_train(False)
    logits = gated(*batch[:2])
    penalty = sum(g.get_penalty() for g in protocol.gates_of(gated, "head"))
    # normalised: the penalty is lambda times the expected FRACTION of open heads
    np.testing.assert_allclose(float(penalty.asnumpy()), 2.0 * pruner.gate_summary(gated)["expected_open"] / 8,
                               rtol=1e-5)
    np.testing.assert_allclose(float(loss_cell(*batch).asnumpy()),
                               float(ce(logits, batch[2]).asnumpy()) + float(penalty.asnumpy()), rtol=1e-5)
    before = [g.log_a.asnumpy().copy() for g in protocol.gates_of(gated, "head")]
    losses = [float(step(*batch).asnumpy()) for _ in range(4)]
    assert np.all(np.isfinite(losses))
    after = [g.log_a.asnumpy() for g in protocol.gates_of(gated, "head")]
    # the penalty pulls every gate shut; the gate lr (0.2, Adam) moves log_a visibly
    assert all(np.all(a < b - 0.1) for a, b in zip(after, before))


def test_target_is_reached_and_kept_exactly():
    # 80 steps: GRAPH_MODE only (PyNative runs ~15x slower here); both modes train in the tests
    # above and below.
    set_context("graph", seed=3)
    ms.set_seed(0)
    model = bert_toy(layers=3)
    pruner = HeadPrunerBertLRP(model, target_fraction=0.25, warmup_steps=30)
    assert pruner.target_heads == 3
    gated = pruner.decorate_model()
    history = train_gated(pruner, gated, ce, toy_batches(1), steps=80, lr=3e-3, gate_lr=0.1, log_every=10, log=None)
    assert history[0][3] > 6  # the target is approached, not jumped to
    expected_open = history[-1][3]
    assert abs(expected_open - 3) < 0.5, history
    assert float(pruner.objective.lambda_2.asnumpy()) > 0  # the multiplier rose by gradient ascent
    gated.set_train(False)
    inputs = [Tensor(b) for b in next(toy_batches(5))][:2]
    want = first(gated(*inputs))
    pruned = pruner.prune_model(gated)
    assert sum(pruned.heads_per_layer()) == 3
    pruned.set_train(False)
    np.testing.assert_allclose(first(gated(*inputs)), first(pruned(*inputs)), rtol=1e-5, atol=1e-5)
    assert np.abs(want - first(pruned(*inputs))).max() < 1.0  # the prune follows the trained gates


def test_gpt_gated_training_runs(mode):
    model = gpt_lm()
    pruner = lrp_pruner(model, target_heads=4, warmup_steps=3)
    assert isinstance(pruner, AbstractHeadPrunerLRP)
    gated = pruner.decorate_model()
    rng = np.random.default_rng(0)

    def batches():
        while True:
            ids = rng.integers(0, 99, (4, 9)).astype(np.int32)
            yield ids, np.roll(ids, -1, axis=1)

    history = train_gated(pruner, gated, lm_ce, batches(), steps=6, lr=1e-3, gate_lr=0.1, log_every=2, log=None)
    assert history[-1][3] < history[0][3] < 8
    assert sum(pruner.prune_model(gated).heads_per_layer()) == 4


def test_penalty_normalization_scales_with_model_size():
    small, large = bert_toy(layers=2), bert_toy(layers=4)
    for normalization, scale in (("heads", lambda n: 0.3 / n), ("none", lambda n: 0.3)):
        for model in (small, large):
            pruner = HeadPrunerBertLRP(model, l0_penalty=0.3, penalty_normalization=normalization)
            assert pruner.gate_l0_penalty == pytest.approx(scale(pruner.total_heads))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_heads=4, target_fraction=0.5), ValueError, "not both"),
    (dict(target_heads=0), ValueError, "target_heads"),
    (dict(target_heads=9), ValueError, "1..8"),
    (dict(target_heads=2.0), ValueError, "target_heads"),
    (dict(target_fraction=1.5), ValueError, "target_fraction"),
    (dict(penalty_normalization="layers"), ValueError, "penalty_normalization"),
    (dict(l0_penalty=-0.1), ValueError, "l0_penalty"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(threshold=1.5), ValueError, "threshold"),
])
def test_bad_configs(kwargs, error, match):
    with pytest.raises(error, match=match):
        HeadPrunerBertLRP(bert_toy(), **kwargs)


def test_wrong_models_and_ungated_prune():
    with pytest.raises(TypeError, match="does not declare the ms_prune model protocol"):
        lrp_pruner(nn.Dense(2, 2))
    model = bert_toy()
    pruner = HeadPrunerBertLRP(model)
    with pytest.raises(ValueError, match="not gated"):
        pruner.prune_model(bert_toy())
    with pytest.raises(ValueError, match="gate_lr"):
        pruner.parameter_groups(pruner.decorate_model(), lr=1e-3, gate_lr=0.0)
