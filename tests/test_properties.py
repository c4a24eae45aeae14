"""Property tests (hypothesis): any head-pruning plan, applied in one call or several, computes
what the unpruned model computes with those heads' contexts masked to zero, and keeps doing so
after save/reload (compact) and after the dense Hugging Face export; any invalid plan is a named
error that changes nothing."""
import numpy as np
import pytest
import mindspore as ms
from hypothesis import HealthCheck, given, settings, strategies as st
from mindspore import Parameter, Tensor, nn, ops

from ms_prune import protocol
from ms_prune.models.bert import BertConfig, BertForSequenceClassification
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.training import set_context

LAYERS, HEADS = 3, 4
MODELS = {
    "bert": (BertForSequenceClassification,
             BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=24, max_position_embeddings=16, num_labels=3)),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=40, n_embd=16, n_layer=LAYERS, n_head=HEADS, n_positions=16)),
}
IDS = Tensor(np.random.default_rng(3).integers(0, 40, (2, 7)), ms.int32)
MASK = Tensor(np.array([[1] * 7, [1] * 5 + [0] * 2]), ms.int32)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class HeadMask(nn.Cell):
    """A fixed 0/1 per-head gate: the reference that multiplies pruned heads' contexts by 0."""

    def __init__(self, keep):
        super().__init__()
        self.mask = Parameter(Tensor(np.asarray(keep, np.float32).reshape(-1, 1)), requires_grad=False)

    def construct(self, context):
        return context * self.mask


def build(kind):
    cls, config = MODELS[kind]
    ms.set_seed(7)
    return cls(config.copy()).set_train(False)


def masked_reference(kind, removed):
    model = build(kind)
    protocol.attach_gates(model, "head",
                          lambda layer, _: HeadMask([h not in removed.get(layer, ()) for h in range(HEADS)]))
    return model(IDS, MASK).asnumpy()


# a plan: {layer: heads}, keys sometimes as JSON digit strings; several plans = repeated calls
plan = st.dictionaries(st.integers(0, LAYERS - 1), st.lists(st.integers(0, HEADS - 1), max_size=HEADS),
                       max_size=LAYERS)
keyed_plan = st.tuples(plan, st.booleans()).map(lambda p: {str(k) if p[1] else k: v for k, v in p[0].items()})
plans = st.lists(keyed_plan, min_size=1, max_size=3)
# plans that also empty a layer, so that case is always in the mix
plans_with_empty_layer = st.tuples(plans, st.integers(0, LAYERS - 1)).map(
    lambda p: p[0] + [{p[1]: list(range(HEADS))}])


def union(calls):
    removed = {}
    for call in calls:
        for layer, heads in call.items():
            removed.setdefault(int(layer), set()).update(heads)
    return removed


def check_plan(kind, calls, tmp_path):
    removed = union(calls)
    model = build(kind)
    for call in calls:
        model.prune_heads(call)
    assert model.heads_per_layer() == [HEADS - len(removed.get(i, ())) for i in range(LAYERS)]
    want = masked_reference(kind, removed)
    got = model(IDS, MASK).asnumpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    cls = MODELS[kind][0]
    model.save_pretrained(str(tmp_path / "compact"))
    reloaded = cls.from_pretrained(str(tmp_path / "compact")).set_train(False)
    np.testing.assert_array_equal(reloaded(IDS, MASK).asnumpy(), got)
    model.export_hf_dense(str(tmp_path / "dense"))
    dense = cls.from_pretrained(str(tmp_path / "dense")).set_train(False)
    assert dense.heads_per_layer() == [HEADS] * LAYERS
    np.testing.assert_allclose(dense(IDS, MASK).asnumpy(), want, atol=2e-5)


@pytest.fixture
def pynative():
    set_context("pynative")
    yield


@pytest.mark.parametrize("kind", sorted(MODELS))
@settings(max_examples=5, **SETTINGS)  # a forward costs ~0.5 s here: 4 per example
@given(calls=st.one_of(plans, plans_with_empty_layer))
def test_any_plan_equals_masked_heads_and_survives_save_and_export(pynative, tmp_path_factory, kind, calls):
    check_plan(kind, calls, tmp_path_factory.mktemp("plan"))


@pytest.mark.parametrize("kind", sorted(MODELS))
@settings(max_examples=1, **SETTINGS)
@given(calls=plans_with_empty_layer)
def test_any_plan_in_graph_mode(tmp_path_factory, kind, calls):
    set_context("graph")
    try:
        check_plan(kind, calls, tmp_path_factory.mktemp("plan"))
    finally:
        set_context("pynative")


# invalid plans: one bad entry among valid ones
bad_layer = st.one_of(st.integers(LAYERS, 100), st.integers(-100, -1), st.sampled_from(["x", "-1", "1.0", None, 1.5]),
                      st.integers(LAYERS, 100).map(str))
bad_head = st.one_of(st.integers(HEADS, 100), st.integers(-100, -1), st.sampled_from([True, 1.0, "2", None]))


@st.composite
def invalid_plans(draw):
    good = draw(plan)
    if draw(st.booleans()):
        layer = draw(bad_layer)
        return {**good, layer: draw(st.lists(st.integers(0, HEADS - 1), max_size=2))}, repr(layer if not
                                                                                             (isinstance(layer, str) and layer.isdigit()) else int(layer))
    layer = draw(st.integers(0, LAYERS - 1))
    head = draw(bad_head)
    return {**good, layer: draw(st.lists(st.integers(0, HEADS - 1), max_size=2)) + [head]}, repr(head)


@pytest.mark.parametrize("kind", sorted(MODELS))
@settings(max_examples=25, **SETTINGS)
@given(case=invalid_plans())
def test_any_invalid_plan_is_a_named_error_that_changes_nothing(pynative, kind, case):
    bad_plan, named = case
    model = build(kind)
    before = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    with pytest.raises((ValueError, TypeError)) as info:
        model.prune_heads(bad_plan)
    assert named in str(info.value), f"{info.value} does not name {named}"
    assert model.heads_per_layer() == [HEADS] * LAYERS and model.config.pruned_heads == {}
    assert all(np.array_equal(p.asnumpy(), before[n]) for n, p in model.parameters_and_names())
