"""The model protocol: the least a transformer declares so that every ms_prune algorithm (LRP,
GradNAS, random-LTD, PLD) works on it. The algorithms know no model class; they read this.

A model declares, through a :class:`TransformerAdapter` (its own ``transformer_adapter()``
method, or one registered for its class with :func:`register_adapter`):

* ``layers()``: the container (``nn.CellList``) of its transformer layers, in order; token and
  layer dropping replace its items with wrappers.
* ``layer_call``: a :class:`LayerCall`, how a layer is called: which argument is the hidden state,
  which is the attention mask, which carry one value per token (positions for rotary
  embeddings), and what the layer returns.
* ``skippable_layers``: whether a layer computes ``x + f(x)`` (pre-LN), so that skipping it leaves
  ``x`` (progressive layer dropping needs this).
* ``attention(i)``: an :class:`AttentionHeads`, where layer i's heads are: its Q/K/V (or fused QKV)
  projections, its output projection, head size, query and key/value head counts.
* ``ffn(i)`` (optional): an :class:`FFNUnits`, where layer i's FFN neurons are.
* ``hidden_channels()`` (optional): a :class:`HiddenChannels`, every tensor that carries the hidden
  dimension (embeddings, norms, the projections reading and writing the residual stream, the LM
  head), for hidden-size pruning (:func:`slice_hidden`).

Head gates and GradNAS masks sit on the input of the output projection (:class:`GatedInput`): the
per-head context is exactly that input, so no attention code is touched. Surgery
(``prune_heads``/``prune_ffn_neurons``) slices the declared projections in place; a model may
override it (ours record what they removed in their config, so a saved model reloads).

After any wrapping or surgery, :func:`refresh` makes graph mode compile the model anew: MindSpore
caches a Cell's graph by the Cell, so a model that has run once would otherwise keep running its
old graph, silently.
"""
import copy
import logging
import time
import traceback
import warnings

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ms_prune.training import release_graphs
from ms_prune.validation import check_int

logger = logging.getLogger(__name__)

__all__ = ["AttentionHeads", "FFNUnits", "GatedInput", "HiddenChannels", "LayerCall", "LayerWrapper", "SurgeryError",
           "TransformerAdapter", "adapter", "attach_gates", "check_declaration", "detach_gates", "gates_of",
           "refresh", "register_adapter", "remember_inputs", "slice_hidden"]

LAYOUTS = ("linear", "conv1d")


def _check_key(owner, name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{owner}: {name} must be an argument position (int) or keyword (str)"
                        f"{' or None' if allow_none else ''}, got {value!r}")
    return value


class LayerCall:
    """How a transformer layer is called.

    ``hidden``: the hidden-state argument, a position (0) or a keyword; states are (batch, seq,
    hidden) (``batch_first``) or (seq, batch, hidden). ``mask``: the attention-mask argument (or
    None): an additive bias or a 0/1 mask of shape (b, seq), (b, seq, seq) or (b, h, seq, seq),
    b in {1, batch}, any axis of length 1 broadcasting. ``per_token``: arguments with one entry per
    token, shaped like the states' leading axes (e.g. ``position_ids`` (batch, seq), from which
    rotary embeddings are computed): token dropping gives the layer the kept tokens' entries, so a
    RoPE layer sees the kept tokens' real positions. Every other argument, positional or keyword,
    is passed through unchanged. ``outputs``: None when the layer returns the hidden states alone,
    else the length of the tuple it returns, hidden states first (a layer dropped by PLD returns
    zeros for the others, which must be scalars such as auxiliary losses).

    For token dropping (random-LTD), which must know the hidden states' shape on the host and what
    in the call and the outputs is per token, without guessing from shapes:

    * ``per_position``: arguments indexed by position with no batch axis, a (seq, ...) table such as
      a precomputed rotary table, or a tuple of such tables (MindFormers' ``freqs_cis``): the layer
      gets, per sequence, the kept tokens' rows, (batch, r, ...), or (batch, 1, r, ...) with
      ``position_axis=2`` (what broadcasts against (batch, heads, r, head_dim) queries). A dict
      ``{argument: (item, ...)}`` names which items of a tuple argument are tables (MindFormers'
      (cos, sin, swap_mask): ``{1: (0, 1)}``); the others, and None items, pass unchanged.
    * ``per_token_outputs``: indexes (>= 1) of tuple outputs shaped like the states' leading axes;
      they are scattered back into zeros at the kept positions. Other outputs pass unchanged.
    * ``token_shape``: a function ``(*batch) -> (batch_size, seq_len)`` of the hidden states the
      layers receive, given a training step's batch (the model inputs first, then any targets;
      numpy arrays or Tensors, only shapes need reading). None: the first input must be 2-D
      integer token ids laid out like the states' leading axes.
    """

    def __init__(self, hidden=0, mask=1, per_token=(), outputs=None, batch_first=True, per_position=(),
                 position_axis=1, per_token_outputs=(), token_shape=None):
        owner = "LayerCall"
        self.hidden = _check_key(owner, "hidden", hidden)
        self.mask = _check_key(owner, "mask", mask, allow_none=True)
        per_token = (per_token,) if isinstance(per_token, (int, str)) else tuple(per_token)
        self.per_token = tuple(_check_key(owner, "per_token entries", k) for k in per_token)
        if outputs is not None and (isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 1):
            raise ValueError(f"{owner}: outputs must be None (a tensor) or the tuple's length >= 1, got {outputs!r}")
        self.outputs = outputs
        self.batch_first = bool(batch_first)
        if isinstance(per_position, dict):
            entries = per_position.items()
        else:
            entries = [(k, None) for k in ((per_position,) if isinstance(per_position, (int, str)) else per_position)]
        self.per_position = tuple(
            (_check_key(owner, "per_position entries", k),
             None if items is None else tuple(check_int(owner, f"per_position[{k!r}] items", i, minimum=0)
                                              for i in ((items,) if isinstance(items, int) else items)))
            for k, items in entries)
        self.position_axis = check_int(owner, "position_axis", position_axis, minimum=1, maximum=2)
        per_token_outputs = (per_token_outputs,) if isinstance(per_token_outputs, int) else tuple(per_token_outputs)
        if per_token_outputs and outputs is None:
            raise ValueError(f"{owner}: per_token_outputs {per_token_outputs} needs outputs (the tuple's length); "
                             f"outputs is None (the layer returns one tensor)")
        self.per_token_outputs = tuple(check_int(owner, "per_token_outputs entries", i, minimum=1,
                                                 maximum=outputs - 1) for i in per_token_outputs)
        if token_shape is not None and not callable(token_shape):
            raise TypeError(f"{owner}: token_shape must be None or a function (*batch) -> (batch_size, seq_len), "
                            f"got {type(token_shape).__name__}")
        self.token_shape = token_shape
        keys = [k for k in (self.hidden, self.mask) + self.per_token + tuple(k for k, _ in self.per_position)
                if k is not None]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{owner}: hidden, mask, per_token and per_position name the same argument twice: "
                             f"{keys}")

    def __repr__(self):
        return (f"LayerCall(hidden={self.hidden!r}, mask={self.mask!r}, per_token={self.per_token!r}, "
                f"outputs={self.outputs!r}, batch_first={self.batch_first}, per_position={self.per_position!r}, "
                f"position_axis={self.position_axis}, per_token_outputs={self.per_token_outputs!r}, "
                f"token_shape={self.token_shape!r})")


def resolve_path(root, path):
    """(owner, attribute) of a dotted path below ``root``."""
    owner, parts = root, path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    if not hasattr(owner, parts[-1]):
        raise AttributeError(f"{type(root).__name__} has no {path!r}")
    return owner, parts[-1]


def resolve_cell(root, path):
    """The Cell at a dotted path below ``root``."""
    owner, name = resolve_path(root, path)
    return getattr(owner, name)


class _Units:
    """What attention heads and FFN neurons share: an owner Cell, the output projection (a dotted
    path below it) whose input holds the units side by side, and which original units remain.

    ``record``: the Cell whose attributes say which units remain (``kept_<unit>s``,
    ``total_<unit>s``) and carry ``count_attributes`` (default: ``cell``). ``after_surgery``: a
    function called after the projections are sliced, for state derived in other ways. ``empty``: a
    function that takes the layer to no units at all (ours replace the projections by the output
    projection's bias); without it a layer keeps at least one unit."""

    unit = "unit"
    counts = ()

    def __init__(self, cell, output, layout, count, width, kept, count_attributes=None, record=None,
                 after_surgery=None, empty=None):
        owner = type(self).__name__
        if not isinstance(cell, nn.Cell):
            raise TypeError(f"{owner}: cell must be the mindspore.nn.Cell holding the projections, "
                            f"got {type(cell).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(f"{owner}: layout must be one of {LAYOUTS} ('linear': weight (out, in) as "
                             f"nn.Dense; 'conv1d': weight (in, out) as GPT-2), got {layout!r}")
        self.cell, self.output, self.layout, self.count, self.width = cell, output, layout, int(count), int(width)
        resolve_path(cell, output)
        if record is not None and not isinstance(record, nn.Cell):
            raise TypeError(f"{owner}: record must be None or the Cell that keeps the counts, got {type(record).__name__}")
        self.record = cell if record is None else record
        self.count_attributes = dict(count_attributes or {})
        bad = {k: v for k, v in self.count_attributes.items() if v not in self.counts}
        if bad:
            raise ValueError(f"{owner}: count_attributes values must be one of {self.counts}, got {bad}")
        for name, function in (("after_surgery", after_surgery), ("empty", empty)):
            if function is not None and not callable(function):
                raise TypeError(f"{owner}: {name} must be None or a function of no arguments, "
                                f"got {type(function).__name__}")
        self.after_surgery, self.empty = after_surgery, empty
        stored = getattr(self.record, "kept_" + self.unit + "s", None)
        self.kept = list(kept if kept is not None else stored if stored is not None else range(self.count))
        if len(self.kept) != self.count:
            raise ValueError(f"{owner}: {len(self.kept)} kept {self.unit}s listed for {self.count} {self.unit}s")
        # how many there were before any pruning (surgery records it on the cell)
        self.total = int(getattr(self.record, "total_" + self.unit + "s", None) or
                         (max(self.kept) + 1 if self.kept else 0))

    def output_slot(self):
        """(owner, attribute) of the output projection."""
        return resolve_path(self.cell, self.output)

    def output_projection(self):
        """The output projection Cell itself (under any gate wrapper)."""
        cell = resolve_cell(self.cell, self.output)
        return cell.layer if isinstance(cell, GatedInput) else cell


class AttentionHeads(_Units):
    """Where one attention's heads are: dotted paths below ``cell`` to its ``query``/``key``/
    ``value`` projections (or the fused ``qkv`` one: [Q | K | V] side by side) and to its
    ``output`` projection, which reads the per-head context (heads side by side, ``head_dim``
    features each); ``num_heads`` query heads and ``num_kv_heads`` key/value heads (grouped-query
    attention: query head h reads key/value head h // (num_heads / num_kv_heads)).

    ``count_attributes``: attributes of ``cell`` (or ``record``) that the attention computes its
    shapes from and that surgery must update, {name: what}, what one of 'heads', 'kv_heads',
    'groups' (query heads per key/value head, e.g. ``num_key_value_groups``), 'width' (heads x
    head_dim) or 'kv_width'. ``record``, ``after_surgery`` (our Llama re-indexes which key/value
    head each query head reads) and ``empty``: see the base class.

    Grouped-query attention is pruned to equal groups (whole key/value groups removed, and the same
    number of query heads kept in every remaining group), what standard attention code assumes. A
    fused ``qkv`` projection holds [Q (num_heads) | K (num_kv_heads) | V (num_kv_heads)] heads.
    """

    unit = "head"
    counts = ("heads", "kv_heads", "groups", "width", "kv_width")

    def __init__(self, cell, output, head_dim, num_heads, query=None, key=None, value=None, qkv=None,
                 num_kv_heads=None, layout="linear", count_attributes=None, kept_heads=None, after_surgery=None,
                 empty=None, record=None):
        super().__init__(cell, output, layout, num_heads, head_dim, kept_heads, count_attributes, record,
                         after_surgery, empty)
        if qkv is None and None in (query, key, value) and num_heads:
            raise ValueError("AttentionHeads: give query, key and value (paths of the projections), or qkv")
        self.query, self.key, self.value, self.qkv = query, key, value, qkv
        self.head_dim = self.width
        self.num_heads = self.count
        self.num_kv_heads = int(num_heads if num_kv_heads is None else num_kv_heads)
        if not 0 <= self.num_kv_heads <= self.num_heads:
            raise ValueError(f"AttentionHeads: num_kv_heads must be in 0..num_heads ({num_heads}), got {num_kv_heads}")
        self.kept_heads = self.kept


class FFNUnits(_Units):
    """Where one FFN's intermediate neurons are: ``inputs``, dotted paths below ``cell`` of the
    projections with one output feature per neuron (``("dense",)``; SwiGLU: ``("gate_proj",
    "up_proj")``), and ``output``, the projection reading them. The activation must map 0 to 0
    (GELU, ReLU, SiLU-gated products) so a removed neuron equals a zero one. ``count_attributes``:
    {name: 'neurons' or 'width'}; ``record``, ``after_surgery`` and ``empty``: see the base class."""

    unit = "neuron"
    counts = ("neurons", "width")

    def __init__(self, cell, inputs, output, num_neurons, layout="linear", count_attributes=None, kept_neurons=None,
                 after_surgery=None, empty=None, record=None):
        super().__init__(cell, output, layout, num_neurons, 1, kept_neurons, count_attributes, record, after_surgery,
                         empty)
        self.inputs = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        for path in self.inputs:
            resolve_path(cell, path)
        self.num_neurons = self.count
        self.kept_neurons = self.kept


class HiddenChannels:
    """Where a model's hidden dimension is (the embedding channels, the width of the residual stream),
    for hidden-size pruning (Minitron's embedding channels): every tensor that carries it, so that
    :func:`slice_hidden` can keep a subset of the channels everywhere at once.

    ``parameters``: ``{dotted path of a Parameter below the model: axis}`` for every Parameter with
    the hidden dimension: the token (and any position) embedding tables, every norm's weight and bias,
    the input axis of every projection reading the residual stream (Q/K/V, FFN inputs, an untied LM
    head), the output axis (and bias) of every projection writing into it (attention and FFN output
    projections). A tied LM head is the embedding's own tensor: list it once (paths naming one shared
    Parameter are sliced once and keep sharing). ``size``: the current hidden size; every listed axis
    must have it. ``norms``: dotted paths of the Cells whose outputs score the channels (each layer's
    norms, Minitron). ``embedding``: the path (among ``parameters``) of the token embedding table,
    whose column norms are the 'magnitude' score. ``attributes``: dotted paths of int attributes
    below the model that must become the new size (``config.hidden_size``, a projection's
    ``in_features``, ``nn.Embedding``'s ``embedding_size``). ``after_surgery``: a function of no
    arguments for other derived state (ours make ``config.head_dim`` explicit, since hidden_size /
    num_heads no longer gives it).

    A norm over fewer channels normalises by statistics of those channels only (RMSNorm's mean
    square, LayerNorm's mean and variance): the pruned model does not compute the unpruned one's
    function even where the removed channels were small. That is inherent to Minitron's hidden
    pruning and why it is followed by distillation."""

    def __init__(self, size, parameters, norms=(), embedding=None, attributes=(), after_surgery=None):
        owner = "HiddenChannels"
        self.size = check_int(owner, "size", size, minimum=1)
        if not isinstance(parameters, dict) or not parameters:
            raise TypeError(f"{owner}: parameters must be a non-empty dict {{parameter path: axis}}, got {parameters!r}")
        self.parameters = {str(p): check_int(owner, f"parameters[{p!r}]", a, minimum=0) for p, a in parameters.items()}
        self.norms = (norms,) if isinstance(norms, str) else tuple(norms)
        if embedding is not None and embedding not in self.parameters:
            raise ValueError(f"{owner}: embedding {embedding!r} must be one of the parameters")
        self.embedding = embedding
        self.attributes = (attributes,) if isinstance(attributes, str) else tuple(attributes)
        if after_surgery is not None and not callable(after_surgery):
            raise TypeError(f"{owner}: after_surgery must be None or a function of no arguments, "
                            f"got {type(after_surgery).__name__}")
        self.after_surgery = after_surgery

    def problems(self, model):
        """What the declaration names that ``model`` does not have, as sentences (none: it fits)."""
        problems = []
        for path, axis in self.parameters.items():
            try:
                owner, name = resolve_path(model, path)
            except AttributeError:
                problems.append(f"no parameter {path!r}")
                continue
            param = getattr(owner, name)
            if not isinstance(param, Parameter):
                problems.append(f"{path!r} is a {type(param).__name__}, not a Parameter")
            elif axis >= len(param.shape) or param.shape[axis] != self.size:
                problems.append(f"{path!r} has shape {tuple(param.shape)}: no axis {axis} of the hidden size "
                                f"{self.size}")
        for path in self.norms:
            try:
                if not isinstance(resolve_cell(model, path), nn.Cell):
                    problems.append(f"norm {path!r} is not a Cell")
            except AttributeError:
                problems.append(f"no norm Cell {path!r}")
        for path in self.attributes:
            try:
                owner, name = resolve_path(model, path)
            except AttributeError:
                problems.append(f"no attribute {path!r}")
                continue
            value = getattr(owner, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                problems.append(f"attribute {path!r} is {value!r}, not an int")
        return problems


# --------------------------------------------------------------------------------------------
# Wrappers that keep the model's parameter names
# --------------------------------------------------------------------------------------------
class LayerWrapper(nn.Cell):
    """Base of Cells that wrap one Cell (a transformer layer, a projection) without changing the
    model's parameter names.

    The wrapped Cell is held unregistered as ``self.layer``; its parameters and sub-Cells are
    registered on the wrapper under their own names, so a wrapped model's parameters (and its
    checkpoints) are named exactly as the unwrapped model's; ``set_train`` reaches the layer too.
    """

    def __init__(self, layer):
        super().__init__()
        if not isinstance(layer, nn.Cell):
            raise TypeError(f"{type(self).__name__} wraps a mindspore.nn.Cell, got {type(layer).__name__}")
        if isinstance(layer, type(self)):
            raise ValueError(f"this layer is already wrapped by {type(layer).__name__}")
        object.__setattr__(self, "layer", layer)
        full_names = [(param, param.name) for param in layer.get_parameters()]
        for name, param in layer._params.items():  # pylint: disable=protected-access
            if param is not None:
                setattr(self, name, param)
        for name, cell in layer.name_cells().items():
            setattr(self, name, cell)
        # Registering renames the parameters relative to this wrapper ("ln_1.weight"); MindSpore's
        # CellList assignment of the wrapper derives its prefix from the full names, so keep them.
        for param, name in full_names:
            param.name = name

    def add_flags_recursive(self, **flags):
        # Cell.set_train (and MindSpore's Model) set the training flag through this recursion,
        # which visits registered Cells only: the wrapped layer is unregistered, so without this a
        # wrapper inside a wrapper (random-LTD inside PLD) keeps the flag it was built with.
        super().add_flags_recursive(**flags)
        self.layer.add_flags_recursive(**flags)
        return self


class GatedInput(LayerWrapper):
    """``projection(x)`` with x's units (heads of ``width`` features, or neurons: width 1) first
    multiplied by ``gate``, a Cell mapping (..., units, width) to the same shape (an L0 gate, a
    GradNAS mask). It replaces the projection in its owner; the gate's tensors are named
    ``<projection>.<slot>.*``."""

    def __init__(self, projection, gate, width, slot):
        super().__init__(projection)
        self.width = int(width)
        self.slot = slot
        setattr(self, slot, gate)
        object.__setattr__(self, "gate", gate)

    def construct(self, x):
        units = x.shape[-1] // self.width
        gated = self.gate(x.reshape(x.shape[:-1] + (units, self.width)))
        return self.layer(gated.reshape(x.shape))


def refresh(model):
    """Call after wrapping or replacing any sub-Cell of ``model``. Names every Parameter by its path
    in the model (or checkpoints would silently drop or collide on tensors), and makes graph mode
    compile anew: MindSpore caches a Cell's graph by its creation time and id, so a model run before
    the change would otherwise keep running its old graph, silently. Cells that wrap the model (loss
    or train-step Cells) hold their own graphs: build them after the change. The graphs compiled for
    the model's Cells so far can never run again, so they are freed (``training.release_graphs``)."""
    release_graphs(*(cell for _, cell in model.cells_and_names()))
    for name, param in model.parameters_and_names():
        param.name = name
    stamp = time.time_ns()
    for _, cell in model.cells_and_names():
        object.__setattr__(cell, "_create_time", stamp)
    return model


# --------------------------------------------------------------------------------------------
# The adapter: a model's declaration, and the operations the algorithms run on it
# --------------------------------------------------------------------------------------------
class TransformerAdapter:
    """A model's declaration of the protocol (see the module docstring); subclass it for a model
    and override ``layers`` and, for head and neuron pruning, ``attention`` and ``ffn``.

    The other methods are what the algorithms call; their defaults work from the declarations:
    generic surgery slices the declared projections in place (a layer keeps at least one head: a
    model that can lose all of a layer's heads says so by overriding ``prune_heads``).
    """

    layer_call = LayerCall()
    skippable_layers = False
    # whether a layer may lose every head (or neuron): the generic surgery keeps one per layer, and
    # LRP and GradNAS then choose so
    empty_layers_allowed = False

    def __init__(self, model):
        if not isinstance(model, nn.Cell):
            raise TypeError(f"{type(self).__name__} adapts a mindspore.nn.Cell, got {type(model).__name__}")
        self.model = model

    # ---- the declaration ------------------------------------------------------------------------
    def layers(self):
        raise NotImplementedError(f"{type(self).__name__} must declare layers(): the CellList of the transformer "
                                  f"layers")

    def attention(self, layer):
        raise NotImplementedError(f"{type(self).__name__} declares no attention(layer): head pruning needs an "
                                  f"AttentionHeads per layer")

    def ffn(self, layer):
        """None when the model's FFN neurons are not prunable."""
        return None

    def hidden_channels(self):
        """A :class:`HiddenChannels`: every tensor carrying the hidden dimension, for hidden-size
        pruning. Optional: a model that declares none keeps its hidden size."""
        raise NotImplementedError(
            f"{type(self).__name__} declares no hidden_channels(): hidden-size pruning needs a HiddenChannels "
            f"listing every Parameter with the hidden dimension and its axis (token/position embeddings, norm "
            f"weights and biases, the input axis of Q/K/V, FFN-input and untied LM-head projections, the output axis "
            f"and bias of attention and FFN output projections), the norms whose outputs score the channels, and the "
            f"int attributes holding the size (config.hidden_size, ...)")

    # ---- derived ---------------------------------------------------------------------------------
    def num_layers(self):
        return len(self.layers())

    def attentions(self):
        return [self.attention(i) for i in range(self.num_layers())]

    def ffns(self):
        """FFNUnits per layer, or None when the model declares none."""
        ffns = [self.ffn(i) for i in range(self.num_layers())]
        return None if any(f is None for f in ffns) else ffns

    def heads_per_layer(self):
        return [a.num_heads for a in self.attentions()]

    def neurons_per_layer(self):
        ffns = self.ffns()
        return None if ffns is None else [f.num_neurons for f in ffns]

    def probe_inputs(self):
        """One small batch of model inputs (a tuple of numpy arrays) that a probe forward runs after
        every surgery, or None: by default the row :func:`remember_inputs` kept (the ``Trainer`` and
        GradNAS keep their first batch's). Override it for a model with inputs of its own."""
        return getattr(self.model, _PROBE, None)

    # ---- surgery ------------------------------------------------------------------------------
    def prune_heads(self, heads_to_prune):
        """Remove ``{layer: [original head numbers]}``: the declaration is checked, the surgery
        (``_prune_heads``) runs, then a probe forward; if anything fails the model is restored."""
        check_declaration(self.model, ("heads",))
        return verified_surgery(self, "prune_heads", lambda: self._prune_heads(heads_to_prune))

    def prune_ffn_neurons(self, neurons_to_prune):
        """Remove ``{layer: [original neuron numbers]}``, checked and verified as ``prune_heads``."""
        if self.ffns() is None:
            raise ValueError(f"{type(self).__name__} declares no ffn(layer): its FFN neurons cannot be pruned")
        check_declaration(self.model, ("neurons",))
        return verified_surgery(self, "prune_ffn_neurons", lambda: self._prune_ffn_neurons(neurons_to_prune))

    def remove_layers(self, layer_ids):
        """Remove whole transformer layers (depth pruning): checked, verified by a probe forward, and
        undone on failure as ``prune_heads``. The layers that stay are renumbered 0..n-1 (parameter
        names follow); ``layers_removed`` then updates whatever the model keeps about its depth."""
        layers = self.layers()
        ids = sorted({int(i) for i in layer_ids})
        bad = [i for i in ids if not 0 <= i < len(layers)]
        if bad or isinstance(layer_ids, (str, bytes)):
            raise ValueError(f"remove_layers: the model has layers 0..{len(layers) - 1}; {bad or layer_ids!r} are not "
                             f"layer indices")
        if len(ids) >= len(layers):
            raise ValueError(f"remove_layers: removing {ids} would leave no transformer layer of {len(layers)}")
        kept = [i for i in range(len(layers)) if i not in ids]

        def change():
            for i in reversed(ids):
                del layers[i]
            self.layers_removed(kept)
            refresh(self.model)
            return self.model
        return verified_surgery(self, "remove_layers", change)

    def layers_removed(self, kept):
        """Called after ``remove_layers`` with the original numbers of the layers that stay: update
        what the model keeps about its depth (a layer count, per-layer records). Default: nothing."""

    def _prune_heads(self, heads_to_prune):
        """The generic surgery: slices the declared projections (:func:`slice_heads`)."""
        attentions = self.attentions()
        plan = checked_units("prune_heads", "head", heads_to_prune, [a.total for a in attentions])
        for layer, positions in head_positions(attentions, plan).items():
            slice_heads(attentions[layer], positions, layer)
        refresh(self.model)
        return self.model

    def _prune_ffn_neurons(self, neurons_to_prune):
        ffns = self.ffns()
        plan = checked_units("prune_ffn_neurons", "neuron", neurons_to_prune, [f.total for f in ffns])
        for layer, positions in neuron_positions(ffns, plan).items():
            slice_neurons(ffns[layer], positions, layer)
        refresh(self.model)
        return self.model

    # ---- counting (``ms_prune.cost``, the one place every count comes from) -----------------
    def extra_flops(self, seq_len, batch_size=1):
        """FLOPs outside the transformer layers (an LM head on every token, a classifier once per
        sequence): 0 unless the adapter declares them."""
        return 0

    def num_parameters(self):
        from ms_prune import cost  # pylint: disable=import-outside-toplevel  (cost reads this module)
        return cost.num_parameters(self.model)

    def forward_flops(self, seq_len, batch_size=1):
        from ms_prune import cost  # pylint: disable=import-outside-toplevel
        return cost.forward_flops(self.model, seq_len, batch_size)


def attention_flops(num_heads, head_dim, seq_len):
    """Scores (QK^T) and context (PV) matmuls of one sequence."""
    return 2 * 2 * seq_len * seq_len * num_heads * head_dim


_REGISTRY = []


def register_adapter(model_class, adapter_class):
    """Declare ``adapter_class`` (a :class:`TransformerAdapter` subclass) for ``model_class`` and its
    subclasses: how a model you did not write takes part in every algorithm."""
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Cell)):
        raise TypeError(f"register_adapter: model_class must be a mindspore.nn.Cell subclass, got {model_class!r}")
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, TransformerAdapter)):
        raise TypeError(f"register_adapter: adapter_class must subclass TransformerAdapter, got {adapter_class!r}")
    previous = [a for m, a in _REGISTRY if m is model_class and a is not adapter_class]
    if previous:
        warnings.warn(f"register_adapter: {adapter_class.__name__} replaces {previous[0].__name__} as the adapter "
                      f"of {model_class.__name__}", stacklevel=2)
    _REGISTRY[:] = [(m, a) for m, a in _REGISTRY if m is not model_class]
    _REGISTRY.append((model_class, adapter_class))
    return adapter_class


def adapter(model):
    """The model's :class:`TransformerAdapter`: one registered for its class (the most derived
    match), else the model's own ``transformer_adapter()``."""
    if isinstance(model, TransformerAdapter):
        return model
    matches = [(m, a) for m, a in _REGISTRY if isinstance(model, m)]
    if matches:
        model_class, adapter_class = min(matches, key=lambda pair: type(model).__mro__.index(pair[0]))
        return adapter_class(model)
    if hasattr(model, "transformer_adapter"):
        return model.transformer_adapter()
    raise TypeError(f"{type(model).__name__} does not declare the ms_prune model protocol: write a "
                    f"TransformerAdapter for it and register_adapter({type(model).__name__}, YourAdapter) "
                    f"(see the README section 'Your own model')")


# --------------------------------------------------------------------------------------------
# Gates on the output projections' inputs
# --------------------------------------------------------------------------------------------
SLOTS = {"head": "head_gate", "neuron": "neuron_gate"}


def _units_of(model, kind):
    if kind not in SLOTS:
        raise ValueError(f"unit kind must be one of {sorted(SLOTS)}, got {kind!r}")
    model_adapter = adapter(model)
    what = "attention" if kind == "head" else "ffn"
    try:
        units = model_adapter.attentions() if kind == "head" else model_adapter.ffns()
    except (AttributeError, TypeError) as err:  # a path or an argument the model does not have
        raise ValueError(f"{type(model_adapter).__name__}.{what}(layer) is not a valid declaration for "
                         f"{type(model).__name__}: {err}") from None
    if kind == "head":
        return units
    ffns = units
    if ffns is None:
        raise ValueError(f"{type(model).__name__} declares no prunable FFN neurons (its adapter has no ffn(layer))")
    return ffns


def attach_gates(model, kind, make):
    """Put ``make(layer, units)`` (a gate Cell, or None for no gate) on the input of every layer's
    output projection for ``kind`` ('head' or 'neuron'); returns the gates per layer (None where a
    layer has no units left or ``make`` gave none)."""
    if kind in SLOTS:
        check_declaration(model, ("heads",) if kind == "head" else ("neurons",))
    units = _units_of(model, kind)
    gates = []
    for layer, declared in enumerate(units):
        owner, name = declared.output_slot()
        projection = getattr(owner, name)
        if isinstance(projection, GatedInput):
            raise ValueError(f"layer {layer} already has a {kind} gate ({type(projection.gate).__name__}); remove it "
                             f"first")
        gate = make(layer, declared) if declared.count else None
        if gate is not None:
            wrapped = GatedInput(projection, gate, declared.width, SLOTS[kind])
            wrapped.set_train(projection.training)
            setattr(owner, name, wrapped)
        gates.append(gate)
    refresh(model)
    return gates


def gates_of(model, kind):
    """The gates :func:`attach_gates` put on, per layer (None where there is none)."""
    gates = []
    for declared in _units_of(model, kind):
        owner, name = declared.output_slot()
        cell = getattr(owner, name)
        gates.append(cell.gate if isinstance(cell, GatedInput) else None)
    return gates


def detach_gates(model, kind):
    """Remove the gates of ``kind``; returns how many there were."""
    removed = 0
    for declared in _units_of(model, kind):
        owner, name = declared.output_slot()
        cell = getattr(owner, name)
        if isinstance(cell, GatedInput):
            setattr(owner, name, cell.layer)
            removed += 1
    refresh(model)
    return removed


# --------------------------------------------------------------------------------------------
# Generic surgery
# --------------------------------------------------------------------------------------------
def head_groups(num_heads, num_kv_heads):
    """Query-head positions per key/value head: grouped-query attention reads key/value head
    p // (num_heads / num_kv_heads) for query head p. Equal groups are what standard attention code
    (ours, transformers', every runtime) assumes, so the surgery keeps them equal."""
    if num_heads == 0:
        return []
    if not num_kv_heads or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be split into {num_kv_heads} equal key/value groups")
    size = num_heads // num_kv_heads
    return [list(range(g * size, (g + 1) * size)) for g in range(num_kv_heads)]


def feasible_head_counts(num_heads, num_kv_heads, allow_empty=True):
    """The numbers of query heads a layer can keep with equal groups: m groups of k heads each."""
    groups = head_groups(num_heads, num_kv_heads)
    size = len(groups[0]) if groups else 0
    counts = {m * k for m in range(1, len(groups) + 1) for k in range(1, size + 1)}
    return sorted(counts | ({0} if allow_empty or not num_heads else set()))


def best_grouped_heads(scores, num_heads, num_kv_heads, count):
    """The ``count`` head positions with the largest total score among the sets that keep the same
    number of query heads in every kept key/value group (whole groups go first when that scores
    better); None when no such set has ``count`` heads. Ties go to the lower position."""
    scores = np.asarray(scores, np.float64)
    if count == 0:
        return []
    groups = head_groups(num_heads, num_kv_heads)
    best, best_value = None, -np.inf
    for m in range(1, len(groups) + 1):
        if count % m or count // m > len(groups[0]):
            continue
        k = count // m
        # each group's k best heads, then the m groups whose k best sum highest
        tops = [sorted(g, key=lambda p: (-scores[p], p))[:k] for g in groups]
        ranked = sorted(range(len(groups)), key=lambda g: (-scores[tops[g]].sum(), g))[:m]
        value = sum(scores[tops[g]].sum() for g in ranked)
        if value > best_value:
            best, best_value = sorted(p for g in ranked for p in tops[g]), value
    return best


def select_grouped_heads(scores, attentions, total, allow_empty):
    """Per layer, the head positions to keep: ``total`` heads over all layers (or the most that fit
    below it when equal groups make ``total`` unreachable) with the largest total score, each layer
    keeping equal key/value groups, and at least one head unless ``allow_empty``. ``scores``: per
    layer, one score per current head; ``attentions``: the layers' :class:`AttentionHeads`.

    A dynamic programme over layers and kept counts: exact for any per-layer group structure."""
    options = []
    for layer_scores, attention in zip(scores, attentions):
        counts = feasible_head_counts(attention.num_heads, attention.num_kv_heads, allow_empty)
        layer_options = {}
        for c in counts:
            kept = best_grouped_heads(layer_scores, attention.num_heads, attention.num_kv_heads, c)
            layer_options[c] = (float(np.sum(np.asarray(layer_scores, np.float64)[kept])) if kept else 0.0, kept)
        options.append(layer_options)
    # value[t]: the best total score of the layers so far keeping t heads; picks[l][t]: the option
    # layer l took for it (back-pointers: a decision runs after every training step)
    top = min(int(total), sum(max(o) for o in options))
    value = np.full(top + 1, -np.inf)
    value[0] = 0.0
    picks = []
    for layer_options in options:
        best, pick = np.full(top + 1, -np.inf), np.full(top + 1, -1)
        for c, (gain, _) in layer_options.items():
            if c > top:
                continue
            candidate = np.full(top + 1, -np.inf)
            candidate[c:] = value[:top + 1 - c] + gain
            better = candidate > best
            best[better], pick[better] = candidate[better], c
        picks.append(pick)
        value = best
    reachable = np.flatnonzero(np.isfinite(value))
    if not len(reachable):
        minimum = sum(min(o) for o in options)
        raise ValueError(f"no head selection keeps equal key/value groups with at most {total} heads: the layers "
                         f"need at least {minimum}{'' if allow_empty else ' (none may be emptied)'}")
    kept, t = [], int(reachable.max())
    for layer in reversed(range(len(options))):
        c = int(picks[layer][t])
        kept.append(options[layer][c][1])
        t -= c
    return kept[::-1]


def checked_units(owner, unit, to_prune, totals):
    """Validate ``{layer: [unit, ...]}`` (original numbers; ``totals``: per layer, how many there
    were) before any surgery, so a bad index changes nothing; returns {layer: set(units)}."""
    if not isinstance(to_prune, dict):
        raise TypeError(f"{owner} takes {{layer: [{unit}s]}}, got {type(to_prune).__name__}")
    checked = {}
    for layer, units in to_prune.items():
        if isinstance(layer, str) and layer.isdigit() and layer.isascii():
            layer = int(layer)  # JSON object keys (config.json, a JSON plan) are strings
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"{owner}: layer keys must be ints (or digit strings such as '0'), "
                            f"got {layer!r} ({type(layer).__name__})")
        if not 0 <= layer < len(totals):
            raise ValueError(f"{owner}: layer {layer!r} is out of range; the model has layers 0..{len(totals) - 1}")
        units = [units] if isinstance(units, (int, np.integer)) else list(units)
        total = totals[layer]
        bad = [u for u in units if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or not 0 <= u < total]
        if bad:
            raise ValueError(f"{owner}: layer {layer} has {unit}s 0..{total - 1}; {unit}(s) {bad} are out of range")
        checked[int(layer)] = {int(u) for u in units}
    return checked


def unit_columns(positions, width):
    """Feature indices of the units at ``positions`` ( ``width`` features each, side by side)."""
    if not len(positions):
        return np.zeros((0,), np.int64)
    return (np.asarray(positions, np.int64)[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def slice_projection(cell, features, layout, axis, blocks=1):
    """Keep ``features`` of a projection Cell's outputs (``axis='out'``) or inputs ('in') by
    replacing its ``weight``/``bias`` Parameters (same names) with sliced ones, in place (any Cell
    with a 2-D ``weight``: ``nn.Dense``, ours); ``blocks`` > 1 for a fused projection whose outputs
    are ``blocks`` equal parts, each sliced alike. Returns the Cell. The one slicing of ms_prune:
    our models' surgery uses it too."""
    weight = cell.weight.asnumpy()
    out_axis = 0 if layout == "linear" else 1
    index = np.asarray(features, np.int64)
    if axis == "out":
        part = weight.shape[out_axis] // blocks
        index = np.concatenate([index + b * part for b in range(blocks)])
    weight_axis = out_axis if axis == "out" else 1 - out_axis
    _replace(cell, "weight", np.take(weight, index, axis=weight_axis))
    if axis == "out" and getattr(cell, "bias", None) is not None:
        _replace(cell, "bias", np.take(cell.bias.asnumpy(), index, axis=0))
    for name, value in (("in_features", weight.shape[1 - out_axis] if axis == "out" else len(index)),
                        ("out_features", len(index) if axis == "out" else weight.shape[out_axis])):
        for alias in (name, name.replace("features", "channels")):
            if isinstance(getattr(cell, alias, None), int):
                setattr(cell, alias, int(value))
    return cell


def _replace(cell, name, array):
    old = getattr(cell, name)
    setattr(cell, name, Parameter(Tensor(np.ascontiguousarray(array), old.dtype), name=old.name,
                                  requires_grad=old.requires_grad))


def _set_counts(cell, attributes, values):
    for name, what in attributes.items():
        setattr(cell, name, int(values[what]))


def check_head_positions(attention, positions, layer):
    """Refuse, before anything changes, a layer keeping ``positions`` (current numbering) that the
    surgery cannot make: unequal key/value groups, or no head where the declaration has no
    ``empty``. Returns the key/value heads kept."""
    if len(positions) == attention.num_heads:
        return list(range(attention.num_kv_heads))
    try:
        groups = head_groups(attention.num_heads, attention.num_kv_heads)
    except ValueError as err:
        raise ValueError(f"prune_heads: layer {layer}: {err}; the surgery keeps equal key/value groups") from None
    kept_per_group = [len([p for p in members if p in positions]) for members in groups]
    if len({n for n in kept_per_group if n}) > 1:
        raise ValueError(f"prune_heads: layer {layer} would keep unequal numbers of query heads per key/value head "
                         f"({kept_per_group} of {len(groups[0])} in each of {len(groups)} groups); keep whole groups "
                         f"or the same number in every group (protocol.best_grouped_heads chooses such a set)")
    if not positions and attention.empty is None:
        raise ValueError(f"prune_heads: layer {layer} would lose all its heads; this model's adapter keeps at "
                         f"least one (declare AttentionHeads(empty=...) for a model whose layers can lose all)")
    return [g for g, n in enumerate(kept_per_group) if n]


def head_positions(attentions, plan):
    """{layer: positions kept} for a checked ``{layer: {original heads removed}}`` plan, every layer
    checked (``check_head_positions``) before any surgery."""
    kept = {}
    for layer, heads in plan.items():
        kept[layer] = [p for p, h in enumerate(attentions[layer].kept) if h not in heads]
        check_head_positions(attentions[layer], kept[layer], layer)
    return kept


def slice_heads(attention, positions, layer):
    """Keep the heads at ``positions`` (current numbering) of a declared attention, in place: the
    one head surgery of ms_prune (our models' ``prune_heads`` call it too). Grouped-query attention
    keeps equal groups (a key/value head stays while its group keeps query heads, and every kept
    group keeps as many); a layer loses every head only through its declared ``empty``."""
    positions = sorted(int(p) for p in positions)
    if len(positions) == attention.num_heads:
        return
    kv_positions = check_head_positions(attention, positions, layer)
    if not positions:
        attention.empty()
    else:
        dim = attention.head_dim
        columns, kv_columns = unit_columns(positions, dim), unit_columns(kv_positions, dim)
        if attention.qkv is not None:
            queries, kvs = attention.num_heads * dim, attention.num_kv_heads * dim
            fused = np.concatenate([columns, queries + kv_columns, queries + kvs + kv_columns])
            slice_projection(resolve_cell(attention.cell, attention.qkv), fused, attention.layout, "out")
        else:
            slice_projection(resolve_cell(attention.cell, attention.query), columns, attention.layout, "out")
            for path in (attention.key, attention.value):
                slice_projection(resolve_cell(attention.cell, path), kv_columns, attention.layout, "out")
        slice_projection(attention.output_projection(), columns, attention.layout, "in")
    _record(attention, positions, {"heads": len(positions), "kv_heads": len(kv_positions),
                                   "width": len(positions) * attention.head_dim,
                                   "kv_width": len(kv_positions) * attention.head_dim,
                                   "groups": len(positions) // len(kv_positions) if kv_positions else 0})


def _record(units, positions, counts):
    """After a slicing: the declared counts, which original units remain, and derived state."""
    _set_counts(units.record, units.count_attributes, counts)
    object.__setattr__(units.record, "total_" + units.unit + "s", units.total)
    object.__setattr__(units.record, "kept_" + units.unit + "s", [units.kept[p] for p in positions])
    if units.after_surgery is not None:
        units.after_surgery()


def neuron_positions(ffns, plan):
    """{layer: positions kept} for a checked ``{layer: {original neurons removed}}`` plan; a layer
    left with no neuron is refused before any surgery unless its declaration has ``empty``."""
    kept = {}
    for layer, neurons in plan.items():
        kept[layer] = [p for p, n in enumerate(ffns[layer].kept) if n not in neurons]
        if not kept[layer] and ffns[layer].empty is None:
            raise ValueError(f"prune_ffn_neurons: layer {layer} would lose all its neurons; this model's adapter "
                             f"keeps at least one (declare FFNUnits(empty=...) for a model whose layers can lose all)")
    return kept


def slice_neurons(ffn, positions, layer):
    """Keep the FFN neurons at ``positions`` (current numbering) of a declared FFN, in place: the
    one neuron surgery of ms_prune (our models' ``prune_ffn_neurons`` call it too)."""
    positions = sorted(int(p) for p in positions)
    if len(positions) == ffn.num_neurons:
        return
    if not positions:
        if ffn.empty is None:
            raise ValueError(f"prune_ffn_neurons: layer {layer} would lose all its neurons; this model's adapter "
                             f"keeps at least one")
        ffn.empty()
    else:
        for path in ffn.inputs:
            slice_projection(resolve_cell(ffn.cell, path), positions, ffn.layout, axis="out")
        slice_projection(ffn.output_projection(), positions, ffn.layout, axis="in")
    _record(ffn, positions, {"neurons": len(positions), "width": len(positions)})


def hidden_of(model, owner="slice_hidden"):
    """The model's checked :class:`HiddenChannels`; a ValueError naming what to declare when it has
    none, or what it declares wrongly."""
    model_adapter = adapter(model)
    try:
        hidden = model_adapter.hidden_channels()
    except NotImplementedError as err:
        raise ValueError(f"{owner}: {type(model).__name__} cannot be hidden-pruned: {err}") from None
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{owner}: {type(model_adapter).__name__}.hidden_channels() is not a valid declaration for "
                         f"{type(model).__name__}: {err}") from None
    if not isinstance(hidden, HiddenChannels):
        raise TypeError(f"{owner}: {type(model_adapter).__name__}.hidden_channels() must return a HiddenChannels, "
                        f"got {type(hidden).__name__}")
    problems = hidden.problems(model)
    if problems:
        raise ValueError(f"{owner}: {type(model_adapter).__name__}.hidden_channels() declares what "
                         f"{type(model).__name__} does not have: " + "; ".join(problems))
    return hidden


def slice_hidden(model, keep):
    """Keep the hidden channels ``keep`` (sorted, distinct indices into the current channels) of a
    model that declares its :class:`HiddenChannels`, in place: every declared tensor is sliced along
    its axis (a Parameter shared by several paths, a tied LM head, once, and it stays shared), the
    declared attributes get the new size, then ``after_surgery``; verified by a probe forward and
    undone on failure (:func:`verified_surgery`). Returns the model. The one hidden-size surgery of
    ms_prune."""
    hidden = hidden_of(model)
    keep = [keep] if isinstance(keep, (int, np.integer)) else list(keep)
    bad = [k for k in keep if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < hidden.size]
    if bad or not keep or keep != sorted(set(keep)):
        raise ValueError(f"slice_hidden: keep must be sorted, distinct channel indices in 0..{hidden.size - 1}, at "
                         f"least one; got {'out of range: ' + repr(bad) if bad else keep!r}")
    if len(keep) == hidden.size:
        return model
    index = np.asarray(keep, np.int64)

    def change():
        sliced = {}  # id of an original Parameter -> its slice, so shared tensors stay one tensor
        for path, axis in hidden.parameters.items():
            owner, name = resolve_path(model, path)
            old = getattr(owner, name)
            if id(old) not in sliced:
                sliced[id(old)] = Parameter(Tensor(np.ascontiguousarray(np.take(old.asnumpy(), index, axis=axis)),
                                                   old.dtype), name=old.name, requires_grad=old.requires_grad)
            setattr(owner, name, sliced[id(old)])
        for path in hidden.attributes:
            owner, name = resolve_path(model, path)
            setattr(owner, name, len(keep))
        if hidden.after_surgery is not None:
            hidden.after_surgery()
        refresh(model)
        return model
    return verified_surgery(adapter(model), "slice_hidden", change)


# --------------------------------------------------------------------------------------------
# Declarations checked before they are used, and surgery verified by a probe forward
# --------------------------------------------------------------------------------------------
class SurgeryError(RuntimeError):
    """The model's own code could not run after a surgery; the model was restored to what it was."""


def _out_in(cell, layout):
    weight = getattr(cell, "weight", None)
    if weight is None or len(weight.shape) != 2:
        return None
    return (weight.shape[0], weight.shape[1]) if layout == "linear" else (weight.shape[1], weight.shape[0])


def check_declaration(model, what=("heads", "neurons")):
    """Check the model's adapter against the model before an algorithm relies on it: every declared
    projection exists, head count x head size (and key/value heads x head size) match the
    projections' widths, key/value heads divide the query heads, and each FFN's projections agree on
    its neuron count. Raises ValueError naming the layer and the declaration; returns the adapter.
    (Without this a wrong declaration showed only at the prune step, after the whole run, or as a raw
    kernel error.)"""
    model_adapter = adapter(model)
    name = type(model_adapter).__name__
    problems = []
    for i in range(model_adapter.num_layers()):
        if "heads" in what:
            try:
                attention = model_adapter.attention(i)
            except NotImplementedError:
                break
            except (AttributeError, ValueError, TypeError) as err:
                raise ValueError(f"{name}.attention({i}) is not a valid declaration: {err}") from None
            problems += [f"attention({i}): {p}" for p in _attention_problems(attention)]
        if "neurons" in what:
            try:
                ffn = model_adapter.ffn(i)
            except (AttributeError, ValueError, TypeError) as err:
                raise ValueError(f"{name}.ffn({i}) is not a valid declaration: {err}") from None
            if ffn is not None:
                problems += [f"ffn({i}): {p}" for p in _ffn_problems(ffn)]
    if problems:
        raise ValueError(f"{name} declares what {type(model).__name__} does not have: " + "; ".join(problems))
    return model_adapter


def _attention_problems(attention):
    if not attention.num_heads:
        return []
    problems = []
    if attention.num_kv_heads == 0 or attention.num_heads % attention.num_kv_heads:
        problems.append(f"num_kv_heads {attention.num_kv_heads} does not divide num_heads {attention.num_heads}")
    width, kv_width = attention.num_heads * attention.head_dim, attention.num_kv_heads * attention.head_dim
    expected = [(attention.qkv, "out", width + 2 * kv_width, "num_heads x head_dim + 2 x num_kv_heads x head_dim")] \
        if attention.qkv is not None else [(attention.query, "out", width, "num_heads x head_dim"),
                                           (attention.key, "out", kv_width, "num_kv_heads x head_dim"),
                                           (attention.value, "out", kv_width, "num_kv_heads x head_dim")]
    expected.append((attention.output, "in", width, "num_heads x head_dim"))
    for path, axis, size, formula in expected:
        try:
            cell = resolve_cell(attention.cell, path)
        except AttributeError:
            problems.append(f"no projection {path!r} below {type(attention.cell).__name__}")
            continue
        cell = cell.layer if isinstance(cell, GatedInput) else cell
        dims = _out_in(cell, attention.layout)
        if dims is None:
            problems.append(f"{path!r} has no 2-D weight")
        elif dims[0 if axis == "out" else 1] != size:
            problems.append(f"{path!r} has {dims[0 if axis == 'out' else 1]} {'output' if axis == 'out' else 'input'} "
                            f"features, but {formula} = {size} (num_heads={attention.num_heads}, "
                            f"num_kv_heads={attention.num_kv_heads}, head_dim={attention.head_dim}, "
                            f"layout={attention.layout!r})")
    return problems


def _ffn_problems(ffn):
    if not ffn.num_neurons:
        return []
    problems = []
    for path, axis in [(p, "out") for p in ffn.inputs] + [(ffn.output, "in")]:
        cell = resolve_cell(ffn.cell, path)
        cell = cell.layer if isinstance(cell, GatedInput) else cell
        dims = _out_in(cell, ffn.layout)
        if dims is None:
            problems.append(f"{path!r} has no 2-D weight")
        elif dims[0 if axis == "out" else 1] != ffn.num_neurons:
            problems.append(f"{path!r} has {dims[0 if axis == 'out' else 1]} {'output' if axis == 'out' else 'input'} "
                            f"features, but num_neurons is {ffn.num_neurons}")
    return problems


_PROBE = "_ms_prune_probe_inputs"


def remember_inputs(model, inputs):
    """Keep one row of the model inputs ``inputs`` (numpy arrays or Tensors) as the probe that
    verifies the model after surgery. The ``Trainer`` and GradNAS call it with their first batch;
    an adapter may instead declare ``probe_inputs()``."""
    inputs = tuple(x.asnumpy() if isinstance(x, Tensor) else np.asarray(x) for x in inputs)
    if not inputs:
        return
    rows = inputs[0].shape[0] if inputs[0].ndim else None
    # one row of every input batched like the first (a shared table or a scalar stays whole)
    probe = tuple(x[:1] if rows is not None and x.ndim and x.shape[0] == rows else x for x in inputs)
    object.__setattr__(model, _PROBE, probe)


def _snapshot(model):
    """What a surgery may change: every Cell's attributes, parameters and sub-Cells (Parameters that
    surgery replaces are new objects, so the old ones hold the old values) and the model's config."""
    cells = []
    for _, cell in model.cells_and_names():
        cells.append((cell, dict(cell.__dict__), dict(cell._params), dict(cell._cells)))  # pylint: disable=protected-access
    config = copy.deepcopy(getattr(model, "config", None))
    return cells, config


def _restore(model, snapshot):
    cells, config = snapshot
    for cell, attributes, params, children in cells:
        cell.__dict__.clear()
        cell.__dict__.update(attributes)
        cell._params.clear()  # pylint: disable=protected-access
        cell._params.update(params)  # pylint: disable=protected-access
        cell._cells.clear()  # pylint: disable=protected-access
        cell._cells.update(children)  # pylint: disable=protected-access
    if config is not None:
        object.__setattr__(model, "config", config)
    refresh(model)


def _user_frame(err):
    """The innermost frame of the error outside MindSpore and ms_prune: the model's own line."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/mindspore/" not in f.filename and "/ms_prune/" not in f.filename.replace("\\", "/")
              and not f.filename.endswith("protocol.py")]
    return frames[-1] if frames else None


def verified_surgery(model_adapter, what, change):
    """Run ``change()`` (a surgery on the adapter's model), then a probe forward in PyNative on the
    adapter's ``probe_inputs()``; if either fails, put the model back as it was and raise
    :class:`SurgeryError` naming what ran, the operator's message and the likely cause."""
    model = model_adapter.model
    snapshot = _snapshot(model)
    try:
        result = change()
    except Exception:
        _restore(model, snapshot)
        raise
    inputs = model_adapter.probe_inputs()
    if inputs is None:
        logger.info("%s: no probe inputs (no batch seen yet and the adapter declares no probe_inputs()): the "
                    "model was not verified after %s", type(model_adapter).__name__, what)
        return result
    training, mode = model.training, ms.get_context("mode")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        model.set_train(False)
        model(*[Tensor(x) for x in inputs])
    except Exception as err:  # the model's own code, whatever it raises
        _restore(model, snapshot)
        frame = _user_frame(err)
        where = f" in {frame.filename}:{frame.lineno} `{frame.line}`" if frame else ""
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        declare = ("in HiddenChannels(attributes=[its dotted path, ...])" if what == "slice_hidden" else
                   "in AttentionHeads/FFNUnits(count_attributes={name: 'heads' | 'kv_heads' | 'groups' | 'width' | "
                   "'kv_width' | 'neurons'})")
        raise SurgeryError(
            f"{what} changed {type(model).__name__}, but its forward then failed{where}: {type(err).__name__}: "
            f"{message}. The model is restored to what it was. Likely cause: the model's code computes a shape from "
            f"a count or width it keeps as an attribute (e.g. reshape(B, N, C) with C the original width): declare "
            f"that attribute {declare}, or an after_surgery function, or read it from the input's shape in the "
            f"model's code") from err
    finally:
        ms.set_context(mode=mode)
        model.set_train(training)
    return result


# --------------------------------------------------------------------------------------------
# Reading and replacing a layer's arguments inside construct (graph-mode safe: the keys are
# compile-time constants, and keyword arguments are replaced in place, which graph mode supports
# where building a new dict is not)
# --------------------------------------------------------------------------------------------
def call_argument(args, kwargs, key):
    """The argument at ``key`` (a position or a keyword) of a layer call, or None when absent."""
    if key is None:
        return None
    if isinstance(key, int):
        if key < len(args):
            return args[key]
        return None
    if key in kwargs:
        return kwargs[key]
    return None
