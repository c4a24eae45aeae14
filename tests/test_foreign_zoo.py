"""Every algorithm on three models nobody here wrote, in GRAPH_MODE and PyNative: a Qwen2-style
decoder with grouped-query attention and a derived ``num_key_value_groups`` (test_surgery.py), a
ViT-style encoder with a fused qkv projection and image inputs (test_surgery.py, its adapter
declaring the width it reshapes to), and a decoder whose rotary tables are ``(seq, head_dim)``
tensors computed once by the model and passed to every layer by keyword.

Per model: LRP's gated evaluation equals the pruned model after an unsaturated run (equal key/value
groups on GQA); GradNAS's pruned model equals the unpruned one with the removed units' output
columns zeroed, under its FLOPs budget; a random-LTD layer equals the plain layer run on the kept
tokens with their real positions, rotary rows and mask entries; PLD skips and scales layers; and
PLD + random-LTD + LRP compose under the Trainer and resume to the identical losses. LRP's check runs
inside the composed run: every Trainer compiles its own step, the bulk of this file's time."""
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.engine import Algorithm, Event, Trainer
from ms_prune.engine.trainer import ModelLoss
from ms_prune.gradnas import apply_gradnas
from ms_prune.heads import LRP
from ms_prune.layer_drop import ProgressiveLayerDropping, convert_to_pld, pld_noise
from ms_prune.protocol import LayerCall
from ms_prune.token_drop import RandomLTD, convert_to_random_ltd, token_draws
from ms_prune.training import write_parameter

from algorithms.algorithm_settings import classification_loss, lm_loss
from test_surgery import BATCH, DIM, HEADS, HIDDEN, KV_HEADS, SEQ, VOCAB, QwenModel, Vit, VitAdapter, qwen
from test_token_drop import top_positions


# ---- the rotary-table decoder: (seq, head_dim) cos/sin computed once, passed by keyword ----------
R_HIDDEN, R_HEADS, R_FFN, R_LAYERS, R_SEQ = HIDDEN, 4, 32, 2, 8
WIDTH = HIDDEN  # every model of the zoo: 32
R_DIM = R_HIDDEN // R_HEADS
PAD = 0


def rotary_tables(seq, dim):
    half = dim // 2
    angles = np.arange(seq)[:, None] / np.power(100.0, np.arange(half) / half)[None, :]
    angles = np.concatenate((angles, angles), 1).astype(np.float32)
    swap = np.zeros((dim, dim), np.float32)  # x @ swap = concat(-x2, x1)
    swap[half:, :half] = -np.eye(half)
    swap[:half, half:] = np.eye(half)
    return np.cos(angles), np.sin(angles), swap


class RopeAttention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.n_heads, self.head_dim = R_HEADS, R_DIM
        self.wq, self.wk, self.wv = (nn.Dense(R_HIDDEN, R_HIDDEN, has_bias=False) for _ in range(3))
        for dense in (self.wq, self.wk):  # sharp attention: which rotary rows a token gets shows in the output
            dense.weight.set_data(dense.weight * 6.0)
        self.wo = nn.Dense(R_HIDDEN, R_HIDDEN, has_bias=False)
        self.swap = Tensor(rotary_tables(1, R_DIM)[2])

    def split(self, dense, x):
        b, s = x.shape[0], x.shape[1]
        return dense(x).reshape(b, s, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, mask, cos, sin):
        # cos, sin: (seq, head_dim), or batched rows (b, 1, seq, head_dim): both broadcast
        q, k, v = self.split(self.wq, x), self.split(self.wk, x), self.split(self.wv, x)
        q = q * cos + ops.matmul(q, self.swap) * sin
        k = k * cos + ops.matmul(k, self.swap) * sin
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) / self.head_dim ** 0.5 + (1.0 - mask) * -1e4
        context = ops.matmul(ops.softmax(scores, -1), v).transpose(0, 2, 1, 3)
        return self.wo(context.reshape(x.shape[0], x.shape[1], -1))


class RopeLayer(nn.Cell):
    def __init__(self):
        super().__init__()
        self.ffn_dim = R_FFN
        self.norm1, self.norm2 = nn.LayerNorm((R_HIDDEN,)), nn.LayerNorm((R_HIDDEN,))
        self.attn = RopeAttention()
        self.w1, self.w2 = nn.Dense(R_HIDDEN, R_FFN), nn.Dense(R_FFN, R_HIDDEN)

    def construct(self, x, mask=None, cos=None, sin=None):
        x = x + self.attn(self.norm1(x), mask, cos, sin)
        return x + self.w2(ops.gelu(self.w1(self.norm2(x))))


class RopeNet(nn.Cell):
    def __init__(self):
        super().__init__()
        cos, sin, _ = rotary_tables(R_SEQ, R_DIM)
        self.cos, self.sin = Tensor(cos), Tensor(sin)
        self.causal = Tensor(np.tril(np.ones((R_SEQ, R_SEQ), np.float32)))  # 0/1, 1 = may attend
        self.embed = nn.Embedding(VOCAB, R_HIDDEN)
        self.layers = nn.CellList([RopeLayer() for _ in range(R_LAYERS)])
        self.norm = nn.LayerNorm((R_HIDDEN,))
        self.head = nn.Dense(R_HIDDEN, VOCAB)

    def construct(self, ids):
        b, s = ids.shape[0], ids.shape[1]
        # 0/1 (batch, 1, seq, seq): causal, and no token attends to padding (id 0)
        mask = self.causal[:s, :s].reshape(1, 1, s, s) * (ids != PAD).astype(ms.float32).reshape(b, 1, 1, s)
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask=mask, cos=cos, sin=sin)
        return self.head(self.norm(x))


class RopeAdapter(protocol.TransformerAdapter):
    layer_call = LayerCall(hidden=0, mask="mask", per_position=("cos", "sin"), position_axis=2)
    skippable_layers = True

    def layers(self):
        return self.model.layers

    def attention(self, layer):
        cell = self.model.layers[layer].attn
        return protocol.AttentionHeads(cell, "wo", R_DIM, cell.n_heads, query="wq", key="wk", value="wv",
                                       count_attributes={"n_heads": "heads"})

    def ffn(self, layer):
        cell = self.model.layers[layer]
        return protocol.FFNUnits(cell, "w1", "w2", cell.ffn_dim, count_attributes={"ffn_dim": "neurons"})


protocol.register_adapter(RopeNet, RopeAdapter)


# ---- the ViT of test_surgery, its adapter declaring the width its attention reshapes to --------
def vit_tokens(images, *targets):
    """The hidden states' (batch, seq): one token per 4x4 patch of the 8x8 images."""
    return images.shape[0], (images.shape[2] // 4) * (images.shape[3] // 4)


class DeclaredVitAdapter(VitAdapter):
    layer_call = LayerCall(hidden=0, mask=None, token_shape=vit_tokens)
    skippable_layers = True  # x + attn(norm1(x))

    def attention(self, layer):
        cell = self.model.blocks[layer].attn
        return protocol.AttentionHeads(cell, "proj", cell.dim // cell.num_heads, cell.num_heads, qkv="qkv",
                                       count_attributes={"num_heads": "heads", "dim": "width"})


@pytest.fixture(scope="module", autouse=True)
def vit_declares_its_width():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        protocol.register_adapter(Vit, DeclaredVitAdapter)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            protocol.register_adapter(Vit, VitAdapter)


# ---- the zoo ----------------------------------------------------------------------------------
def seeded(build):
    def make(seed=0):
        ms.set_seed(seed)
        return build()
    return make


def lm_data(seq):
    def batch(step):
        ids = np.random.default_rng(step).integers(1, VOCAB, (BATCH, seq + 1)).astype(np.int32)
        ids[1, :2] = PAD  # left padding (the rotary model masks it; the others take it as a token)
        return ids[:, :-1], ids[:, 1:]
    return batch


def image_batch(step):
    rng = np.random.default_rng(step)
    return rng.normal(size=(BATCH, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, BATCH).astype(np.int32)


ZOO = {
    # 2 layers of 4 query heads in 2 key/value groups: 3 heads = 1 + 2, so one layer keeps 2 of 4
    "gqa": SimpleNamespace(make=qwen, data=lm_data(SEQ), loss=lm_loss, seq=SEQ, target_heads=3,
                           ltd=dict(min_value=4, max_value=6, require_steps=8, seq_per_step=2, layer_ids=[1])),
    "vit": SimpleNamespace(make=seeded(Vit), data=image_batch, loss=classification_loss, seq=4, target_heads=5,
                           ltd=dict(min_value=2, max_value=4, require_steps=8, seq_per_step=2, layer_ids=[1])),
    "rope": SimpleNamespace(make=seeded(RopeNet), data=lm_data(R_SEQ), loss=lm_loss, seq=R_SEQ, target_heads=5,
                            ltd=dict(min_value=4, max_value=8, require_steps=8, seq_per_step=4, layer_ids=[1])),
}


@pytest.fixture(params=sorted(ZOO))
def zoo(request):
    return ZOO[request.param]


def evaluate(model, inputs):
    model.set_train(False)
    return model(*inputs).asnumpy()


def probe_inputs(entry):
    return (Tensor(entry.data(99)[0]),)


# ---- LRP ----------------------------------------------------------------------------------------
class GatedProbe(Algorithm):
    """At FIT_END, before LRP prunes (``*_END`` events run in reverse order), the gated model's
    evaluation output and the gates' evaluation values."""

    def __init__(self, inputs):
        self.inputs = inputs  # None: the gates alone (no evaluation graph to compile)

    def match(self, event, state):
        return event == Event.FIT_END

    def apply(self, event, state, logger):
        if self.inputs is not None:
            self.output = evaluate(state.model, self.inputs)
            state.model.set_train(True)
        self.gates = np.concatenate([g.raw_gate_values() for g in protocol.gates_of(state.model, "head")])


def check_equal_groups(model):
    """Each layer of the pruned GQA model keeps the same number of query heads in every key/value
    group it keeps, and its derived attributes and key projection say so."""
    for i, layer in enumerate(model.layers):
        cell, kept = layer.self_attn, protocol.adapter(model).attention(i).kept
        per_group = np.bincount(np.asarray(kept) // (HEADS // KV_HEADS), minlength=KV_HEADS)
        assert len(set(per_group[per_group > 0])) == 1, (i, kept)
        assert cell.num_key_value_heads == np.count_nonzero(per_group) and cell.num_heads == len(kept)
        assert cell.num_key_value_groups == per_group.max()
        assert tuple(cell.k_proj.weight.shape)[0] == cell.num_key_value_heads * DIM


# ---- GradNAS ------------------------------------------------------------------------------------
def zero_removed_units(model, heads, neurons):
    """The dense model with each removed head's output-projection input columns and each removed
    FFN neuron's output-projection column zeroed: what the pruned model must compute."""
    model_adapter = protocol.adapter(model)
    for layer, removed in heads.items():
        attention = model_adapter.attention(layer)
        weight = attention.output_projection().weight
        array = weight.asnumpy().copy()
        array[:, protocol.unit_columns(removed, attention.head_dim)] = 0.0
        write_parameter(weight, array)
    for layer, removed in neurons.items():
        weight = model_adapter.ffn(layer).output_projection().weight
        array = weight.asnumpy().copy()
        array[:, list(removed)] = 0.0
        write_parameter(weight, array)
    return model  # written in place: a graph compiled before sees them


def test_gradnas_pruned_model_equals_the_zeroed_reference_within_budget(zoo, mode):
    model, reference, inputs = zoo.make(0), zoo.make(0), probe_inputs(zoo)
    unpruned = evaluate(reference, inputs)
    before = protocol.adapter(model).forward_flops(zoo.seq)
    batches = [zoo.data(i) for i in range(2)]
    result = apply_gradnas(model, ModelLoss(model, zoo.loss, 1), batches, constraints={"flops": "60%"},
                           seq_len=zoo.seq)
    after = protocol.adapter(model).forward_flops(zoo.seq)
    assert after <= 0.6 * before and result["ratios"]["flops"] == after / before
    assert result["pruned_heads"], result  # heads went: the comparison below tests the surgery
    if protocol.adapter(model).ffns() is not None:
        assert result["pruned_neurons"], result
    expected = evaluate(zero_removed_units(reference, result["pruned_heads"], result["pruned_neurons"]), inputs)
    assert not np.allclose(expected, unpruned, atol=1e-4)  # zeroing them changes the output
    np.testing.assert_allclose(evaluate(model, inputs), expected, rtol=1e-5, atol=1e-5)


# ---- random-LTD ---------------------------------------------------------------------------------
class QwenLayerCall(nn.Cell):
    """Calls a layer as QwenModel does (keywords, hidden states out of the tuple)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, hidden, bias, positions):
        return self.layer(hidden, attention_bias=bias, position_ids=positions)[0]


class VitLayerCall(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, hidden):
        return self.layer(hidden)


class RopeLayerCall(nn.Cell):
    """Calls a layer as RopeNet does: the (seq, head_dim) tables by keyword."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, hidden, mask, cos, sin):
        return self.layer(hidden, mask=mask, cos=cos, sin=sin)


def layer_arguments(model, seq):
    """``(call Cell class, full arguments, kept_arguments(p))``: a layer's arguments as the model
    passes them, and as the kept tokens at positions ``p`` (batch, r) must see them (their real
    positions, their rows of the rotary tables, the mask among them)."""
    def among(mask, p):  # (b, 1, s, s) -> (batch, 1, r, r) at the kept positions
        mask = np.broadcast_to(mask, (BATCH,) + mask.shape[1:])
        return mask[np.arange(BATCH)[:, None, None], :, p[:, :, None], p[:, None, :]].transpose(0, 3, 1, 2)

    if isinstance(model, QwenModel):
        bias = np.triu(np.full((seq, seq), -1e9, np.float32), 1).reshape(1, 1, seq, seq)
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (BATCH, seq))
        return QwenLayerCall, (bias, positions), lambda p: (among(bias, p), p.astype(np.int32))
    if isinstance(model, Vit):
        return VitLayerCall, (), lambda p: ()
    valid = np.ones((BATCH, seq), np.float32)
    valid[1, :2] = valid[0, 3] = 0.0  # left padding, and a masked token inside a sequence
    mask = np.tril(np.ones((seq, seq), np.float32))[None, None] * valid[:, None, None, :]  # (b, 1, s, s)
    cos, sin, _ = rotary_tables(seq, R_DIM)
    return RopeLayerCall, (mask, cos, sin), lambda p: (among(mask, p), cos[p][:, None], sin[p][:, None])


def test_random_ltd_equals_the_layer_on_the_kept_tokens_at_their_positions(zoo, mode):
    model = zoo.make(0)
    layer = protocol.adapter(model).layers()[1]
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(BATCH, zoo.seq, WIDTH)).astype(np.float32)
    scores = rng.random((BATCH, zoo.seq)).astype(np.float32)
    kept = zoo.seq // 2
    p = top_positions(scores, kept)
    rows = np.arange(BATCH)[:, None]
    call, arguments, kept_arguments = layer_arguments(model, zoo.seq)

    wrappers = convert_to_random_ltd(model, layer_ids=[1], kept_length=kept, host_noise=True)
    draw = token_draws(wrappers)[0]
    draw.use_shape(BATCH, zoo.seq)
    write_parameter(draw.scores, scores)
    wrapped = call(wrappers[0])
    wrapped.set_train(True)
    out = wrapped(Tensor(hidden), *[Tensor(a) for a in arguments]).asnumpy()

    plain = call(layer)
    plain.set_train(True)

    def on_kept(kept_args):
        return plain(Tensor(hidden[rows, p]), *[Tensor(np.ascontiguousarray(a)) for a in kept_args]).asnumpy()

    expected = hidden.copy()
    expected[rows, p] = on_kept(kept_arguments(p))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    if arguments:  # the check can fail: positions (rotary rows) 0..r-1 instead of the kept tokens' own differ
        from_zero = kept_arguments(np.broadcast_to(np.arange(kept), (BATCH, kept)))
        wrong = on_kept(kept_arguments(p)[:1] + from_zero[1:])
        assert not np.allclose(wrong, expected[rows, p], atol=1e-3)
    else:  # without positions: the layer on every token differs on the kept ones, and evaluation runs it
        every = plain(Tensor(hidden)).asnumpy()
        assert not np.allclose(every[rows, p], expected[rows, p], atol=1e-3)
        wrapped.set_train(False)
        np.testing.assert_allclose(wrapped(Tensor(hidden)).asnumpy(), every, rtol=1e-5, atol=1e-5)


# ---- PLD ----------------------------------------------------------------------------------------
def test_pld_skips_and_scales_the_layers(zoo, mode):
    model, (ids,) = zoo.make(0), probe_inputs(zoo)
    model.set_train(True)
    plain = model(ids).asnumpy()  # compiled before the wrapping: the graph must be refreshed
    schedule = convert_to_pld(model, host_noise=True)
    noise = pld_noise(model)
    schedule.set_theta(1.0)  # every layer kept with p_l = 1: unscaled
    write_parameter(noise, np.zeros(noise.shape, np.float32))
    model.set_train(True)
    np.testing.assert_allclose(model(ids).asnumpy(), plain, rtol=1e-5, atol=1e-5)
    schedule.set_theta(0.5)  # kept with p_l < 1: each layer's change scaled by 1 / p_l
    scaled = model(ids).asnumpy()
    assert not np.allclose(scaled, plain, atol=1e-4)
    write_parameter(noise, np.ones(noise.shape, np.float32))  # every layer dropped
    dropped = model(ids).asnumpy()
    empty = zoo.make(0)  # what is left when no layer runs
    name = next(n for n, c in empty.name_cells().items() if c is protocol.adapter(empty).layers())
    setattr(empty, name, nn.CellList([]))
    protocol.refresh(empty)
    empty.set_train(True)
    np.testing.assert_allclose(dropped, empty(ids).asnumpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(dropped, scaled, atol=1e-4)


# ---- LRP, PLD and random-LTD together, with checkpoints ------------------------------------------
def composed_run(entry, steps, probe=None, **kwargs):
    ltd = RandomLTD(**entry.ltd)
    algorithms = [ltd, ProgressiveLayerDropping(theta=0.5, gamma=0.1),
                  LRP(target_heads=entry.target_heads, gate_lr=0.3)] + ([probe] if probe else [])
    model = entry.make(0)
    trainer = Trainer(model, entry.loss, entry.data, max_steps=steps, algorithms=algorithms, log_interval=0,
                      **kwargs)
    return model, trainer, ltd


def test_lrp_pld_and_random_ltd_compose_prune_as_evaluated_and_resume(zoo, mode, tmp_path):
    """One composed run per model and mode (each Trainer compiles its own step: the file's time):
    LRP's gated evaluation at FIT_END, after 4 steps whose gates have not saturated, equals the
    pruned model's; a run resumed from step 2 gives the identical losses and the same pruned model."""
    inputs = probe_inputs(zoo)
    probe = GatedProbe(inputs)
    model, first, ltd = composed_run(zoo, 4, probe, checkpoint_dir=str(tmp_path / "run"), checkpoint_interval=2)
    uninterrupted = [r["loss"] for r in first.fit()]
    assert np.all(np.isfinite(uninterrupted)) and len(set(uninterrupted)) == len(uninterrupted)
    # tokens dropped at every step, the steps after the resume included (one kept length: one step graph)
    assert ltd.scheduler.distinct_lengths(4) == [zoo.ltd["min_value"]] and zoo.ltd["min_value"] < zoo.seq
    assert first.compilations == 1

    assert np.any((probe.gates > 0.01) & (probe.gates < 0.99)), f"saturated gates test nothing: {probe.gates}"
    assert protocol.gates_of(model, "head") == [None] * len(protocol.adapter(model).layers())
    assert sum(protocol.adapter(model).heads_per_layer()) == zoo.target_heads
    pruned = evaluate(model, inputs)
    np.testing.assert_allclose(pruned, probe.output, rtol=1e-5, atol=1e-5)
    if isinstance(model, QwenModel):
        check_equal_groups(model)
        assert sorted(protocol.adapter(model).heads_per_layer()) == [1, 2]  # 3 = 1 + 2: a layer keeps 2 of 4

    # the same algorithms as the checkpoint's (the Trainer checks); no second evaluation graph
    resumed_model, resumed, _ = composed_run(zoo, 4, GatedProbe(None), checkpoint_dir=str(tmp_path / "resumed"),
                                             resume_from=str(tmp_path / "run" / "step_2"))
    again = [r["loss"] for r in resumed.fit()]
    assert again == uninterrupted[2:], (again, uninterrupted)
    assert protocol.adapter(resumed_model).heads_per_layer() == protocol.adapter(model).heads_per_layer()
    tensors = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    resumed_tensors = {n: p.asnumpy() for n, p in resumed_model.parameters_and_names()}
    assert sorted(resumed_tensors) == sorted(tensors)
    for name, value in tensors.items():  # the same pruned, trained model
        np.testing.assert_array_equal(resumed_tensors[name], value, err_msg=name)
