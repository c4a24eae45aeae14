"""A graph-mode training loop on which every algorithm runs the same way.

The step is a Cell (``ms_prune.training.TrainStep``: forward, loss, backward and update in one
compiled graph). One compiled step is kept per graph key (the batch's shapes plus what the
algorithms freeze into the graph, e.g. random-LTD's kept length). After surgery (an algorithm
sets ``state.structure_changed``) the step AND the optimizer are rebuilt: MindSpore caches a
Cell's graph, and an optimizer holds the Parameters it was built with, so a step built before
surgery would go on training the old weights, silently.
"""
import json
import logging
import math
import os
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.fileio import atomic_write
from ms_prune.training import compiled_graph_count, make_train_step
from ms_prune.validation import check_int, check_number

from .engine import Engine
from .event import Event
from .state import State

__all__ = ["Trainer", "ModelLoss", "LossWithTerms"]

log = logging.getLogger("ms_prune.trainer")

CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "trainer_state.json"


class ModelLoss(nn.Cell):
    """``loss_fn(model(*batch[:num_inputs]), *batch[num_inputs:])``."""

    def __init__(self, model, loss_fn, num_inputs):
        super().__init__(auto_prefix=False)
        self.model = model
        self.loss_fn = loss_fn
        self.num_inputs = num_inputs

    def construct(self, *batch):
        return self.loss_fn(self.model(*batch[:self.num_inputs]), *batch[self.num_inputs:])


class LossWithTerms(nn.Cell):
    """``loss_net(*batch)`` plus each term (Cells taking no input, e.g. LRP's gate objective)."""

    def __init__(self, loss_net, terms):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.terms = nn.CellList(list(terms))

    def construct(self, *batch):
        loss = self.loss_net(*batch)
        for term in self.terms:
            loss = loss + term()
        return loss


def default_optimizer(learning_rate=1e-3, weight_decay=0.0):
    """The optimizer factory the trainer uses when none is given: AdamW."""
    def build(params):
        return nn.AdamWeightDecay(params, learning_rate=learning_rate, weight_decay=weight_decay)
    return build


class Trainer:
    """Train ``model`` for ``max_steps`` steps with ``algorithms``.

    * ``loss_fn(outputs, *targets)``: a Cell or a module-level function (graph mode parses it); a
      Cell's own Parameters (a task head) train with the model and go into the checkpoints;
      each batch is a tuple of numpy arrays, the first ``num_inputs`` (default all but the last)
      go to the model, the rest to ``loss_fn``.
    * ``train_data``: an iterable of batches, iterated again each epoch (a resumed run skips the
      batches already seen in the epoch), or a function ``step -> batch``.
    * ``optimizer``: a function ``params -> mindspore Optimizer`` (it is called again after
      surgery; ``params`` is a list of Parameters or of groups); default AdamW at ``lr`` and
      ``weight_decay``.
    * ``eval_fn(model) -> {name: value}`` every ``eval_interval`` steps and at the end.
    * ``checkpoint_dir`` / ``checkpoint_interval``: a checkpoint every N steps (and at the end):
      model, optimizer and algorithm tensors, algorithm states, counters and the RNG state.
      ``resume_from`` (a checkpoint folder, or ``"latest"`` in ``checkpoint_dir``) continues a run
      so that its next loss is the uninterrupted run's.
    * ``log_interval``: a progress line (step, loss, steps/s, ETA) every N steps; 0 is silent.
    """

    def __init__(self, model, loss_fn, train_data, max_steps, algorithms=(), optimizer=None, lr=1e-3,
                 weight_decay=0.0, num_inputs=None, eval_fn=None, eval_interval=0, log_interval=10, checkpoint_dir=None,
                 checkpoint_interval=0, keep_checkpoints=2, resume_from=None, seed=0, logger=None):
        owner = "Trainer"
        if not isinstance(model, nn.Cell):
            raise TypeError(f"{owner}: model must be a mindspore.nn.Cell, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"{owner}: loss_fn must be a Cell or a function (outputs, *targets) -> loss, "
                            f"got {type(loss_fn).__name__}")
        if not (callable(train_data) or hasattr(train_data, "__iter__")):
            raise TypeError(f"{owner}: train_data must be an iterable of batches or a function step -> batch, "
                            f"got {type(train_data).__name__}")
        self.max_steps = check_int(owner, "max_steps", max_steps, minimum=1)
        self.num_inputs = check_int(owner, "num_inputs", num_inputs, minimum=1, allow_none=True)
        self.eval_interval = check_int(owner, "eval_interval", eval_interval, minimum=0)
        self.log_interval = check_int(owner, "log_interval", log_interval, minimum=0)
        self.checkpoint_interval = check_int(owner, "checkpoint_interval", checkpoint_interval, minimum=0)
        self.keep_checkpoints = check_int(owner, "keep_checkpoints", keep_checkpoints, minimum=1)
        seed = check_int(owner, "seed", seed, minimum=0)
        if optimizer is None:
            optimizer = default_optimizer(check_number(owner, "lr", lr, minimum=0.0, min_open=True),
                                          check_number(owner, "weight_decay", weight_decay, minimum=0.0))
        elif not callable(optimizer) or isinstance(optimizer, nn.Optimizer):
            raise TypeError(f"{owner}: optimizer must be a function params -> Optimizer (it is rebuilt after "
                            f"surgery), got {type(optimizer).__name__}; e.g. "
                            f"optimizer=lambda params: nn.Adam(params, 1e-3)")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"{owner}: eval_fn must be a function model -> dict, got {type(eval_fn).__name__}")
        if checkpoint_interval and checkpoint_dir is None:
            raise ValueError(f"{owner}: checkpoint_interval={checkpoint_interval} needs a checkpoint_dir")
        self.loss_fn, self.train_data, self.optimizer_factory = loss_fn, train_data, optimizer
        self.eval_fn, self.checkpoint_dir = eval_fn, checkpoint_dir
        self.state = State(model, algorithms, max_steps=self.max_steps, seed=seed)
        self.engine = Engine(self.state, logger or log)
        self.logger = logger or log
        self._steps = {}
        self._data_iter = None
        self.compilations = 0
        self.history = []
        ms.set_seed(seed)
        self.engine.run_event(Event.INIT)
        self._build()
        if resume_from is not None:
            self.load_checkpoint(self._resolve_checkpoint(resume_from))

    # ---- building the step ---------------------------------------------------------------------
    def _build(self):
        """(Re)build the loss Cell and the optimizer for the model as it is now; drop the steps."""
        state = self.state
        protocol.refresh(state.model)
        terms = [term for algorithm in state.algorithms for term in algorithm.loss_terms(state)]
        # -1: all but the last array of a batch go to the model
        loss_net = ModelLoss(state.model, self.loss_fn, self.num_inputs or -1)
        state.loss_net = LossWithTerms(loss_net, terms) if terms else loss_net
        groups = [dict(g) for algorithm in state.algorithms for g in algorithm.param_groups(state)]
        claimed = {id(p) for g in groups for p in g["params"]}
        params = [p for p in self._trainable_params() if id(p) not in claimed]
        state.optimizer = self.optimizer_factory(([{"params": params}] + groups) if groups else params)
        self._steps = {}
        state.structure_changed = False

    def _trainable_params(self):
        """The model's, then those of a ``loss_fn`` Cell that has its own (a task head such as an
        MLM head is trained with the model)."""
        params = list(self.state.model.trainable_params())
        if isinstance(self.loss_fn, nn.Cell):
            seen = {id(p) for p in params}
            params += [p for p in self.loss_fn.trainable_params() if id(p) not in seen]
        return params

    def _graph_key(self, batch):
        algorithm_keys = tuple(a.graph_key(self.state) for a in self.state.algorithms if a.changes_graph)
        return algorithm_keys + tuple((tuple(x.shape), str(x.dtype)) for x in batch) + (self.state.model.training,)

    def _step_for(self, batch):
        key = self._graph_key(batch)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = make_train_step(self.state.loss_net, self.state.optimizer)
        return step

    # ---- data ----------------------------------------------------------------------------------
    def _next_batch(self):
        state = self.state
        if callable(self.train_data):
            return tuple(self.train_data(state.step))
        if self._data_iter is None:
            self._data_iter = iter(self.train_data)
            if state.batch_in_epoch and self._data_iter is self.train_data:
                raise ValueError("Trainer: train_data is a one-pass iterator, so a resumed run cannot see the "
                                 "batches the uninterrupted run saw; pass a re-iterable (a list, a Dataset) or a "
                                 "function step -> batch")
            for _ in range(state.batch_in_epoch):  # a resumed run skips what the epoch has seen
                next(self._data_iter)
        try:
            return tuple(next(self._data_iter))
        except StopIteration:
            self._data_iter = None
            self._end_epoch()
            self._data_iter = iter(self.train_data)
            try:
                return tuple(next(self._data_iter))
            except StopIteration:
                raise ValueError("Trainer: train_data yielded no batch") from None

    def _end_epoch(self):
        self.engine.run_event(Event.EPOCH_END)
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.engine.run_event(Event.EPOCH_START)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self):
        """Train up to ``max_steps``; returns the history [{"step", "loss", ...metrics}]."""
        state = self.state
        state.model.set_train(True)
        self.engine.run_event(Event.FIT_START)
        if state.step == 0 and state.batch_in_epoch == 0:
            self.engine.run_event(Event.EPOCH_START)
        started, first_step = time.perf_counter(), state.step
        while state.step < self.max_steps:
            step_started = time.perf_counter()
            batch = self._next_batch()
            state.batch = batch
            if state.step == first_step:  # a row of it verifies the model after any surgery
                protocol.remember_inputs(state.model, batch[:self.num_inputs or -1])
            self.engine.run_event(Event.BATCH_START)
            if state.structure_changed:
                self._build()
            step = self._step_for(batch)
            before = compiled_graph_count(step)
            loss = step(*[Tensor(x) for x in batch])
            compiled = compiled_graph_count(step) - before
            self.compilations += compiled
            state.loss = float(loss.asnumpy())
            if not math.isfinite(state.loss):
                raise FloatingPointError(f"Trainer: the loss is {state.loss} at step {state.step + 1}")
            state.step += 1
            state.batch_in_epoch += 1
            state.samples += int(batch[0].shape[0])
            state.tokens += int(np.prod(batch[0].shape[:2])) if batch[0].ndim >= 2 else int(batch[0].shape[0])
            self.engine.run_event(Event.AFTER_TRAIN_STEP)
            self.engine.run_event(Event.BATCH_END)
            if state.structure_changed:
                self._build()
            # seconds: the step's wall-clock (data and algorithm events included); a step that
            # compiled a graph says so, so time-to-quality can count compilation apart
            record = {"step": state.step, "loss": state.loss, "seconds": time.perf_counter() - step_started,
                      "compiled": compiled > 0}
            if self.eval_interval and state.step % self.eval_interval == 0 and state.step < self.max_steps:
                record.update(self.evaluate())
            self.history.append(record)
            self._log_progress(started, first_step)
            if self.checkpoint_interval and state.step % self.checkpoint_interval == 0:
                self.save_checkpoint()
        self.engine.run_event(Event.FIT_END)
        if state.structure_changed:
            self._build()
        if self.eval_fn is not None:
            self.history[-1].update(self.evaluate())
        if self.checkpoint_dir is not None:
            self.save_checkpoint()
        return self.history

    def evaluate(self):
        if self.eval_fn is None:
            return {}
        state = self.state
        self.engine.run_event(Event.EVAL_START)
        state.model.set_train(False)
        metrics = dict(self.eval_fn(state.model))
        state.model.set_train(True)
        state.metrics = metrics
        self.engine.run_event(Event.EVAL_END)
        if self.log_interval:
            self.logger.info("step %d eval %s", state.step,
                             ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return metrics

    def _log_progress(self, started, first_step):
        state = self.state
        if not self.log_interval or (state.step % self.log_interval and state.step != self.max_steps):
            return
        elapsed = time.perf_counter() - started
        rate = (state.step - first_step) / elapsed if elapsed > 0 else float("nan")
        eta = (self.max_steps - state.step) / rate if rate > 0 else float("nan")
        self.logger.info("step %d/%d | loss %.4f | %.2f steps/s | ETA %s", state.step, self.max_steps,
                         state.loss, rate, time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?")

    # ---- checkpoints ---------------------------------------------------------------------------
    def _named_tensors(self):
        """{name: Parameter} of everything a resume needs: model, optimizer and algorithm tensors."""
        named = {}
        sources = [self.state.model.parameters_and_names(), self.state.optimizer.parameters_and_names()]
        if isinstance(self.loss_fn, nn.Cell):
            sources.append(self.loss_fn.parameters_and_names())
        sources += [((p.name, p) for p in a.parameters()) for a in self.state.algorithms]
        for source in sources:
            for name, param in source:
                key = param.name if param.name else name
                if key in named and named[key] is not param:
                    raise RuntimeError(f"Trainer: two tensors are named {key!r}; checkpoints would lose one")
                named[key] = param
        return named

    def save_checkpoint(self, path=None):
        """Write a checkpoint folder (default ``checkpoint_dir/step_<N>``); every file is written
        atomically and ``latest`` is updated last, so a crash mid-save leaves the previous one."""
        from safetensors.numpy import save
        state = self.state
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("Trainer.save_checkpoint: give a path or a checkpoint_dir")
            path = os.path.join(self.checkpoint_dir, f"step_{state.step}")
        os.makedirs(path, exist_ok=True)
        tensors = {name: np.ascontiguousarray(p.asnumpy()) for name, p in self._named_tensors().items()}
        with atomic_write(os.path.join(path, CHECKPOINT_TENSORS)) as f:
            f.write(save(tensors))
        saved = {"state": state.state_dict(),
                 "algorithms": {a.name: a.state_dict() for a in state.algorithms},
                 "model_training": state.model.training}
        with atomic_write(os.path.join(path, CHECKPOINT_STATE), binary=False) as f:
            json.dump(saved, f, indent=1, sort_keys=True)
        if self.checkpoint_dir is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.checkpoint_dir):
            with atomic_write(os.path.join(self.checkpoint_dir, "latest"), binary=False) as f:
                f.write(os.path.basename(path))
            self._prune_old_checkpoints()
        return path

    def _prune_old_checkpoints(self):
        import shutil
        folders = sorted((int(n.split("_")[1]), n) for n in os.listdir(self.checkpoint_dir)
                         if n.startswith("step_") and n.split("_")[1].isdigit())
        for _, name in folders[:-self.keep_checkpoints]:
            shutil.rmtree(os.path.join(self.checkpoint_dir, name), ignore_errors=True)

    def _resolve_checkpoint(self, resume_from):
        if resume_from == "latest":
            if self.checkpoint_dir is None:
                raise ValueError("Trainer: resume_from='latest' needs a checkpoint_dir")
            pointer = os.path.join(self.checkpoint_dir, "latest")
            if not os.path.isfile(pointer):
                raise FileNotFoundError(f"Trainer: no checkpoint to resume in {self.checkpoint_dir} (no 'latest')")
            with open(pointer, encoding="utf-8") as f:
                return os.path.join(self.checkpoint_dir, f.read().strip())
        return resume_from

    def load_checkpoint(self, path):
        """Continue from a checkpoint written by :meth:`save_checkpoint` (same model, algorithms and
        data as the run that wrote it)."""
        from safetensors.numpy import load_file
        state = self.state
        for name in (CHECKPOINT_STATE, CHECKPOINT_TENSORS):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"Trainer.load_checkpoint: {path} has no {name}")
        with open(os.path.join(path, CHECKPOINT_STATE), encoding="utf-8") as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"Trainer.load_checkpoint: {os.path.join(path, CHECKPOINT_STATE)} is not valid "
                                 f"JSON ({error})") from None
        ours = [a.name for a in state.algorithms]
        if sorted(saved["algorithms"]) != sorted(ours):
            raise ValueError(f"Trainer.load_checkpoint: the checkpoint was written with algorithms "
                             f"{sorted(saved['algorithms'])}, this trainer has {sorted(ours)}")
        for algorithm in state.algorithms:
            algorithm.load_state_dict(saved["algorithms"][algorithm.name])
        state.load_state_dict(saved["state"])
        self.engine.run_event(Event.AFTER_LOAD)
        self._build()
        try:
            tensors = load_file(os.path.join(path, CHECKPOINT_TENSORS))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"Trainer.load_checkpoint: cannot read {os.path.join(path, CHECKPOINT_TENSORS)}: "
                             f"{error}") from None
        named = self._named_tensors()
        missing = sorted(set(named) - set(tensors))
        unexpected = sorted(set(tensors) - set(named))
        # safetensors stores a 0-d tensor as shape (1,): compare sizes, then take the Parameter's shape
        mismatched = [f"{n}: saved {tensors[n].shape} vs {tuple(named[n].shape)}" for n in named
                      if n in tensors and tensors[n].size != int(np.prod(named[n].shape))]
        if missing or unexpected or mismatched:
            raise ValueError(f"Trainer.load_checkpoint: {path} does not fit this run: missing {missing}, "
                             f"unexpected {unexpected}, shape mismatches {mismatched}")
        for name, param in named.items():
            ops.assign(param, Tensor(tensors[name].reshape(param.shape), dtype=param.dtype))
        state.model.set_train(bool(saved.get("model_training", True)))
        self._data_iter = None
        return path
