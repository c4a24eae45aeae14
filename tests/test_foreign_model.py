"""A transformer nobody here wrote, in MindSpore model_zoo style (``query_layer``/``key_layer``/
``value_layer`` ``nn.Dense`` cells, a 0/1 (batch, seq, seq) mask, keyword arguments including one
the algorithms know nothing about, rotary positions): every algorithm runs on it through a short
adapter, in GRAPH_MODE and PyNative, with no change to its code."""
import copy
import inspect
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.engine import Trainer
from ms_prune.gradnas import apply_gradnas, compute_scores
from ms_prune.heads import LRP, apply_lrp, lrp_pruner, prune_lrp
from ms_prune.heads.algorithm import write_lrp_decision
from ms_prune.layer_drop import convert_to_pld, pld_noise
from ms_prune.token_drop import convert_to_random_ltd, token_draws
from ms_prune.training import write_parameter

HIDDEN, HEADS, FFN, LAYERS, VOCAB, SEQ, BATCH = 16, 4, 24, 3, 32, 6, 2


# ---- the foreign model: written as MindSpore model_zoo writes its BERT, not on our classes ----
class ZooConfig:
    def __init__(self, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
                 num_hidden_layers=LAYERS, vocab_size=VOCAB):
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.intermediate_size, self.num_hidden_layers, self.vocab_size = (intermediate_size, num_hidden_layers,
                                                                           vocab_size)


def rotate(x, position_ids, size):
    inv_freq = Tensor(1.0 / np.power(10000.0, np.arange(0, size, 2, dtype=np.float32) / size))
    angles = position_ids.astype(ms.float32).expand_dims(-1) * inv_freq
    angles = ops.concat((angles, angles), -1).expand_dims(1)
    half = size // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * ops.cos(angles) + rotated * ops.sin(angles)


class ZooSelfAttention(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.size_per_head = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.size_per_head
        self.query_layer = nn.Dense(config.hidden_size, self.all_head_size)
        self.key_layer = nn.Dense(config.hidden_size, self.all_head_size)
        self.value_layer = nn.Dense(config.hidden_size, self.all_head_size)
        self.output_dense = nn.Dense(self.all_head_size, config.hidden_size)
        self.scores_mul = 1.0 / math.sqrt(float(self.size_per_head))

    def construct(self, from_tensor, attention_mask, position_ids):
        batch, seq = from_tensor.shape[0], from_tensor.shape[1]
        shape = (batch, seq, self.num_attention_heads, self.size_per_head)
        query = rotate(self.query_layer(from_tensor).reshape(shape).transpose(0, 2, 1, 3), position_ids,
                       self.size_per_head)
        key = rotate(self.key_layer(from_tensor).reshape(shape).transpose(0, 2, 1, 3), position_ids,
                     self.size_per_head)
        value = self.value_layer(from_tensor).reshape(shape).transpose(0, 2, 1, 3)
        scores = ops.matmul(query, key.transpose(0, 1, 3, 2)) * self.scores_mul
        adder = (1.0 - attention_mask.astype(ms.float32).expand_dims(1)) * -10000.0
        probs = ops.softmax(scores + adder, -1)
        context = ops.matmul(probs, value).transpose(0, 2, 1, 3).reshape(batch, seq, self.all_head_size)
        return self.output_dense(context)


class ZooEncoderCell(nn.Cell):
    """Pre-LN: x + attention(LN(x)), then + FFN(LN(.))."""

    def __init__(self, config):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.attention_norm = nn.LayerNorm((config.hidden_size,))
        self.attention = ZooSelfAttention(config)
        self.output_norm = nn.LayerNorm((config.hidden_size,))
        self.intermediate = nn.Dense(config.hidden_size, config.intermediate_size, activation="gelu")
        self.output_dense = nn.Dense(config.intermediate_size, config.hidden_size)

    def construct(self, hidden_states, attention_mask=None, batch_valid_length=None, position_ids=None):
        hidden_states = hidden_states + self.attention(self.attention_norm(hidden_states), attention_mask,
                                                       position_ids)
        return hidden_states + self.output_dense(self.intermediate(self.output_norm(hidden_states)))


class ZooModel(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.CellList([ZooEncoderCell(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm((config.hidden_size,))
        self.classifier = nn.Dense(config.hidden_size, 2)

    def construct(self, input_ids, input_mask):
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        # model_zoo's (batch, seq, seq) 0/1 mask, built from the (batch, seq) input mask
        attention_mask = ops.broadcast_to(input_mask.astype(ms.float32).expand_dims(1), (batch, seq, seq))
        position_ids = ops.broadcast_to(ops.arange(seq).astype(ms.int32).reshape(1, seq), (batch, seq))
        hidden = self.word_embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask, batch_valid_length=None,
                           position_ids=position_ids)
        return self.classifier(self.final_norm(hidden)[:, 0])


# ---- the adapter: all that ms_prune needs to know about it ------------------------------------
class ZooAdapter(protocol.TransformerAdapter):
    layer_call = protocol.LayerCall(hidden=0, mask="attention_mask", per_token="position_ids")
    skippable_layers = True  # pre-LN

    def layers(self):
        return self.model.layers

    def attention(self, layer):
        cell = self.model.layers[layer].attention
        return protocol.AttentionHeads(
            cell, "output_dense", cell.size_per_head, cell.num_attention_heads, query="query_layer",
            key="key_layer", value="value_layer", count_attributes={"num_attention_heads": "heads",
                                                                    "all_head_size": "width"})

    def ffn(self, layer):
        cell = self.model.layers[layer]
        return protocol.FFNUnits(cell, "intermediate", "output_dense", cell.intermediate_size,
                                 count_attributes={"intermediate_size": "neurons"})


protocol.register_adapter(ZooModel, ZooAdapter)


def adapter_lines():
    """Lines of the adapter and its registration (code only)."""
    source = inspect.getsource(ZooAdapter).splitlines() + ["protocol.register_adapter(ZooModel, ZooAdapter)"]
    return len([line for line in source if line.strip() and not line.strip().startswith("#")])


def make_model(seed=0):
    ms.set_seed(seed)
    np.random.seed(seed)
    return ZooModel(ZooConfig())


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, -2:] = 0  # padding in the second row
    return Tensor(ids), Tensor(mask), Tensor(rng.integers(0, 2, (BATCH,)).astype(np.int32))


def loss_fn(logits, labels):
    return ops.cross_entropy(logits, labels)


class LossNet(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids, mask, labels):
        return loss_fn(self.model(ids, mask), labels)


class CallLikeTheModel(nn.Cell):
    """Calls a layer with the model's keywords (as ZooModel does), from inside a graph."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, hidden, mask, positions):
        return self.layer(hidden, attention_mask=mask, batch_valid_length=None, position_ids=positions)


def evaluate(model, data):
    model.set_train(False)
    return model(*data[:2]).asnumpy()


def test_the_adapter_is_a_short_declaration():
    assert adapter_lines() <= 25, adapter_lines()
    assert protocol.adapter(make_model()).heads_per_layer() == [HEADS] * LAYERS


def test_lrp_gated_evaluation_equals_the_pruned_model(mode):
    model, data = make_model(), batch()
    gates = apply_lrp(model, host_noise=True).cells
    # parameter names are the model's own plus the gates'
    names = [name for name, _ in model.parameters_and_names()]
    assert "layers.0.attention.output_dense.weight" in names and "layers.0.attention.output_dense.head_gate.log_a" in names
    trainer = Trainer(model, loss_fn, lambda step: batch(step), max_steps=3, num_inputs=2, lr=1e-2, seed=0)
    trainer.fit()
    gates[0].set_log_a([4.0, -6.0, 2.0, 0.5])  # one head closed, the others open at several values
    gates[2].set_log_a([-6.0, -6.0, 3.0, 3.0])
    write_lrp_decision(model)
    protocol.refresh(model)
    gated = evaluate(model, data)
    removed = prune_lrp(model)
    assert removed == {0: [1], 2: [0, 1]}
    assert protocol.adapter(model).heads_per_layer() == [3, 4, 2]
    assert model.layers[2].attention.num_attention_heads == 2 and model.layers[2].attention.all_head_size == 8
    np.testing.assert_allclose(evaluate(model, data), gated, rtol=1e-5, atol=1e-6)
    assert not any(".head_gate." in name for name, _ in model.parameters_and_names())


def test_lrp_copy_train_prune_and_the_engine_algorithm(mode):
    model, data = make_model(), batch()
    pruner = lrp_pruner(model, target_heads=8)
    gated = pruner.decorate_model()
    step = nn.TrainOneStepCell(pruner.loss_cell(gated, loss_fn), pruner.optimizer(gated, 1e-3, 0.1))
    step.set_train(True)
    for i in range(3):
        pruner.set_step(i)
        step(*batch(i))
    gated.set_train(False)
    pruner.prune_model(gated)
    assert sum(protocol.adapter(model).heads_per_layer()) == 8
    np.testing.assert_allclose(evaluate(model, data), evaluate(gated, data), rtol=1e-5, atol=1e-6)

    engine_model = make_model(1)
    trainer = Trainer(engine_model, loss_fn, lambda step: batch(step), max_steps=3, num_inputs=2, lr=1e-3,
                      algorithms=[LRP(target_heads=6)], seed=0)
    trainer.fit()
    assert sum(protocol.adapter(engine_model).heads_per_layer()) == 6


def test_gradnas_scores_and_budget(mode):
    model, data = make_model(), batch()
    scores = compute_scores(model, LossNet(model), [batch(i) for i in range(2)])
    assert [len(h) for h in scores.heads] == [HEADS] * LAYERS and [len(n) for n in scores.neurons] == [FFN] * LAYERS
    assert all(np.all(h > 0) for h in scores.heads)
    before = protocol.adapter(model).num_parameters()
    result = apply_gradnas(model, constraints={"params": "70%"}, scores=scores)
    after = protocol.adapter(model).num_parameters()
    assert after <= 0.7 * before and result["after"]["params"] == after
    assert evaluate(model, data).shape == (BATCH, 2)  # the pruned model still runs in this mode
    flops = apply_gradnas(make_model(), LossNet(make_model()), [data], constraints={"flops": "80%"}, seq_len=SEQ,
                          refit=True)
    assert flops["ratios"]["flops"] <= 0.8


def test_random_ltd_gives_the_kept_tokens_their_real_positions_and_masks(mode):
    model, data = make_model(), batch()
    layer = model.layers[1]
    hidden = Tensor(np.random.default_rng(0).standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32))
    mask = ops.broadcast_to(data[1].astype(ms.float32).expand_dims(1), (BATCH, SEQ, SEQ))
    positions = ops.broadcast_to(ops.arange(SEQ).astype(ms.int32).reshape(1, SEQ), (BATCH, SEQ))
    wrappers = convert_to_random_ltd(model, layer_ids=[1], kept_length=3, host_noise=True)
    scores = np.array([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3], [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]], np.float32)
    draw = token_draws(wrappers)[0]
    draw.use_shape(BATCH, SEQ)
    write_parameter(draw.scores, scores)
    wrappers[0].set_train(True)
    call = CallLikeTheModel(wrappers[0])
    call.set_train(True)
    out = call(hidden, mask, positions).asnumpy()
    kept = np.sort(np.argsort(-scores, 1)[:, :3], 1)  # rows: [0, 2, 4] and [1, 3, 5]

    def run_on_kept(kept_positions):
        rows = np.arange(BATCH)[:, None]
        return CallLikeTheModel(layer)(
            Tensor(hidden.asnumpy()[rows, kept]), Tensor(mask.asnumpy()[rows[:, :, None], kept[:, :, None], kept[:, None, :]]),
            Tensor(kept_positions.astype(np.int32))).asnumpy()
    expected = hidden.asnumpy().copy()
    expected[np.arange(BATCH)[:, None], kept] = run_on_kept(kept)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # DeepSpeed's positions 0..r-1 would give another result: the check above can fail
    wrong = run_on_kept(np.broadcast_to(np.arange(3), (BATCH, 3)))
    assert not np.allclose(wrong, expected[np.arange(BATCH)[:, None], kept], atol=1e-3)
    # and a training step of the whole model runs through the wrapper
    trainer = Trainer(model, loss_fn, lambda step: batch(step), max_steps=2, num_inputs=2, lr=1e-3, seed=0)
    trainer.fit()


def test_pld_on_the_foreign_model_and_the_graph_is_refreshed(mode):
    model, data = make_model(), batch()
    model.set_train(True)
    before = model(*data[:2]).asnumpy()  # compiled (graph mode) before the wrapping
    schedule = convert_to_pld(model, host_noise=True)
    schedule.set_theta(0.5)
    write_parameter(pld_noise(model), np.ones((LAYERS,), np.float32))  # every layer dropped
    model.set_train(True)
    dropped = model(*data[:2]).asnumpy()
    reference = make_model()
    reference.layers = nn.CellList([])  # what is left when no layer runs
    protocol.refresh(reference)
    reference.set_train(True)
    np.testing.assert_allclose(dropped, reference(*data[:2]).asnumpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(dropped, before, atol=1e-4)  # a stale graph would have given `before`
    write_parameter(pld_noise(model), np.zeros((LAYERS,), np.float32))  # every layer kept
    assert not np.allclose(model(*data[:2]).asnumpy(), dropped, atol=1e-4)
    Trainer(model, loss_fn, lambda step: batch(step), max_steps=2, num_inputs=2, lr=1e-3, seed=0).fit()


def test_a_model_without_an_adapter_is_told_what_to_declare():
    class Bare(nn.Cell):
        def construct(self, x):
            return x
    with pytest.raises(TypeError, match="register_adapter"):
        protocol.adapter(Bare())
    with pytest.raises(ValueError, match="layer_class"):
        convert_to_random_ltd(Bare(), kept_length=2)


def test_generic_surgery_refuses_an_empty_layer_and_keeps_names():
    model = make_model()
    names = sorted(name for name, _ in model.parameters_and_names())
    with pytest.raises(ValueError, match="lose all its heads"):
        protocol.adapter(model).prune_heads({0: [0, 1, 2, 3]})
    protocol.adapter(model).prune_heads({0: [1]})
    protocol.adapter(model).prune_heads({0: [1, 2]})  # original numbering: 1 is already gone
    assert protocol.adapter(model).attention(0).kept == [0, 3]
    assert sorted(name for name, _ in model.parameters_and_names()) == names
    assert model.layers[0].attention.query_layer.weight.shape == (8, HIDDEN)
    with pytest.raises(ValueError, match="out of range"):
        protocol.adapter(model).prune_heads({0: [4]})
    copy.deepcopy(model.config)
