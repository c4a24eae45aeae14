"""Compiled graphs that cannot run again are freed by the library itself (issue #21, bounded
memory): a dropped Trainer's steps, a model's graphs at surgery, GradNAS's scoring pass; the model
then trains and evaluates to the same numbers as without the release. Each test fails when
``ms_prune.training.release_graphs`` does nothing (``GRAPH_RELEASE`` off)."""
import gc

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from ms_prune import training
from ms_prune.engine import Trainer
from ms_prune.gradnas import apply_gradnas
from ms_prune.engine.trainer import ModelLoss
from ms_prune.models.bert import BertConfig, BertForSequenceClassification
from ms_prune.training import live_graph_count

BERT = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=16, initializer_range=0.3)
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 40, (4, 8)).astype(np.int32)
LABELS = RNG.integers(0, 2, 4).astype(np.int32)


def bert():
    ms.set_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT))


def cross_entropy(logits, labels):
    return ops.cross_entropy(logits, labels)


def batch(step):
    return IDS, LABELS


def logits(model):
    model.set_train(False)
    return model(Tensor(IDS)).asnumpy()


def trained(model, steps=2):
    """A Trainer's losses, the Trainer dropped."""
    trainer = Trainer(model, cross_entropy, batch, max_steps=steps, lr=1e-2, log_interval=0)
    losses = [record["loss"] for record in trainer.fit()]
    del trainer
    gc.collect()
    return losses


@pytest.fixture
def release_off():
    training.GRAPH_RELEASE["enabled"] = False
    yield
    training.GRAPH_RELEASE["enabled"] = True


def test_a_dropped_trainer_frees_its_steps_and_the_model_trains_on_alike(mode):
    model = bert()
    before = live_graph_count()
    first = trained(model)
    assert live_graph_count() == before
    second = trained(model)  # compiles anew
    assert live_graph_count() == before

    reference = bert()
    training.GRAPH_RELEASE["enabled"] = False
    try:
        expected = trained(reference) + trained(reference)
    finally:
        training.GRAPH_RELEASE["enabled"] = True
    np.testing.assert_array_equal(first + second, expected)
    np.testing.assert_array_equal(logits(model), logits(reference))


def test_the_graphs_stay_when_release_is_off(mode, release_off):
    model = bert()
    before = live_graph_count()
    trained(model)
    assert live_graph_count() > before


def pruned_logits(model):
    """Evaluate (a model graph), GradNAS to half the FLOPs (scoring pass + surgery), evaluate."""
    dense = logits(model)
    apply_gradnas(model, ModelLoss(model, cross_entropy, -1), [(IDS, LABELS)] * 2, constraints={"flops": "50%"},
                  seq_len=8)
    return dense, logits(model)


def test_surgery_and_scoring_free_their_graphs_and_the_pruned_model_evaluates_alike(mode):
    model = bert()
    before = live_graph_count()
    dense, pruned = pruned_logits(model)
    gc.collect()
    # left: the pruned model's evaluation graph (PyNative runs it op by op); the dense model's and
    # the scoring step's are gone
    assert live_graph_count() == before + (mode == "graph")
    assert model.heads_per_layer() != [4, 4]

    training.GRAPH_RELEASE["enabled"] = False
    try:
        kept_before = live_graph_count()
        expected_dense, expected_pruned = pruned_logits(bert())
        assert live_graph_count() >= kept_before + 1 + 2 * (mode == "graph")
    finally:
        training.GRAPH_RELEASE["enabled"] = True
    np.testing.assert_array_equal(dense, expected_dense)
    np.testing.assert_array_equal(pruned, expected_pruned)
