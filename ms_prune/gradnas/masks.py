"""The Cells GradNAS puts into a model: unit masks (whose gradients are the scores), the one-graph
scoring step, and the capture Cells that collect what the refit needs.

All of them sit in the model's existing hooks: ``HeadPrunableAttention.head_gate`` (multiplies
axis 1 of the per-head context (B, heads, S, head_dim)) and ``NeuronPrunableFFN.neuron_gate``
(multiplies the last axis of the FFN activation (B, S, neurons)). They are Parameters inside
Cells because forward hooks are ignored in graph mode.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

HEAD_AXIS, HEAD_NDIM = 1, 4
NEURON_AXIS, NEURON_NDIM = 2, 3


def _broadcast_shape(size, axis, ndim):
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


class _GateBase(nn.Cell):
    """What the attention's gate slot expects besides ``construct``: a penalty (none here)."""

    def get_penalty(self):
        return ops.zeros((), ms.float32)


class UnitMask(_GateBase):
    """A mask of ones, one entry per unit; ``d loss / d mask`` is the unit's score."""

    def __init__(self, size, axis, ndim):
        super().__init__()
        self.axis, self.ndim = axis, ndim
        self.shape = _broadcast_shape(size, axis, ndim)
        self.mask = Parameter(Tensor(np.ones((size,), np.float32)), name="gradnas_mask")

    def construct(self, x):
        return x * self.mask.reshape(self.shape)

    def keep(self, positions):
        self.mask.set_data(Tensor(self.mask.asnumpy()[list(positions)]))
        self.shape = _broadcast_shape(len(positions), self.axis, self.ndim)


class HeadGram(_GateBase):
    """Accumulates G[h, g] = sum over tokens of <A_h, A_g>, A_h being head h's contribution to the
    attention output (its context times its slice of the output projection), so that the refit
    solves its least squares from an (heads x heads) matrix instead of every token's output."""

    def __init__(self, head_slices):
        super().__init__()
        heads = head_slices.shape[0]
        self.slices = Parameter(Tensor(head_slices.astype(np.float32)), name="gradnas_head_slices",
                                requires_grad=False)
        self.gram = Parameter(Tensor(np.zeros((heads, heads), np.float32)), name="gradnas_head_gram",
                              requires_grad=False)

    def construct(self, context):
        heads, head_dim = context.shape[1], context.shape[3]
        per_head = context.transpose(1, 0, 2, 3).reshape(heads, -1, head_dim)
        contribution = ops.bmm(per_head, self.slices).reshape(heads, -1)
        update = ops.assign_add(self.gram, ops.matmul(contribution, contribution.T))
        return ops.depend(context, update)


class NeuronGram(_GateBase):
    """Accumulates the activations' Gram matrix a^T a over tokens; times the Gram matrix of the
    output-projection columns it gives the neurons' contribution Gram matrix (see ``HeadGram``)."""

    def __init__(self, neurons):
        super().__init__()
        self.gram = Parameter(Tensor(np.zeros((neurons, neurons), np.float32)), name="gradnas_neuron_gram",
                              requires_grad=False)

    def construct(self, activation):
        flat = activation.reshape(-1, activation.shape[-1])
        update = ops.assign_add(self.gram, ops.matmul(flat.T, flat))
        return ops.depend(activation, update)


def _slots(model):
    """(kind, Cells holding the slot, slot attribute, unit count attribute) per unit kind."""
    return (("head", model.attention_layers(), "head_gate", "num_heads"),
            ("neuron", model.ffn_layers(), "neuron_gate", "num_neurons"))


def attach(model, make_head, make_neuron):
    """Put ``make_head(layer, attention)`` / ``make_neuron(layer, ffn)`` (a Cell or None) in every
    layer's gate slots; returns (head cells, neuron cells) per layer (None for an empty layer)."""
    made = []
    for (kind, holders, slot, count), make in zip(_slots(model), (make_head, make_neuron)):
        cells = []
        for layer, holder in enumerate(holders):
            if getattr(holder, slot) is not None:
                raise ValueError(f"GradNAS: layer {layer} already has a {kind} gate ({type(getattr(holder, slot)).__name__}"
                                 f" in {slot}); remove it first (LRP gates: model.remove_gates())")
            cell = make(layer, holder) if getattr(holder, count) else None
            setattr(holder, slot, cell)
            cells.append(cell)
        made.append(cells)
    model.refresh_after_surgery()
    return made[0], made[1]


def detach(model):
    """Remove whatever ``attach`` put in; graph mode compiles the unmasked model anew."""
    for _, holders, slot, _ in _slots(model):
        for holder in holders:
            setattr(holder, slot, None)
    model.refresh_after_surgery()


def attach_masks(model):
    return attach(model, lambda _, a: UnitMask(a.num_heads, HEAD_AXIS, HEAD_NDIM),
                  lambda _, f: UnitMask(f.num_neurons, NEURON_AXIS, NEURON_NDIM))


class ScoreStep(nn.Cell):
    """One batch of scoring as one graph: the loss's gradient with respect to the masks only
    (model weights get none), squared (``absolute=False``) or absolute, added to score Parameters
    in the graph, so N batches need no host round-trip but the loss."""

    def __init__(self, loss_net, masks, absolute=False):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.masks = ParameterTuple(masks)
        self.scores = ParameterTuple([
            Parameter(Tensor(np.zeros(m.shape, np.float32)), name=f"gradnas_score_{i}", requires_grad=False)
            for i, m in enumerate(masks)])
        self.absolute = absolute
        self.grad_fn = ms.value_and_grad(loss_net, None, self.masks)

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        for score, grad in zip(self.scores, grads):
            contribution = ops.abs(grad) if self.absolute else grad * grad
            loss = ops.depend(loss, ops.assign_add(score, contribution))
        return loss


class Forward(nn.Cell):
    """Runs ``net`` for its side effects (the capture Cells); a fresh top-level Cell, so graph
    mode compiles it with the capture Cells in place."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, *inputs):
        return self.net(*inputs)


class _AllReduceSum(nn.Cell):
    def __init__(self):
        super().__init__()
        self.reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def construct(self, x):
        return self.reduce(x)


def distributed():
    """True when ``mindspore.communication.init()`` has run (msrun workers)."""
    from mindspore.communication import GlobalComm
    return bool(GlobalComm.INITED)


def all_reduce_sum(vector):
    """Sum a float32 numpy vector over the workers of the initialised group (itself when none)."""
    if not distributed() or vector.size == 0:
        return vector
    return _AllReduceSum()(Tensor(vector.astype(np.float32))).asnumpy()


def compiled(cell):
    """PyNative runs op by op; compile the step there too (as ``make_train_step`` does)."""
    if ms.get_context("mode") == ms.PYNATIVE_MODE:
        cell.construct = ms.jit(cell.construct)
    return cell
