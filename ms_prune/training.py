"""Small pieces every sample, benchmark and algorithm test needs: context set-up, a compiled
training step, result files."""
import ctypes
import gc
import json
import logging
import math
import os
import re
import weakref

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, amp, nn, ops


DEVICE_TARGETS = ("CPU", "GPU", "Ascend")


def device_target_name(value):
    """MindSpore's spelling of a device target given in any case ('cpu', 'gpu', 'ASCEND' ...)."""
    for name in DEVICE_TARGETS:
        if isinstance(value, str) and value.strip().lower() == name.lower():
            return name
    raise ValueError(f"device_target must be one of {list(DEVICE_TARGETS)} (any case), got {value!r}")


def set_context(mode="graph", device_target="CPU", seed=None):
    """``mode``: 'graph' (GRAPH_MODE, how users train) or 'pynative'; ``device_target`` in any case.
    A backend this MindSpore installation cannot run is a RuntimeError saying so."""
    if mode not in ("graph", "pynative"):
        raise ValueError(f"mode must be 'graph' or 'pynative', got {mode!r}")
    device_target = device_target_name(device_target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    # set_device raises once kernels have run, even for the same target: set it only on change.
    if ms.get_context("device_target") != device_target:
        try:
            ms.set_device(device_target)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"device_target {device_target!r} is not available here (MindSpore: {first}); "
                               f"install MindSpore's {device_target} package and drivers, or use "
                               f"--device_target CPU") from None
    if seed is not None:
        ms.set_seed(seed)


class TrainStep(nn.Cell):
    """``loss = loss_net(*inputs)``, its gradients with respect to the optimizer's parameters, and
    the optimizer update, as one Cell: in GRAPH_MODE the whole step compiles to one graph.

    A Cell rather than ``ms.jit`` of a closure: on MindSpore 2.10 CPU a jitted closure ran the
    same step about 2x slower, and froze Parameters it does not optimise (a schedule written
    between steps) as constants at compile time; a Cell's graph reads them every step.
    """

    def __init__(self, loss_net, optimizer):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.optimizer = optimizer
        self.grad_fn = ms.value_and_grad(loss_net, None, optimizer.parameters)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        self.optimizer(grads)
        return loss


def make_train_step(loss_net, optimizer, jit=True):
    """A :class:`TrainStep`; returns the loss when called with the loss net's inputs.

    Compiled in GRAPH_MODE. In PyNative it runs op by op, or compiled with ``ms.jit`` when
    ``jit=True``, so a PyNative program still gets a compiled step.
    """
    step = TrainStep(loss_net, optimizer)
    return compile_in_pynative(step) if jit else step


def compile_in_pynative(cell):
    """``cell`` with its ``construct`` compiled by ``ms.jit`` when the context is PyNative (in
    GRAPH_MODE the Cell compiles anyway): a step Cell is one graph in either mode."""
    if ms.get_context("mode") == ms.PYNATIVE_MODE:
        cell.construct = ms.jit(cell.construct)
    return cell


# False only to measure what releasing graphs saves (benchmarks/memory.py --no-release)
GRAPH_RELEASE = {"enabled": True}


def _jit_phases(cell, phases):
    # ms.jit names a method's graph "<function>.<create_time><phase>.<id(cell)>.<arguments>"
    marker = re.compile(rf"\.{cell.create_time}[A-Za-z_]*\.{id(cell)}\.")
    return {phase for phase in phases if marker.search(phase)}


def live_graph_count():
    """How many compiled graphs MindSpore holds in this process, in either mode (Cells' own and
    ``ms.jit``'s): what ``release_graphs`` brings down."""
    from mindspore.graph.api import cells_compile_cache, ms_compile_cache
    return len(ms_compile_cache) + sum(len(cache) for cache in list(cells_compile_cache.values()))


def release_graphs(*cells):
    """Free the graphs MindSpore compiled for ``cells`` themselves (not their sub-Cells): GRAPH_MODE
    keeps them on the Cell, ``ms.jit`` (``compile_in_pynative``) in a global record. For Cells whose
    graphs cannot run again: a model's before surgery (``protocol.refresh``), a train step whose
    optimizer was rebuilt, a finished scoring pass. Needed because MindSpore's executor holds a
    compiled Cell (and everything it reaches: model, optimizer state) until its graphs are deleted,
    so dropping the last Python reference frees nothing (measured on MiniLM: 0.8-2.8 GB per graph).
    A released Cell that runs again compiles again, with the same result. Returns how many graphs
    were freed; the heap's free pages go back to the system."""
    if not GRAPH_RELEASE["enabled"]:
        return 0
    from mindspore.graph.api import _cell_graph_executor, ms_compile_cache
    freed = 0
    for cell in cells:
        if cell is None:
            continue
        own, jitted = set(cell.compile_cache), _jit_phases(cell, ms_compile_cache)
        if own:
            _cell_graph_executor.del_net_res(cell, own)
            cell.compile_cache.clear()
        if jitted:
            _cell_graph_executor.del_net_res(None, jitted)
            if os.getenv("MS_DEV_JIT_PIPELINE") != "0":  # as mindspore.ms_memory_recycle does
                from mindspore._c_expression import JitExecutor_
                JitExecutor_.get_instance().del_net_res(None, jitted)
            ms_compile_cache.difference_update(jitted)
        freed += len(own) + len(jitted)
    if freed:
        trim_heap()
    return freed


def trim_heap():
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing):
    without it a freed graph's memory stays in the process's resident size."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CompiledCells(dict):
    """{key: compiled Cell} one owner runs, such as a Trainer's train step per graph key.
    ``clear()`` also frees their graphs (``release_graphs``); with ``owner`` that happens too when
    the owner is garbage-collected, since MindSpore would otherwise keep the Cells alive."""

    def __init__(self, owner=None):
        super().__init__()
        if owner is not None:
            # not at exit: MindSpore may be torn down before the finalizer runs
            weakref.finalize(owner, CompiledCells.clear, self).atexit = False

    def clear(self):
        release_graphs(*self.values())
        super().clear()


# what each ``precision`` computes the model's forward in; the weights stay float32 (master copy)
PRECISIONS = {"fp32": None, "fp16": ms.float16, "bf16": ms.bfloat16}


def _to_float32(x):
    if x.dtype in (ms.float16, ms.bfloat16):
        return ops.cast(x, ms.float32)
    return x


class Float32Outputs(nn.Cell):
    """``model(*inputs)`` with low-precision float outputs cast to float32: the loss (and whatever
    reads the outputs) then runs in float32 whatever the model computed in."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model
        self.hyper_map = ops.HyperMap()

    def construct(self, *inputs):
        outputs = self.model(*inputs)
        if isinstance(outputs, tuple):
            return self.hyper_map(_to_float32, outputs)
        return _to_float32(outputs)


def mixed_precision(model, precision):
    """``model`` as the trainer differentiates it at ``precision``: 'fp32' is the model itself;
    'fp16'/'bf16' wrap it (the model's own Cells are left as they are) in MindSpore's ``auto``
    mixed precision: the matrix products (``mindspore.amp`` auto white list: MatMul, BatchMatMul,
    Dense, ...) run in the low dtype, the ops of its black list (LayerNorm, Softmax, LogSoftmax,
    Exp, Log, Rsqrt, Pow, ...) in float32, the rest in their inputs' dtype; Parameters stay
    float32 and are cast where a product reads them; the outputs are cast back to float32, so the
    loss and any penalty term are float32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return model
    return amp.auto_mixed_precision(Float32Outputs(model), "auto", dtype)


def check_precision_runs(owner, precision):
    """A RuntimeError naming the operator and the back-end when this back-end has no kernel for
    ``precision``'s matrix products (bfloat16 MatMul on CPU): said now rather than as a kernel
    selection error from inside the first compiled step."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    backend = ms.get_context("device_target")
    a = ops.ones((2, 2, 2), dtype)
    for name, run in (("MatMul", lambda: ops.matmul(a[0], a[0])), ("BatchMatMul", lambda: ops.bmm(a, a))):
        try:
            run().asnumpy()
        except (RuntimeError, TypeError, ValueError) as error:
            raise RuntimeError(unsupported_precision_message(owner, precision, name, backend, error)) from None


def unsupported_precision_message(owner, precision, operator, backend, error):
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{owner}: precision={precision!r} cannot run on the {backend} back-end: its {operator} kernel has no "
            f"{PRECISIONS[precision]} version (MindSpore: {first}); use precision='fp32'"
            f"{'' if precision == 'fp16' else ' or fp16'}, or a device whose kernels support it")


class LossScale(nn.Cell):
    """Dynamic loss scaling for float16 training, by ``mindspore.amp.DynamicLossScaler``: the loss
    is multiplied by the scale before the backward pass (small float16 gradients would flush to
    zero otherwise), the gradients divided by it before the update. An update whose gradients are
    not all finite is skipped and the scale halves (not below 1); after ``window`` finite updates
    in a row it doubles. Scales are powers of 2, so scaling and unscaling are exact. The state
    (scale, finite updates in a row, skipped updates) lives in Parameters the compiled step
    updates."""

    def __init__(self, scale=2.0 ** 16, window=2000):
        super().__init__(auto_prefix=False)
        self.scaler = amp.DynamicLossScaler(scale, 2, window)
        # unique names: a graph refuses two Parameters of one name, and DynamicLossScaler's are generic
        self.scaler.scale_value.name = "loss_scale.scale"
        self.scaler.counter.name = "loss_scale.good_steps"
        self.skipped = Parameter(Tensor(0, ms.int32), name="loss_scale.skipped", requires_grad=False)

    def scale(self, loss):
        return self.scaler.scale((loss,))[0]

    def unscale(self, loss, grads):
        """(loss / scale, grads / scale, whether every gradient is finite)."""
        unscaled = self.scaler.unscale((loss,) + grads)
        grads = unscaled[1:]
        return unscaled[0], grads, amp.all_finite(grads)

    def adjust(self, finite):
        skipped = ops.assign_add(self.skipped, ops.cast(ops.logical_not(finite), ms.int32))
        return ops.depend(self.scaler.adjust(finite), skipped)

    def state_dict(self):
        return {"scale": float(self.scaler.scale_value.asnumpy()), "good_steps": int(self.scaler.counter.asnumpy()),
                "skipped_steps": int(self.skipped.asnumpy())}

    def load_state_dict(self, state):
        write_parameter(self.scaler.scale_value, float(state["scale"]))
        write_parameter(self.scaler.counter, int(state["good_steps"]))
        write_parameter(self.skipped, int(state["skipped_steps"]))


class ScaledLoss(nn.Cell):
    """``loss_net(*inputs)`` times the loss scale (a :class:`LossScale`): what the backward pass of
    a float16 step differentiates."""

    def __init__(self, loss_net, loss_scale):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.loss_scale = loss_scale

    def construct(self, *inputs):
        return self.loss_scale.scale(self.loss_net(*inputs))


def peak_memory_mb():
    """{"host": peak resident memory of this process, "device": peak memory MindSpore allocated on
    the accelerator} in MiB; ``None`` where the platform cannot tell (the device on CPU)."""
    host = None
    try:
        import resource
        import sys
        # ru_maxrss is in KiB on Linux, in bytes on macOS
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):  # Windows has no resource module
        pass
    device = None
    if ms.get_context("device_target") != "CPU":
        try:
            device = ms.runtime.max_memory_allocated() / 2 ** 20
        except (AttributeError, RuntimeError):
            pass
    return {"host": host, "device": device}


def write_parameter(param, value):
    """Write a host value into ``param`` so that every compiled graph reading it sees it at its
    next run, with no recompilation: the one way ms_prune moves a host value (a schedule's theta,
    a target, a learning rate, per-step noise) into a compiled step.

    In place (``ops.assign``), not ``set_data``: a graph compiled with ``ms.jit`` (the PyNative
    train step) keeps reading the memory it was compiled with, and ``set_data`` swaps it."""
    ops.assign(param, Tensor(np.asarray(value, dtype=ms.dtype_to_nptype(param.dtype)).reshape(param.shape)))


def compiled_graph_count(step):
    """How many graphs MindSpore has compiled for ``step`` plus every ``ms.jit`` graph so far:
    the difference around a call tells whether that call compiled. GRAPH_MODE records a Cell's
    graphs on the Cell (``compile_cache``), ``ms.jit`` in a global record."""
    from mindspore.graph.api import ms_compile_cache
    return len(ms_compile_cache) + len(getattr(step, "compile_cache", ()))


def lm_cross_entropy(logits, labels):
    """Mean next-token cross-entropy of (batch, seq, vocab) logits against (batch, seq) labels: the
    ``loss_fn`` of an ``ms_prune.engine.Trainer`` training a language model (module-level, so graph
    mode can parse it)."""
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class LMLoss(nn.Cell):
    """Mean next-token cross-entropy of a model returning (batch, seq, vocab) logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, input_ids, labels):
        return lm_cross_entropy(self.model(input_ids), labels)


def lm_perplexity(model, tokens, batch_size, seq_len, max_batches=None):
    """exp(mean next-token cross-entropy) over consecutive windows of ``tokens``, in evaluation
    mode (the model's mode is restored after). A model returning a tuple gives its logits first."""
    from ms_prune.data import lm_eval_windows
    was_training = model.training
    model.set_train(False)
    losses = []
    for inputs, labels in lm_eval_windows(tokens, batch_size, seq_len, max_batches):
        outputs = model(Tensor(inputs, ms.int32))
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), Tensor(labels, ms.int32).reshape(-1))
        losses.append(float(loss.asnumpy()))
    model.set_train(was_training)
    return math.exp(float(np.mean(losses)))


def classification_accuracy(model, rows, labels, batch_size, buckets):
    """Percentage of ``rows`` (token id lists, unpadded) whose argmax logit is their label, in
    evaluation mode (the model's mode is restored after); rows are padded to ``buckets``
    (``data.pad_rows``). A model returning a tuple gives its logits first."""
    from ms_prune.data import pad_rows
    was_training = model.training
    model.set_train(False)
    order = np.argsort([len(r) for r in rows])  # similar lengths together: fewer padded tokens
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = order[start:start + batch_size]
        # the last batch is filled up so that every batch has the same shape (no new graph)
        ids, mask = pad_rows([rows[i] for i in chunk] + [[0]] * (batch_size - len(chunk)), buckets)
        out = model(Tensor(ids), Tensor(mask))
        logits = (out[0] if isinstance(out, tuple) else out).asnumpy()[:len(chunk)]
        correct += int(np.sum(logits.argmax(-1) == np.asarray(labels)[chunk]))
    model.set_train(was_training)
    return 100.0 * correct / len(rows)


def under_msrun():
    """Whether this process is a worker that MindSpore's ``msrun`` started (it gives each worker
    its role in the environment); such a worker calls ``mindspore.communication.init()``."""
    return os.environ.get("MS_ROLE") is not None


def write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"wrote {path}")


def release_graph_memory():
    """Free every compiled graph of the process, also those of Cells still in use (they compile
    again when run): each compiled MiniLM graph holds GBs of CPU memory (measured: ~2.7 GB for a
    32 x 64 training step). The library frees the graphs that cannot run again by itself
    (``release_graphs``); this is for a program that drops whole models between phases."""
    gc.collect()
    try:
        ms.ms_memory_recycle()
    except RuntimeError as err:
        # MindSpore 2.10 iterates its per-Cell compile cache while freeing graphs deletes Cells
        # (and their cache entries): "dictionary changed size during iteration". Freeing memory is
        # all this is for, so go on with what was freed (the rest is freed at exit).
        if "changed size" not in str(err):
            raise
        logging.getLogger(__name__).warning("ms_memory_recycle stopped early (%s); continuing", err)
    trim_heap()
