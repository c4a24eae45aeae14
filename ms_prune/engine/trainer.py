"""A graph-mode training loop on which every algorithm runs the same way.

The step is a Cell (``ms_prune.training.TrainStep``: forward, loss, backward and update in one
compiled graph). One compiled step is kept per graph key (the batch's shapes plus what the
algorithms freeze into the graph, e.g. random-LTD's kept length). After surgery (an algorithm
sets ``state.structure_changed``) the step AND the optimizer are rebuilt: MindSpore caches a
Cell's graph, and an optimizer holds the Parameters it was built with, so a step built before
surgery would go on training the old weights, silently.

With ``grad_accumulation=k`` a step is k compiled micro-steps that add their gradients into
Parameter buffers inside the graph, then one compiled update (scale by 1/k, clip, optimizer,
zero the buffers): no host round-trip until the update's loss is read.

Data parallel: after ``mindspore.communication.init()`` (e.g. under ``msrun``) each of the N
workers trains on its contiguous 1/N share of every global batch; the gradients (and the loss)
are averaged over the workers inside the compiled step, before clipping and the optimizer (once
per update with accumulation), so the update is the single-process update on the global batch.
Worker 0 alone writes checkpoints and progress lines.

Checkpoints are folders written whole or not at all (``fileio.atomic_directory``) with a
``checksums.json`` written last; a run rotates only the checkpoints that carry its run id, and
"latest" resumes from the newest checkpoint that verifies.
"""
import contextlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ms_prune import protocol
from ms_prune.fileio import (CHECKSUMS, atomic_directory, atomic_write, clean_orphans, read_checksums,
                             verify_checksums, write_checksums)
from ms_prune.training import (PRECISIONS, CompiledCells, LossScale, ScaledLoss, TrainStep, check_precision_runs,
                               compile_in_pynative, compiled_graph_count, make_train_step, mixed_precision,
                               peak_memory_mb, release_graphs, unsupported_precision_message,
                               write_parameter)
from ms_prune.validation import check_choice, check_int, check_number

from .engine import Engine
from .event import Event
from .state import State, required

__all__ = ["Trainer", "ModelLoss", "LossWithTerms", "lr_multiplier", "default_no_decay", "data_parallel_world"]

log = logging.getLogger("ms_prune.trainer")

CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "trainer_state.json"
STEP_FOLDER = re.compile(r"step_(\d+)")
LR_SCHEDULES = ("constant", "linear", "cosine")
# a loss this many times the first loss of a fit is divergence, not noise: training that works
# lowers the loss, and a run at 1e15 that stays finite would otherwise go on unnoticed
DIVERGENCE_FACTOR = 1e3
# settings a checkpoint written before the setting existed ran with
SETTING_DEFAULTS = {"precision": "fp32"}
# MindSpore's CPU/GPU kernel selection error names the operator so
KERNEL_SELECTION = re.compile(r"Select \w+ operator\[(\w+)\] fail")


def lr_multiplier(schedule, step, max_steps, warmup_steps=0):
    """The factor of the base learning rate at update ``step`` (0-based) of ``max_steps``: a linear
    warm-up ``(step + 1) / warmup_steps``, then 1 (``constant``), ``1 - progress`` (``linear``,
    reaching ``1 / (max_steps - warmup_steps)`` at the last step) or ``(1 + cos(pi * progress)) / 2``
    (``cosine``), with ``progress = (step - warmup_steps) / (max_steps - warmup_steps)``."""
    schedule = check_choice("lr_multiplier", "schedule", schedule, LR_SCHEDULES)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def default_no_decay(param):
    """Parameters without weight decay by default: 1-D and scalar ones (norm weights, biases, gates'
    log-alphas). Decaying a norm's scale or a bias towards 0 regularises nothing useful and
    fights the model's normalisation."""
    return len(param.shape) <= 1


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


def data_parallel_world(owner="Trainer"):
    """(rank, number of workers) of the communication group ``mindspore.communication.init()``
    set up (e.g. under ``msrun``); (0, 1) without one. A parallel mode other than data parallel
    (semi-auto or auto parallel split the model itself) is a ValueError naming it."""
    from mindspore.communication import GlobalComm
    if not GlobalComm.INITED:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank
    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode not in ("stand_alone", "data_parallel"):
        raise ValueError(f"{owner}: parallel_mode={mode!r}; the trainer does data parallelism itself (gradients "
                         f"averaged over the workers inside its step): leave parallel_mode 'stand_alone' or set "
                         f"'data_parallel'")
    return int(get_rank()), int(get_group_size())


class WorkerMean(nn.Cell):
    """``(loss, grads) -> (their means over the workers)``, inside a compiled step: the gradients
    through ``nn.DistributedGradReducer`` (as ``nn.TrainOneStepCell`` does in data parallel), the
    loss by an AllReduce. With each worker's loss a mean over its equal share of the rows, these are
    the loss and the gradients of the global batch."""

    def __init__(self, parameters, world_size):
        super().__init__(auto_prefix=False)
        from mindspore.communication import GlobalComm
        self.reducer = nn.DistributedGradReducer(parameters, mean=True, degree=world_size,
                                                 group=GlobalComm.WORLD_COMM_GROUP)
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, GlobalComm.WORLD_COMM_GROUP)
        self.scale = 1.0 / world_size

    def construct(self, loss, grads):
        loss = self.all_reduce(ops.cast(loss, ms.float32)) * self.scale
        return loss, self.reducer(grads)


class _AllReduceSum(nn.Cell):
    """Host-side collectives between steps (weights from worker 0, metrics, barriers): each
    input summed over the workers."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        from mindspore.communication import GlobalComm
        self.all_reduce = ops.AllReduce(ops.ReduceOp.SUM, GlobalComm.WORLD_COMM_GROUP)

    def construct(self, *tensors):
        out = ()
        for x in tensors:
            out = out + (self.all_reduce(x),)
        return out


class _Unchanged(nn.Cell):
    def construct(self, loss, grads):
        return loss, grads


class Update(nn.Cell):
    """``(loss, gradients) -> the update``, in this order: averaged over the workers
    (``worker_mean``, a :class:`WorkerMean`), unscaled (``loss_scale``, a
    :class:`~ms_prune.training.LossScale`), clipped to ``max_grad_norm``, the optimizer; returns the
    (mean, unscaled) loss. With a loss scale, an update whose gradients are not all finite is
    skipped (weights and optimizer state untouched) and the scale adjusts: the gradients are
    checked after the workers' mean, which every worker holds alike, so every worker skips alike."""

    def __init__(self, optimizer, max_grad_norm=None, worker_mean=None, loss_scale=None):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.worker_mean = worker_mean if worker_mean is not None else _Unchanged()
        self.scaled = loss_scale is not None
        self.loss_scale = loss_scale
        self.clip = max_grad_norm is not None
        self.max_grad_norm = max_grad_norm if self.clip else 1.0

    def construct(self, loss, grads):
        loss, grads = self.worker_mean(loss, grads)
        if self.scaled:
            loss, grads, finite = self.loss_scale.unscale(loss, grads)
        if self.clip:
            grads = ops.clip_by_global_norm(grads, self.max_grad_norm)
        if self.scaled:
            if finite:
                loss = ops.depend(loss, self.optimizer(grads))
            return ops.depend(loss, self.loss_scale.adjust(finite))
        self.optimizer(grads)
        return loss


class UpdateStep(TrainStep):
    """A ``TrainStep`` whose gradients go through an :class:`Update` (workers' mean, loss scale,
    clipping) before the optimizer."""

    def __init__(self, loss_net, optimizer, update):
        super().__init__(loss_net, optimizer)
        self.update = update

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        return self.update(loss, grads)


class AccumulateGrads(nn.Cell):
    """One micro-batch of an accumulated step: its loss and gradients are added into ``buffers``
    (``ops.assign_add`` inside the graph); returns the micro-batch's loss."""

    def __init__(self, loss_net, optimizer, buffers, loss_sum):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)
        self.buffers = buffers
        self.loss_sum = loss_sum
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.hyper_map(ops.assign_add, self.buffers, grads)
        ops.assign_add(self.loss_sum, ops.cast(loss, ms.float32))
        return loss


class ApplyGrads(nn.Cell):
    """The update of an accumulated step: the mean gradient (buffers / k) and the mean loss of the
    k micro-batches go through ``update`` (an :class:`Update`: workers' mean once per update, not
    per micro-batch; loss scale; clipping; optimizer), and the buffers are zeroed; returns the
    loss ``update`` returns."""

    def __init__(self, buffers, loss_sum, grad_accumulation, update):
        super().__init__(auto_prefix=False)
        self.update = update
        self.buffers = buffers
        self.loss_sum = loss_sum
        self.scale = 1.0 / grad_accumulation
        self.hyper_map = ops.HyperMap()

    def construct(self):
        grads = self.hyper_map(ops.partial(ops.mul, self.scale), self.buffers)
        loss = self.update(self.loss_sum * self.scale, grads)
        self.hyper_map(ops.assign, self.buffers, self.hyper_map(ops.zeros_like, self.buffers))
        ops.assign(self.loss_sum, ops.zeros_like(self.loss_sum))
        return loss


def _arity(function):
    """(fewest, most) positional arguments ``function`` takes (most None with ``*args``), or None
    when Python cannot tell."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    fewest, most = 0, 0
    for parameter in signature.parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            most = None
        elif parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            most = None if most is None else most + 1
            fewest += parameter.default is parameter.empty
    return fewest, most


def _describe(value):
    if isinstance(value, (np.ndarray, Tensor)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _read_back(value):
    """Read a result (a Tensor or a tuple of them) back to the host, so a failure shows now."""
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, Tensor):
            item.asnumpy()


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _shapes(arrays):
    return ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in arrays) or "none"


class Trainer:
    """Train ``model`` for ``max_steps`` optimizer steps with ``algorithms``.

    * ``loss_fn(outputs, *targets)``: a Cell or a module-level function (graph mode parses it); a
      Cell's own Parameters (a task head) train with the model and go into the checkpoints;
      each batch is a tuple of numpy arrays, the first ``num_inputs`` (default all but the last)
      go to the model, the rest to ``loss_fn``. The first batch is checked against the model and
      the loss (how many arrays, their types, the ids against ``config.vocab_size``); a first step
      that fails is retraced to the model or to ``loss_fn`` and the shapes each received.
    * ``train_data``: an iterable of batches, iterated again each epoch (a resumed run skips the
      batches already seen in the epoch), or a function ``batch_index -> batch`` (the index counts
      batches taken: the step, without gradient accumulation).
    * ``optimizer``: a function ``params -> mindspore Optimizer`` (it is called again after
      surgery; ``params`` is a list of Parameters or of groups); default AdamW at ``lr`` and
      ``weight_decay``. ``lr=1e-3`` suits training from scratch; fine-tuning a pretrained model
      wants far less (2e-5..5e-5 for BERT-size models).
    * ``no_decay(param) -> bool``: Parameters kept out of weight decay (default
      :func:`default_no_decay`: norm weights, biases, gates); an algorithm's own groups (gates)
      get ``weight_decay=0.0`` unless they say otherwise. ``no_decay=None`` decays everything.
    * ``grad_accumulation=k``: each step takes k batches and updates once with their mean gradient
      (one update on the k-times larger batch); algorithms' BATCH_START/BATCH_END run once per step.
    * ``max_grad_norm``: gradients clipped to this global norm before each update.
    * ``precision``: ``"fp32"``, or ``"fp16"``/``"bf16"``: the model computes in the low precision
      (``ms_prune.training.mixed_precision``: matrix products low, norms, softmax and the loss
      float32) on float32 weights and optimizer state. fp16 scales the loss dynamically
      (``loss_scale``, doubled after ``loss_scale_window`` good updates, halved on overflow): an
      update whose gradients overflow is skipped, counted in the progress line and in
      ``summary["skipped_steps"]``, and the scaler's state goes into checkpoints. A precision
      this back-end has no kernels for (bf16 on CPU) is a RuntimeError naming the operator.
    * ``lr_schedule`` ``constant``/``linear``/``cosine`` with ``warmup_steps`` (see
      :func:`lr_multiplier`): the optimizer's learning rates (each group's) are multiplied by the
      schedule's factor before each step; a resumed run continues the schedule.
    * ``eval_fn(model) -> {name: value}`` every ``eval_interval`` steps and at the end.
    * ``checkpoint_dir`` / ``checkpoint_interval``: a checkpoint every N steps (and at the end):
      model, optimizer and algorithm tensors, algorithm states, counters, the RNG state and the
      run's settings, as a folder written whole (``step_N``) with a checksum per file. A run
      rotates (``keep_checkpoints``) only its own checkpoints; a fresh run in a folder that holds
      checkpoints is refused. ``resume_from`` (a checkpoint folder, or ``"latest"``: the newest
      checkpoint of ``checkpoint_dir`` that verifies) continues a run so that its next loss is the
      uninterrupted run's. Settings that differ from the checkpoint's (lr, schedule, ...) apply and
      are logged; a model whose config differs, or ``max_steps`` below the checkpoint's step, is
      refused.
    * ``log_interval``: a progress line (step, loss, steps/s, ETA) every N steps, printed to stdout
      when the program has configured no logging (else through the ``ms_prune.trainer`` logger);
      0 is silent. After ``fit``, ``summary`` holds steps, seconds, tokens/s, peak memory and
      compilations (logged too).
    * data parallel: after ``mindspore.communication.init()`` (``msrun --worker_num=N ...``) each
      batch ``train_data`` gives is the GLOBAL batch; worker r trains on rows
      ``[r * B / N, (r + 1) * B / N)`` of every array (``state.batch``; a batch whose rows do not
      divide by N is a ValueError), the loss and gradients are averaged over the workers inside
      the compiled step (before clipping and the update), so the run equals the single-process
      run on the global batches. Worker 0's weights are copied to every worker when the trainer is
      built. Worker 0 alone writes checkpoints and progress lines (the others wait for each save);
      every worker resumes from them. ``eval_fn`` runs on every worker and its numeric metrics are
      averaged over the workers (evaluate the same data everywhere, or each worker its own equal
      share by ``get_rank()``). Host draws (``state.rng``) are seeded alike on every worker.
    """

    def __init__(self, model, loss_fn, train_data, max_steps, algorithms=(), optimizer=None, lr=1e-3,
                 weight_decay=0.0, num_inputs=None, eval_fn=None, eval_interval=0, log_interval=10, checkpoint_dir=None,
                 checkpoint_interval=0, keep_checkpoints=2, resume_from=None, seed=0, logger=None,
                 grad_accumulation=1, max_grad_norm=None, lr_schedule="constant", warmup_steps=0,
                 no_decay=default_no_decay, precision="fp32", loss_scale=None, loss_scale_window=None):
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
        self.grad_accumulation = check_int(owner, "grad_accumulation", grad_accumulation, minimum=1)
        self.max_grad_norm = check_number(owner, "max_grad_norm", max_grad_norm, minimum=0.0, min_open=True,
                                          allow_none=True)
        self.lr_schedule = check_choice(owner, "lr_schedule", lr_schedule, LR_SCHEDULES)
        self.warmup_steps = check_int(owner, "warmup_steps", warmup_steps, minimum=0, maximum=self.max_steps)
        self.precision = check_choice(owner, "precision", precision, tuple(PRECISIONS))
        self._loss_scale = None
        if self.precision == "fp16":
            # 2**16 and 2000: PyTorch's GradScaler defaults
            self._loss_scale = LossScale(
                check_number(owner, "loss_scale", 2.0 ** 16 if loss_scale is None else loss_scale, minimum=1.0),
                check_int(owner, "loss_scale_window", 2000 if loss_scale_window is None else loss_scale_window,
                          minimum=1))
        elif loss_scale is not None or loss_scale_window is not None:
            raise ValueError(f"{owner}: loss_scale and loss_scale_window apply to precision='fp16' only (float16's "
                             f"range needs the scaling), got precision={self.precision!r}")
        check_precision_runs(owner, self.precision)
        if no_decay is not None and not callable(no_decay):
            raise TypeError(f"{owner}: no_decay must be a function Parameter -> bool (True: no weight decay) or "
                            f"None (decay every Parameter), got {type(no_decay).__name__}")
        self.seed = check_int(owner, "seed", seed, minimum=0)
        self.lr = self.weight_decay = None
        if optimizer is None:
            self.lr = check_number(owner, "lr", lr, minimum=0.0, min_open=True)
            self.weight_decay = check_number(owner, "weight_decay", weight_decay, minimum=0.0)
            optimizer = default_optimizer(self.lr, self.weight_decay)
        elif not callable(optimizer) or isinstance(optimizer, nn.Optimizer):
            raise TypeError(f"{owner}: optimizer must be a function params -> Optimizer (it is rebuilt after "
                            f"surgery), got {type(optimizer).__name__}; e.g. "
                            f"optimizer=lambda params: nn.Adam(params, 1e-3)")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"{owner}: eval_fn must be a function model -> dict, got {type(eval_fn).__name__}")
        if checkpoint_interval and checkpoint_dir is None:
            raise ValueError(f"{owner}: checkpoint_interval={checkpoint_interval} needs a checkpoint_dir")
        self.loss_fn, self.train_data, self.optimizer_factory = loss_fn, train_data, optimizer
        self.no_decay = no_decay
        self.eval_fn, self.checkpoint_dir = eval_fn, checkpoint_dir
        self.state = State(model, algorithms, max_steps=self.max_steps, seed=self.seed)
        self.state.rank, self.state.world_size = data_parallel_world(owner)
        self._collective = _AllReduceSum() if self.state.world_size > 1 else None
        self.engine = Engine(self.state, logger or log)
        self.logger = logger or log
        self._steps = CompiledCells(owner=self)  # their graphs are freed with the Trainer
        self._data_iter = None
        self._verified = {}
        self._checked_arity = False
        self.compilations = 0
        self.history = []
        self.summary = None
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        self._vocab_size = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        if checkpoint_dir is not None:  # before INIT's surgery: a refused run leaves the model as it was
            self._prepare_checkpoint_dir(fresh=resume_from is None)
        ms.set_seed(self.seed)
        self.engine.run_event(Event.INIT)
        self._build()
        if self._collective is not None:
            self._copy_from_worker_zero()
        if resume_from is not None:
            self._resume(resume_from)
            if checkpoint_dir is not None:
                self._refuse_other_runs()

    # ---- data parallel -------------------------------------------------------------------------
    @property
    def _leader(self):
        """Worker 0 (the only process without data parallelism): it writes checkpoints and logs."""
        return self.state.rank == 0

    def _all_reduce(self, *arrays):
        """Each numpy array summed over the workers (float32 on the wire)."""
        out = self._collective(*[Tensor(np.asarray(a, np.float32)) for a in arrays])
        return [o.asnumpy() for o in out]

    def _copy_from_worker_zero(self):
        """Start every worker from worker 0's tensors (a model built without a common seed would
        otherwise differ per worker, and averaged gradients would train N different models)."""
        params = [p for p in self._named_tensors().values()
                  if p.dtype in (ms.float16, ms.float32, ms.bfloat16) and int(np.prod(p.shape)) > 0]
        zero = self._leader
        values = self._collective(*[p.value() if zero else ops.zeros_like(p) for p in params])
        for param, value in zip(params, values):
            ops.assign(param, value)

    def _agree(self, error, what):
        """Collective check after ``what`` ran on worker 0 alone: raises ``error`` there and a
        RuntimeError on the other workers when it failed; a barrier when it did not."""
        if self._collective is None:
            if error is not None:
                raise error
            return
        failed = self._all_reduce(np.array([0.0 if error is None else 1.0]))[0][0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"Trainer: worker 0 failed to {what} (its log says why); worker {self.state.rank} "
                               f"stops too")

    def _share(self, batch, index):
        """This worker's rows of the global ``batch``; a row count the workers cannot share equally
        is a ValueError naming it."""
        state = self.state
        workers = state.world_size
        if workers == 1:
            return batch
        for i, x in enumerate(batch):
            rows = int(x.shape[0]) if len(x.shape) else 0
            if rows == 0 or rows % workers:
                raise ValueError(f"Trainer: the global batch has {rows} rows (batch {index}[{i}] of shape "
                                 f"{tuple(x.shape)}), which {workers} workers cannot share equally; give batches "
                                 f"whose arrays' first axis divides by {workers}")
        return tuple(state.worker_rows(x) for x in batch)

    def _mean_metrics(self, metrics):
        """``metrics`` with its numbers averaged over the workers (in two float32 halves, so that a
        float64 value every worker shares comes back exact); other values stay as they are."""
        keys = [k for k, v in sorted(metrics.items())
                if isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))]
        values = np.array([float(metrics[k]) for k in keys] or [0.0], np.float64)
        high = values.astype(np.float32)
        low = (values - high.astype(np.float64)).astype(np.float32)
        high_sum, low_sum = self._all_reduce(high, low)
        means = (high_sum.astype(np.float64) + low_sum.astype(np.float64)) / self.state.world_size
        out = dict(metrics)
        for key, mean in zip(keys, means):
            whole = isinstance(metrics[key], (int, np.integer)) and float(mean).is_integer()
            out[key] = int(mean) if whole else float(mean)
        return out

    # ---- building the step ---------------------------------------------------------------------
    def _build(self):
        """(Re)build the loss Cell and the optimizer for the model as it is now; drop the steps."""
        state = self.state
        protocol.refresh(state.model)
        terms = [term for algorithm in state.algorithms for term in algorithm.loss_terms(state)]
        # -1: all but the last array of a batch go to the model
        loss_net = ModelLoss(mixed_precision(state.model, self.precision), self.loss_fn, self.num_inputs or -1)
        for algorithm in state.algorithms:
            loss_net = algorithm.wrap_loss(loss_net, state)
        state.loss_net = LossWithTerms(loss_net, terms) if terms else loss_net
        state.optimizer = self.optimizer_factory(self._param_groups())
        self._base_lrs = self._scheduled_lrs()
        # the old steps update Parameters no optimizer holds now: they can never run again
        self._steps.clear()
        release_graphs(getattr(self, "_apply", None))
        self._apply = None
        if self.grad_accumulation > 1:
            # zero between steps: checkpoints and surgery happen only there, so the buffers are
            # never saved and a rebuild loses nothing
            self._buffers = ParameterTuple([Parameter(ops.zeros(p.shape, p.dtype), name=f"accumulated.{p.name}",
                                                      requires_grad=False) for p in state.optimizer.parameters])
            self._loss_sum = Parameter(Tensor(0.0, ms.float32), name="accumulated.loss", requires_grad=False)
            self._apply = compile_in_pynative(ApplyGrads(self._buffers, self._loss_sum, self.grad_accumulation,
                                                         self._update() or Update(state.optimizer)))
        state.structure_changed = False

    def _update(self):
        """The :class:`Update` of this run's optimizer; None when it would only call the optimizer."""
        state = self.state
        if state.world_size == 1 and self.max_grad_norm is None and self._loss_scale is None:
            return None
        mean = WorkerMean(state.optimizer.parameters, state.world_size) if state.world_size > 1 else None
        return Update(state.optimizer, self.max_grad_norm, mean, self._loss_scale)

    def _param_groups(self):
        """What the optimizer factory gets: the trainable Parameters (less those an algorithm
        groups itself), split by ``no_decay``, then the algorithms' groups (without weight decay
        unless they set it). A plain list when there is nothing to group."""
        state = self.state
        groups = [dict(g) for algorithm in state.algorithms for g in algorithm.param_groups(state)]
        for group in groups:
            group.setdefault("weight_decay", 0.0)
        claimed = {id(p) for g in groups for p in g["params"]}
        params = [p for p in self._trainable_params() if id(p) not in claimed]
        if self.no_decay is not None and (self.weight_decay is None or self.weight_decay > 0):
            kept = [p for p in params if not self.no_decay(p)]
            if len(kept) < len(params):
                kept_ids = {id(p) for p in kept}
                # the decayed group keeps the optimizer's own weight_decay (a user factory's)
                groups = [{"params": kept}, {"params": [p for p in params if id(p) not in kept_ids],
                                             "weight_decay": 0.0}] + groups
                return [g for g in groups if g["params"]]
        return ([{"params": params}] + groups) if groups else params

    def _trainable_params(self):
        """The model's, then those of a ``loss_fn`` Cell that has its own (a task head such as an
        MLM head is trained with the model)."""
        params = list(self.state.model.trainable_params())
        if isinstance(self.loss_fn, nn.Cell):
            seen = {id(p) for p in params}
            params += [p for p in self.loss_fn.trainable_params() if id(p) not in seen]
        return params

    def _lr_parameters(self):
        """The optimizer's learning-rate Parameters: one, one per group, or those of a schedule
        Cell (a list of rates becomes one, indexed by the optimizer's step)."""
        rates = getattr(self.state.optimizer, "learning_rate", None)
        found = []
        for rate in (rates if isinstance(rates, (tuple, list)) else [rates]):
            if isinstance(rate, Parameter):
                found.append(rate)
            elif isinstance(rate, nn.Cell):
                found += list(rate.get_parameters())
        return found

    def _scheduled_lrs(self):
        """[(learning-rate Parameter, base value)] the schedule scales; [] for a constant schedule."""
        if self.lr_schedule == "constant" and not self.warmup_steps:
            return []
        rates = getattr(self.state.optimizer, "learning_rate", None)
        rates = list(rates) if isinstance(rates, (tuple, list)) else [rates]
        if not all(isinstance(r, Parameter) and tuple(r.shape) == () for r in rates):
            raise ValueError(f"Trainer: lr_schedule={self.lr_schedule!r} with warmup_steps={self.warmup_steps} "
                             f"scales the optimizer's learning rates, but {type(self.state.optimizer).__name__} "
                             f"has a schedule of its own ({', '.join(type(r).__name__ for r in rates)}): build it "
                             f"with number learning rates, or leave lr_schedule='constant'")
        return [(r, float(r.asnumpy())) for r in rates]

    def _write_lr(self):
        factor = lr_multiplier(self.lr_schedule, self.state.step, self.max_steps, self.warmup_steps)
        for param, base in self._base_lrs:
            write_parameter(param, base * factor)

    def _graph_key(self, batch):
        algorithm_keys = tuple(a.graph_key(self.state) for a in self.state.algorithms if a.changes_graph)
        return algorithm_keys + tuple((tuple(x.shape), str(x.dtype)) for x in batch) + (self.state.model.training,)

    def _step_for(self, batch):
        key = self._graph_key(batch)
        step = self._steps.get(key)
        if step is None:
            state = self.state
            loss_net = state.loss_net if self._loss_scale is None else ScaledLoss(state.loss_net, self._loss_scale)
            update = self._update() if self.grad_accumulation == 1 else None
            if self.grad_accumulation > 1:
                step = compile_in_pynative(AccumulateGrads(loss_net, state.optimizer, self._buffers, self._loss_sum))
            elif update is not None:
                step = compile_in_pynative(UpdateStep(loss_net, state.optimizer, update))
            else:
                step = make_train_step(loss_net, state.optimizer)
            self._steps[key] = step
        return step

    def _run(self, step, inputs):
        before = compiled_graph_count(step)
        out = step(*inputs)
        compiled = compiled_graph_count(step) - before
        self.compilations += compiled
        return out, compiled

    # ---- data ----------------------------------------------------------------------------------
    def _next_batch(self):
        """The next batch (checked; this worker's share of it in data parallel), counted in
        ``batches`` and ``batch_in_epoch``; ``state.global_batch`` is the whole batch."""
        state = self.state
        if callable(self.train_data):
            batch = self._checked(self.train_data(state.batches))
        else:
            batch = self._checked(self._next_from_iterable())
        share = self._share(batch, state.batches)
        state.global_batch = batch
        state.batches += 1
        state.batch_in_epoch += 1
        return share

    def _next_from_iterable(self):
        state = self.state
        if self._data_iter is None:
            self._data_iter = iter(self.train_data)
            if state.batch_in_epoch and self._data_iter is self.train_data:
                raise ValueError("Trainer: train_data is a one-pass iterator, so a resumed run cannot see the "
                                 "batches the uninterrupted run saw; pass a re-iterable (a list, a Dataset) or a "
                                 "function step -> batch")
            for _ in range(state.batch_in_epoch):  # a resumed run skips what the epoch has seen
                next(self._data_iter)
        try:
            return next(self._data_iter)
        except StopIteration:
            self._data_iter = None
            self._end_epoch()
            self._data_iter = iter(self.train_data)
            try:
                return next(self._data_iter)
            except StopIteration:
                raise ValueError("Trainer: train_data yielded no batch") from None

    def _checked(self, batch):
        """``batch`` as a tuple, or a TypeError/ValueError naming what is wrong with it: a raw
        array, a list, a count the model or the loss cannot take, ids outside the vocabulary."""
        index = self.state.batches
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"Trainer: train_data must give each batch as a tuple of numpy arrays (the model's "
                            f"inputs, then loss_fn's targets); batch {index} is {_describe(batch)}")
        for i, x in enumerate(batch):
            if not isinstance(x, (np.ndarray, Tensor)):
                raise TypeError(f"Trainer: batch {index}[{i}] is {_describe(x)}; each array of a batch must be a "
                                f"numpy array (np.asarray(...))")
        batch = tuple(batch)
        if not self._checked_arity:
            self._check_arity(batch, index)
            self._checked_arity = True
        ids = batch[0]
        if self._vocab_size is not None and isinstance(ids, np.ndarray) and ids.size and \
                np.issubdtype(ids.dtype, np.integer):
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self._vocab_size:
                raise ValueError(f"Trainer: batch {index}: the model's ids run from 0 to {self._vocab_size - 1} "
                                 f"(config.vocab_size={self._vocab_size}), but batch[0] holds ids {low}..{high}")
        return batch

    def _check_arity(self, batch, index):
        n_inputs = self.num_inputs if self.num_inputs is not None else len(batch) - 1
        n_targets = len(batch) - n_inputs
        which = f"num_inputs={self.num_inputs}" if self.num_inputs is not None else "all but the last"
        if n_inputs < 1 or n_targets < 1:
            raise ValueError(f"Trainer: batch {index} has {len(batch)} array(s) ({_shapes(batch)}); the model takes "
                             f"the first ones ({which}) and loss_fn the rest: a batch needs at least one model input "
                             f"and one target")
        model = self.state.model
        for name, function, given, shift in (
                (f"{type(model).__name__}.construct", model.construct, n_inputs, 0),
                ("loss_fn", self.loss_fn.construct if isinstance(self.loss_fn, nn.Cell) else self.loss_fn,
                 n_targets, 1)):
            arity = _arity(function)
            if arity is None:
                continue
            fewest, most = arity[0] - shift, (None if arity[1] is None else arity[1] - shift)
            if given < fewest or (most is not None and given > most):
                takes = f"{fewest}" if fewest == most else f"{fewest} to {'any' if most is None else most}"
                what = "inputs" if not shift else "targets after the model's outputs"
                raise ValueError(f"Trainer: batch {index} gives {name} {given} array(s) ({which} of {len(batch)}: "
                                 f"{_shapes(batch)}), but it takes {takes} {what}")

    def _diagnose(self, batch):
        """After a first step failed: which of the model and ``loss_fn`` fails on what it got, as
        a ValueError naming the shapes (MindSpore's own error names an op, e.g. MaskedFill); None
        when both run alone (the failure is elsewhere)."""
        n = self.num_inputs or len(batch) - 1
        inputs, targets = [Tensor(x) for x in batch[:n]], [Tensor(x) for x in batch[n:]]
        name = type(self.state.model).__name__
        mode = ms.get_context("mode")
        # op by op, and each result read back: run as a graph (or left pending), a mismatch can pass
        # unnoticed here after other graphs compiled in the process (seen in the full suite)
        ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            try:
                outputs = self.state.model(*inputs)
                _read_back(outputs)
            except Exception as error:  # noqa: BLE001 - any failure of the user's model is reported
                return ValueError(f"Trainer: the first step failed in the model: {name} fails on the batch's inputs "
                                  f"({_shapes(inputs)}): {_first_line(error)}")
            try:
                _read_back(self.loss_fn(outputs, *targets))
            except Exception as error:  # noqa: BLE001
                shown = _shapes(outputs if isinstance(outputs, tuple) else (outputs,))
                return ValueError(f"Trainer: the first step failed in loss_fn: it fails on the model's outputs "
                                  f"({shown}) and the batch's targets ({_shapes(targets)}); check the targets' "
                                  f"shapes: {_first_line(error)}")
        finally:
            ms.set_context(mode=mode)
        return None

    def _end_epoch(self):
        self.engine.run_event(Event.EPOCH_END)
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.engine.run_event(Event.EPOCH_START)

    # ---- the loop ------------------------------------------------------------------------------
    def _train_step(self, first):
        """One optimizer step over ``grad_accumulation`` batches; returns (loss, compiled a graph)."""
        state = self.state
        compiled = 0
        for micro in range(self.grad_accumulation):
            if micro:
                state.batch = self._next_batch()
            batch = state.batch
            try:
                out, new = self._run(self._step_for(batch), [Tensor(x) for x in batch])
            except Exception as error:
                if not (first and micro == 0):
                    raise
                kernel = KERNEL_SELECTION.search(str(error))
                if kernel and self.precision != "fp32":
                    raise RuntimeError(unsupported_precision_message(
                        "Trainer", self.precision, kernel.group(1), ms.get_context("device_target"), error)) from error
                diagnosis = self._diagnose(batch)
                if diagnosis is None:
                    raise
                raise diagnosis from error
            compiled += new
            # the global batch's counts: equal to a single-process run's, and what throughput means
            state.samples += state.global_rows(batch[0].shape[0])
            state.tokens += state.global_rows(batch[0].shape[0]) * (int(batch[0].shape[1]) if batch[0].ndim >= 2 else 1)
        if self._apply is not None:
            out, new = self._run(self._apply, ())
            compiled += new
        return float(out.asnumpy()), compiled

    def fit(self):
        """Train up to ``max_steps``; returns the history [{"step", "loss", ...metrics}] and sets
        ``summary``."""
        state = self.state
        with self._progress_output():
            state.model.set_train(True)
            self.engine.run_event(Event.FIT_START)
            if state.step == 0 and state.batch_in_epoch == 0:
                self.engine.run_event(Event.EPOCH_START)
            started, first_step = time.perf_counter(), state.step
            counts = (state.tokens, state.samples, self.compilations, self._skipped())
            first_loss, warned, skipped = None, False, counts[3]
            if state.step >= self.max_steps:
                self.logger.info("Trainer: nothing to train: the run is at step %d of max_steps=%d",
                                 state.step, self.max_steps)
            while state.step < self.max_steps:
                step_started = time.perf_counter()
                state.batch = self._next_batch()
                if state.step == first_step:  # a row of it verifies the model after any surgery
                    protocol.remember_inputs(state.model, state.batch[:self.num_inputs or -1])
                if self._base_lrs:
                    # before BATCH_START: an algorithm that drives the learning rate itself writes last
                    self._write_lr()
                self.engine.run_event(Event.BATCH_START)
                if state.structure_changed:
                    self._build()
                    if self._base_lrs:
                        self._write_lr()
                state.loss, compiled = self._train_step(first=state.step == first_step)
                if not math.isfinite(state.loss):
                    raise FloatingPointError(f"Trainer: the loss is {state.loss} at step {state.step + 1}")
                first_loss = state.loss if first_loss is None else first_loss
                if not warned and first_loss and abs(state.loss) > DIVERGENCE_FACTOR * abs(first_loss):
                    warned = True
                    self.logger.warning("Trainer: the loss is diverging: %.4g at step %d, %.0fx the first loss of "
                                        "this fit (%.4g); lower the learning rate or set max_grad_norm",
                                        state.loss, state.step + 1, abs(state.loss / first_loss), first_loss)
                state.step += 1
                self.engine.run_event(Event.AFTER_TRAIN_STEP)
                self.engine.run_event(Event.BATCH_END)
                if state.structure_changed:
                    self._build()
                # seconds: the step's wall-clock (data and algorithm events included); a step that
                # compiled a graph says so, so time-to-quality can count compilation apart
                record = {"step": state.step, "loss": state.loss, "seconds": time.perf_counter() - step_started,
                          "compiled": compiled > 0}
                if self._loss_scale is not None:
                    skipped, skipped_before = self._skipped(), skipped
                    record["skipped"] = skipped > skipped_before
                if self.eval_interval and state.step % self.eval_interval == 0 and state.step < self.max_steps:
                    record.update(self.evaluate())
                self.history.append(record)
                self._log_progress(started, first_step)
                if self.checkpoint_interval and state.step % self.checkpoint_interval == 0:
                    self.save_checkpoint()
            ran = state.step > first_step
            self.engine.run_event(Event.FIT_END)
            changed = state.structure_changed
            if changed:
                self._build()
            if self.eval_fn is not None:
                metrics = self.evaluate()
                if ran:
                    self.history[-1].update(metrics)
                else:  # a finished run resumed: its evaluation has no step of its own
                    self.history.append(dict(metrics, step=state.step))
            if self.checkpoint_dir is not None and (ran or changed):
                self.save_checkpoint()
            self._summarise(started, first_step, counts)
        return self.history

    def _skipped(self):
        """Updates the loss scale skipped (overflowing float16 gradients) in the whole run."""
        return 0 if self._loss_scale is None else int(self._loss_scale.skipped.asnumpy())

    def _summarise(self, started, first_step, counts):
        state = self.state
        seconds = time.perf_counter() - started
        tokens, samples = state.tokens - counts[0], state.samples - counts[1]
        memory = peak_memory_mb()
        self.summary = {"steps": state.step - first_step, "step": state.step, "seconds": seconds, "tokens": tokens,
                        "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
                        "samples_per_second": samples / seconds if seconds > 0 else float("nan"),
                        "compilations": self.compilations - counts[2], "precision": self.precision,
                        "skipped_steps": self._skipped() - counts[3],
                        "peak_host_memory_mb": memory["host"], "peak_device_memory_mb": memory["device"]}
        if self.log_interval and self._leader:
            s = self.summary
            peak = ", ".join(f"{where} {s[f'peak_{where}_memory_mb']:.0f} MiB" for where in ("host", "device")
                             if s[f"peak_{where}_memory_mb"] is not None)
            skipped = f", {s['skipped_steps']} skipped (float16 overflow)" if self._loss_scale is not None else ""
            self.logger.info("Trainer: %d steps in %.1f s (now at step %d/%d)%s, %.0f tokens/s, %d graph "
                             "compilations, peak memory %s", s["steps"], seconds, state.step, self.max_steps,
                             skipped, s["tokens_per_second"], s["compilations"], peak or "unknown")

    @contextlib.contextmanager
    def _progress_output(self):
        """Progress lines reach the user without any logging set-up: when no handler would take the
        logger's records, one that prints to stdout is attached for the duration of ``fit``."""
        logger = self.logger
        if not self.log_interval or not self._leader or logger.hasHandlers():
            yield
            return
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        level = logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    def evaluate(self):
        if self.eval_fn is None:
            return {}
        state = self.state
        self.engine.run_event(Event.EVAL_START)
        state.model.set_train(False)
        metrics = dict(self.eval_fn(state.model))
        if self._collective is not None:
            metrics = self._mean_metrics(metrics)
        state.model.set_train(True)
        state.metrics = metrics
        self.engine.run_event(Event.EVAL_END)
        if self.log_interval and self._leader:
            self.logger.info("step %d eval%s %s", state.step,
                             f" (mean over {state.world_size} workers)" if state.world_size > 1 else "",
                             ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return metrics

    def _log_progress(self, started, first_step):
        state = self.state
        if not self.log_interval or not self._leader or (state.step % self.log_interval and
                                                          state.step != self.max_steps):
            return
        elapsed = time.perf_counter() - started
        rate = (state.step - first_step) / elapsed if elapsed > 0 else float("nan")
        eta = (self.max_steps - state.step) / rate if rate > 0 else float("nan")
        scale = ""
        if self._loss_scale is not None:
            scale = f" | loss scale {self._loss_scale.state_dict()['scale']:g}, {self._skipped()} skipped"
        self.logger.info("step %d/%d | loss %.4f | %.2f steps/s | ETA %s%s", state.step, self.max_steps,
                         state.loss, rate, time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?",
                         scale)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _settings(self):
        """What the user chose for this run, saved with each checkpoint and compared at resume."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "optimizer": type(self.state.optimizer).__name__,
                "lr_schedule": self.lr_schedule, "warmup_steps": self.warmup_steps, "max_steps": self.max_steps,
                "grad_accumulation": self.grad_accumulation, "max_grad_norm": self.max_grad_norm, "seed": self.seed,
                "precision": self.precision}

    def _model_config(self):
        """The model's config as JSON values (None for a model without a ``config.to_dict()``)."""
        config = getattr(self.state.model, "config", None)
        if not callable(getattr(config, "to_dict", None)):
            return None
        return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))

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

    def _prepare_checkpoint_dir(self, fresh):
        """Create ``checkpoint_dir`` and prove it writable now rather than at the first save, clean
        what a killed save left there, and refuse a fresh run in a folder that holds checkpoints
        (its rotation would delete them, and it could not resume)."""
        directory = self.checkpoint_dir
        problem = None
        if self._leader:  # in data parallel worker 0 alone writes there; the others wait for it
            problem = self._prepare_writable(directory)
        self._agree(problem, f"prepare checkpoint_dir {directory!r}")
        folders = self._checkpoint_folders()
        if fresh and (folders or os.path.exists(os.path.join(directory, "latest"))):
            raise ValueError(f"Trainer: checkpoint_dir {directory!r} already holds checkpoints "
                             f"({[n for _, n in folders] or ['latest']}); pass resume_from='latest' to continue "
                             f"that run, or give a new or empty checkpoint_dir (this run would mix its checkpoints "
                             f"with them)")

    def _prepare_writable(self, directory):
        """None when ``directory`` was made (or is) writable and cleaned of what killed saves
        left; else the ValueError to raise."""
        probe = os.path.join(str(directory), f".write-test-{os.getpid()}")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.remove(probe)
        except OSError as error:
            return ValueError(f"Trainer: checkpoint_dir {directory!r} is not a writable folder ({error}); "
                              f"give a folder this process can write")
        cleaned = clean_orphans(directory)
        if cleaned:
            self.logger.warning("Trainer: removed or restored what interrupted saves left in %s: %s",
                                directory, cleaned)
        return None

    def _checkpoint_folders(self):
        """[(step, name)] of the step folders in ``checkpoint_dir``, newest first."""
        found = []
        for name in os.listdir(self.checkpoint_dir):
            match = STEP_FOLDER.fullmatch(name)
            if match and os.path.isdir(os.path.join(self.checkpoint_dir, name)):
                found.append((int(match.group(1)), name))
        return sorted(found, reverse=True)

    def _owner(self, folder):
        """The run id a checkpoint folder names, or None when its checksums cannot be read."""
        try:
            return read_checksums(folder).get("run_id")
        except ValueError:
            return None

    def _refuse_other_runs(self):
        """A resumed run writes its checkpoints and ``latest`` beside no other run's."""
        others = sorted(n for _, n in self._checkpoint_folders()
                        if self._owner(os.path.join(self.checkpoint_dir, n)) not in (None, self.state.run_id))
        if others:
            raise ValueError(f"Trainer: checkpoint_dir {self.checkpoint_dir!r} holds checkpoints of another run "
                             f"({others}); give this run its own checkpoint_dir")

    def save_checkpoint(self, path=None):
        """Write a checkpoint folder (default ``checkpoint_dir/step_<N>``) whole or not at all: its
        files go to ``step_<N>.tmp-PID`` with ``checksums.json`` last, then the folder is renamed
        into place (swapped with an existing one); ``latest`` is updated after, then the run's
        older checkpoints rotate. In data parallel every worker calls it, worker 0 writes and the
        others wait until the checkpoint is complete."""
        state = self.state
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("Trainer.save_checkpoint: give a path or a checkpoint_dir")
            path = os.path.join(self.checkpoint_dir, f"step_{state.step}")
        problem = None
        if self._leader:
            try:
                self._write_checkpoint(path)
            except Exception as error:  # noqa: BLE001 - re-raised after the other workers hear of it
                if self._collective is None:
                    raise
                problem = error
        self._agree(problem, f"write the checkpoint {path}")
        return path

    def _write_checkpoint(self, path):
        from safetensors.numpy import save
        state = self.state
        tensors = {name: np.ascontiguousarray(p.asnumpy()) for name, p in self._named_tensors().items()}
        saved = {"state": state.state_dict(),
                 "algorithms": {a.name: a.state_dict() for a in state.algorithms},
                 "model_training": state.model.training,
                 "settings": self._settings(),
                 "model_config": self._model_config()}
        if self._loss_scale is not None:
            saved["loss_scale"] = self._loss_scale.state_dict()
        with atomic_directory(path) as folder:
            with open(os.path.join(folder, CHECKPOINT_TENSORS), "wb") as f:
                f.write(save(tensors))
            with open(os.path.join(folder, CHECKPOINT_STATE), "w", encoding="utf-8") as f:
                json.dump(saved, f, indent=1, sort_keys=True)
            write_checksums(folder, run_id=state.run_id, step=state.step)
        if self.checkpoint_dir is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.checkpoint_dir):
            self._verified[os.path.basename(path)] = self._stamp(path)
            with atomic_write(os.path.join(self.checkpoint_dir, "latest"), binary=False) as f:
                f.write(os.path.basename(path))
            self._rotate()

    @staticmethod
    def _stamp(folder):
        return os.stat(os.path.join(folder, CHECKSUMS)).st_mtime_ns

    def _verifies(self, name):
        """Whether checkpoint ``name`` verifies against its checksums (cached per checksums file)."""
        folder = os.path.join(self.checkpoint_dir, name)
        try:
            stamp = self._stamp(folder)
        except OSError:
            return False
        if self._verified.get(name) == stamp:
            return True
        try:
            verify_checksums(folder)
        except ValueError:
            return False
        self._verified[name] = stamp
        return True

    def _rotate(self):
        """Keep this run's ``keep_checkpoints`` newest checkpoints that verify; delete its older
        ones. Other runs' folders and folders whose owner cannot be read are left alone."""
        own = [(step, name) for step, name in self._checkpoint_folders()
               if self._owner(os.path.join(self.checkpoint_dir, name)) == self.state.run_id]
        kept = [(step, name) for step, name in own if self._verifies(name)][:self.keep_checkpoints]
        if not kept:
            return
        newest = kept[0][0]
        for step, name in own:
            if (step, name) not in kept and step < newest:
                shutil.rmtree(os.path.join(self.checkpoint_dir, name), ignore_errors=True)
                self._verified.pop(name, None)

    def _resume(self, resume_from):
        if resume_from != "latest":
            return self.load_checkpoint(str(resume_from))
        if self.checkpoint_dir is None:
            raise ValueError("Trainer: resume_from='latest' needs a checkpoint_dir")
        candidates, problems = [], []
        pointer = os.path.join(self.checkpoint_dir, "latest")
        if os.path.isfile(pointer):
            with open(pointer, "rb") as f:
                raw = f.read()
            try:
                name = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                name = None
            if name is None or not STEP_FOLDER.fullmatch(name):
                problems.append(f"{pointer} does not name a checkpoint (it holds {raw[:40]!r})")
            else:
                candidates.append(name)
        candidates += [n for _, n in self._checkpoint_folders() if n not in candidates]
        if not candidates:
            raise FileNotFoundError(f"Trainer: no checkpoint to resume in {self.checkpoint_dir} (no 'latest')")
        for name in candidates:
            folder = os.path.join(self.checkpoint_dir, name)
            try:
                verify_checksums(folder)
            except ValueError as error:
                problems.append(str(error))
                continue
            if problems:
                self.logger.warning("Trainer: resuming from %s, the newest checkpoint that verifies: %s", folder,
                                    "; ".join(problems))
            return self.load_checkpoint(folder, _verified=True)
        raise ValueError(f"Trainer: no checkpoint in {self.checkpoint_dir} verifies: " + "; ".join(problems))

    def _read_saved_state(self, path):
        file = os.path.join(path, CHECKPOINT_STATE)
        try:
            with open(file, "rb") as f:
                saved = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"Trainer.load_checkpoint: {path} has no {CHECKPOINT_STATE}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"Trainer.load_checkpoint: {file} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start}): corrupt") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"Trainer.load_checkpoint: {file} is not valid JSON ({error})") from None
        try:
            for key in ("state", "algorithms", "settings"):
                required(saved, key)
            required(saved, "state", "counters", "step")
        except ValueError as error:
            raise ValueError(f"Trainer.load_checkpoint: {file}: {error}") from None
        return saved, file

    def load_checkpoint(self, path, _verified=False):
        """Continue from a checkpoint written by :meth:`save_checkpoint` (same model, algorithms and
        data as the run that wrote it). The folder must verify against its checksums; settings
        that differ from the checkpoint's are applied and logged; a model config that differs, or
        ``max_steps`` below the checkpoint's step, is a ValueError naming it."""
        from safetensors.numpy import load_file
        state = self.state
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Trainer.load_checkpoint: {path} is not a checkpoint folder")
        if not _verified:
            try:
                verify_checksums(path)
            except ValueError as error:
                raise ValueError(f"Trainer.load_checkpoint: {path} does not verify: {error}; resume_from='latest' "
                                 f"takes the newest checkpoint that does") from None
        saved, file = self._read_saved_state(path)
        saved_step = saved["state"]["counters"]["step"]
        if self.max_steps < saved_step:
            raise ValueError(f"Trainer: max_steps={self.max_steps} is below the step of the checkpoint {path} "
                             f"({saved_step}); pass max_steps >= {saved_step} to resume it")
        ours = [a.name for a in state.algorithms]
        if not isinstance(saved["algorithms"], dict) or sorted(saved["algorithms"]) != sorted(ours):
            raise ValueError(f"Trainer.load_checkpoint: the checkpoint was written with algorithms "
                             f"{sorted(saved['algorithms'])}, this trainer has {sorted(ours)}")
        try:
            for algorithm in state.algorithms:
                algorithm.load_state_dict(saved["algorithms"][algorithm.name])
            state.load_state_dict(saved["state"])
            if self._loss_scale is not None and "loss_scale" in saved:  # else (an fp32 run's) it starts afresh
                self._loss_scale.load_state_dict(saved["loss_scale"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"Trainer.load_checkpoint: {file}: {error}") from None
        self.engine.run_event(Event.AFTER_LOAD)
        self._build()
        self._check_model_config(saved.get("model_config"), path)
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
        # the learning rates come from this run's settings (and schedule), not from the checkpoint:
        # a resumed run given another lr trains at it
        rates = {id(p) for p in self._lr_parameters()}
        for name, param in named.items():
            if id(param) not in rates:
                ops.assign(param, Tensor(tensors[name].reshape(param.shape), dtype=param.dtype))
        state.model.set_train(bool(saved.get("model_training", True)))
        self._data_iter = None
        self._log_changed_settings(saved["settings"], path)
        return path

    def _check_model_config(self, saved_config, path):
        ours = self._model_config()
        if saved_config is None or ours is None:
            return
        differing = {k: (saved_config.get(k), ours.get(k)) for k in sorted(set(saved_config) | set(ours))
                     if saved_config.get(k) != ours.get(k)}
        if differing:
            shown = ", ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in differing.items())
            raise ValueError(f"Trainer.load_checkpoint: {path} was written for another model config ({shown}); "
                             f"build the model with the checkpoint's config")

    def _log_changed_settings(self, saved, path):
        for key, ours in self._settings().items():
            theirs = saved.get(key, SETTING_DEFAULTS.get(key)) if isinstance(saved, dict) else None
            if theirs == ours:
                continue
            if key == "seed":
                self.logger.warning("Trainer: resuming %s: seed=%r is not used, the checkpoint's random state "
                                    "(seed %r) continues", path, ours, theirs)
            else:
                self.logger.warning("Trainer: resuming %s with %s=%r (the checkpoint's run had %r): applied from "
                                    "step %d on", path, key, ours, theirs, self.state.step + 1)
