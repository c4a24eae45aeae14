"""The shared training pieces: the compiled step, perplexity, the samples' command line."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.training import LMLoss, compiled_graph_count, lm_perplexity, make_train_step


def tiny_lm():
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_train_step_lowers_the_loss_and_compiles_once(mode):
    model = tiny_lm()
    model.set_train(True)
    step = make_train_step(LMLoss(model), nn.Adam(model.trainable_params(), 1e-2))
    rng = np.random.default_rng(0)
    ids = Tensor(rng.integers(0, 30, (4, 9)), ms.int32)
    before = compiled_graph_count(step)
    losses = [float(step(ids[:, :-1], ids[:, 1:]).asnumpy()) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1
    assert compiled_graph_count(step) - before == 1


def test_lm_perplexity_matches_numpy_and_restores_mode(mode):
    model = tiny_lm()
    model.set_train(True)
    tokens = np.random.default_rng(1).integers(0, 30, 60).astype(np.int32)
    got = lm_perplexity(model, tokens, batch_size=2, seq_len=8, max_batches=2)
    assert model.training
    model.set_train(False)
    nll = []
    for b in range(2):
        windows = [tokens[i * 8:i * 8 + 9] for i in range(2 * b, 2 * b + 2)]
        x = np.stack([w[:-1] for w in windows])
        logits = model(Tensor(x)).asnumpy().astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        y = np.stack([w[1:] for w in windows])
        nll.append(-np.take_along_axis(logp, y[..., None], -1).mean())
    assert got == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


@pytest.mark.parametrize("pre_layer_norm", [False, True], ids=["post-LN", "pre-LN"])
def test_bert_classifier_trains_one_step(mode, pre_layer_norm):
    from ms_prune.models.bert import BertConfig, BertForSequenceClassification
    ms.set_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, pre_layer_norm=pre_layer_norm))
    model.prune_heads({1: [0, 1]})  # a layer without heads trains too
    model.set_train(True)
    loss_net = nn.WithLossCell(model, nn.CrossEntropyLoss())
    step = make_train_step(loss_net, nn.Adam(model.trainable_params(), 1e-2))
    ids = Tensor(np.random.default_rng(2).integers(0, 30, (4, 8)), ms.int32)
    labels = Tensor(np.array([0, 1, 0, 1]), ms.int32)
    before = model.classifier.weight.asnumpy().copy()
    loss = float(step(ids, labels).asnumpy())
    assert np.isfinite(loss) and np.abs(model.classifier.weight.asnumpy() - before).max() > 0
