"""The Cells GradNAS puts into a model: unit masks (whose gradients are the scores), the one-graph
scoring step, and the capture Cells that collect what the refit needs.

All of them are gates of ``ms_prune.protocol``: they sit on the input of a layer's output
projection (attention: the per-head context, (..., heads, head_dim); FFN: the activation,
(..., neurons, 1)), which the model protocol declares, so no model code knows them. They are
Parameters inside Cells because forward hooks are ignored in graph mode.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ms_prune import protocol


class UnitMask(nn.Cell):
    """A mask of ones, one entry per unit; ``d loss / d mask`` is the unit's score."""

    def __init__(self, size):
        super().__init__()
        self.mask = Parameter(Tensor(np.ones((size,), np.float32)), name="mask")

    def construct(self, x):
        return x * self.mask.reshape(-1, 1)


class HeadGram(nn.Cell):
    """Accumulates G[h, g] = sum over tokens of <A_h, A_g>, A_h being head h's contribution to the
    attention output (its context times its slice of the output projection), so that the refit
    solves its least squares from an (heads x heads) matrix instead of every token's output."""

    def __init__(self, head_slices):
        super().__init__()
        heads = head_slices.shape[0]
        self.slices = Parameter(Tensor(head_slices.astype(np.float32)), name="slices", requires_grad=False)
        self.gram = Parameter(Tensor(np.zeros((heads, heads), np.float32)), name="gram", requires_grad=False)

    def construct(self, context):
        heads, head_dim = context.shape[-2], context.shape[-1]
        per_head = context.reshape(-1, heads, head_dim).transpose(1, 0, 2)
        contribution = ops.bmm(per_head, self.slices).reshape(heads, -1)
        update = ops.assign_add(self.gram, ops.matmul(contribution, contribution.T))
        return ops.depend(context, update)


class NeuronGram(nn.Cell):
    """Accumulates the activations' Gram matrix a^T a over tokens; times the Gram matrix of the
    output-projection columns it gives the neurons' contribution Gram matrix (see ``HeadGram``)."""

    def __init__(self, neurons):
        super().__init__()
        self.gram = Parameter(Tensor(np.zeros((neurons, neurons), np.float32)), name="gram", requires_grad=False)

    def construct(self, activation):
        flat = activation.reshape(-1, activation.shape[-2])
        update = ops.assign_add(self.gram, ops.matmul(flat.T, flat))
        return ops.depend(activation, update)


def attach(model, make_head, make_neuron):
    """Put ``make_head(layer, heads)`` / ``make_neuron(layer, ffn)`` (a Cell or None) on every
    layer's heads and, where the model declares prunable FFN neurons, on its neurons; returns
    (head cells, neuron cells) per layer (None for an empty layer; neuron cells [] when the model
    declares no FFN neurons)."""
    for layer, gate in enumerate(protocol.gates_of(model, "head")):
        if gate is not None:  # LRP's gates sit where the masks go: one would scale the other
            raise ValueError(f"GradNAS: layer {layer} already has a head gate ({type(gate).__name__}, from "
                             f"{type(gate).__module__}); GradNAS and LRP cannot gate the same heads: remove the LRP "
                             f"gates first with ms_prune.heads.remove_lrp(model) (or prune_lrp(model) to keep what "
                             f"they learned), or drop LRP from this run")
    heads = protocol.attach_gates(model, "head", make_head)
    if protocol.adapter(model).ffns() is None:
        return heads, []
    try:
        return heads, protocol.attach_gates(model, "neuron", make_neuron)
    except Exception:
        protocol.detach_gates(model, "head")
        raise


def detach(model):
    """Remove whatever ``attach`` put in; graph mode compiles the unmasked model anew."""
    protocol.detach_gates(model, "head")
    if protocol.adapter(model).ffns() is not None:
        protocol.detach_gates(model, "neuron")


def attach_masks(model):
    return attach(model, lambda _, heads: UnitMask(heads.num_heads), lambda _, ffn: UnitMask(ffn.num_neurons))


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
