"""One worker of the data-parallel GradNAS scoring test (launched twice by msrun from
test_gradnas.py): loads the model the test saved in OUT_DIR/model, scores its share of the batches
(rank r takes batches r, r+2, ...) and writes the all-reduced scores to OUT_DIR/rank<r>.json.
Usage: dist_gradnas_worker.py OUT_DIR."""
import json
import os
import sys

import numpy as np
from mindspore import nn
from mindspore.communication import get_group_size, get_rank, init

from ms_prune.gradnas import compute_scores
from ms_prune.models.bert import BertForSequenceClassification
from ms_prune.training import set_context


def main(out_dir):
    set_context("graph", seed=0)
    init()
    rank, size = get_rank(), get_group_size()
    model = BertForSequenceClassification.from_pretrained(os.path.join(out_dir, "model"))
    data = np.load(os.path.join(out_dir, "batches.npz"))
    batches = [(data["ids"][i], data["labels"][i]) for i in range(rank, len(data["ids"]), size)]
    scores = compute_scores(model, nn.WithLossCell(model, nn.CrossEntropyLoss()), batches)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "size": size, "batches": len(batches),
                   "scores": scores.to_dict()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
