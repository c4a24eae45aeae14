"""What BERT and GPT-2 share: config objects, Hugging Face checkpoint I/O, head surgery, counting.

Parameter names of our Cells are Hugging Face's tensor names (our LayerNorm and Embedding keep
``weight``/``bias``), up to a short list of renames a model declares in ``_hf_renames``; so loading
a checkpoint is an explicit name-to-name copy in which every tensor is accounted for.
"""
import copy
import functools
import json
import logging
import math
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from ms_prune import cost
from ms_prune.fileio import atomic_write
from ms_prune.protocol import (AttentionHeads, FFNUnits, HiddenChannels, LayerCall, TransformerAdapter, checked_units,
                               head_positions, neuron_positions, refresh, resolve_cell, resolve_path, slice_heads,
                               slice_neurons, slice_projection)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Additive attention bias for masked positions: exp() of it underflows to exactly 0 in float32.
MASK_VALUE = -1e9


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
class PretrainedConfig:
    """A typed, validated config that reads and writes Hugging Face ``config.json`` files.

    Subclasses list their keys and defaults in ``defaults``. Keyword arguments are checked: an
    unknown key is a ``ValueError`` naming it. Keys of a ``config.json`` that we do not use
    (``architectures``, ``transformers_version``, ...) are kept in ``extra`` and written back.
    """

    model_type = ""
    defaults = {}

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown key(s) {unknown}; "
                f"known keys are {sorted(self.defaults)}")
        for key, default in self.defaults.items():
            setattr(self, key, copy.deepcopy(kwargs.get(key, default)))
        self.pruned_heads = _int_unit_map(self.pruned_heads)
        if "pruned_ffn_neurons" in self.defaults:
            self.pruned_ffn_neurons = _int_unit_map(self.pruned_ffn_neurons)
        self.extra = {}
        self.validate()

    def validate(self):
        """Check value ranges; subclasses extend it."""

    def _check_positive(self, *names):
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")

    def _check_probability(self, *names):
        for name in names:
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{type(self).__name__}.{name} must be in [0, 1), got {value!r}")

    def _check_pruned_units(self, key, unit, num_layers, total):
        for layer, units in getattr(self, key).items():
            if not 0 <= layer < num_layers:
                raise ValueError(f"{key} names layer {layer}, but the model has layers 0..{num_layers - 1}")
            bad = [u for u in units if not 0 <= u < total]
            if bad:
                raise ValueError(f"{key} of layer {layer} names {unit}(s) {bad}, but layers have {unit}s 0..{total - 1}")

    def _check_pruned_heads(self, num_layers, num_heads):
        self._check_pruned_units("pruned_heads", "head", num_layers, num_heads)

    def _check_pruned_ffn_neurons(self, num_layers, width):
        self._check_pruned_units("pruned_ffn_neurons", "neuron", num_layers, width)

    @classmethod
    def from_dict(cls, values):
        """Build from a ``config.json`` dict: keys we do not use go to ``extra``."""
        known = {k: v for k, v in values.items() if k in cls.defaults}
        config = cls(**known)
        config.extra = {k: v for k, v in values.items() if k not in cls.defaults and k != "model_type"}
        return config

    @classmethod
    def from_json_file(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                             f"the file is truncated or corrupt: restore or re-save it") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                             f"it is corrupt or not a config.json") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of config keys, got a {type(values).__name__}")
        return cls.from_dict(values)

    @classmethod
    def from_pretrained(cls, directory):
        return cls.from_json_file(os.path.join(directory, CONFIG_NAME))

    def to_dict(self):
        values = dict(self.extra)
        values.update({key: copy.deepcopy(getattr(self, key)) for key in self.defaults})
        values.pop("pruned_heads", None)
        pruned = {str(k): v for k, v in sorted(self.pruned_heads.items()) if v}
        if pruned:  # like transformers, only when something is pruned: a dense model's config has none
            values["pruned_heads"] = pruned
        if "pruned_ffn_neurons" in self.defaults:
            # also only when something is pruned, so a dense model's config.json stays Hugging Face's
            values.pop("pruned_ffn_neurons", None)
            ffn = {str(k): v for k, v in sorted(self.pruned_ffn_neurons.items()) if v}
            if ffn:
                values["pruned_ffn_neurons"] = ffn
        values["model_type"] = self.model_type
        return values

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory):
        with atomic_write(os.path.join(directory, CONFIG_NAME), binary=False) as f:
            f.write(self.to_json_string())

    def copy(self, **changes):
        config = copy.deepcopy(self)
        for key, value in changes.items():
            if key not in self.defaults:
                raise ValueError(f"{type(self).__name__} has no key {key!r}")
            setattr(config, key, value)
        config.validate()
        return config

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"


def _int_unit_map(mapping):
    """{layer: [unit, ...]} with int keys (JSON gives strings) and sorted, unique int units."""
    return {int(layer): sorted({int(u) for u in units}) for layer, units in (mapping or {}).items()}


# --------------------------------------------------------------------------------------------
# Building blocks whose parameter names match Hugging Face's
# --------------------------------------------------------------------------------------------
def _normal(shape, std):
    return Parameter(initializer(Normal(std), shape, ms.float32))


def _constant(shape, value):
    return Parameter(Tensor(np.full(shape, value, np.float32)))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with parameters named ``weight``/``bias`` as in PyTorch."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = _constant((hidden_size,), 1.0)
        self.bias = _constant((hidden_size,), 0.0)
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.layer_norm(x, self.weight, self.bias)[0]


class Embedding(nn.Cell):
    """A lookup table with its parameter named ``weight`` as in PyTorch."""

    def __init__(self, num_embeddings, dim, std=0.02):
        super().__init__()
        self.weight = _normal((num_embeddings, dim), std)

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class Linear(nn.Cell):
    """y = x W^T + b with W of shape (out, in): PyTorch's ``nn.Linear`` layout. ``has_bias=False``
    gives no ``bias`` parameter at all (Llama's projections), so checkpoints without one load."""

    def __init__(self, in_features, out_features, std=0.02, weight=None, bias=None, has_bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(Tensor(weight)) if weight is not None else _normal((out_features, in_features), std)
        if not has_bias:
            self.bias = None
        else:
            self.bias = Parameter(Tensor(bias)) if bias is not None else _constant((out_features,), 0.0)

    def construct(self, x):
        if self.bias is None:
            return ops.matmul(x, self.weight.T)
        return ops.matmul(x, self.weight.T) + self.bias


class Conv1D(nn.Cell):
    """y = x W + b with W of shape (in, out): GPT-2's ``Conv1D`` layout, kept so names and
    shapes equal the checkpoint's."""

    def __init__(self, in_features, out_features, std=0.02, weight=None, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(Tensor(weight)) if weight is not None else _normal((in_features, out_features), std)
        self.bias = Parameter(Tensor(bias)) if bias is not None else _constant((out_features,), 0.0)

    def construct(self, x):
        return ops.matmul(x, self.weight) + self.bias


class OutputBias(nn.Cell):
    """What an output projection leaves when every head feeding it is pruned: its bias, or zeros
    (``bias=None``, with ``out_features``) for a projection without one."""

    def __init__(self, bias, out_features=None):
        super().__init__()
        self.in_features = 0
        self.out_features = bias.shape[0] if bias is not None else out_features
        self.bias = Parameter(Tensor(bias)) if bias is not None else None

    def construct(self, like):
        if self.bias is None:
            return ops.zeros_like(like)
        return ops.zeros_like(like) + self.bias


# --------------------------------------------------------------------------------------------
# Attention with prunable, gateable heads
# --------------------------------------------------------------------------------------------
class HeadPrunableAttention(nn.Cell):
    """Base of the multi-head attentions: bookkeeping of which original heads remain.

    Subclasses build their projections for ``self.kept_heads`` (original head numbers) and
    declare them in ``heads()`` (``declare_heads``) for the model protocol, whose one surgery
    prunes them.
    """

    def __init__(self, num_heads, head_dim, kept_heads, dropout):
        super().__init__()
        self.total_heads = num_heads
        self.head_dim = head_dim
        self.kept_heads = list(kept_heads)
        self.num_heads = len(self.kept_heads)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.attn_dropout = nn.Dropout(p=dropout)

    def attend(self, q, k, v, attention_bias, batch, seq):
        """Scaled dot-product attention; q/k/v of shape (batch, seq, heads * head_dim).

        Returns the per-head context merged to (batch, seq, heads * head_dim): the input of the
        output projection, where head gates sit (``ms_prune.protocol.GatedInput``).
        """
        shape = (batch, seq, self.num_heads, self.head_dim)
        q = q.reshape(shape).transpose(0, 2, 1, 3)
        k = k.reshape(shape).transpose(0, 2, 3, 1)
        v = v.reshape(shape).transpose(0, 2, 1, 3)
        return self.attend_heads(q, k, v, attention_bias)

    def attend_heads(self, q, keys_t, v, attention_bias):
        """``attend`` for attentions that lay out their heads themselves (rotary positions,
        key/value heads shared by several query heads): q and v (batch, heads, seq, head_dim),
        keys_t (batch, heads, head_dim, seq), one entry per query head on axis 1."""
        batch, seq = q.shape[0], q.shape[2]
        scores = ops.matmul(q, keys_t) * self.scale + attention_bias
        probs = self.attn_dropout(ops.softmax(scores, -1))
        context = ops.matmul(probs, v)
        return context.transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.head_dim)

    def declare_heads(self, output, **projections):
        """This attention's ``AttentionHeads``: the projections' paths (``query``/``key``/``value``
        or ``qkv``, ``layout``, ``num_kv_heads``) and what our attentions share: ``num_heads`` kept
        by the surgery, and a layer that may lose every head."""
        inputs = [projections["qkv"]] if projections.get("qkv") else [projections[k] for k in ("query", "key", "value")]
        return AttentionHeads(self, output, self.head_dim, self.num_heads, kept_heads=self.kept_heads,
                              count_attributes={"num_heads": "heads"}, after_surgery=self._heads_changed,
                              empty=functools.partial(remove_units, self, inputs, output,
                                                      projections.get("layout", "linear")), **projections)

    def _heads_changed(self):
        """State derived from the kept heads beyond their count (Llama's key/value indexing)."""

    def heads(self):
        """This attention's ``AttentionHeads`` declaration."""
        raise NotImplementedError



def remove_units(cell, inputs, output, layout):
    """What our layers keep of a unit kind that lost every unit: no input projections (``inputs``,
    paths below ``cell``), and the output projection's bias alone (``OutputBias``)."""
    for path in inputs:
        owner, name = resolve_path(cell, path)
        setattr(owner, name, None)
    owner, name = resolve_path(cell, output)
    setattr(owner, name, slice_output_projection(getattr(owner, name), [], layout))


class NeuronPrunableFFN(nn.Cell):
    """Base of the Cells computing an FFN's activation (B, S, intermediate): bookkeeping of which
    original intermediate neurons remain (``kept_neurons``, original numbers). A width of 0 is
    allowed: the FFN then adds only its output bias (the model's ``ffn_units`` says where the
    projections are)."""

    def __init__(self, total_neurons, kept_neurons):
        super().__init__()
        self.total_neurons = total_neurons
        self.kept_neurons = list(kept_neurons)
        self.num_neurons = len(self.kept_neurons)

    def declare_neurons(self, cell, inputs, output, layout="linear"):
        """The ``FFNUnits`` of this FFN, whose projections sit below ``cell`` (the layer): the
        surgery keeps the counts here, and a layer may lose every neuron."""
        inputs = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        return FFNUnits(cell, inputs, output, self.num_neurons, layout=layout, record=self,
                        count_attributes={"num_neurons": "neurons"},
                        empty=functools.partial(remove_units, cell, inputs, output, layout))


def declare_hidden(model, size, embeddings, norms, reads, writes, attributes=(), after_surgery=None, scored=None):
    """A ``HiddenChannels`` for one of our models from the roles of its Cells (dotted paths below
    ``model``; a path whose Cell is None, a projection removed with all its units, is skipped):
    ``embeddings``, tables (rows, hidden), the first the token embedding; ``norms``, norms with a
    ``weight`` (and ``bias``) of the hidden size; ``reads``, ``Linear`` projections from the hidden
    states (weight axis 1); ``writes``, projections into them (weight axis 0 and bias: ``Linear`` or
    ``OutputBias``). Their ``in_features``/``out_features`` follow the new size. ``scored``: the
    norms whose outputs score the channels (default: all of ``norms``)."""
    parameters, sizes = {}, list(attributes)
    for path in embeddings:
        parameters[path + ".weight"] = 1
    for path in norms:
        parameters.update({f"{path}.{k}": 0 for k in ("weight", "bias")
                           if getattr(resolve_cell(model, path), k, None) is not None})
    for path, axis, features in [(p, 1, "in_features") for p in reads] + [(p, 0, "out_features") for p in writes]:
        cell = resolve_cell(model, path)
        if cell is None:
            continue
        if getattr(cell, "weight", None) is not None:
            parameters[path + ".weight"] = axis
        if axis == 0 and getattr(cell, "bias", None) is not None:
            parameters[path + ".bias"] = 0
        if hasattr(cell, features):
            sizes.append(f"{path}.{features}")
    return HiddenChannels(size, parameters, norms=norms if scored is None else scored,
                          embedding=embeddings[0] + ".weight" if embeddings else None, attributes=sizes,
                          after_surgery=after_surgery)


def slice_output_projection(projection, columns, layout):
    """Keep input features ``columns`` of an output projection (``layout``: 'linear' or 'conv1d');
    with none kept, what is left: an ``OutputBias``."""
    if len(columns) == 0:
        bias = projection.bias.asnumpy() if projection.bias is not None else None
        return OutputBias(bias, projection.out_features)
    return slice_projection(projection, columns, layout, axis="in")


def check_model_inputs(owner, input_ids, attention_mask, max_positions, position_key):
    """Refuse inputs the kernels would reject with an opaque message (or, for ids past the
    position table, a Gather index error) and name the argument instead.

    Called at the top of a model's ``construct``: ranks, shapes and dtypes are compile-time
    constants in GRAPH_MODE, so these conditions fold away at graph build time (an error is raised
    while compiling) and a step pays no host round-trip; in PyNative they are plain Python checks.
    """
    if len(input_ids.shape) != 2:
        raise ValueError(f"{owner}: input_ids must be 2-D (batch, seq) token ids, got shape {input_ids.shape}")
    if input_ids.dtype not in (ms.int32, ms.int64):
        raise TypeError(f"{owner}: input_ids must hold int32 or int64 token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > max_positions:
        raise ValueError(f"{owner}: input_ids has {input_ids.shape[1]} tokens per sequence, more than the "
                         f"{max_positions} positions of the position table (config.{position_key}); "
                         f"truncate or split the input")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"{owner}: attention_mask must have the shape of input_ids {input_ids.shape}, "
                         f"got {attention_mask.shape}")


def densify(array, axis, blocks, total, kept, width):
    """Put the slices of ``kept`` units (``width`` features each) of a pruned tensor back at their
    original places along ``axis``, zeros elsewhere. ``blocks`` > 1 for fused projections (GPT-2's
    ``c_attn`` holds Q, K and V side by side, each pruned alike)."""
    kept = list(kept)
    if array.shape[axis] != blocks * len(kept) * width:
        raise ValueError(f"densify: axis {axis} of shape {array.shape} should hold {blocks} x {len(kept)} "
                         f"units of width {width}")
    shape = list(array.shape)
    shape[axis] = blocks * total * width
    dense = np.zeros(shape, array.dtype)
    if kept:
        within = (np.asarray(kept)[:, None] * width + np.arange(width)[None, :]).reshape(-1)
        index = np.concatenate([b * total * width + within for b in range(blocks)])
        dense_view, array_view = np.moveaxis(dense, axis, 0), np.moveaxis(array, axis, 0)
        dense_view[index] = array_view
    return dense


class PrunedUnits:
    """One layer's prunable units of one kind: how many there were (``total``), which remain
    (``kept``, original numbers), features per unit (``width``) and the checkpoint tensors they
    occupy: (hf_name, axis, blocks). ``export_hf_dense`` re-inflates every listed tensor.

    Heads of BERT layer i: width head_dim, Q/K/V weights and biases on axis 0, the output
    projection's weight on axis 1. Another kind adds its entries to the model's
    ``_prunable_units`` and its config record to ``_pruning_records``; FFN neurons of BERT layer i
    would be width 1 with ``intermediate.dense.weight``/``.bias`` on axis 0 and
    ``output.dense.weight`` on axis 1 (GPT-2: ``mlp.c_fc`` weight axis 1 and bias axis 0,
    ``mlp.c_proj.weight`` axis 0): a zeroed neuron gives act(0) = 0 for gelu/relu, read by a zero
    column.
    """

    def __init__(self, kind, layer, total, kept, width, tensors):
        self.kind, self.layer, self.total, self.kept, self.width = kind, layer, total, list(kept), width
        self.tensors = list(tensors)


def additive_padding_bias(attention_mask, dtype=ms.float32):
    """(batch, seq) 1/0 mask -> (batch, 1, 1, seq) additive bias."""
    return (1.0 - attention_mask.astype(dtype)).reshape(attention_mask.shape[0], 1, 1, -1) * MASK_VALUE


def causal_attention_bias(seq, attention_mask=None):
    """Additive bias of a decoder: (1, 1, seq, seq) causal, or (batch, 1, seq, seq) combined with a
    (batch, seq) 1/0 padding mask. Built from positions rather than a stored (max_positions^2)
    table, which would take 256 MB for an 8k context."""
    positions = ops.arange(seq)
    allowed = (positions.reshape(1, seq) <= positions.reshape(seq, 1)).astype(ms.float32).reshape(1, 1, seq, seq)
    if attention_mask is not None:
        allowed = allowed * attention_mask.astype(ms.float32).reshape(attention_mask.shape[0], 1, 1, seq)
    return (1.0 - allowed) * MASK_VALUE


# --------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------
class PreTrainedCell(nn.Cell):
    """Base of our models: Hugging Face checkpoint I/O, head pruning and counting.

    Subclasses set ``config_class``, ``base_model_prefix`` (the attribute holding the backbone in
    task models, e.g. ``bert``; empty for a bare backbone), ``_hf_renames`` (pairs
    (hf_fragment, our_fragment)), ``_ignored_checkpoint_keys`` (suffixes of buffers that HF
    sometimes saves), ``_task_head_prefixes`` (parameters a backbone-only checkpoint may lack),
    and implement ``attention_layers()``.
    """

    config_class = PretrainedConfig
    base_model_prefix = ""
    backbone_prefix = ""
    _hf_renames = ()
    _ignored_checkpoint_keys = ()
    _task_head_prefixes = ()

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.loading_info = {}

    # ---- structure ----------------------------------------------------------------------
    def attention_layers(self):
        """The head-prunable attention Cells, in layer order."""
        raise NotImplementedError

    def transformer_layers(self):
        """The CellList of transformer layers (what token and layer dropping wrap)."""
        raise NotImplementedError

    def refresh_after_surgery(self):
        """Call after replacing sub-Cells: ``ms_prune.protocol.refresh`` (parameters named by their
        paths, and graph mode compiles anew)."""
        return refresh(self)

    # ---- the model protocol -------------------------------------------------------------------
    # how a transformer layer is called; Llama's layers also take position_ids
    layer_call = LayerCall(hidden=0, mask=1)
    skippable_layers = True  # pre-LN layers: x + f(x)

    def transformer_adapter(self):
        """This model's declaration of ``ms_prune.protocol`` (what every algorithm reads)."""
        return PreTrainedAdapter(self)

    # ---- naming ---------------------------------------------------------------------------
    @classmethod
    def _to_ours(cls, hf_name):
        for hf, ours in cls._hf_renames:
            hf_name = hf_name.replace(hf, ours)
        return hf_name

    @classmethod
    def _to_hf(cls, our_name):
        for hf, ours in cls._hf_renames:
            our_name = our_name.replace(ours, hf)
        return our_name

    def _checkpoint_key_to_param(self, key, param_names):
        """Map a checkpoint tensor name to one of our parameter names, or None."""
        name = self._to_ours(key)
        if name in param_names:
            return name
        prefix = self.base_model_prefix
        if prefix and prefix + "." + name in param_names:
            return prefix + "." + name  # bare-backbone checkpoint loaded into a task model
        if prefix == "" and self.backbone_prefix and name.startswith(self.backbone_prefix + "."):
            stripped = name[len(self.backbone_prefix) + 1:]
            if stripped in param_names:
                return stripped  # task-model checkpoint loaded into a bare backbone
        return None

    # ---- loading / saving ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, strict=True, **config_changes):
        """Load ``config.json`` + ``model.safetensors`` written by Hugging Face or by us.

        Every checkpoint tensor is copied or reported: missing tensors (other than a task head
        absent from a backbone checkpoint), tensors we cannot place and shapes that do not fit
        raise ``ValueError`` naming them. With ``strict=False`` unplaced tensors are only
        reported in ``model.loading_info['unexpected']``.
        """
        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {os.path.basename(path)} in {directory}")
        config = cls.config_class.from_json_file(config_path)
        if config_changes:
            config = config.copy(**config_changes)
        model = cls(config)
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            state = load_file(weights_path)
        except SafetensorError as err:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err}, "
                             f"{os.path.getsize(weights_path)} bytes); it is truncated or corrupt: "
                             f"restore or re-save it") from None
        try:
            model.load_hf_state_dict(state, strict=strict)
        except ValueError as err:
            raise ValueError(f"{weights_path} with {config_path}: {err}") from None
        return model

    def load_hf_state_dict(self, state, strict=True):
        """Copy a {hf_name: numpy array} dict into the parameters (see ``from_pretrained``)."""
        params = dict(self.parameters_and_names())
        loaded, unexpected, mismatched, ignored = set(), [], [], []
        for key, array in state.items():
            if any(key.endswith(suffix) for suffix in self._ignored_checkpoint_keys):
                ignored.append(key)
                continue
            name = self._checkpoint_key_to_param(key, params)
            if name is None:
                if array.size == 0:
                    ignored.append(key)  # a projection of a layer whose heads are all pruned
                else:
                    unexpected.append(key)
                continue
            param = params[name]
            if tuple(array.shape) != tuple(param.shape):
                mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs model {tuple(param.shape)}")
                continue
            param.set_data(Tensor(np.ascontiguousarray(array), dtype=param.dtype))
            loaded.add(name)
        missing = [n for n in params if n not in loaded]
        newly_initialized = [n for n in missing if n.startswith(self._task_head_prefixes)]
        missing = [n for n in missing if n not in newly_initialized]
        problems = []
        if mismatched:
            problems.append("shape does not fit the config: " + "; ".join(mismatched))
        if missing:
            problems.append(f"missing from the checkpoint: {[self._to_hf(n) for n in missing]}")
        if unexpected and strict:
            problems.append(f"unexpected tensors (no parameter of {type(self).__name__} takes them; "
                            f"strict=False only reports them): {unexpected}")
        if problems:
            raise ValueError(f"cannot load checkpoint into {type(self).__name__}: " + " | ".join(problems))
        if unexpected:
            logger.warning("%s: checkpoint tensors not used: %s", type(self).__name__, unexpected)
        if newly_initialized:
            logger.info("%s: newly initialised (not in the checkpoint): %s", type(self).__name__, newly_initialized)
        self.loading_info = {"unexpected": unexpected, "newly_initialized": newly_initialized,
                             "ignored": ignored}
        return self.loading_info

    def hf_state_dict(self):
        """{hf_name: numpy array}, including the zero-size projections of fully pruned layers so
        that Hugging Face can load the file too."""
        state = {self._to_hf(name): param.asnumpy() for name, param in self.parameters_and_names()}
        state.update(self._zero_size_tensors())
        return state

    def _zero_size_tensors(self):
        """The tensors of every unit kind a layer has lost entirely (all its heads, all its FFN
        neurons), with size 0 along the unit axis: Hugging Face's layout of such a layer, which
        ``from_pretrained`` skips and ``export_hf_dense`` re-inflates. A model that declares no
        prunable units has none."""
        try:
            unit_kinds = self._prunable_units()
        except NotImplementedError:
            return {}
        hidden = self._hidden_size()
        state = {}
        for units in unit_kinds:
            if units.kept:
                continue
            for name, axis, _ in units.tensors:
                shape = (0,) if name.endswith(".bias") else tuple(0 if a == axis else hidden for a in range(2))
                state[name] = np.zeros(shape, np.float32)
        return state

    def _hidden_size(self):
        """The model width (the other axis of a unit's 2-D tensors)."""
        raise NotImplementedError

    def hidden_channels(self):
        """The ``HiddenChannels`` of the model (``declare_hidden``), for hidden-size pruning."""
        raise NotImplementedError(f"{type(self).__name__} does not declare hidden_channels() (hidden-size pruning is "
                                  f"built for our Llama): declare its embeddings, norms and the projections reading "
                                  f"and writing the hidden states with modeling_utils.declare_hidden")

    def save_pretrained(self, directory, standard=False):
        """Write ``config.json`` + ``model.safetensors`` in our compact layout: pruned tensors keep
        their pruned shapes and ``config.pruned_heads`` records what is gone, so
        ``from_pretrained`` rebuilds the same model (and transformers 4.x reads it, except BERT
        layers left with no head). ``standard=True``: a model pruned to one shape in every layer is
        written as the plain model of that shape (``standard_config``), which any loader reads as
        an ordinary model. For a checkpoint every transformers version loads, see
        :meth:`export_hf_dense`."""
        config = self.standard_config() if standard else self.config
        config.extra["architectures"] = [type(self).__name__]
        self._write_checkpoint(directory, config, self.hf_state_dict())

    def standard_config(self):
        """The config of an unpruned model with this model's shapes (no pruning records), when
        every layer has the same shape."""
        raise NotImplementedError(
            f"{type(self).__name__}.standard_config: its config cannot state a head size other than hidden size / "
            f"heads, so a pruned model has no standard form; save_pretrained() writes the compact form (it "
            f"reloads here) and export_hf_dense() the dense one (transformers loads it)")

    def export_hf_dense(self, directory):
        """Write a checkpoint in the UNPRUNED (dense) shapes of ``config``, with no
        ``pruned_heads``: transformers 5.x (which dropped head pruning) and 4.x load it with
        ``from_pretrained`` as an ordinary model, with no warnings, and compute what this model
        computes. Removed heads become zeros: their Q/K/V rows and their columns of the
        output projection (a layer with no heads left keeps only the projection bias), so a
        zeroed head's context is 0 and it adds nothing.

        The cost: the file and the loaded model are as big as the unpruned model, and transformers
        computes the zeroed heads anyway (dense FLOPs and latency). Keep ``save_pretrained`` for
        the small, fast pruned model; ``from_pretrained`` reads both.
        """
        state = self.hf_state_dict()
        for units in self._prunable_units():
            for name, axis, blocks in units.tensors:
                state[name] = densify(state[name], axis, blocks, units.total, units.kept, units.width)
        config = self.config.copy(**{key: {} for key in self._pruning_records if key in self.config.defaults})
        config.extra["architectures"] = [type(self).__name__]
        self._write_checkpoint(directory, config, state)

    # config keys that record removed units; the dense export clears them
    _pruning_records = ("pruned_heads", "pruned_ffn_neurons")

    def _prunable_units(self):
        """The ``PrunedUnits`` of every layer: which checkpoint tensors each unit kind occupies."""
        raise NotImplementedError

    def _write_checkpoint(self, directory, config, state):
        """Each file is written whole beside its destination and renamed over it (``atomic_write``),
        so a process killed while saving leaves the previous checkpoint. Both files are complete
        on disk before the first rename; only a kill between the two renames (microseconds)
        leaves a new config.json beside old weights, which ``from_pretrained`` then names as a
        shape mismatch instead of loading."""
        from safetensors.numpy import save
        existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if os.path.exists(os.path.join(directory, name))]
        if existing:
            logger.warning("%s.save_pretrained: overwriting the model files %s in %s", type(self).__name__,
                           existing, os.path.abspath(directory))
        # serialised in memory first (one extra copy of the weights) so that atomic_write gets bytes
        payload = save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"format": "pt"})
        with atomic_write(os.path.join(directory, WEIGHTS_NAME)) as weights, \
                atomic_write(os.path.join(directory, CONFIG_NAME), binary=False) as config_file:
            weights.write(payload)
            config_file.write(config.to_json_string())

    # ---- head pruning -----------------------------------------------------------------------
    def prune_heads(self, heads_to_prune):
        """Physically remove heads: ``{layer: [head, ...]}`` in the ORIGINAL head numbering.

        Repeated calls merge; ``config.pruned_heads`` records the union so that a saved model
        reloads with the same shapes. Layer keys may be digit strings ("0"), as JSON delivers
        them; any other non-int key is a TypeError. A layer may lose all its heads (its attention then adds
        only the output projection's bias; the residual path stays).
        """
        layers = self.attention_layers()
        checked = checked_units("prune_heads", "head", heads_to_prune, [a.total_heads for a in layers])
        declared = [a.heads() for a in layers]
        for layer, positions in head_positions(declared, checked).items():
            slice_heads(declared[layer], positions, layer)
            self._record_pruned("pruned_heads", layer, checked[layer])
        self.refresh_after_surgery()
        return self

    def _record_pruned(self, key, layer, units):
        # the config records the union over calls, so a saved model reloads with the same shapes
        record = getattr(self.config, key)
        record[layer] = sorted(set(record.get(layer, [])) | set(units))

    def heads_per_layer(self):
        return [attention.num_heads for attention in self.attention_layers()]

    # the config key of the number of transformer layers
    _num_layers_key = "num_hidden_layers"

    def remove_layers(self, layer_ids):
        """Remove whole transformer layers (depth pruning) by the protocol's surgery; the config's
        layer count and per-layer pruning records follow, so a saved model reloads."""
        return self.transformer_adapter().remove_layers(layer_ids)

    def layers_removed(self, kept):
        """The config after ``remove_layers``: ``kept`` (original numbers of the layers that stay)
        become layers 0..n-1."""
        setattr(self.config, self._num_layers_key, len(kept))
        for key in self._pruning_records:
            if key in self.config.defaults:
                record = getattr(self.config, key)
                setattr(self.config, key, {new: record[old] for new, old in enumerate(kept) if old in record})

    # ---- FFN neuron pruning -------------------------------------------------------------------
    def ffn_layers(self):
        """The ``NeuronPrunableFFN`` Cells (which neurons remain), in layer order."""
        raise NotImplementedError

    def ffn_units(self, layer):
        """Layer ``layer``'s FFN neurons: an ``ms_prune.protocol.FFNUnits`` naming its input
        projection(s) (one output feature per neuron) and its output projection."""
        raise NotImplementedError

    def prune_ffn_neurons(self, neurons_to_prune):
        """Physically remove FFN intermediate neurons: ``{layer: [neuron, ...]}`` in the ORIGINAL
        numbering. Repeated calls merge; ``config.pruned_ffn_neurons`` records the union so that a
        saved model reloads with the same shapes. Layers may keep different widths, down to 0
        (the FFN then adds only its output bias; the residual path stays)."""
        declared = [self.ffn_units(i) for i in range(len(self.ffn_layers()))]
        checked = checked_units("prune_ffn_neurons", "neuron", neurons_to_prune, [f.total for f in declared])
        for layer, positions in neuron_positions(declared, checked).items():
            slice_neurons(declared[layer], positions, layer)
            self._record_pruned("pruned_ffn_neurons", layer, checked[layer])
        self.refresh_after_surgery()
        return self

    def neurons_per_layer(self):
        return [ffn.num_neurons for ffn in self.ffn_layers()]

    # ---- counting ---------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings=False):
        total = 0
        for name, param in self.parameters_and_names():
            if exclude_embeddings and self._is_embedding_parameter(name):
                continue
            total += int(np.prod(param.shape))
        return total

    def _is_embedding_parameter(self, name):
        return False

    def forward_flops(self, seq_len, batch_size=1):
        """Multiply-adds x 2 of one forward pass, from the structure (after pruning): every
        projection on every token, plus the attention matmuls; elementwise work is ignored
        (``ms_prune.cost``, where every count of ms_prune comes from)."""
        return cost.forward_flops(self, seq_len, batch_size)

    def flops_outside_layers(self, seq_len, batch_size=1):
        """The projections outside the transformer layers (pooler, classifier once per sequence, an
        LM head on every token) and what ``_extra_flops`` adds (a tied LM head's matmul)."""
        inside = {id(c) for layer in self.transformer_layers() for _, c in layer.cells_and_names()}
        flops = 0
        for name, cell in self.cells_and_names():
            if isinstance(cell, (Linear, Conv1D)) and id(cell) not in inside:
                tokens = seq_len * batch_size if self._is_per_token(name) else batch_size
                flops += 2 * int(np.prod(cell.weight.shape)) * tokens
        return flops + self._extra_flops(seq_len) * batch_size

    def _is_per_token(self, cell_name):
        return True

    def _extra_flops(self, seq_len):
        return 0


class PreTrainedAdapter(TransformerAdapter):
    """The model protocol of our models: layers, attention heads and FFN neurons from the model's
    own hooks; surgery and counting by the model's own methods (which record what they removed in
    the config, so a saved model reloads, and allow a layer to lose every head)."""

    empty_layers_allowed = True

    def __init__(self, model):
        super().__init__(model)
        self.layer_call = model.layer_call
        self.skippable_layers = bool(model.skippable_layers)

    def layers(self):
        return self.model.transformer_layers()

    def attention(self, layer):
        return self.model.attention_layers()[layer].heads()

    def ffn(self, layer):
        try:
            return self.model.ffn_units(layer)
        except NotImplementedError:
            return None

    def probe_inputs(self):
        recorded = super().probe_inputs()
        return recorded if recorded is not None else (np.zeros((1, 4), np.int32),)

    def layers_removed(self, kept):
        self.model.layers_removed(kept)

    def hidden_channels(self):
        return self.model.hidden_channels()

    def _prune_heads(self, heads_to_prune):
        return self.model.prune_heads(heads_to_prune)

    def _prune_ffn_neurons(self, neurons_to_prune):
        return self.model.prune_ffn_neurons(neurons_to_prune)

    def extra_flops(self, seq_len, batch_size=1):
        return self.model.flops_outside_layers(seq_len, batch_size)
