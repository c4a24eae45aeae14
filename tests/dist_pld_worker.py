"""One worker of the data-parallel PLD test (launched twice by msrun from test_layer_drop.py).

Each rank trains the same converted pre-LN BERT on DIFFERENT data (rank-dependent batches),
all-reduces gradients with DistributedGradReducer, and writes what it saw: its keep decisions per
step, its losses and a fingerprint of its parameters. Usage: dist_pld_worker.py OUT_DIR.
"""
import json
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.communication import get_group_size, get_rank, init

from ms_prune.layer_drop import ProgressiveLayerDrop, convert_to_pld, pld_layers
from ms_prune.models.bert import BertConfig, BertForSequenceClassification
from ms_prune.training import set_context

STEPS = 6


def main(out_dir):
    set_context("graph", seed=0)
    init()
    rank, size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    ms.set_seed(0)  # same initial weights on every rank
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, num_labels=2, pre_layer_norm=True)
    model = BertForSequenceClassification(config)
    # Same seed on every rank: every rank drops the same layers in a step (one sub-network per
    # step, as in the paper), so the all-reduced gradient is that sub-network's gradient.
    pld = convert_to_pld(model, ProgressiveLayerDrop(theta=0.3, gamma=0.3), seed=7, count_runs=True)
    model.set_train(True)
    loss_net = nn.WithLossCell(model, nn.CrossEntropyLoss())
    optimizer = nn.Adam(model.trainable_params(), learning_rate=1e-2)
    grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)
    reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True, degree=size)

    @ms.jit
    def step(ids, labels):
        loss, grads = grad_fn(ids, labels)
        optimizer(reducer(grads))
        return loss

    rng = np.random.default_rng(100 + rank)  # different data per rank
    runs = [0] * len(pld_layers(model))
    decisions, losses = [], []
    ids = rng.integers(0, 40, (8, 12))
    labels = (ids[:, 0] % 2).astype(np.int32)  # learnable: the label is a token's parity
    for t in range(STEPS):
        pld.update_state(t)
        losses.append(float(step(Tensor(ids, ms.int32), Tensor(labels, ms.int32)).asnumpy()))
        now = [int(layer.runs.asnumpy()) for layer in pld_layers(model)]
        decisions.append([b - a for a, b in zip(runs, now)])
        runs = now
    fingerprint = [float(np.sum(np.abs(p.asnumpy()))) for p in model.trainable_params()]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "size": size, "decisions": decisions, "losses": losses,
                   "fingerprint": fingerprint, "theta": pld.get_theta()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
