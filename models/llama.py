"""Llama-family decoders (Llama 2/3, SmolLM2, ...) in MindSpore, loading and saving Hugging Face
checkpoints.

Parameter names and shapes are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``,
``model.norm.weight``, ``lm_head.weight`` when untied), so loading is the name-to-name copy of
``PreTrainedCell``. The blocks are pre-norm (RMSNorm), attention uses rotary position embeddings
(Hugging Face's ``rotate_half`` convention, base ``rope_theta``) and grouped-query attention
(``num_key_value_heads`` key/value heads, each shared by a group of query heads), the MLP is
SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

Every decoder layer maps ``(hidden_states, attention_bias, position_ids) -> hidden_states``:
``attention_bias`` is additive, (batch, 1, seq, seq), causal and padding combined;
``position_ids`` (batch, seq) int32 are the tokens' positions, from which the attention computes
its rotary angles (declared ``per_token`` in the model protocol, so a wrapper that keeps only some
tokens passes their real positions).

Head pruning removes QUERY heads (original numbering, as ``config.pruned_heads`` records them);
a key/value head goes when every query head of its group is gone. A pruned layer may therefore
keep query groups of unequal sizes, which is why query heads pick their key/value head by an index
(a gather) rather than a uniform repeat. Hugging Face Llama has no head pruning: a pruned
checkpoint saved here reloads here, not in transformers.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_prune.protocol import LayerCall

from .modeling_utils import (Embedding, HeadPrunableAttention, Linear, NeuronPrunableFFN, OutputBias, PreTrainedCell,
                             PretrainedConfig, PrunedUnits, causal_attention_bias, declare_hidden)

__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM", "greedy_generate"]


def _check_default_rope(owner, key, spec):
    """Only the plain rotary embedding is implemented: refuse scaled variants by name rather
    than silently computing different angles."""
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise ValueError(f"{owner}.{key} must be a mapping or None, got {spec!r}")
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    extra = sorted(set(spec) - {"rope_type", "type", "rope_theta"})
    if rope_type != "default" or extra:
        raise ValueError(f"{owner}.{key} = {spec!r} is not supported: only the default rotary "
                         f"embedding (rope_type 'default', no scaling) is implemented")


class LlamaConfig(PretrainedConfig):
    model_type = "llama"
    defaults = dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
        mlp_bias=False, pruned_heads={}, pruned_ffn_neurons={},
    )

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        # transformers 5.x writes the rotary settings as rope_parameters; 4.x as rope_theta (+
        # rope_scaling). Read both; we write the 4.x form, which 5.x also reads.
        rope = values.pop("rope_parameters", None)
        if rope is not None:
            _check_default_rope(cls.__name__, "rope_parameters", rope)
            if "rope_theta" in rope:
                values["rope_theta"] = rope["rope_theta"]
        return super().from_dict(values)

    def validate(self):
        owner = type(self).__name__
        self._check_positive("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "max_position_embeddings")
        if self.num_key_value_heads is not None:
            self._check_positive("num_key_value_heads")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"{owner}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.kv_heads}")
        if self.head_dim is not None:
            self._check_positive("head_dim")
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{owner}: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads} (give head_dim explicitly)")
        if self.head_size % 2:
            raise ValueError(f"{owner}: the head size must be even for rotary embeddings, got {self.head_size}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{owner}.{name} must be a positive number, got {value!r}")
        self._check_probability("attention_dropout")
        if self.hidden_act != "silu":
            raise ValueError(f"{owner}.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}")
        _check_default_rope(owner, "rope_scaling", self.rope_scaling)
        self._check_pruned_heads(self.num_hidden_layers, self.num_attention_heads)
        self._check_pruned_ffn_neurons(self.num_hidden_layers, self.intermediate_size)

    @property
    def kv_heads(self):
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def head_size(self):
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads


class LlamaRMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Hugging Face does."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones((hidden_size,), np.float32)))
        self.eps = eps

    def construct(self, x):
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, True)
        return self.weight * (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


class LlamaAttention(HeadPrunableAttention):
    def __init__(self, config, kept_heads):
        super().__init__(config.num_attention_heads, config.head_size, kept_heads, config.attention_dropout)
        self.total_kv_heads = config.kv_heads
        self.group_size = config.num_attention_heads // config.kv_heads
        self.kept_kv_heads = sorted({h // self.group_size for h in self.kept_heads})
        hidden, dim, std, bias = config.hidden_size, self.head_dim, config.initializer_range, config.attention_bias
        inner, kv_inner = self.num_heads * dim, len(self.kept_kv_heads) * dim
        self.q_proj = Linear(hidden, inner, std, has_bias=bias) if inner else None
        self.k_proj = Linear(hidden, kv_inner, std, has_bias=bias) if inner else None
        self.v_proj = Linear(hidden, kv_inner, std, has_bias=bias) if inner else None
        self.o_proj = (Linear(inner, hidden, std, has_bias=bias) if inner else
                       OutputBias(np.zeros((hidden,), np.float32) if bias else None, hidden))
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        self.inv_freq = Tensor((1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32))
        self._index_kv_heads(self.kept_heads)

    def _index_kv_heads(self, kept_heads):
        """Which key/value head (position among the kept ones) each kept query head reads."""
        self.num_kv_heads = len(self.kept_kv_heads)
        self.kv_index = Tensor(np.array([self.kept_kv_heads.index(h // self.group_size) for h in kept_heads],
                                        np.int32))
        # one key/value head per query head (plain multi-head attention): no gather needed
        self.shares_kv = self.num_kv_heads != len(kept_heads)

    def rotary(self, position_ids):
        """cos and sin of the rotary angles, (batch, 1, seq, head_dim) float32."""
        angles = position_ids.astype(ms.float32).expand_dims(-1) * self.inv_freq
        angles = ops.concat((angles, angles), -1).expand_dims(1)
        return ops.cos(angles), ops.sin(angles)

    def construct(self, hidden_states, attention_bias, position_ids):
        if self.num_heads == 0:
            return self.o_proj(hidden_states)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        q = self.q_proj(hidden_states).reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        kv_shape = (batch, seq, self.num_kv_heads, self.head_dim)
        k = self.k_proj(hidden_states).reshape(kv_shape).transpose(0, 2, 1, 3)
        v = self.v_proj(hidden_states).reshape(kv_shape).transpose(0, 2, 1, 3)
        cos, sin = self.rotary(position_ids)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.shares_kv:
            k = ops.gather(k, self.kv_index, 1)
            v = ops.gather(v, self.kv_index, 1)
        return self.o_proj(self.attend_heads(q, k.transpose(0, 1, 3, 2), v, attention_bias))

    def heads(self):
        return self.declare_heads("o_proj", query="q_proj", key="k_proj", value="v_proj",
                                  num_kv_heads=self.num_kv_heads)

    def _heads_changed(self):
        self.kept_kv_heads = sorted({h // self.group_size for h in self.kept_heads})
        self._index_kv_heads(self.kept_heads)


class LlamaMLP(NeuronPrunableFFN):
    """SwiGLU: down(silu(gate(x)) * up(x)). A pruned neuron is a row of ``gate_proj`` and of
    ``up_proj`` and a column of ``down_proj`` (silu(0) * 0 = 0); with none left the FFN adds
    ``down_proj``'s bias alone."""

    def __init__(self, config, kept_neurons=None):
        total = config.intermediate_size
        super().__init__(total, range(total) if kept_neurons is None else kept_neurons)
        hidden, inner, std, bias = config.hidden_size, self.num_neurons, config.initializer_range, config.mlp_bias
        self.gate_proj = Linear(hidden, inner, std, has_bias=bias) if inner else None
        self.up_proj = Linear(hidden, inner, std, has_bias=bias) if inner else None
        self.down_proj = (Linear(inner, hidden, std, has_bias=bias) if inner else
                          OutputBias(np.zeros((hidden,), np.float32) if bias else None, hidden))

    def construct(self, x):
        if self.num_neurons == 0:
            return self.down_proj(x)
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, config, kept_heads, kept_neurons=None):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, kept_heads)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, kept_neurons)

    def construct(self, hidden_states, attention_bias, position_ids):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_bias,
                                                       position_ids)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaPreTrainedCell(PreTrainedCell):
    config_class = LlamaConfig
    backbone_prefix = "model"
    layer_call = LayerCall(hidden=0, mask=1, per_token=2)  # position_ids, for the rotary angles
    # rotary tables some older checkpoints saved; we compute them
    _ignored_checkpoint_keys = (".rotary_emb.inv_freq",)

    def _backbone(self):
        return self

    def _backbone_name(self):
        return ""

    def attention_layers(self):
        return [layer.self_attn for layer in self.transformer_layers()]

    def transformer_layers(self):
        return self._backbone().layers

    def ffn_layers(self):
        return [layer.mlp for layer in self.transformer_layers()]

    def ffn_units(self, layer):
        mlp = self.transformer_layers()[layer].mlp
        return mlp.declare_neurons(mlp, ("gate_proj", "up_proj"), "down_proj")

    def _is_embedding_parameter(self, name):
        return name.split(".")[-2] in ("embed_tokens", "lm_head")

    def _hidden_size(self):
        return self.config.hidden_size

    def hidden_channels(self):
        """The hidden dimension: the token embedding (the tied LM head with it), every RMSNorm, the
        inputs of q/k/v, gate and up projections (and of an untied ``lm_head``), the outputs of o_proj
        and down_proj; channels scored at each layer's two norms' outputs (ModelOpt's Minitron).
        After slicing, ``config.hidden_size`` is the new size and ``config.head_dim`` is explicit, so
        a saved model reloads, and ``save_pretrained(standard=True)`` writes a plain LlamaConfig."""
        base = self._backbone_name()
        norms, reads, writes = [], [], []
        for i, layer in enumerate(self.transformer_layers()):
            prefix = f"{base}layers.{i}."
            norms += [prefix + "input_layernorm", prefix + "post_attention_layernorm"]
            reads += [prefix + p for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "mlp.gate_proj", "mlp.up_proj")]
            writes += [prefix + "self_attn.o_proj", prefix + "mlp.down_proj"]
        reads += ["lm_head"] if getattr(self, "lm_head", None) is not None else []
        return declare_hidden(self, self.config.hidden_size, [base + "embed_tokens"], norms + [base + "norm"], reads,
                              writes, attributes=["config.hidden_size"], after_surgery=self._hidden_changed,
                              scored=norms)

    def _hidden_changed(self):
        # hidden_size / num_attention_heads no longer gives the head size
        self.config.head_dim = self.attention_layers()[0].head_dim

    def standard_config(self):
        """A plain ``LlamaConfig`` of this model's shape (``head_dim`` explicit, no pruning records),
        for a model whose layers all keep the same query heads, key/value heads and FFN width: what
        uniform pruning (``ms_prune.prune(..., uniform=True)`` or a target shape) gives. The kept
        heads are already in the order a standard layout reads them (each key/value group's query
        heads side by side)."""
        attentions = self.attention_layers()
        shapes = [(a.num_heads, a.num_kv_heads, f.num_neurons) for a, f in zip(attentions, self.ffn_layers())]
        if len(set(shapes)) != 1 or min(min(s) for s in shapes) == 0:
            raise ValueError(f"{type(self).__name__}.standard_config: a standard config has one shape for every layer "
                             f"and at least one head and neuron; (query heads, key/value heads, FFN width) per layer "
                             f"are {shapes}: save_pretrained() without standard=True keeps per-layer shapes")
        heads, kv_heads, width = shapes[0]
        return self.config.copy(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=width,
                                head_dim=self.config.head_size, pruned_heads={}, pruned_ffn_neurons={})

    def _prunable_units(self):
        """Query heads (their ``q_proj`` rows and ``o_proj`` columns), key/value heads (``k_proj``
        and ``v_proj`` rows) and FFN neurons: what ``export_hf_dense`` re-inflates with zeros."""
        units, config = [], self.config
        attention_biases, mlp_biases = ("weight", "bias") if config.attention_bias else ("weight",), \
            ("weight", "bias") if config.mlp_bias else ("weight",)
        for i, (attention, mlp) in enumerate(zip(self.attention_layers(), self.ffn_layers())):
            base = f"{self._backbone_name()}layers.{i}."
            dim = attention.head_dim
            units.append(PrunedUnits("heads", i, attention.total_heads, attention.kept_heads, dim,
                                     [(f"{base}self_attn.q_proj.{k}", 0, 1) for k in attention_biases] +
                                     [(f"{base}self_attn.o_proj.weight", 1, 1)]))
            units.append(PrunedUnits("kv_heads", i, attention.total_kv_heads, attention.kept_kv_heads, dim,
                                     [(f"{base}self_attn.{p}.{k}", 0, 1) for p in ("k_proj", "v_proj")
                                      for k in attention_biases]))
            units.append(PrunedUnits("neurons", i, mlp.total_neurons, mlp.kept_neurons, 1,
                                     [(f"{base}mlp.{p}.{k}", 0, 1) for p in ("gate_proj", "up_proj") for k in mlp_biases]
                                     + [(f"{base}mlp.down_proj.weight", 1, 1)]))
        return units


class LlamaModel(LlamaPreTrainedCell):
    """Returns the final (normalised) hidden states (batch, seq, hidden_size). ``position_ids`` default to 0..seq-1 for every row, as Hugging Face's
    with right padding."""

    def __init__(self, config):
        super().__init__(config)
        heads = range(config.num_attention_heads)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range)
        self.layers = nn.CellList([
            LlamaDecoderLayer(config, [h for h in heads if h not in config.pruned_heads.get(i, [])],
                              [n for n in range(config.intermediate_size)
                               if n not in config.pruned_ffn_neurons.get(i, [])])
            for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        if position_ids is None:
            position_ids = ops.broadcast_to(ops.arange(seq).astype(ms.int32).reshape(1, seq), (batch, seq))
        attention_bias = causal_attention_bias(seq, attention_mask)
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_bias, position_ids)
        return self.norm(hidden)


class LlamaForCausalLM(LlamaPreTrainedCell):
    """Returns logits (batch, seq, vocab_size). With
    ``tie_word_embeddings`` the output projection is the token embedding (no ``lm_head``
    parameter; a checkpoint's copy of it is ignored)."""

    base_model_prefix = "model"
    _task_head_prefixes = ("lm_head.",)

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.tied = config.tie_word_embeddings
        if self.tied:
            self._ignored_checkpoint_keys = type(self)._ignored_checkpoint_keys + ("lm_head.weight",)
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, config.initializer_range, has_bias=False)

    def _backbone(self):
        return self.model

    def _backbone_name(self):
        return "model."

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids)
        if self.tied:
            return ops.matmul(hidden, self.model.embed_tokens.weight.T)
        return self.lm_head(hidden)

    def _extra_flops(self, seq_len):
        # the tied output projection is a matmul with the embedding, not a Linear cell
        return 2 * self.config.hidden_size * self.config.vocab_size * seq_len if self.tied else 0


def greedy_generate(model, input_ids, max_new_tokens, eos_token_id=None, pad_to=None):
    """Greedy continuation of ``input_ids`` (numpy (batch, seq) ints, no padding) by a causal LM
    returning logits: numpy (batch, seq + generated).

    Every step runs the model on one fixed-length buffer (prompt + ``max_new_tokens``, or
    ``pad_to`` tokens when that is longer; the tail filled with token 0) and reads the logits at
    the last real position: causal attention keeps the filler invisible to it, and one input shape
    means GRAPH_MODE compiles once instead of once per length. ``pad_to`` shares that one graph
    between prompts of different lengths, or with an evaluation of (batch, pad_to) windows. No
    key/value cache: meant for checks and short prompts, not for serving.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"greedy_generate: input_ids must be integer (batch, seq) with seq >= 1, got "
                         f"{ids.dtype} of shape {ids.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"greedy_generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)) or pad_to < 1):
        raise ValueError(f"greedy_generate: pad_to must be None or an int >= 1, got {pad_to!r}")
    prompt = ids.shape[1]
    buffer = np.zeros((ids.shape[0], max(prompt + max_new_tokens, pad_to or 0)), np.int32)
    buffer[:, :prompt] = ids
    was_training = model.training
    model.set_train(False)
    length, end = prompt, prompt + max_new_tokens
    while length < end:
        outputs = model(Tensor(buffer))
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        next_ids = logits[:, length - 1].argmax(-1).asnumpy().astype(np.int32)
        buffer[:, length] = next_ids
        length += 1
        if eos_token_id is not None and np.all(next_ids == eos_token_id):
            break
    model.set_train(was_training)
    return buffer[:, :length]
