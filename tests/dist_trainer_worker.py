"""One worker of the data-parallel Trainer tests (launched twice by msrun from
test_data_parallel.py; the test computes the single-process references itself, with the same
functions). Usage: dist_trainer_worker.py OUT_DIR; OUT_DIR/phase.json says what to run:

* ``{"phase": "equal"}``: every case of ``CASES`` (a plain model, the same with gradient
  accumulation and clipping, each row of the generic algorithm suite) trained on its global
  batches; worker 0 writes each case's starting weights, every worker its losses, final weights
  and the shapes of its shares.
* ``{"phase": "kill"}``: the uninterrupted run of ``RESUME_CASE`` (losses written), then the same
  run with checkpoints, stopped before step ``KILL_AT + 1`` (nothing saved after its last
  checkpoint).
* ``{"phase": "resume"}``: the killed run resumed from ``latest`` to the end (losses written).
* ``{"phase": "sample", "argv": [...]}``: ``samples/data_parallel.py`` with these arguments.
* ``{"phase": "model_train"}``: ``AlgorithmCallback`` with PLD and LRP under ``Model.train`` in
  DATA_PARALLEL mode (``gradients_mean=True``), each worker on its share of the global batches.
* ``{"phase": ["equal", "model_train"]}``: those phases one after the other in one launch (each
  launch starts two MindSpore processes and their group: about 15 s).
"""
import json
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from algorithms.algorithm_settings import (ALGORITHM_SETTINGS, classification_batch, classification_loss,  # noqa: E402
                                           lm_batch, lm_loss, pre_ln_bert, tiny_gpt2)
from ms_prune.engine import Algorithm, AlgorithmCallback, Event, Trainer  # noqa: E402
from ms_prune.engine.trainer import ModelLoss  # noqa: E402
from ms_prune.heads import LRP  # noqa: E402
from ms_prune.layer_drop import ProgressiveLayerDropping  # noqa: E402
from ms_prune.training import set_context  # noqa: E402

PLAIN = dict(model=tiny_gpt2, data=lm_batch, loss_fn=lm_loss, algorithm=None, steps=3)
CASES = {"plain": dict(PLAIN, options={}),
         "plain_accumulated_clipped": dict(PLAIN, options=dict(grad_accumulation=2, max_grad_norm=0.05))}
# 4 steps reach what each row exercises (LRP's gates after warm-up, GradNAS pruning at step 2, PLD's
# drops, random-LTD's first longer kept length) at a third less time than the suite's 6
CASES.update({name: dict(row, options={}, steps=min(row["steps"], 4)) for name, row in ALGORITHM_SETTINGS.items()})
RESUME_CASE, KILL_AT = "progressive_layer_drop", 3
MODEL_TRAIN_STEPS = 4


def weights(model):
    return {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}


def load_weights(model, saved):
    for name, param in model.parameters_and_names():
        ops.assign(param, Tensor(saved[name], param.dtype))


def train(name, init=None, max_steps=None, **options):
    """(trainer, losses) of case ``name`` trained from the weights ``init`` (None: as built)."""
    case = CASES[name]
    model = case["model"]()
    if init is not None:
        load_weights(model, init)
    algorithms = [case["algorithm"]()] if case["algorithm"] else []
    trainer = Trainer(model, case["loss_fn"], case["data"], max_steps=max_steps or case["steps"], lr=1e-2,
                      algorithms=algorithms, log_interval=0, **dict(case["options"], **options))
    history = trainer.fit()
    return trainer, [r["loss"] for r in history]


def model_train_parts(init=None):
    """(model, callback, TrainOneStepCell) of the Model.train case, from the weights ``init``."""
    model = pre_ln_bert()
    if init is not None:
        load_weights(model, init)
    callback = AlgorithmCallback(model, [ProgressiveLayerDropping(theta=0.5, gamma=0.5),
                                         LRP(target_heads=5, warmup_steps=2, gate_lr=0.3)])
    loss_net = callback.loss_net(ModelLoss(model, classification_loss, num_inputs=1))
    optimizer = nn.AdamWeightDecay(callback.param_groups(), learning_rate=1e-2)
    return model, callback, nn.TrainOneStepCell(loss_net, optimizer)


def model_train(init, rank=0, world_size=1):
    """Final weights of Model.train over ``MODEL_TRAIN_STEPS`` global batches, this worker's rows."""
    import mindspore.dataset as ds
    from mindspore.train import Model
    model, callback, step = model_train_parts(init)
    share = 8 // world_size
    batches = [tuple(x[rank * share:(rank + 1) * share] for x in classification_batch(i))
               for i in range(MODEL_TRAIN_STEPS)]
    dataset = ds.GeneratorDataset(batches, column_names=["ids", "labels"], shuffle=False)
    model.set_train(True)
    Model(step).train(1, dataset, callbacks=[callback], dataset_sink_mode=False)
    return model


def save(out_dir, name, result):
    np.savez(os.path.join(out_dir, name + ".npz"), **result)


def main(out_dir):
    with open(os.path.join(out_dir, "phase.json"), encoding="utf-8") as f:
        settings = json.load(f)
    phase = settings["phase"]
    if phase == "sample":  # the sample sets up its context and the workers' group itself
        from conftest import load_script
        load_script("data_parallel").main(settings["argv"])
        return
    set_context("graph", seed=0)
    from mindspore.communication import get_group_size, get_rank, init
    init()
    rank, size = get_rank(), get_group_size()
    for name in phase if isinstance(phase, list) else [phase]:
        run_phase(name, out_dir, rank, size)


def run_phase(phase, out_dir, rank, size):
    result = {"rank": rank, "size": size}
    if phase == "equal":
        for name, case in CASES.items():
            init_weights = weights(case["model"]())  # the trainer copies worker 0's to every worker
            if rank == 0:
                save(out_dir, f"{name}_init", init_weights)
            trainer, losses = train(name, init_weights)
            save(out_dir, f"{name}_rank{rank}", weights(trainer.state.model))
            result[name] = {"losses": losses, "share": [list(x.shape) for x in trainer.state.batch],
                            "global": [list(x.shape) for x in trainer.state.global_batch],
                            "rng": str(trainer.state.rng.bit_generator.state["state"])}
    elif phase == "kill":
        _, result["uninterrupted"] = train(RESUME_CASE)
        case = CASES[RESUME_CASE]
        model = case["model"]()
        trainer = Trainer(model, case["loss_fn"], case["data"], max_steps=case["steps"], lr=1e-2, log_interval=0,
                          algorithms=[case["algorithm"](), KillAt(KILL_AT)],
                          checkpoint_dir=os.path.join(out_dir, "checkpoints"), checkpoint_interval=2)
        try:
            trainer.fit()
            raise AssertionError("the run was to be stopped")
        except Stopped:
            result["stopped_at"] = trainer.state.step
    elif phase == "resume":
        case = CASES[RESUME_CASE]
        model = case["model"]()
        trainer = Trainer(model, case["loss_fn"], case["data"], max_steps=case["steps"], lr=1e-2, log_interval=0,
                          algorithms=[case["algorithm"](), KillAt(None)],
                          checkpoint_dir=os.path.join(out_dir, "checkpoints"), resume_from="latest")
        result["resumed_at"] = trainer.state.step
        result["resumed"] = [r["loss"] for r in trainer.fit()]
    elif phase == "model_train":
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        init_weights = weights(pre_ln_bert())
        if rank == 0:
            save(out_dir, "model_train_init", init_weights)
        model = model_train(init_weights, rank, size)
        save(out_dir, f"model_train_rank{rank}", weights(model))
        result["heads"] = model.heads_per_layer()
    write(out_dir, rank, result, phase)


def write(out_dir, rank, result, phase):
    with open(os.path.join(out_dir, f"{phase}_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


class Stopped(Exception):
    pass


class KillAt(Algorithm):
    """Stands for a kill: the run stops at the BATCH_START of step ``at + 1`` with nothing saved
    after its last checkpoint, and the process's trainer is dropped (an ``os._exit`` would stop the
    worker as a kill does, but msrun then fails the launch); ``at=None`` does nothing (the resumed
    run has the same algorithm list)."""

    def __init__(self, at):
        self.at = at

    def match(self, event, state):
        return self.at is not None and event == Event.BATCH_START and state.step == self.at

    def apply(self, event, state, logger):
        raise Stopped(f"stopped before step {state.step + 1}")


if __name__ == "__main__":
    main(sys.argv[1])
