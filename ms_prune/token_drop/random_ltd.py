"""Random layer-wise token dropping (random-LTD, Yao et al. 2022, arXiv 2211.11586) for MindSpore.

In training, a wrapped transformer layer sees only ``r`` tokens per sequence, drawn at random and
kept in their original order; the other tokens bypass the layer unchanged. The layer really runs
on ``(batch, r, hidden)`` tensors, so its cost falls with ``r`` (attention with ``r**2``).

Graph mode needs static shapes, so ``r`` is a Python int frozen into each compiled graph: the
engine's ``Trainer`` (with the :class:`RandomLTD` algorithm) or :class:`RandomLTDTrainStep` keeps
one compiled step per distinct kept length (and batch shape), which bounds compilations by
:meth:`RandomLTDScheduler.distinct_lengths`.

Composer form: :func:`apply_random_ltd` / :func:`remove_random_ltd` and the :class:`RandomLTD`
algorithm, which draws the token scores on the host from the run's saved RNG (resumable); the
functional form draws them in the graph by default.
"""
import numbers

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_prune import cost, protocol
from ms_prune.engine import Algorithm, Applied, Event
from ms_prune.protocol import LayerCall, LayerWrapper, call_argument
from ms_prune.training import compiled_graph_count, make_train_step, write_parameter
from ms_prune.validation import check_bool, check_instance, check_int, deprecated_alias

from .scheduler import RandomLTDScheduler, check_schedule, set_learning_rate

# The Composer form; the older names below stay importable from this module and the package.
__all__ = ["RandomLTD", "apply_random_ltd", "remove_random_ltd"]


# --------------------------------------------------------------------------------------------
# Gather / scatter: plain differentiable ops (gather_nd, tensor_scatter_update), so MindSpore's
# own autodiff carries gradients through them on CPU, GPU and Ascend.
# --------------------------------------------------------------------------------------------
def _nd_indices(positions, batch_first):
    """(batch, r) sorted positions -> (batch, r, 2) or (r, batch, 2) gather_nd indices."""
    batch, kept = positions.shape
    rows = ops.broadcast_to(ops.arange(batch).astype(ms.int32).reshape(batch, 1), (batch, kept))
    if batch_first:
        return ops.stack((rows, positions), -1)
    return ops.stack((positions.T, rows.T), -1)


def gather_tokens(hidden_states, positions, batch_first=True):
    """The tokens at ``positions`` (batch, r): (B, S, ...) -> (B, r, ...), or (S, B, ...) ->
    (r, B, ...) when not ``batch_first``."""
    return ops.gather_nd(hidden_states, _nd_indices(positions, batch_first))


def scatter_tokens(full, kept, positions, batch_first=True):
    """``full`` with the tokens at ``positions`` replaced by ``kept`` (inverse of gather_tokens)."""
    return ops.tensor_scatter_update(full, _nd_indices(positions, batch_first), kept)


def kept_attention_bias(attention_bias, positions, seq_len):
    """The additive bias among the kept tokens, taken at their real positions.

    ``attention_bias`` is (b, heads, queries, keys) with b in {1, batch}; an axis of length
    ``seq_len`` among queries/keys is indexed by the kept positions, a length-1 axis broadcasts.
    So a causal bias keeps causality between real positions and padding stays masked: slicing
    the first r rows and columns (DeepSpeed's GPT path) is right only without padding.
    """
    if attention_bias is None:
        return None
    batch, kept = positions.shape
    _, heads, queries, keys = attention_bias.shape
    bias = ops.broadcast_to(attention_bias, (batch, heads, queries, keys))
    if queries == seq_len:
        rows = ops.broadcast_to(positions.reshape(batch, 1, kept, 1), (batch, heads, kept, keys))
        bias = ops.gather_elements(bias, 2, rows)
        queries = kept
    if keys == seq_len:
        cols = ops.broadcast_to(positions.reshape(batch, 1, 1, kept), (batch, heads, queries, kept))
        bias = ops.gather_elements(bias, 3, cols)
    return bias


def kept_mask(mask, positions, seq_len):
    """An attention mask or bias among the kept tokens: (b, seq) -> (batch, r), (b, seq, seq) ->
    (batch, r, r), (b, h, seq, seq) -> (batch, h, r, r) (see ``kept_attention_bias``; additive or
    0/1 alike, axes of length 1 broadcast); None stays None."""
    if mask is None:
        return None
    if mask.ndim == 4:
        return kept_attention_bias(mask, positions, seq_len)
    if mask.ndim == 3:
        kept = kept_attention_bias(mask.expand_dims(1), positions, seq_len)
        return kept.squeeze(1)
    kept = kept_attention_bias(mask.reshape(mask.shape[0], 1, 1, mask.shape[1]), positions, seq_len)
    return kept.reshape(kept.shape[0], kept.shape[3])


def gather_rows(table, positions, position_axis=1):
    """Per sequence, the rows of a (seq, ...) table (no batch axis: a precomputed rotary table) at
    ``positions`` (batch, r): (batch, r, ...), or (batch, 1, r, ...) with ``position_axis=2``."""
    rows = ops.gather(table, positions, 0)
    return rows.expand_dims(1) if position_axis == 2 else rows


def sorted_topk_positions(scores, kept):
    """Positions of the ``kept`` largest scores per row, in increasing order (int32)."""
    positions = ops.topk(scores, kept)[1]
    # float sort: exact below 2**24 positions, and float sort exists on every backend
    return ops.sort(positions.astype(ms.float32), -1)[0].astype(ms.int32)


class TokenDraw(nn.Cell):
    """One random draw per step shared by the wrappers that hold it.

    In-graph (default): the first wrapper of the group (``draws=True``) writes fresh uniform scores
    into ``scores``; the later ones read them, so all take the same top-r positions (nested sets
    when their kept lengths differ). ``host_noise=True``: no wrapper draws; the scores are written
    on the host before every step (``write_parameter``; the :class:`RandomLTD` algorithm writes them
    from the run's saved RNG, so a resumed run keeps the tokens the uninterrupted run kept).

    ``scores`` has a static shape: :meth:`use_shape` selects (or creates) the buffer for the hidden
    states' (batch, seq) before a graph is compiled; each compiled graph keeps the buffer it was
    built with. A wrapper whose hidden states do not match it draws on its own in the graph, or,
    with ``host_noise``, raises when its graph is built: silently drawing in the graph would
    break the exact resume the host-written scores exist for.

    Wrappers hold this Cell unregistered, so its buffers are not model parameters: they are not
    trained, counted or saved.
    """

    def __init__(self, host_noise=False):
        super().__init__()
        self.host_noise = check_bool("TokenDraw", "host_noise", host_noise)
        self._buffers = {}
        self.scores = self._buffer((1, 1))

    def _buffer(self, shape):
        if shape not in self._buffers:
            self._buffers[shape] = Parameter(ops.zeros(shape, ms.float32), requires_grad=False,
                                             name=f"random_ltd_scores_{id(self)}_{shape[0]}x{shape[1]}")
        return self._buffers[shape]

    def use_shape(self, batch_size, seq_len):
        self.scores = self._buffer((int(batch_size), int(seq_len)))


class RandomLayerTokenDrop(LayerWrapper):
    """Wraps a transformer layer called as ``call`` (an ``ms_prune.protocol.LayerCall``; default:
    ``layer(hidden_states, mask, *others) -> hidden | tuple``).

    Training (``self.training``) with ``kept_length = r < seq_len``: draws ``r`` sorted random
    positions per sequence, runs the layer on those tokens with the mask among their real
    positions (``kept_mask``: an additive bias or a 0/1 mask, 2-, 3- or 4-D, or none), the
    kept tokens' entries of the ``per_token`` arguments (a RoPE layer's ``position_ids``: the kept
    tokens keep their real positions) and the kept tokens' rows of the ``per_position`` tables
    (batched: (batch, r, ...), see ``LayerCall``), every other argument, positional or keyword,
    unchanged; then scatters the outputs back: the first output (the hidden states) into the
    input, the declared ``per_token_outputs`` into zeros; every other output (an auxiliary loss)
    passes unchanged. Evaluation, ``kept_length=None``, or ``r >= seq_len`` (when
    ``skip_when_full``): the layer runs on all tokens.

    Parameter names stay those of the unwrapped model (``LayerWrapper``), so a converted model
    saves and loads its checkpoints as it is. ``batch_first=False`` takes (seq, batch, hidden)
    states (it overrides ``call.batch_first``). ``kept_length`` is a Python int: changing it
    changes the graph, see :class:`RandomLTDTrainStep`.
    """

    def __init__(self, layer, kept_length=None, batch_first=True, skip_when_full=True, call=None):
        super().__init__(layer)
        call = check_instance("RandomLayerTokenDrop", "call", call, LayerCall, allow_none=True) or LayerCall()
        self.batch_first = check_bool("RandomLayerTokenDrop", "batch_first", batch_first) and call.batch_first
        self.layer_call = call
        self.hidden_key, self.mask_key, self.per_token_keys = call.hidden, call.mask, call.per_token
        self.per_position, self.position_axis = call.per_position, call.position_axis
        self.per_token_outputs = call.per_token_outputs
        self.keyword_keys = tuple(k for k in (call.hidden, call.mask) + call.per_token +
                                  tuple(key for key, _ in call.per_position) if isinstance(k, str))
        self.skip_when_full = check_bool("RandomLayerTokenDrop", "skip_when_full", skip_when_full)
        self.kept_length = None
        self.set_kept_length(kept_length)
        self.draws = True
        object.__setattr__(self, "token_draw", None)

    def set_kept_length(self, kept_length):
        """None keeps every token."""
        self.kept_length = check_int("RandomLayerTokenDrop", "kept_length", kept_length, minimum=1, allow_none=True)

    def share_draw(self, token_draw, draws):
        """Take positions from ``token_draw`` (a :class:`TokenDraw`, or None for an own draw);
        ``draws``: this wrapper is the group's first and draws for the step."""
        check_instance("RandomLayerTokenDrop.share_draw", "token_draw", token_draw, TokenDraw, allow_none=True)
        object.__setattr__(self, "token_draw", token_draw)
        self.draws = bool(draws)

    def _check_host_draw(self, batch, seq):
        draw = self.token_draw
        if draw is not None and draw.host_noise and draw.scores.shape != (batch, seq):
            raise ValueError(f"random-LTD: the host wrote token scores of shape {draw.scores.shape} but this layer's "
                             f"hidden states have (batch, seq) = {(batch, seq)}: the step's token count was "
                             f"not the hidden states'. Declare it: LayerCall(token_shape=f), "
                             f"f(*batch) -> (batch_size, seq_len), in the model adapter's layer_call or "
                             f"RandomLTD(layer_call=...)")

    def _positions(self, batch, seq, kept):
        draw = self.token_draw
        if draw is not None and draw.scores.shape == (batch, seq):
            if self.draws and not draw.host_noise:
                ops.assign(draw.scores, ops.rand(batch, seq))
            return sorted_topk_positions(draw.scores, kept)
        return sorted_topk_positions(ops.rand(batch, seq), kept)

    def _kept_rows(self, key, table, positions, seq):
        if table.shape[0] < seq:
            raise ValueError(f"random-LTD: per_position argument {key!r} has shape {table.shape}: a table indexed "
                             f"by position needs at least seq = {seq} rows on axis 0")
        return gather_rows(table, positions, self.position_axis)

    def _kept_tables(self, key, value, items, positions, seq):
        """A per-position argument: a table, or a tuple whose ``items`` (None: every one) are."""
        if not isinstance(value, (tuple, list)):
            if items is not None:
                raise ValueError(f"random-LTD: per_position names items {items} of argument {key!r}, but it is "
                                 f"not a tuple")
            return self._kept_rows(key, value, positions, seq)
        kept = ()
        for i in range(len(value)):
            item = value[i]
            if item is not None and (items is None or i in items):
                item = self._kept_rows(key, item, positions, seq)
            kept = kept + (item,)
        return kept

    def _kept_argument(self, key, value, positions, batch, seq):
        """The layer argument at ``key`` as the kept tokens see it."""
        if value is None:
            return value
        if key == self.hidden_key:
            return gather_tokens(value, positions, self.batch_first)
        if key == self.mask_key:
            return kept_mask(value, positions, seq)
        if key in self.per_token_keys:
            leading = (batch, seq) if self.batch_first else (seq, batch)
            if value.ndim < 2 or value.shape[:2] != leading:
                raise ValueError(f"random-LTD: per_token argument {key!r} has shape {value.shape}, but per-token "
                                 f"arguments lead with the hidden states' axes {leading}; a (seq, ...) table "
                                 f"without a batch axis is declared with LayerCall(per_position=...)")
            return gather_tokens(value, positions, self.batch_first)
        for entry in self.per_position:
            if key == entry[0]:
                return self._kept_tables(key, value, entry[1], positions, seq)
        return value

    def construct(self, *args, **kwargs):
        hidden_states = call_argument(args, kwargs, self.hidden_key)
        seq_axis = 1 if self.batch_first else 0
        seq = hidden_states.shape[seq_axis]
        if not self.training or self.kept_length is None:
            return self.layer(*args, **kwargs)
        batch = hidden_states.shape[1 - seq_axis]
        # also when every token is kept: a wrong host-side count would otherwise pass unnoticed
        self._check_host_draw(batch, seq)
        if self.kept_length >= seq and self.skip_when_full:
            return self.layer(*args, **kwargs)
        kept = min(self.kept_length, seq)
        positions = self._positions(batch, seq, kept)
        kept_args = ()
        for i in range(len(args)):
            kept_args = kept_args + (self._kept_argument(i, args[i], positions, batch, seq),)
        for key in self.keyword_keys:  # only the declared ones: the others stay as they came
            if key in kwargs:
                kwargs[key] = self._kept_argument(key, kwargs[key], positions, batch, seq)
        outputs = self.layer(*kept_args, **kwargs)
        if not isinstance(outputs, (tuple, list)):
            return scatter_tokens(hidden_states, outputs, positions, self.batch_first)
        restored = (scatter_tokens(hidden_states, outputs[0], positions, self.batch_first),)
        for i in range(1, len(outputs)):
            output = outputs[i]
            if i in self.per_token_outputs:
                full_shape = output.shape[:seq_axis] + (seq,) + output.shape[seq_axis + 1:]
                restored = restored + (scatter_tokens(ops.zeros(full_shape, output.dtype), output, positions,
                                                      self.batch_first),)
            else:
                restored = restored + (output,)
        return restored


# --------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------
def _layer_slots(model, layer_class):
    """[(container, key, layer)] of the model's transformer layers, in order."""
    if layer_class is None:
        try:
            layers = protocol.adapter(model).layers()
        except TypeError as err:
            raise ValueError(f"{err}; or name its layer class with layer_class='ClassName' (or pass the class)"
                             ) from None
        return [(layers, i, layers[i]) for i in range(len(layers))]
    if not isinstance(layer_class, (type, str)):
        raise TypeError(f"layer_class must be a class or a class name, got {type(layer_class).__name__}")
    label = layer_class if isinstance(layer_class, str) else layer_class.__name__

    def matches(cell):
        return isinstance(cell, layer_class) if isinstance(layer_class, type) else type(cell).__name__ == layer_class
    slots = []
    for _, parent in model.cells_and_names():
        if isinstance(parent, RandomLayerTokenDrop):
            continue
        for key, child in parent.name_cells().items():
            if matches(child):
                slots.append((parent, int(key) if isinstance(parent, (nn.CellList, nn.SequentialCell)) else key, child))
    if not slots:
        raise ValueError(f"{type(model).__name__} has no layers of class {label!r}")
    return slots


def _set_slot(container, key, cell):
    if isinstance(key, int):
        container[key] = cell
    else:
        setattr(container, key, cell)


def random_ltd_layers(model):
    """The RandomLayerTokenDrop wrappers of a model, in order."""
    return [cell for _, cell in model.cells_and_names() if isinstance(cell, RandomLayerTokenDrop)]


def convert_to_random_ltd(model, layer_ids=None, layer_class=None, kept_length=None, batch_first=True,
                          share_draw=True, host_noise=False, layer_call=None):
    """Wrap layers of ``model`` in :class:`RandomLayerTokenDrop`; returns the wrappers.

    ``layer_ids``: indices among the model's layers (declared by the model protocol; or the Cells
    of class ``layer_class``, in model order, called as ``LayerCall()``); default all but the first and
    the last, which the paper keeps full. ``share_draw``: one random draw per step shared by the
    wrapped layers (else each layer draws its own, as DeepSpeed does). ``host_noise``: the scores
    are not drawn in the graph but written before every step into the :class:`TokenDraw` buffers
    (one shared, or one per wrapper without ``share_draw``; see :func:`token_draws`).
    ``layer_call``: how the layers are called (a ``LayerCall``), in place of the adapter's
    ``layer_call`` (or of ``LayerCall()`` for layers found by ``layer_class``).
    """
    check_instance("convert_to_random_ltd", "layer_call", layer_call, LayerCall, allow_none=True)
    check_bool("convert_to_random_ltd", "share_draw", share_draw)
    check_bool("convert_to_random_ltd", "host_noise", host_noise)
    slots = _layer_slots(model, layer_class)
    count = len(slots)
    if any(isinstance(layer, RandomLayerTokenDrop) for _, _, layer in slots) or random_ltd_layers(model):
        raise ValueError(f"{type(model).__name__} already has random-LTD layers; revert_random_ltd first")
    if layer_ids is None:
        layer_ids = list(range(1, count - 1))
        if not layer_ids:
            raise ValueError(f"{type(model).__name__} has {count} layer(s): with the first and last kept full none "
                             f"is left to wrap; pass layer_ids explicitly")
    layer_ids = list(layer_ids) if not isinstance(layer_ids, numbers.Integral) else [layer_ids]
    bad = [i for i in layer_ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < count]
    if bad:
        raise ValueError(f"layer_ids {bad} are not layer indices: the model has layers 0..{count - 1}")
    if len(set(layer_ids)) != len(layer_ids) or not layer_ids:
        raise ValueError(f"layer_ids must be distinct and non-empty, got {layer_ids}")
    shared = TokenDraw(host_noise) if share_draw else None
    call = layer_call or (protocol.adapter(model).layer_call if layer_class is None else LayerCall())
    wrappers = []
    for n, i in enumerate(sorted(int(i) for i in layer_ids)):
        container, key, layer = slots[i]
        wrapper = RandomLayerTokenDrop(layer, kept_length=kept_length, batch_first=batch_first, call=call)
        if share_draw:
            wrapper.share_draw(shared, draws=n == 0)
        elif host_noise:  # each layer its own scores, still written from the host
            wrapper.share_draw(TokenDraw(host_noise=True), draws=True)
        wrapper.set_train(model.training)  # a new Cell starts in eval mode; keep the model's mode
        _set_slot(container, key, wrapper)
        wrappers.append(wrapper)
    protocol.refresh(model)
    return wrappers


def token_draws(wrappers):
    """The distinct :class:`TokenDraw` objects of ``wrappers``, in wrapper order."""
    draws = []
    for wrapper in wrappers:
        if wrapper.token_draw is not None and all(wrapper.token_draw is not d for d in draws):
            draws.append(wrapper.token_draw)
    return draws


def remove_random_ltd(model):
    """Put the wrapped layers back (the trained weights stay); returns the model (``apply_random_ltd``'s
    inverse)."""
    reverted = 0
    for _, parent in list(model.cells_and_names()):
        for key, child in list(parent.name_cells().items()):
            if isinstance(child, RandomLayerTokenDrop):
                _set_slot(parent, int(key) if isinstance(parent, (nn.CellList, nn.SequentialCell)) else key,
                          child.layer)
                reverted += 1
    if not reverted:
        raise ValueError(f"remove_random_ltd: {type(model).__name__} has no random-LTD layers")
    protocol.refresh(model)
    return model


revert_random_ltd = deprecated_alias(remove_random_ltd, "revert_random_ltd")


def forward_flops_with_ltd(model, seq_len, batch_size=1):
    """The model's forward FLOPs (``ms_prune.cost.forward_flops``) with each random-LTD layer
    counted on its kept tokens: projections scale with the kept length r, attention matmuls with
    r**2 (gather/scatter are not FLOPs)."""
    layers = protocol.adapter(model).layers()
    tokens = [min(layer.kept_length, seq_len) if isinstance(layer, RandomLayerTokenDrop) and
              layer.kept_length is not None else seq_len for layer in layers]
    return cost.forward_flops(model, seq_len, batch_size, tokens_per_layer=tokens)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def hidden_token_shape(call, batch, batch_first=True):
    """(batch_size, seq_len) of the hidden states the layers called as ``call`` (a ``LayerCall``)
    receive in a training step on ``batch`` (model inputs first, numpy arrays or Tensors): what the
    step's kept length, token-score buffers and layer-token count are set from, on the host, before
    the step's graph exists. ``call.token_shape(*batch)`` when declared; otherwise the first input
    must be (batch, seq) integer token ids ((seq, batch) when not ``batch_first``): the first input
    of a vision model (images) or of a model that shifts its ids says nothing reliable."""
    owner = "LayerCall.token_shape"
    if call.token_shape is not None:
        shape = call.token_shape(*batch)
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"{owner} must return (batch_size, seq_len), got {shape!r}")
        return check_int(owner, "batch_size", shape[0], minimum=1), check_int(owner, "seq_len", shape[1], minimum=1)
    first = batch[0] if isinstance(batch[0], Tensor) else np.asarray(batch[0])
    dtype = np.dtype(ms.dtype_to_nptype(first.dtype)) if isinstance(first, Tensor) else first.dtype
    if first.ndim != 2 or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"random-LTD: the first model input has shape {tuple(first.shape)} ({dtype}), not 2-D "
                         f"integer token ids, so how many tokens the layers see cannot be read from it. Declare "
                         f"it: LayerCall(..., token_shape=f) with f(*batch) -> (batch_size, seq_len), in the model "
                         f"adapter's layer_call or RandomLTD(layer_call=...)")
    shape = tuple(int(n) for n in first.shape)
    return shape if batch_first else shape[::-1]


def _prepare_step(wrappers, draws, scheduler, batch, seq, optimizer, lr_schedule):
    """Set this step's kept length on the wrappers and the draw buffers' shape, and the learning
    rate from ``lr_schedule``; returns the kept length (what the step's graph freezes)."""
    kept = min(scheduler.kept_length(), seq)
    for wrapper in wrappers:
        wrapper.set_kept_length(kept)
    for draw in draws:
        draw.use_shape(batch, seq)
    if lr_schedule is not None:
        set_learning_rate(optimizer, lr_schedule(scheduler.consumed_layer_tokens))
    return kept


class RandomLTDTrainStep:
    """A training step that sets each step's kept length from ``scheduler`` on the wrappers (the
    pre-engine API; the :class:`RandomLTD` algorithm under ``ms_prune.engine.Trainer`` does the same).

    One compiled step (``make_train_step``) is kept per (kept length, batch shape, training flag):
    a new length compiles exactly once, a length seen before reuses its graph. ``compilations``
    counts graphs actually compiled (from MindSpore's compile records), ``step_keys`` the cache.
    With ``lr_schedule`` (e.g. :class:`LayerTokenLR`) the optimizer's learning rate follows the
    consumed layer-tokens. The hidden states' (batch, seq) come from the inputs as
    :func:`hidden_token_shape` says (the wrappers' ``LayerCall.token_shape``, or token ids first).
    """

    def __init__(self, model, loss_net, optimizer, scheduler, lr_schedule=None, jit=True, max_compilations=None):
        owner = "RandomLTDTrainStep"
        check_instance(owner, "scheduler", scheduler, RandomLTDScheduler)
        self.wrappers = random_ltd_layers(model)
        if not self.wrappers:
            raise ValueError(f"{owner}: {type(model).__name__} has no random-LTD layers: call apply_random_ltd first")
        if scheduler.ltd_layers != len(self.wrappers):
            raise ValueError(f"{owner}: scheduler.ltd_layers is {scheduler.ltd_layers} but the model has "
                             f"{len(self.wrappers)} random-LTD layers: layer-token counts would be wrong")
        self.max_compilations = check_int(owner, "max_compilations", max_compilations, minimum=1, allow_none=True)
        self.model, self.loss_net, self.optimizer = model, loss_net, optimizer
        self.scheduler, self.lr_schedule, self.jit = scheduler, lr_schedule, jit
        self.batch_first = self.wrappers[0].batch_first
        self.draws = token_draws(self.wrappers)
        self._steps = {}
        self.compilations = 0

    @property
    def step_keys(self):
        return sorted(self._steps, key=str)

    def __call__(self, *inputs):
        batch, seq = hidden_token_shape(self.wrappers[0].layer_call, inputs, self.batch_first)
        kept = _prepare_step(self.wrappers, self.draws, self.scheduler, batch, seq, self.optimizer, self.lr_schedule)
        key = (kept, tuple(tuple(x.shape) for x in inputs), bool(self.model.training))
        step = self._steps.get(key)
        if step is None:
            if self.max_compilations is not None and len(self._steps) >= self.max_compilations:
                raise RuntimeError(f"random-LTD would build step graph {len(self._steps) + 1} (key {key}) but "
                                   f"max_compilations is {self.max_compilations}; seen keys {self.step_keys}")
            step = self._steps[key] = make_train_step(self.loss_net, self.optimizer, jit=self.jit)
        before = compiled_graph_count(step)
        loss = step(*inputs)
        self.compilations += compiled_graph_count(step) - before
        self.scheduler.step(batch, seq)
        return loss


def make_random_ltd_train_step(model, loss_net, optimizer, scheduler, lr_schedule=None, jit=True,
                               max_compilations=None):
    """Functional form of :class:`RandomLTDTrainStep`."""
    return RandomLTDTrainStep(model, loss_net, optimizer, scheduler, lr_schedule, jit, max_compilations)


# --------------------------------------------------------------------------------------------
# The Composer form: functional twin and the algorithm
# --------------------------------------------------------------------------------------------
def apply_random_ltd(model, min_value, max_value, require_steps, seq_per_step=16, layer_ids=None,
                     layer_class=None, batch_first=True, share_draw=True, host_noise=False, layer_call=None):
    """Convert ``model`` in place and return ``Applied(cells=wrappers, schedule=scheduler)`` (it
    unpacks as ``wrappers, scheduler``), the scheduler with the layer counts filled in. Before each training step set ``scheduler.kept_length()`` on the wrappers (or train with
    ``make_random_ltd_train_step``, or the :class:`RandomLTD` algorithm, which do it); scores are
    drawn in the graph unless ``host_noise`` (see :func:`convert_to_random_ltd`)."""
    min_value, max_value, require_steps, seq_per_step = check_schedule(
        "apply_random_ltd", min_value, max_value, require_steps, seq_per_step)
    total = len(_layer_slots(model, layer_class))
    wrappers = convert_to_random_ltd(model, layer_ids, layer_class, batch_first=batch_first, share_draw=share_draw,
                                     host_noise=host_noise, layer_call=layer_call)
    scheduler = RandomLTDScheduler(min_value, max_value, require_steps, seq_per_step,
                                   total_layers=total, ltd_layers=len(wrappers))
    return Applied(wrappers, scheduler)


class RandomLTD(Algorithm):
    """random-LTD for ``ms_prune.engine.Trainer``.

    INIT: wraps the layers (host noise; no ``structure_changed``: the trainer and ``AlgorithmCallback``
    build every step after INIT). BATCH_START: this batch's kept length
    ``min(scheduler.kept_length(), seq_len)`` on the wrappers (``graph_key``: the Trainer keeps one
    compiled step per kept length), fresh token scores from the run's ``state.rng`` written into the
    draw buffers (a resumed run keeps the tokens the uninterrupted run kept), and the learning rate
    from ``lr_schedule(consumed_layer_tokens)`` (e.g. :class:`LayerTokenLR`; the optimizer needs one
    constant float learning rate). AFTER_TRAIN_STEP: the scheduler counts the step. The wrappers stay
    after FIT_END (evaluation runs every token); ``revert_random_ltd(model)`` unwraps.

    The batch's (batch, seq) are the hidden states' (:func:`hidden_token_shape`): a model whose first
    input is not its token ids declares ``LayerCall(token_shape=...)``, in its adapter or as
    ``layer_call`` here (which replaces the adapter's declaration, or ``LayerCall()`` for layers
    found by ``layer_class``).

    Not for ``mindspore.train.Model.train`` (``runs_in_model_train = False``): a changing kept
    length needs a new graph, and Model.train compiles one for the whole run.

    The pre-engine use still works: ``ltd.apply(model)`` (in-graph draws), then
    ``ltd.train_step(loss_net, optimizer)`` (a :class:`RandomLTDTrainStep`).
    """

    changes_graph = True
    runs_in_model_train = False

    def __init__(self, min_value, max_value, require_steps, seq_per_step=16, layer_ids=None, layer_class=None,
                 batch_first=True, share_draw=True, lr_schedule=None, layer_call=None):
        owner = self.name
        check_schedule(owner, min_value, max_value, require_steps, seq_per_step)
        check_instance(owner, "layer_class", layer_class, (type, str), allow_none=True)
        check_instance(owner, "layer_call", layer_call, LayerCall, allow_none=True)
        if layer_ids is not None:  # their upper bound needs the model: checked again at conversion
            ids = [layer_ids] if isinstance(layer_ids, numbers.Integral) else layer_ids
            if not isinstance(ids, (list, tuple, range)):
                raise TypeError(f"{owner}: layer_ids must be None, an int or a list of ints, "
                                f"got {layer_ids!r} ({type(layer_ids).__name__})")
            for i, layer_id in enumerate(ids):
                check_int(owner, f"layer_ids[{i}]", layer_id, minimum=0)
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"{owner}: lr_schedule must be None or a function consumed_layer_tokens -> lr "
                            f"(e.g. LayerTokenLR), got {type(lr_schedule).__name__}")
        self.kwargs = dict(min_value=min_value, max_value=max_value, require_steps=require_steps,
                           seq_per_step=seq_per_step, layer_ids=layer_ids, layer_class=layer_class,
                           batch_first=check_bool(owner, "batch_first", batch_first),
                           share_draw=check_bool(owner, "share_draw", share_draw), layer_call=layer_call)
        self.lr_schedule = lr_schedule
        self.model = self.scheduler = None
        self.wrappers, self.draws = [], []
        self._kept = self._shape = self._pending = None

    def _convert(self, model, host_noise):
        self.wrappers, self.scheduler = apply_random_ltd(model, host_noise=host_noise, **self.kwargs)
        self.draws = token_draws(self.wrappers)
        self.model = model
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None
        return model

    def match(self, event, state):
        return event in (Event.INIT, Event.BATCH_START, Event.AFTER_TRAIN_STEP)

    def apply(self, event, state=None, logger=None):
        if isinstance(event, nn.Cell) and state is None:
            # the pre-engine API, ltd.apply(model): in-graph draws, as without a trainer nobody
            # writes the scores before each step
            return self._convert(event, host_noise=False)
        if event == Event.INIT:
            self._convert(state.model, host_noise=True)
        elif event == Event.BATCH_START:
            first = self.wrappers[0]
            self._shape = hidden_token_shape(first.layer_call, state.batch, first.batch_first)
            self._kept = _prepare_step(self.wrappers, self.draws, self.scheduler, *self._shape, state.optimizer,
                                       self.lr_schedule)
            # drawn for the global batch, then this worker's rows: under msrun each worker keeps the
            # tokens a single process would keep for its rows
            rows, seq = self._shape
            for draw in self.draws:
                write_parameter(draw.scores, state.worker_rows(state.rng.random((state.global_rows(rows), seq))))
        elif event == Event.AFTER_TRAIN_STEP:
            self.scheduler.step(state.global_rows(self._shape[0]), self._shape[1])  # the global batch's tokens
        return None

    def graph_key(self, state):
        return self._kept

    def train_step(self, loss_net, optimizer, lr_schedule=None, jit=True, max_compilations=None):
        """The pre-engine training step (after ``apply(model)``): a :class:`RandomLTDTrainStep`."""
        if self.model is None:
            raise RuntimeError("RandomLTD.train_step: call apply(model) first")
        return RandomLTDTrainStep(self.model, loss_net, optimizer, self.scheduler, lr_schedule, jit, max_compilations)

    def state_dict(self):
        return self.scheduler.state_dict() if self.scheduler is not None else dict(self._pending or {})

    def load_state_dict(self, state_dict):
        if self.scheduler is None:
            self._pending = dict(state_dict)  # applied when the model is converted
        else:
            self.scheduler.load_state_dict(state_dict)

    def __repr__(self):
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"
