"""Importance scores from calibration activations, for heads and FFN neurons of any protocol model.

* ``"activation"`` (Minitron, Muralidharan et al. 2024): a unit's mean squared activation on the
  calibration tokens: for a head, the squared norm of its context (the input of the output
  projection, where the protocol declares the heads); for an FFN neuron, its squared activation.
* ``"flap"`` (An et al., AAAI 2024): the fluctuation of each input channel of the output
  projection, its variance over the calibration tokens times the squared norm of the weights that
  read it; a head sums its channels'.
* Hidden channels (Minitron's embedding channels): the mean |activation| of each channel at the
  outputs of every layer's norms, summed over the norms (``hidden_scores``).
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
from ms_prune.gradnas.gradnas import GradNASScores, model_units, output_slices, run_pass, take_batches

__all__ = ["ACTIVATION_METHODS", "HIDDEN_METHODS", "activation_scores", "hidden_scores", "layer_scores"]

ACTIVATION_METHODS = ("activation", "flap")
HIDDEN_METHODS = ("activation", "magnitude", "random")


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
        run_pass(_masks.Forward(model), batches, model)
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


class ChannelActivity(protocol.LayerWrapper):
    """Runs its layer (a norm) and adds, per channel of its output, the sum of |activation| over the
    tokens, and the token count, into Parameters; returns the layer's output."""

    def __init__(self, layer, size):
        super().__init__(layer)
        self.activity = Parameter(Tensor(np.zeros((size,), np.float32)), name="hidden_activity", requires_grad=False)
        self.tokens = Parameter(Tensor(np.zeros((), np.float32)), name="hidden_tokens", requires_grad=False)

    def construct(self, x):
        y = self.layer(x)
        flat = y.reshape(-1, y.shape[-1]).astype(ms.float32)
        y = ops.depend(y, ops.assign_add(self.activity, ops.abs(flat).sum(0)))
        return ops.depend(y, ops.assign_add(self.tokens, ops.ones((), ms.float32) * flat.shape[0]))


def hidden_scores(model, method="activation", batches=None, num_batches=None, seed=0):
    """One score per current hidden channel of a model that declares ``hidden_channels()``:
    'activation' (Minitron): the mean over the calibration tokens of |activation| at the output of
    every declared norm, summed over the norms (one compiled forward per batch, capture Cells on the
    norms, summed over the workers under ``msrun``); 'magnitude': the norm of the channel's column of
    the token embedding; 'random': seeded uniform. A numpy vector, the smallest the first to go."""
    owner = "hidden_scores"
    if method not in HIDDEN_METHODS:
        raise ValueError(f"{owner}: hidden channels are scored by one of {HIDDEN_METHODS}, got {method!r}")
    hidden = protocol.hidden_of(model, owner)
    if method == "random":
        return np.random.default_rng(seed).random(hidden.size)
    if method == "magnitude":
        if hidden.embedding is None:
            raise ValueError(f"{owner}: method='magnitude' reads the token embedding; the model's HiddenChannels "
                             f"names none (declare embedding=<its parameter path>)")
        owner_cell, name = protocol.resolve_path(model, hidden.embedding)
        table = np.moveaxis(getattr(owner_cell, name).asnumpy().astype(np.float64), hidden.parameters[hidden.embedding],
                            -1)
        return np.sqrt(np.square(table.reshape(-1, hidden.size)).sum(0))
    if not hidden.norms:
        raise ValueError(f"{owner}: method='activation' reads the norms' outputs; the model's HiddenChannels names "
                         f"no norms")
    taken = take_batches(owner, batches, num_batches)
    slots = [protocol.resolve_path(model, path) for path in hidden.norms]
    originals = [getattr(cell, name) for cell, name in slots]
    probes = [ChannelActivity(norm, hidden.size) for norm in originals]
    for (cell, name), probe in zip(slots, probes):
        setattr(cell, name, probe)
    protocol.refresh(model)
    try:
        run_pass(_masks.Forward(model), taken, model)
        sums = np.concatenate([np.concatenate([p.activity.asnumpy(), [float(p.tokens.asnumpy())]]) for p in probes])
    finally:
        for (cell, name), norm in zip(slots, originals):
            setattr(cell, name, norm)
        protocol.refresh(model)
    sums = _masks.all_reduce_sum(sums.astype(np.float32)).astype(np.float64).reshape(len(probes), hidden.size + 1)
    return (sums[:, :-1] / np.maximum(sums[:, -1:], 1.0)).sum(0)


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
        run_pass(_masks.Forward(model), taken, model)
        sums = np.array([[float(p.cosines.asnumpy()), float(p.tokens.asnumpy())] for p in probes], np.float32)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        protocol.refresh(model)
    sums = _masks.all_reduce_sum(sums.ravel()).reshape(-1, 2).astype(np.float64)
    return 1.0 - sums[:, 0] / np.maximum(sums[:, 1], 1.0)
