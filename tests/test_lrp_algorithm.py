"""LRP as an engine algorithm: one decision in the log, in evaluation and in pruning at any point
of training (after a short run whose gates have not saturated), in GRAPH_MODE and PyNative."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from ms_prune import protocol
from ms_prune.engine import Algorithm, Event, Trainer
from ms_prune.heads import LRP, apply_lrp, prune_lrp
from ms_prune.heads.algorithm import write_lrp_decision
from ms_prune.models.bert import BertConfig, BertForSequenceClassification

CONFIG = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)


def data(step):
    ids = np.random.default_rng(step).integers(0, 60, (8, 12)).astype(np.int32)
    return ids, (ids[:, 0] % 3).astype(np.int32)


def classification_loss(logits, labels):
    return ops.cross_entropy(logits, labels)


PROBE_IDS = Tensor(data(99)[0])


class GatedProbe(Algorithm):
    """At FIT_END, before LRP prunes (``*_END`` events run in reverse order and this one comes after
    LRP in the list), records the gated model's evaluation output and LRP's open-head count."""

    def __init__(self, lrp):
        self.lrp = lrp

    def match(self, event, state):
        return event == Event.FIT_END

    def apply(self, event, state, logger):
        state.model.set_train(False)
        self.output = state.model(PROBE_IDS).asnumpy()
        state.model.set_train(True)
        self.summary = self.lrp.summary(state.model)
        self.gates = [g.raw_gate_values() for g in protocol.gates_of(state.model, "head")]


# AdamWeightDecay (no bias correction) moves log_a by about 3 x gate_lr per early step, from 3.66
# (gate exactly 1): two penalty steps leave the gates near 0.84, open but not saturated.
@pytest.mark.parametrize("kwargs,steps", [(dict(target_heads=3, warmup_steps=3), 5), (dict(l0_penalty=2.0), 2)])
def test_gated_evaluation_equals_the_pruned_model_before_the_gates_saturate(kwargs, steps, mode):
    ms.set_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    lrp = LRP(gate_lr=0.3, **kwargs)
    probe = GatedProbe(lrp)
    Trainer(model, classification_loss, data, max_steps=steps, algorithms=[lrp, probe], log_interval=0).fit()
    gates = np.concatenate(probe.gates)
    assert np.any((gates > 0.01) & (gates < 0.99)), f"the gates saturated; the test needs open questions: {gates}"
    model.set_train(False)
    np.testing.assert_allclose(model(PROBE_IDS).asnumpy(), probe.output, rtol=1e-5, atol=1e-5)
    assert sum(model.heads_per_layer()) == probe.summary["open"]
    if "target_heads" in kwargs:
        assert probe.summary["open"] == 3


def test_functional_form_prunes_what_evaluation_shows(mode):
    ms.set_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    gates = apply_lrp(model).cells
    for i, gate in enumerate(gates):  # an arbitrary point of training: log_a spread around the threshold
        gate.set_log_a(np.random.default_rng(i).normal(0.0, 1.5, gate.num_heads))
    keep = write_lrp_decision(model, target_heads=5)
    assert sum(len(k) for k in keep) == 5
    model.set_train(False)
    gated = model(PROBE_IDS).asnumpy()
    removed = prune_lrp(model, target_heads=5)
    assert sum(model.heads_per_layer()) == 5 and sum(len(v) for v in removed.values()) == 3
    assert protocol.gates_of(model, "head") == [None] * len(model.attention_layers())
    np.testing.assert_allclose(model(PROBE_IDS).asnumpy(), gated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target_heads=2, target_fraction=0.5), ValueError, "not both"),
    (dict(target_heads=0), ValueError, "target_heads"), (dict(target_fraction=1.5), ValueError, "target_fraction"),
    (dict(gate_lr=0), ValueError, "gate_lr"), (dict(prune_at_step="10"), TypeError, "prune_at_step"),
    (dict(penalty_normalization="layers"), ValueError, "penalty_normalization")])
def test_lrp_arguments_are_checked_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        LRP(**kwargs)


def test_a_target_above_the_model_heads_is_refused_at_init():
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    with pytest.raises(ValueError, match="at most the model's 8 heads"):
        Trainer(model, classification_loss, data, max_steps=1, algorithms=[LRP(target_heads=9)])


def test_model_train_callback_refuses_prune_at_step_when_built():
    from ms_prune.engine import AlgorithmCallback
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    with pytest.raises(ValueError, match=r"LRP: prune_at_step=2 removes heads in the middle of the run.*Trainer"):
        AlgorithmCallback(model, [LRP(target_heads=3, prune_at_step=2)])
    assert protocol.gates_of(model, "head") == [None, None]  # refused before any gate went on
    AlgorithmCallback(model, [LRP(target_heads=3)])  # pruning after Model.train ends is fine


class Heads:
    """What ``decide_heads`` reads of a layer's ``protocol.AttentionHeads``."""

    def __init__(self, num_heads, num_kv_heads):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads


def equal_groups(kept, num_heads, num_kv_heads):
    size = num_heads // num_kv_heads
    counts = [len([p for p in kept if p // size == g]) for g in range(num_kv_heads)]
    return len({c for c in counts if c}) <= 1


def best_by_enumeration(log_as, heads, total, allow_empty):
    """The best total log_a over every per-layer subset with equal groups (exhaustive)."""
    import itertools
    per_layer = []
    for log_a, h in zip(log_as, heads):
        subsets = [s for r in range(h.num_heads + 1) for s in itertools.combinations(range(h.num_heads), r)
                   if equal_groups(s, h.num_heads, h.num_kv_heads) and (allow_empty or s)]
        per_layer.append(subsets)
    best = -np.inf
    for choice in itertools.product(*per_layer):
        if sum(len(s) for s in choice) == total:
            best = max(best, sum(log_a[list(s)].sum() for log_a, s in zip(log_as, choice)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("allow_empty", [False, True])
def test_grouped_decision_is_the_best_with_equal_groups(seed, allow_empty):
    from ms_prune.heads import ConcreteGate, decide_heads
    heads = [Heads(4, 2), Heads(6, 3), Heads(4, 4)]
    rng = np.random.default_rng(seed)
    gates = [ConcreteGate(h.num_heads) for h in heads]
    for gate in gates:
        gate.set_log_a(rng.normal(0.0, 2.0, gate.num_heads))
    log_as = [g.log_a.asnumpy().astype(np.float64) for g in gates]
    for target in (3, 5, 9):
        keep = decide_heads(gates, heads, target, allow_empty=allow_empty)
        assert sum(len(k) for k in keep) == target
        assert all(equal_groups(k, h.num_heads, h.num_kv_heads) and (allow_empty or k) for k, h in zip(keep, heads))
        np.testing.assert_allclose(sum(a[k].sum() for a, k in zip(log_as, keep)),
                                   best_by_enumeration(log_as, heads, target, allow_empty), rtol=1e-9)


def test_threshold_decision_on_grouped_heads_keeps_open_heads_in_equal_groups():
    from ms_prune.heads import ConcreteGate, decide_heads
    gate = ConcreteGate(6)  # 3 key/value groups of 2: [0, 1], [2, 3], [4, 5]
    gate.set_log_a([3.0, 2.0, 1.0, -5.0, -5.0, -5.0])  # heads 0, 1, 2 open
    # 3 open heads: one per group would need a closed head from group 3, so the largest equal set of
    # open heads is 2: a whole group (3 + 2) beats one head in each of two groups (3 + 1)
    assert decide_heads([gate], [Heads(6, 3)]) == [[0, 1]]
    gate.set_log_a([3.0, -5.0, 2.5, 1.0, -5.0, -5.0])  # heads 0, 2, 3 open: [0] + [2] beats [2, 3]
    assert decide_heads([gate], [Heads(6, 3)]) == [[0, 2]]
    gate.set_log_a([-5.0, -4.0, -6.0, -5.0, -5.0, -5.0])  # all closed: empty, or the best single head
    assert decide_heads([gate], [Heads(6, 3)], allow_empty=True) == [[]]
    assert decide_heads([gate], [Heads(6, 3)], allow_empty=False) == [[1]]
    # plain multi-head attention: exactly the open heads
    assert decide_heads([gate], [Heads(6, 6)], allow_empty=True) == [[]]
    gate.set_log_a([3.0, -5.0, 2.5, 1.0, -5.0, -0.5])  # -0.5: formula value 0.35, closed
    assert decide_heads([gate], [Heads(6, 6)]) == [[0, 2, 3]]
