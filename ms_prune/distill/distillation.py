"""Knowledge distillation: the student learns the teacher's token distributions.

The training loss (``DistillationLoss``, built by :func:`apply_distillation` or by the
:class:`Distillation` algorithm) is::

    loss = (1 - alpha) * task + alpha * T^2 * KL + hidden_weight * MSE(h_student, h_teacher)
    KL   = mean over tokens of  sum_v q(v) * (log q(v) - log p(v))
    p    = softmax(z_student / T),  q = softmax(z_teacher / T)  (over the teacher's top-k only, with top_k)

``task`` is the user's ``loss_fn(outputs, *targets)``; T^2 keeps the KL's gradient at the task
loss's scale whatever T (Hinton et al. 2015). With ``top_k``, q is the teacher's distribution cut
to its k largest logits and renormalised (ties at the k-th value are kept); p stays the student's
distribution over the whole vocabulary, so the student is also taught to put no mass elsewhere.

The teacher runs in the same compiled step, in evaluation mode, under ``ops.stop_gradient``; its
Parameters are frozen (``requires_grad=False``), never in the optimizer or the checkpoints.

Memory: the vocabulary axis is taken ``vocab_chunk`` columns at a time. The forward computes the
log-normalisers (logsumexp) chunk by chunk, then the KL chunk by chunk; the gradient
``T / N * (p - q)`` is a custom backward (``DistillationKL.bprop``), also chunk by chunk, from the
logits and the two normalisers. So beyond the student's and the teacher's logits (which the models
produce) and the logits' gradient (which any loss on them has), the KL holds O(tokens x
vocab_chunk) temporaries, and nothing of size tokens x vocabulary is saved for the backward. That
bounds the peak where MindSpore frees memory between kernels (PyNative, measured); a GRAPH_MODE
graph on CPU keeps every kernel's output until it ends, so there it does not (README.md).
"""
import json
import weakref

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from ms_prune.engine import Algorithm, Applied, Event
from ms_prune.engine.trainer import ModelLoss
from ms_prune.validation import check_instance, check_int, check_number

__all__ = ["Distillation", "DistillationKL", "apply_distillation", "remove_distillation", "distillation_loss"]

# while frozen the teacher's Parameters carry this prefix: a compiled graph refuses two Parameters
# of one name, and a teacher of the student's class has the student's names
TEACHER_PREFIX = "distillation_teacher."
_FROZEN = "_ms_prune_distillation_frozen"
# the teacher's logits outside its top-k: finite, so that a vocabulary chunk holding none of the
# top-k has a finite logsumexp (all -inf gives NaN) and q * log q is 0 there, not 0 * -inf
MASKED = -1e30
# settings a resumed run must share with its checkpoint (vocab_chunk only changes the rounding)
RESUMED_SETTINGS = ("temperature", "alpha", "top_k", "hidden_weight", "logits_output", "hidden_output")


def _check_kl(owner, temperature, top_k, vocab_chunk):
    return (check_number(owner, "temperature", temperature, minimum=0.0, min_open=True),
            check_int(owner, "top_k", top_k, minimum=1, allow_none=True),
            check_int(owner, "vocab_chunk", vocab_chunk, minimum=1, allow_none=True))


def _check_settings(owner, temperature, alpha, top_k, hidden_weight, vocab_chunk, logits_output, hidden_output):
    temperature, top_k, vocab_chunk = _check_kl(owner, temperature, top_k, vocab_chunk)
    settings = dict(temperature=temperature, top_k=top_k, vocab_chunk=vocab_chunk,
                    alpha=check_number(owner, "alpha", alpha, minimum=0.0, maximum=1.0),
                    hidden_weight=check_number(owner, "hidden_weight", hidden_weight, minimum=0.0),
                    logits_output=check_int(owner, "logits_output", logits_output, minimum=0),
                    hidden_output=check_int(owner, "hidden_output", hidden_output, minimum=0, allow_none=True))
    if settings["hidden_weight"] > 0 and settings["hidden_output"] is None:
        raise ValueError(f"{owner}: hidden_weight={hidden_weight} needs hidden_output, the index of the final hidden "
                         f"states in the tuple both models return")
    return settings


# ---- the KL, chunk by chunk over the vocabulary (module-level: graph mode parses them) ----------
def _flat(logits):
    return ops.cast(logits.reshape(-1, logits.shape[-1]), ms.float32)


def _stop(start, chunk, vocab):
    # not min(): graph mode fails to compile min() of two ints here ("The func graph is empty")
    return start + chunk if start + chunk < vocab else vocab


def _top_k_threshold(teacher, top_k):
    """(N, 1): each token's k-th largest teacher logit, or None without top-k."""
    if top_k is None:
        return None
    return ops.topk(teacher, top_k)[0][:, top_k - 1:top_k]


def _scaled(logits, start, stop, inv_t, threshold):
    """Columns [start, stop) of logits / T; below ``threshold`` (outside the top-k) ``MASKED``."""
    piece = logits[:, start:stop] * inv_t
    if threshold is None:
        return piece
    return ops.masked_fill(piece, logits[:, start:stop] < threshold, MASKED)


def _logsumexp(logits, inv_t, chunk, threshold):
    """(N, 1) logsumexp of logits / T over the whole vocabulary, one chunk at a time."""
    vocab = logits.shape[-1]
    parts = ()
    for start in range(0, vocab, chunk):
        piece = _scaled(logits, start, _stop(start, chunk, vocab), inv_t, threshold)
        parts = parts + (ops.logsumexp(piece, -1, True),)
    if len(parts) == 1:
        return parts[0]
    return ops.logsumexp(ops.concat(parts, -1), -1, True)


def _kl_sum(student, teacher, temperature, top_k, chunk):
    """sum over tokens of KL(q || p) for (N, V) float32 logits."""
    inv_t = 1.0 / temperature
    threshold = _top_k_threshold(teacher, top_k)
    lse_s = _logsumexp(student, inv_t, chunk, None)
    lse_t = _logsumexp(teacher, inv_t, chunk, threshold)
    vocab = student.shape[-1]
    total = ops.zeros((), ms.float32)
    for start in range(0, vocab, chunk):
        stop = _stop(start, chunk, vocab)
        log_q = _scaled(teacher, start, stop, inv_t, threshold) - lse_t
        log_p = student[:, start:stop] * inv_t - lse_s
        total = total + (ops.exp(log_q) * (log_q - log_p)).sum()
    return total


def _kl_student_grad(student, teacher, temperature, top_k, chunk):
    """d(T^2 * sum-over-tokens KL) / d student logits = T * (p - q), for (N, V) float32 logits."""
    inv_t = 1.0 / temperature
    threshold = _top_k_threshold(teacher, top_k)
    lse_s = _logsumexp(student, inv_t, chunk, None)
    lse_t = _logsumexp(teacher, inv_t, chunk, threshold)
    vocab = student.shape[-1]
    parts = ()
    for start in range(0, vocab, chunk):
        stop = _stop(start, chunk, vocab)
        p = ops.exp(student[:, start:stop] * inv_t - lse_s)
        q = ops.exp(_scaled(teacher, start, stop, inv_t, threshold) - lse_t)
        parts = parts + ((p - q) * temperature,)
    if len(parts) == 1:
        return parts[0]
    return ops.concat(parts, -1)


def _mean_scaled_kl(student_logits, teacher_logits, temperature, top_k, chunk):
    student, teacher = _flat(student_logits), _flat(teacher_logits)
    chunk = student.shape[-1] if chunk is None else chunk
    return _kl_sum(student, teacher, temperature, top_k, chunk) * (temperature * temperature / student.shape[0])


def distillation_loss(student_logits, teacher_logits, temperature=1.0, top_k=None, vocab_chunk=None):
    """T^2 * KL(q || p) averaged over tokens (every axis but the last, the vocabulary), as a float32
    scalar; p, q = softmax(logits / T) of the student and the teacher (q over the teacher's top-k
    logits only with ``top_k``); ``vocab_chunk`` columns at a time. The gradient flows to
    ``student_logits`` only when the caller stops it at the teacher's.

    For eager code and precomputed teacher logits; its gradient is MindSpore's automatic one. In a
    graph-mode loss, or for the chunked backward, use the Cell :class:`DistillationKL`."""
    temperature, top_k, vocab_chunk = _check_kl("distillation_loss", temperature, top_k, vocab_chunk)
    return _mean_scaled_kl(student_logits, teacher_logits, temperature, top_k, vocab_chunk)


class DistillationKL(nn.Cell):
    """``kl(student_logits, teacher_logits)``: :func:`distillation_loss` as a Cell (graph mode, a
    user's loss Cell with precomputed teacher logits), with the chunked backward (``bprop``): the
    gradient ``T / N * (p - q)`` to the student's logits, none to the teacher's."""

    def __init__(self, temperature=1.0, top_k=None, vocab_chunk=None):
        super().__init__()
        self.temperature, self.top_k, self.vocab_chunk = _check_kl(type(self).__name__, temperature, top_k,
                                                                   vocab_chunk)

    def construct(self, student_logits, teacher_logits):
        return _mean_scaled_kl(student_logits, teacher_logits, self.temperature, self.top_k, self.vocab_chunk)

    def bprop(self, student_logits, teacher_logits, out, dout):
        student, teacher = _flat(student_logits), _flat(teacher_logits)
        chunk = student.shape[-1] if self.vocab_chunk is None else self.vocab_chunk
        grad = _kl_student_grad(student, teacher, self.temperature, self.top_k, chunk)
        grad = grad * (ops.cast(dout, ms.float32) / student.shape[0])
        return (ops.cast(grad.reshape(student_logits.shape), student_logits.dtype), ops.zeros_like(teacher_logits))


def _output(outputs, index):
    """Item ``index`` of a model's tuple outputs; a single output is the logits."""
    if isinstance(outputs, (tuple, list)):
        return outputs[index]
    return outputs


class DistillationLoss(nn.Cell):
    """``loss(*batch)``: the student's ``loss_fn(student(*inputs), *targets)`` mixed with the KL to
    the teacher's token distributions and, optionally, the squared distance of the final hidden
    states (see the module's formula). ``num_inputs``: how many arrays of a batch go to the models
    (-1: all but the last).

    The student is a registered sub-Cell (its Parameters keep their names, as in a ``ModelLoss``);
    the teacher is held unregistered, so ``set_train`` on a surrounding Cell (``Model.train`` sets
    its whole network training) cannot turn its dropout on, and it has no Parameters of this Cell.
    """

    def __init__(self, student, teacher, loss_fn, num_inputs=-1, temperature=1.0, alpha=0.5, top_k=None,
                 hidden_weight=0.0, vocab_chunk=None, logits_output=0, hidden_output=None):
        super().__init__(auto_prefix=False)
        owner = type(self).__name__
        settings = _check_settings(owner, temperature, alpha, top_k, hidden_weight, vocab_chunk, logits_output,
                                   hidden_output)
        check_instance(owner, "student", student, nn.Cell)
        if not callable(loss_fn):
            raise TypeError(f"{owner}: loss_fn must be a Cell or a function (outputs, *targets) -> loss, "
                            f"got {type(loss_fn).__name__}")
        vocab = getattr(getattr(student, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and settings["top_k"] is not None and settings["top_k"] > vocab:
            raise ValueError(f"{owner}: top_k={top_k} exceeds the vocabulary ({vocab} tokens)")
        self.model = student
        self.loss_fn = loss_fn
        self.num_inputs = check_int(owner, "num_inputs", num_inputs, minimum=-1)
        if self.num_inputs == 0:
            raise ValueError(f"{owner}: num_inputs must be -1 (all but the last array) or >= 1, got 0")
        object.__setattr__(self, "teacher", _frozen_teacher(owner, teacher, student))
        self.kl = DistillationKL(temperature, top_k, vocab_chunk)
        self.settings = settings
        self.kl_weight = settings["alpha"]
        self.task_weight = 1.0 - settings["alpha"]
        self.hidden_weight = settings["hidden_weight"]
        self.logits_output, self.hidden_output = settings["logits_output"], settings["hidden_output"]

    def construct(self, *batch):
        inputs = batch[:self.num_inputs]
        outputs = self.model(*inputs)
        teacher_outputs = self.teacher(*inputs)
        teacher_logits = ops.stop_gradient(_output(teacher_outputs, self.logits_output))
        loss = self.kl(_output(outputs, self.logits_output), teacher_logits) * self.kl_weight
        if self.task_weight > 0:
            loss = loss + self.loss_fn(outputs, *batch[self.num_inputs:]) * self.task_weight
        if self.hidden_weight > 0:
            teacher_hidden = ops.stop_gradient(_output(teacher_outputs, self.hidden_output))
            student_hidden = ops.cast(_output(outputs, self.hidden_output), ms.float32)
            difference = student_hidden - ops.cast(teacher_hidden, ms.float32)
            loss = loss + ops.mean(difference * difference) * self.hidden_weight
        return loss


# ---- the teacher: frozen while distilled from -------------------------------------------------
def _frozen_teacher(owner, teacher, student):
    """Freeze ``teacher`` (evaluation mode, no gradients, prefixed names; idempotent) after checking
    it is not the student and shares none of its Parameters; returns it."""
    check_instance(owner, "teacher", teacher, nn.Cell)
    if teacher is student:
        raise ValueError(f"{owner}: the teacher is the student itself; give a separate (e.g. unpruned) model")
    frozen = getattr(teacher, _FROZEN, None)
    students = {id(p) for p in student.get_parameters()}
    shared = sorted(p.name for p in teacher.get_parameters() if id(p) in students)
    if shared:
        raise ValueError(f"{owner}: the teacher shares Parameters with the student ({shared[:3]}); a frozen teacher "
                         f"would freeze the student's: give the teacher its own copy")
    vocabs = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (student, teacher)]
    if all(isinstance(v, int) for v in vocabs) and vocabs[0] != vocabs[1]:
        raise ValueError(f"{owner}: the teacher's vocabulary ({vocabs[1]}) differs from the student's ({vocabs[0]}): "
                         f"token distributions over different vocabularies cannot be compared")
    if frozen is None:
        params = list(teacher.get_parameters())
        object.__setattr__(teacher, _FROZEN, {"training": teacher.training,
                                              "params": [(p, p.name, p.requires_grad) for p in params]})
        for p in params:
            p.requires_grad = False
            p.name = TEACHER_PREFIX + p.name
    teacher.set_train(False)
    return teacher


def _thaw(teacher):
    """Give a frozen teacher back its names, ``requires_grad`` flags and training mode."""
    frozen = getattr(teacher, _FROZEN, None)
    if frozen is None:
        return teacher
    for p, name, requires_grad in frozen["params"]:
        p.name, p.requires_grad = name, requires_grad
    teacher.set_train(frozen["training"])
    object.__delattr__(teacher, _FROZEN)
    return teacher


def teacher_fingerprint(teacher):
    """What identifies the teacher, cheaply, as JSON values: its class, config, tensor count and
    size, and the sum and sum of squares of its weights (reduced where the weights are; two
    scalars per tensor come to the host)."""
    config = getattr(teacher, "config", None)
    if callable(getattr(config, "to_dict", None)):
        config = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    else:
        config = None
    total = total_squares = 0.0
    elements = 0
    params = list(teacher.get_parameters())
    for p in params:
        values = ops.cast(p.value(), ms.float32)
        total += float(ops.sum(values).asnumpy())
        total_squares += float(ops.sum(values * values).asnumpy())
        elements += int(np.prod(p.shape))
    return {"class": type(teacher).__name__, "config": config, "tensors": len(params), "elements": elements,
            "sum": total, "sum_squares": total_squares}


def _same_teacher(saved, ours):
    """The fields in which two fingerprints differ (the sums to float32 rounding)."""
    differing = [k for k in ("class", "config", "tensors", "elements") if saved.get(k) != ours.get(k)]
    for k in ("sum", "sum_squares"):
        a, b = saved.get(k), ours.get(k)
        if not isinstance(a, (int, float)) or not np.isclose(a, b, rtol=1e-5, atol=1e-6 * max(1, ours["elements"])):
            differing.append(k)
    return differing


# ---- the Composer form ----------------------------------------------------------------------------
# student -> its distillation loss Cell, so that the inverse takes the model as every inverse does
# (weak: a student that is dropped takes its entry with it)
_DISTILLED = weakref.WeakKeyDictionary()


def apply_distillation(student, teacher, loss_fn, num_inputs=-1, temperature=1.0, alpha=0.5, top_k=None,
                       hidden_weight=0.0, vocab_chunk=None, logits_output=0, hidden_output=None):
    """Freeze ``teacher`` and return ``Applied(cells=[loss_net])``: ``loss_net(*batch)`` (a
    :class:`DistillationLoss`) trains ``student`` on ``(1 - alpha) * loss_fn(...) + alpha * T^2 * KL
    (+ hidden_weight * MSE)``; build the train step on it. The student's weights and structure are
    not changed. :func:`remove_distillation` undoes it."""
    if student in _DISTILLED:
        raise ValueError(f"apply_distillation: {type(student).__name__} is already being distilled; call "
                         f"remove_distillation(student) first")
    loss_net = DistillationLoss(student, teacher, loss_fn, num_inputs, temperature, alpha, top_k, hidden_weight,
                                vocab_chunk, logits_output, hidden_output)
    _DISTILLED[student] = loss_net
    return Applied([loss_net])


def remove_distillation(student):
    """Undo :func:`apply_distillation`: the teacher gets back its Parameter names, ``requires_grad``
    flags and training mode; returns the student."""
    loss_net = _DISTILLED.pop(student, None)
    if loss_net is None:
        raise ValueError(f"remove_distillation: {type(student).__name__} is not being distilled "
                         f"(apply_distillation(student, teacher, loss_fn) first)")
    _thaw(loss_net.teacher)
    return student


class Distillation(Algorithm):
    """Knowledge distillation from ``teacher`` for ``ms_prune.engine.Trainer`` and
    ``AlgorithmCallback`` (``mindspore.train.Model.train``).

    INIT: freezes the teacher (evaluation mode, ``requires_grad=False``, its Parameters renamed
    ``distillation_teacher.<name>`` while frozen: one graph cannot hold two Parameters of one name).
    ``wrap_loss``: the loss the step differentiates becomes a :class:`DistillationLoss` around the
    user's ``loss_fn``, so the teacher runs in the same compiled step. The teacher is not in the
    optimizer nor in the checkpoints; its fingerprint (class, config, size, weight sums) is, and a
    resume with another teacher, or other settings (``vocab_chunk`` aside), is a ValueError.
    ``release()`` thaws the teacher when the run is done with it.

    ``logits_output``/``hidden_output``: which item of the models' tuple outputs holds the logits /
    the final hidden states (a single output is the logits). ``hidden_weight > 0`` needs
    ``hidden_output``, and equal hidden sizes (there is no learned projection).
    """

    runs_in_model_train = True  # the loss is built once, before the graph; nothing changes during the run

    def __init__(self, teacher, temperature=1.0, alpha=0.5, top_k=None, hidden_weight=0.0, vocab_chunk=None,
                 logits_output=0, hidden_output=None):
        self.teacher = check_instance(self.name, "teacher", teacher, nn.Cell)
        self.settings = _check_settings(self.name, temperature, alpha, top_k, hidden_weight, vocab_chunk,
                                        logits_output, hidden_output)
        self._fingerprint = None

    def match(self, event, state):
        return event == Event.INIT

    def apply(self, event, state, logger):
        _frozen_teacher(self.name, self.teacher, state.model)

    def wrap_loss(self, loss_net, state):
        if isinstance(loss_net, ModelLoss):
            model, loss_fn, num_inputs = loss_net.model, loss_net.loss_fn, loss_net.num_inputs
        elif isinstance(loss_net, nn.WithLossCell):
            model, loss_fn, num_inputs = loss_net.backbone_network, loss_net._loss_fn, 1  # noqa: SLF001
        else:
            raise TypeError(f"{self.name}: the loss to distil into must be a ModelLoss(model, loss_fn, num_inputs) "
                            f"or an nn.WithLossCell (the teacher needs the model's inputs and outputs), got "
                            f"{type(loss_net).__name__}; does an algorithm before it replace the loss?")
        return DistillationLoss(model, self.teacher, loss_fn, num_inputs, **self.settings)

    def fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = teacher_fingerprint(self.teacher)
        return self._fingerprint

    def release(self):
        """Thaw the teacher (its names, ``requires_grad`` and training mode as before INIT)."""
        _thaw(self.teacher)

    def state_dict(self):
        return {"settings": {k: self.settings[k] for k in RESUMED_SETTINGS}, "teacher": self.fingerprint()}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("settings", {})
        changed = {k: (saved.get(k), self.settings[k]) for k in RESUMED_SETTINGS if saved.get(k) != self.settings[k]}
        if changed:
            shown = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{self.name}.load_state_dict: the checkpoint was trained with other settings ({shown})")
        differing = _same_teacher(state_dict.get("teacher", {}), self.fingerprint())
        if differing:
            raise ValueError(f"{self.name}.load_state_dict: the teacher differs from the checkpoint's (in "
                             f"{differing}); resume with the teacher the run started with")

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{self.name}({type(self.teacher).__name__}, {shown})"
