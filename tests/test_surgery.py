"""The one head surgery on models nobody here wrote: a Qwen2-style decoder with grouped-query
attention and a derived ``num_key_value_groups``, and a ViT-style encoder whose attention reshapes
to its original width. Equal key/value groups, derived attributes updated, declarations checked
before use, and a probe forward after every surgery that restores the model when its own code
cannot follow."""
import math
import warnings

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.gradnas import apply_gradnas
from ms_prune.heads import apply_lrp

HIDDEN, HEADS, KV_HEADS, DIM, FFN, LAYERS, VOCAB, SEQ, BATCH = 32, 4, 2, 8, 24, 2, 40, 6, 2


# ---- a Qwen2-style decoder: GQA, q/k/v biases, rotary positions by keyword, SwiGLU, tuple output ----
def rotate(x, position_ids):
    inv_freq = Tensor(1.0 / np.power(10000.0, np.arange(0, DIM, 2, dtype=np.float32) / DIM))
    angles = position_ids.astype(ms.float32).expand_dims(-1) * inv_freq
    angles = ops.concat((angles, angles), -1).expand_dims(1)
    rotated = ops.concat((-x[..., DIM // 2:], x[..., :DIM // 2]), -1)
    return x * ops.cos(angles) + rotated * ops.sin(angles)


class QwenAttention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.num_heads, self.num_key_value_heads = HEADS, KV_HEADS
        self.num_key_value_groups = HEADS // KV_HEADS  # derived: the surgery must keep it right
        self.q_proj = nn.Dense(HIDDEN, HEADS * DIM)
        self.k_proj = nn.Dense(HIDDEN, KV_HEADS * DIM)
        self.v_proj = nn.Dense(HIDDEN, KV_HEADS * DIM)
        self.o_proj = nn.Dense(HEADS * DIM, HIDDEN, has_bias=False)

    def construct(self, x, bias, position_ids):
        b, s = x.shape[0], x.shape[1]
        q = rotate(self.q_proj(x).reshape(b, s, self.num_heads, DIM).transpose(0, 2, 1, 3), position_ids)
        k = rotate(self.k_proj(x).reshape(b, s, self.num_key_value_heads, DIM).transpose(0, 2, 1, 3), position_ids)
        v = self.v_proj(x).reshape(b, s, self.num_key_value_heads, DIM).transpose(0, 2, 1, 3)
        k = ops.repeat_interleave(k, self.num_key_value_groups, 1)
        v = ops.repeat_interleave(v, self.num_key_value_groups, 1)
        probs = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(DIM) + bias, -1)
        context = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, self.num_heads * DIM)
        return self.o_proj(context)


class QwenLayer(nn.Cell):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm((HIDDEN,))
        self.self_attn = QwenAttention()
        self.post_attention_layernorm = nn.LayerNorm((HIDDEN,))
        self.gate_proj = nn.Dense(HIDDEN, FFN, has_bias=False)
        self.up_proj = nn.Dense(HIDDEN, FFN, has_bias=False)
        self.down_proj = nn.Dense(FFN, HIDDEN, has_bias=False)

    def construct(self, hidden, attention_bias=None, position_ids=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), attention_bias, position_ids)
        x = self.post_attention_layernorm(hidden)
        return hidden + self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x)), ops.zeros((), ms.float32)


class QwenModel(nn.Cell):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.CellList([QwenLayer() for _ in range(LAYERS)])
        self.norm = nn.LayerNorm((HIDDEN,))
        self.lm_head = nn.Dense(HIDDEN, VOCAB, has_bias=False)

    def construct(self, input_ids):
        s = input_ids.shape[1]
        causal = Tensor(np.triu(np.full((SEQ, SEQ), -1e9, np.float32), 1))[:s, :s].reshape(1, 1, s, s)
        positions = ops.broadcast_to(ops.arange(s).astype(ms.int32).reshape(1, s), (input_ids.shape[0], s))
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_bias=causal, position_ids=positions)[0]
        return self.lm_head(self.norm(hidden))


class QwenAdapter(protocol.TransformerAdapter):
    layer_call = protocol.LayerCall(hidden=0, mask="attention_bias", per_token="position_ids", outputs=2)
    skippable_layers = True

    def layers(self):
        return self.model.layers

    def attention(self, layer):
        cell = self.model.layers[layer].self_attn
        return protocol.AttentionHeads(cell, "o_proj", DIM, cell.num_heads, query="q_proj", key="k_proj",
                                       value="v_proj", num_kv_heads=cell.num_key_value_heads,
                                       count_attributes={"num_heads": "heads", "num_key_value_heads": "kv_heads",
                                                         "num_key_value_groups": "groups"})

    def ffn(self, layer):
        cell = self.model.layers[layer]
        return protocol.FFNUnits(cell, ("gate_proj", "up_proj"), "down_proj", cell.gate_proj.weight.shape[0],
                                 count_attributes={})


protocol.register_adapter(QwenModel, QwenAdapter)


def qwen(seed=0):
    ms.set_seed(seed)
    return QwenModel()


def ids(seed=0):
    return Tensor(np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))


def logits(model, data):
    model.set_train(False)
    return model(data).asnumpy()


def zeroed(model, heads_removed):
    """The dense model with the removed query heads' o_proj columns zeroed: what pruning must compute."""
    for layer, heads in heads_removed.items():
        o_proj = model.layers[layer].self_attn.o_proj
        weight = o_proj.weight.asnumpy().copy()
        weight[:, protocol.unit_columns(heads, DIM)] = 0.0
        o_proj.weight.set_data(Tensor(weight))
    protocol.refresh(model)
    return model


@pytest.mark.parametrize("plan", [{0: [0, 1]}, {0: [1, 3], 1: [0, 1]}, {0: [0, 2], 1: [2, 3]}])
def test_grouped_query_heads_pruned_to_equal_groups(mode, plan):
    """Whole key/value groups and heads within groups; the derived group size follows."""
    data = ids()
    expected = logits(zeroed(qwen(), plan), data)
    model = qwen()
    logits(model, data)  # a graph compiled before the surgery must not run after it
    protocol.adapter(model).prune_heads(plan)
    np.testing.assert_allclose(logits(model, data), expected, atol=1e-5)
    for layer, attention in enumerate(model.layers):
        cell = attention.self_attn
        kept = HEADS - len(plan.get(layer, []))
        assert cell.num_heads == kept and cell.num_key_value_heads * cell.num_key_value_groups == kept
        assert tuple(cell.k_proj.weight.shape) == (cell.num_key_value_heads * DIM, HIDDEN)


def test_unequal_groups_are_refused_before_anything_changes():
    model, data = qwen(), ids()
    before = logits(model, data)
    with pytest.raises(ValueError, match="layer 1 would keep unequal numbers of query heads"):
        protocol.adapter(model).prune_heads({0: [0, 1], 1: [0]})  # layer 0 alone would be fine
    assert protocol.adapter(model).heads_per_layer() == [HEADS] * LAYERS
    np.testing.assert_array_equal(logits(model, data), before)


def test_gradnas_on_grouped_query_attention_keeps_equal_groups_and_runs(mode):
    model, data = qwen(), ids()
    labels = Tensor(np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))

    class LMLoss(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, input_ids, targets):
            out = self.net(input_ids)
            return ops.cross_entropy(out.reshape(-1, VOCAB), targets.reshape(-1))

    result = apply_gradnas(model, LMLoss(model), [(data, labels)] * 2, constraints={"flops": "40%"}, seq_len=SEQ)
    assert result["ratios"]["flops"] <= 0.4
    for layer in model.layers:
        cell = layer.self_attn
        assert cell.num_heads == 0 or cell.num_heads == cell.num_key_value_heads * cell.num_key_value_groups
    assert np.all(np.isfinite(logits(model, data)))  # the model's own forward follows the new shapes


def test_declarations_are_checked_when_an_algorithm_is_applied():
    class WrongWidth(QwenAdapter):
        def attention(self, layer):
            heads = super().attention(layer)
            heads.num_heads = heads.count = 3  # 3 x 8 is not q_proj's 32 outputs
            return heads

    class WrongPath(QwenAdapter):
        def attention(self, layer):
            cell = self.model.layers[layer].self_attn
            return protocol.AttentionHeads(cell, "out_proj", DIM, HEADS, query="q_proj", key="k_proj",
                                           value="v_proj", num_kv_heads=KV_HEADS)

    class Indivisible(QwenAdapter):
        def attention(self, layer):
            heads = super().attention(layer)
            heads.num_kv_heads = 3
            return heads

    for adapter_class, match in ((WrongWidth, r"'q_proj' has 32 output features, but num_heads x head_dim = 24"),
                                 (WrongPath, r"WrongPath.attention\(.*\) is not a valid declaration.*out_proj"),
                                 (Indivisible, "num_kv_heads 3 does not divide num_heads 4")):
        model = qwen()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            protocol.register_adapter(QwenModel, adapter_class)
        try:
            with pytest.raises(ValueError, match=match):
                apply_lrp(model)
            assert not any(protocol.gates_of(model, "head") if adapter_class is not WrongPath else [])
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                protocol.register_adapter(QwenModel, QwenAdapter)


def test_registering_a_second_adapter_for_a_class_warns():
    class Other(QwenAdapter):
        pass

    with pytest.warns(UserWarning, match="Other replaces QwenAdapter as the adapter of QwenModel"):
        protocol.register_adapter(QwenModel, Other)
    with pytest.warns(UserWarning, match="QwenAdapter replaces Other"):
        protocol.register_adapter(QwenModel, QwenAdapter)


# ---- a ViT-style encoder whose attention reshapes to the width it was built with ------------------
class VitAttention(nn.Cell):
    def __init__(self, dim=HIDDEN, heads=HEADS):
        super().__init__()
        self.dim, self.num_heads = dim, heads  # timm keeps C as the input's width
        self.qkv = nn.Dense(dim, 3 * dim)
        self.proj = nn.Dense(dim, dim)

    def construct(self, x):
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        probs = ops.softmax(ops.matmul(qkv[0], qkv[1].transpose(0, 1, 3, 2)), -1)
        return self.proj(ops.matmul(probs, qkv[2]).transpose(0, 2, 1, 3).reshape(b, n, self.dim))


class VitBlock(nn.Cell):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm((HIDDEN,))
        self.attn = VitAttention()

    def construct(self, x):
        return x + self.attn(self.norm1(x))


class Vit(nn.Cell):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Dense(3 * 4 * 4, HIDDEN)
        self.blocks = nn.CellList([VitBlock() for _ in range(LAYERS)])
        self.head = nn.Dense(HIDDEN, 3)

    def construct(self, images):
        b = images.shape[0]
        patches = images.reshape(b, 3, 2, 4, 2, 4).transpose(0, 2, 4, 1, 3, 5).reshape(b, 4, 48)
        x = self.patch_embed(patches)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class VitAdapter(protocol.TransformerAdapter):
    layer_call = protocol.LayerCall(hidden=0, mask=None)

    def layers(self):
        return self.model.blocks

    def attention(self, layer):
        cell = self.model.blocks[layer].attn
        return protocol.AttentionHeads(cell, "proj", HIDDEN // HEADS, cell.num_heads, qkv="qkv",
                                       count_attributes={"num_heads": "heads"})


protocol.register_adapter(Vit, VitAdapter)


def test_surgery_the_model_cannot_follow_is_undone_and_named(mode):
    ms.set_seed(0)
    model = Vit()
    images = Tensor(np.random.default_rng(0).normal(size=(BATCH, 3, 8, 8)).astype(np.float32))
    model.set_train(False)
    before = model(images).asnumpy()
    protocol.remember_inputs(model, (images,))
    names = sorted(n for n, _ in model.parameters_and_names())
    with pytest.raises(protocol.SurgeryError) as info:
        protocol.adapter(model).prune_heads({0: [1]})
    message = str(info.value)
    assert "reshape(b, n, self.dim)" in message and "test_surgery.py" in message, message
    assert "restored" in message and "count_attributes" in message
    # restored: the same heads, tensors, names and outputs
    assert protocol.adapter(model).heads_per_layer() == [HEADS] * LAYERS
    assert tuple(model.blocks[0].attn.qkv.weight.shape) == (3 * HIDDEN, HIDDEN)
    assert sorted(n for n, _ in model.parameters_and_names()) == names
    model.set_train(False)
    np.testing.assert_array_equal(model(images).asnumpy(), before)


def test_a_declared_width_lets_the_same_model_be_pruned(mode):
    class WidthAdapter(VitAdapter):
        def attention(self, layer):
            cell = self.model.blocks[layer].attn
            return protocol.AttentionHeads(cell, "proj", HIDDEN // HEADS, cell.num_heads, qkv="qkv",
                                           count_attributes={"num_heads": "heads", "dim": "width"})

    ms.set_seed(0)
    model = Vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        protocol.register_adapter(Vit, WidthAdapter)
    try:
        protocol.remember_inputs(model, (np.zeros((1, 3, 8, 8), np.float32),))
        protocol.adapter(model).prune_heads({0: [1], 1: [0, 3]})
        assert protocol.adapter(model).heads_per_layer() == [3, 2] and model.blocks[1].attn.dim == 16
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            protocol.register_adapter(Vit, VitAdapter)
