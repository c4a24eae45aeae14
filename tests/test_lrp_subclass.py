"""A model written on our base classes (``PreTrainedCell``, ``HeadPrunableAttention``) declares the
model protocol with two methods (``transformer_layers``, and ``heads`` on its attention) and gets LRP
with no pruner of its own: here a small transformer defined in this file. (A model not on our
classes: tests/test_foreign_model.py.)"""
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.heads import AbstractHeadPrunerLRP, train_gated
from ms_prune.models.modeling_utils import (HeadPrunableAttention, LayerNorm, Linear, PreTrainedCell,
                                            PretrainedConfig, slice_input_projection, slice_output_projection)
from ms_prune.training import set_context


class TinyConfig(PretrainedConfig):
    model_type = "tiny"
    defaults = dict(vocab_size=30, width=16, heads=4, layers=2, num_labels=2, pruned_heads={})


class TinyAttention(HeadPrunableAttention):
    def __init__(self, config, kept_heads):
        super().__init__(config.heads, config.width // config.heads, kept_heads, 0.0)
        inner = self.num_heads * self.head_dim
        self.qkv = Linear(config.width, 3 * inner)
        self.out = Linear(inner, config.width)

    def construct(self, x, bias):
        if self.num_heads == 0:  # every head pruned: the projection leaves its bias
            return self.out(x)
        inner = self.num_heads * self.head_dim
        qkv = self.qkv(x)
        context = self.attend(qkv[:, :, :inner], qkv[:, :, inner:2 * inner], qkv[:, :, 2 * inner:],
                              bias, x.shape[0], x.shape[1])
        return self.out(context)

    def heads(self):
        return protocol.AttentionHeads(self, "out", self.head_dim, self.num_heads, qkv="qkv",
                                       kept_heads=self.kept_heads)

    def _slice_projections(self, positions):
        columns = self.head_columns(positions)
        inner = self.num_heads * self.head_dim
        self.qkv = slice_input_projection(self.qkv, np.concatenate([columns, columns + inner, columns + 2 * inner]),
                                          "linear")
        self.out = slice_output_projection(self.out, columns, "linear")


class TinyEncoder(PreTrainedCell):
    config_class = TinyConfig
    skippable_layers = False  # its blocks are post-norm

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.CellList([TinyAttention(config, [h for h in range(config.heads)
                                                          if h not in config.pruned_heads.get(i, [])])
                                   for i in range(config.layers)])
        self.norm = LayerNorm(config.width, 1e-5)

    def _backbone(self):
        return self

    def attention_layers(self):
        return list(self.blocks)

    def transformer_layers(self):
        return self.blocks

    def construct(self, ids):
        x = self.embed(ids)
        bias = ops.zeros((1, 1, 1, ids.shape[1]), x.dtype)
        for block in self.blocks:
            x = self.norm(x + block(x, bias))
        return x


class TinyClassifier(PreTrainedCell):
    config_class = TinyConfig
    base_model_prefix = "encoder"
    skippable_layers = False

    def __init__(self, config):
        super().__init__(config)
        self.encoder = TinyEncoder(config)
        self.head = Linear(config.width, config.num_labels)

    def _backbone(self):
        return self.encoder

    def attention_layers(self):
        return self.encoder.attention_layers()

    def transformer_layers(self):
        return self.encoder.transformer_layers()

    def construct(self, ids):
        return self.head(self.encoder(ids).mean(1))


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    set_context(request.param, seed=11)
    yield request.param
    set_context("graph")


def ce(logits, labels):
    return ops.cross_entropy(logits, labels)


def test_subclass_trains_and_prunes(mode):
    model = TinyClassifier(TinyConfig())
    pruner = AbstractHeadPrunerLRP(model, target_heads=3, warmup_steps=2)
    gated = pruner.decorate_model()
    rng = np.random.default_rng(0)

    def batches():
        while True:
            ids = rng.integers(0, 30, (8, 6)).astype(np.int32)
            yield ids, (ids[:, 0] % 2).astype(np.int32)

    train_gated(pruner, gated, ce, batches(), steps=4, lr=1e-2, gate_lr=0.1, log=None)
    gated.set_train(False)
    ids = Tensor(rng.integers(0, 30, (3, 6)).astype(np.int32))
    pruned = pruner.prune_model(gated)
    assert sum(pruned.heads_per_layer()) == 3
    pruned.set_train(False)
    np.testing.assert_allclose(pruned(ids).asnumpy(), gated(ids).asnumpy(), rtol=1e-5, atol=1e-5)


def test_subclass_with_whole_layer_closed(mode):
    model = TinyEncoder(TinyConfig())
    pruner = AbstractHeadPrunerLRP(model)
    gated = pruner.decorate_model()
    gates = protocol.gates_of(gated, "head")
    gates[1].set_log_a([-5.0] * 4)
    gates[0].set_log_a([5.0, 0.3, -5.0, 2.0])
    gated.set_train(False)
    ids = Tensor(np.arange(12, dtype=np.int32).reshape(2, 6))
    want = gated(ids).asnumpy()
    pruned = pruner.prune_model(gated)
    assert pruned.heads_per_layer() == [3, 0]
    pruned.set_train(False)
    np.testing.assert_allclose(pruned(ids).asnumpy(), want, rtol=1e-5, atol=1e-5)
