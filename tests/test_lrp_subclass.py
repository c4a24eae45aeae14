"""A pruner for a new model is a short subclass: here for a small transformer defined in this file."""
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

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
            return self.out(x), ops.zeros((), x.dtype)
        inner = self.num_heads * self.head_dim
        qkv = self.qkv(x)
        context, penalty = self.attend(qkv[:, :, :inner], qkv[:, :, inner:2 * inner], qkv[:, :, 2 * inner:],
                                       bias, x.shape[0], x.shape[1])
        return self.out(context), penalty

    def _slice_projections(self, positions):
        columns = self.head_columns(positions)
        inner = self.num_heads * self.head_dim
        self.qkv = slice_input_projection(self.qkv, np.concatenate([columns, columns + inner, columns + 2 * inner]),
                                          "linear")
        self.out = slice_output_projection(self.out, columns, "linear")


class TinyEncoder(PreTrainedCell):
    config_class = TinyConfig

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

    def construct(self, ids):
        x = self.embed(ids)
        bias = ops.zeros((1, 1, 1, ids.shape[1]), x.dtype)
        penalty = ops.zeros((), x.dtype)
        for block in self.blocks:
            out, block_penalty = block(x, bias)
            x = self.norm(x + out)
            penalty = penalty + block_penalty
        if self.return_penalty:
            return x, penalty
        return x


class TinyClassifier(PreTrainedCell):
    config_class = TinyConfig
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = TinyEncoder(config)
        self.head = Linear(config.width, config.num_labels)

    def _backbone(self):
        return self.encoder

    def attention_layers(self):
        return self.encoder.attention_layers()

    def construct(self, ids):
        outputs = self.encoder(ids)
        hidden = outputs[0] if self.return_penalty else outputs
        logits = self.head(hidden.mean(1))
        if self.return_penalty:
            return logits, outputs[1]
        return logits


# The whole pruner for the new model family:
class HeadPrunerTinyLRP(AbstractHeadPrunerLRP):
    backbone_class = TinyEncoder

    def output_projection(self, attention):
        return attention.out, "linear"


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    set_context(request.param, seed=11)
    yield request.param
    set_context("graph")


def ce(logits, labels):
    return ops.cross_entropy(logits, labels)


def test_subclass_trains_and_prunes(mode):
    model = TinyClassifier(TinyConfig())
    pruner = HeadPrunerTinyLRP(model, target_heads=3, warmup_steps=2)
    assert pruner.backbone is model.encoder and pruner.task_head_names == ["head.weight", "head.bias"]
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
    np.testing.assert_allclose(pruned(ids).asnumpy(), gated(ids)[0].asnumpy(), rtol=1e-5, atol=1e-5)


def test_subclass_with_whole_layer_closed(mode):
    model = TinyEncoder(TinyConfig())
    pruner = HeadPrunerTinyLRP(model)
    gated = pruner.decorate_model()
    gated.attention_layers()[1].head_gate.set_log_a([-5.0] * 4)
    gated.attention_layers()[0].head_gate.set_log_a([5.0, 0.3, -5.0, 2.0])
    gated.set_train(False)
    ids = Tensor(np.arange(12, dtype=np.int32).reshape(2, 6))
    want = gated(ids)[0].asnumpy()
    pruned = pruner.prune_model(gated)
    assert pruned.heads_per_layer() == [3, 0]
    pruned.set_train(False)
    np.testing.assert_allclose(pruned(ids).asnumpy(), want, rtol=1e-5, atol=1e-5)
