"""Importance scores from calibration activations, for heads and FFN neurons of any protocol model.

* ``"activation"`` (Minitron, Muralidharan et al. 2024): a unit's mean squared activation on the
  calibration tokens: for a head, the squared norm of its context (the input of the output
  projection, where the protocol declares the heads); for an FFN neuron, its squared activation.
* ``"flap"`` (An et al., AAAI 2024): the fluctuation of each input channel of the output
  projection, its variance over the calibration tokens times the squared norm of the weights that
  read it; a head sums its channels'.
* Layers: block influence (ShortGPT, Men et al. 2024; Gromov et al. 2024), 1 - the mean cosine
  similarity of a layer's input and output hidden states over the calibration tokens: a layer that
  barely turns its input matters least (``layer_scores``).

Both come from one compiled forward per batch with capture Cells on the output projections' inputs
(sums and sums of squares per channel accumulated in the graph, no host round-trip), summed over
the workers under ``msrun``. Padding tokens count like any other: calibrate on unpadded text.
"""
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_prune import protocol
from ms_prune.gradnas import masks as _masks
from ms_prune.gradnas.gradnas import GradNASScores, as_batch, eval_mode, model_units, output_slices, take_batches

__all__ = ["ACTIVATION_METHODS", "activation_scores", "layer_scores"]

ACTIVATION_METHODS = ("activation", "flap")


class ChannelMoments(nn.Cell):
    """Adds, per channel of its input (..., units, width), the sum and the sum of squares over the
    tokens, and the token count, into Parameters; returns its input unchanged."""

    def __init__(self, units, width):
        super().__init__()
        self.sum = Parameter(Tensor(np.zeros((units, width), np.float32)), name="sum", requires_grad=False)
        self.square = Parameter(Tensor(np.zeros((units, width), np.float32)), name="square", requires_grad=False)
        self.count = Parameter(Tensor(np.zeros((), np.float32)), name="count", requires_grad=False)

    def construct(self, x):
        flat = x.reshape(-1, x.shape[-2], x.shape[-1]).astype(ms.float32)
        x = ops.depend(x, ops.assign_add(self.sum, flat.sum(0)))
        x = ops.depend(x, ops.assign_add(self.square, (flat * flat).sum(0)))
        return ops.depend(x, ops.assign_add(self.count, ops.ones((), ms.float32) * flat.shape[0]))


def _moments(model, batches):
    """Per layer, (mean, variance) per channel of the heads' and the neurons' activations."""
    head_cells, neuron_cells = _masks.attach(model, lambda _, heads: ChannelMoments(heads.num_heads, heads.head_dim),
                                             lambda _, ffn: ChannelMoments(ffn.num_neurons, 1))
    cells = head_cells + neuron_cells
    try:
        forward = _masks.compiled(_masks.Forward(model))
        with eval_mode(model):
            for batch in batches:
                forward(*as_batch(batch))
        stats = [None if c is None else (c.sum.asnumpy(), c.square.asnumpy(), float(c.count.asnumpy()))
                 for c in cells]
    finally:
        _masks.detach(model)
    flat = np.concatenate([np.concatenate([s.ravel(), q.ravel(), [n]]) for s, q, n in (x for x in stats if x)]
                          or [np.zeros(0)])
    flat = _masks.all_reduce_sum(flat.astype(np.float32)).astype(np.float64)
    moments, offset = [], 0
    for item in stats:
        if item is None:
            moments.append(None)
            continue
        size = item[0].size
        total, square = flat[offset:offset + size], flat[offset + size:offset + 2 * size]
        count = max(flat[offset + 2 * size], 1.0)
        offset += 2 * size + 1
        mean = (total / count).reshape(item[0].shape)
        moments.append((mean, np.maximum(square.reshape(item[0].shape) / count - mean * mean, 0.0),
                        square.reshape(item[0].shape) / count))
    return moments[:len(head_cells)], moments[len(head_cells):]


def activation_scores(model, batches, method="activation", num_batches=None):
    """``GradNASScores`` (one score per current head and FFN neuron) by ``method`` ('activation' or
    'flap', see the module docstring) on the first ``num_batches`` of ``batches`` (tuples of the
    model's inputs, or single arrays)."""
    owner = "activation_scores"
    if method not in ACTIVATION_METHODS:
        raise ValueError(f"{owner}: method must be one of {ACTIVATION_METHODS}, got {method!r}")
    taken = take_batches(owner, batches, num_batches)
    start = time.perf_counter()
    kept_heads, kept_neurons = model_units(model)
    head_moments, neuron_moments = _moments(model, taken)
    head_slices, neuron_rows = output_slices(model)
    heads, neurons = [], []
    for moments, slices, kept in zip(head_moments, head_slices, kept_heads):
        if moments is None:
            heads.append(np.zeros(len(kept)))
        elif method == "activation":
            heads.append(moments[2].sum(axis=1))
        else:  # slices (heads, head_dim, out): each channel's squared weight norm
            heads.append((moments[1] * np.square(slices.astype(np.float64)).sum(axis=2)).sum(axis=1))
    for moments, rows, kept in zip(neuron_moments, neuron_rows, kept_neurons):
        if moments is None:
            neurons.append(np.zeros(len(kept)))
        elif method == "activation":
            neurons.append(moments[2][:, 0])
        else:
            neurons.append(moments[1][:, 0] * np.square(rows.astype(np.float64)).sum(axis=1))
    if not neuron_moments:  # a model without prunable FFN neurons: none per layer
        neurons = [np.zeros(0) for _ in kept_neurons]
    return GradNASScores(heads, neurons, kept_heads, kept_neurons, method, len(taken), time.perf_counter() - start)


class InfluenceProbe(protocol.LayerWrapper):
    """Runs its layer and adds, over the tokens, the cosine similarity of the layer's input and output
    hidden states (and the token count) into Parameters; returns what the layer returns."""

    def __init__(self, layer, call):
        super().__init__(layer)
        self.hidden_key, self.tuple_output = call.hidden, call.outputs is not None
        self.cosines = Parameter(Tensor(np.zeros((), np.float32)), name="influence_cosines", requires_grad=False)
        self.tokens = Parameter(Tensor(np.zeros((), np.float32)), name="influence_tokens", requires_grad=False)

    def construct(self, *args, **kwargs):
        hidden = protocol.call_argument(args, kwargs, self.hidden_key)
        outputs = self.layer(*args, **kwargs)
        new = outputs[0] if self.tuple_output else outputs
        x = hidden.reshape(-1, hidden.shape[-1]).astype(ms.float32)
        y = new.reshape(-1, new.shape[-1]).astype(ms.float32)
        cosine = (x * y).sum(-1) / ops.sqrt((x * x).sum(-1) * (y * y).sum(-1) + 1e-12)
        new = ops.depend(new, ops.assign_add(self.cosines, cosine.sum()))
        new = ops.depend(new, ops.assign_add(self.tokens, ops.ones((), ms.float32) * x.shape[0]))
        if self.tuple_output:
            return (new,) + tuple(outputs[1:])
        return new


def layer_scores(model, batches, num_batches=None):
    """Block influence of every transformer layer (1 - mean cosine of its input and output hidden
    states on ``batches`` of model inputs): a numpy vector, one score per layer, the smallest the
    first to remove. One compiled forward per batch; summed over the workers under ``msrun``."""
    taken = take_batches("layer_scores", batches, num_batches)
    model_adapter = protocol.adapter(model)
    layers = model_adapter.layers()
    originals = [layers[i] for i in range(len(layers))]
    probes = [InfluenceProbe(layer, model_adapter.layer_call) for layer in originals]
    for i, probe in enumerate(probes):
        layers[i] = probe
    protocol.refresh(model)
    try:
        forward = _masks.compiled(_masks.Forward(model))
        with eval_mode(model):
            for batch in taken:
                forward(*as_batch(batch))
        sums = np.array([[float(p.cosines.asnumpy()), float(p.tokens.asnumpy())] for p in probes], np.float32)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        protocol.refresh(model)
    sums = _masks.all_reduce_sum(sums.ravel()).reshape(-1, 2).astype(np.float64)
    return 1.0 - sums[:, 0] / np.maximum(sums[:, 1], 1.0)
