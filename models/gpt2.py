"""GPT-2 (Radford et al. 2019) in MindSpore, loading and saving Hugging Face checkpoints.

Parameter names and shapes are Hugging Face's, including the ``Conv1D`` layout (weights stored
(in, out)) and the fused ``c_attn`` (Q, K and V side by side). GPT-2 is pre-LN, so progressive
layer dropping can skip its blocks as they are.

Every block maps ``(hidden_states, attention_bias) -> hidden_states``: ``attention_bias`` is
additive, (batch, 1, seq, seq), causal and padding combined.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .bert import activation
from .modeling_utils import (MASK_VALUE, Conv1D, Embedding, HeadPrunableAttention, LayerNorm,
                             NeuronPrunableFFN, OutputBias, PreTrainedCell, PretrainedConfig, PrunedUnits,
                             check_model_inputs)

__all__ = ["GPT2Config", "GPT2Model", "GPT2LMHeadModel", "HeadPrunerGPTLRP"]


class GPT2Config(PretrainedConfig):
    model_type = "gpt2"
    defaults = dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=True, pruned_heads={}, pruned_ffn_neurons={},
    )

    def validate(self):
        self._check_positive("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        if self.n_inner is not None:
            self._check_positive("n_inner")
        self._check_probability("resid_pdrop", "embd_pdrop", "attn_pdrop")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.activation_function not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"GPT2Config.activation_function {self.activation_function!r} is not supported")
        for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                             ("reorder_and_upcast_attn", False), ("tie_word_embeddings", True)):
            if getattr(self, flag) != wanted:
                raise ValueError(f"GPT2Config.{flag}={getattr(self, flag)!r} is not supported (only {wanted})")
        self._check_pruned_heads(self.n_layer, self.n_head)
        self._check_pruned_ffn_neurons(self.n_layer, self.inner_size)

    @property
    def inner_size(self):
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class GPT2Attention(HeadPrunableAttention):
    def __init__(self, config, kept_heads):
        head_dim = config.n_embd // config.n_head
        super().__init__(config.n_head, head_dim, kept_heads, config.attn_pdrop)
        inner = self.num_heads * head_dim
        std = config.initializer_range
        self.c_attn = Conv1D(config.n_embd, 3 * inner, std) if inner else None
        self.c_proj = (Conv1D(inner, config.n_embd, std) if inner
                       else OutputBias(np.zeros((config.n_embd,), np.float32)))
        self.resid_dropout = nn.Dropout(p=config.resid_pdrop)

    def construct(self, hidden_states, attention_bias):
        if self.num_heads == 0:
            return self.resid_dropout(self.c_proj(hidden_states))
        inner = self.num_heads * self.head_dim
        qkv = self.c_attn(hidden_states)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        context = self.attend(qkv[:, :, :inner], qkv[:, :, inner:2 * inner], qkv[:, :, 2 * inner:],
                              attention_bias, batch, seq)
        return self.resid_dropout(self.c_proj(context))

    def heads(self):
        return self.declare_heads("c_proj", qkv="c_attn", layout="conv1d")


class GPT2MLP(NeuronPrunableFFN):
    def __init__(self, config, kept_neurons=None):
        super().__init__(config.inner_size, range(config.inner_size) if kept_neurons is None else kept_neurons)
        width, std = self.num_neurons, config.initializer_range
        self.c_fc = Conv1D(config.n_embd, width, std) if width else None
        self.c_proj = Conv1D(width, config.n_embd, std) if width else OutputBias(np.zeros((config.n_embd,), np.float32))
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(p=config.resid_pdrop)

    def construct(self, x):
        if self.num_neurons == 0:
            return self.dropout(self.c_proj(x))
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Cell):
    def __init__(self, config, kept_heads, kept_neurons=None):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, kept_heads)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, kept_neurons)

    def construct(self, hidden_states, attention_bias):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attention_bias)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2PreTrainedCell(PreTrainedCell):
    config_class = GPT2Config
    backbone_prefix = "transformer"
    _ignored_checkpoint_keys = (".attn.bias", ".attn.masked_bias", "lm_head.weight")

    def _backbone(self):
        return self

    def _backbone_name(self):
        return ""

    def attention_layers(self):
        return [block.attn for block in self.transformer_layers()]

    def transformer_layers(self):
        return self._backbone().h

    _num_layers_key = "n_layer"

    def ffn_layers(self):
        return [block.mlp for block in self.transformer_layers()]

    def ffn_units(self, layer):
        mlp = self.transformer_layers()[layer].mlp
        return mlp.declare_neurons(mlp, "c_fc", "c_proj", layout="conv1d")

    def _is_embedding_parameter(self, name):
        return name.split(".")[-2] in ("wte", "wpe")

    def _prunable_units(self):
        units = []
        for i, attention in enumerate(self.attention_layers()):
            base = f"{self._backbone_name()}h.{i}.attn."
            # c_attn holds [Q | K | V] (Conv1D: features on axis 1), each sliced alike
            tensors = [(base + "c_attn.weight", 1, 3), (base + "c_attn.bias", 0, 3), (base + "c_proj.weight", 0, 1)]
            units.append(PrunedUnits("heads", i, attention.total_heads, attention.kept_heads, attention.head_dim,
                                     tensors))
        for i, ffn in enumerate(self.ffn_layers()):
            base = f"{self._backbone_name()}h.{i}.mlp."
            tensors = [(base + "c_fc.weight", 1, 1), (base + "c_fc.bias", 0, 1), (base + "c_proj.weight", 0, 1)]
            units.append(PrunedUnits("neurons", i, ffn.total_neurons, ffn.kept_neurons, 1, tensors))
        return units

    def _hidden_size(self):
        return self.config.n_embd


class GPT2Model(GPT2PreTrainedCell):
    """Returns the final hidden states (batch, seq, n_embd)."""

    def __init__(self, config):
        super().__init__(config)
        self.max_positions = config.n_positions  # a plain int: a graph-mode constant
        heads, neurons = range(config.n_head), range(config.inner_size)
        self.wte = Embedding(config.vocab_size, config.n_embd, config.initializer_range)
        self.wpe = Embedding(config.n_positions, config.n_embd, config.initializer_range)
        self.drop = nn.Dropout(p=config.embd_pdrop)
        self.h = nn.CellList([
            GPT2Block(config, [h for h in heads if h not in config.pruned_heads.get(i, [])],
                      [n for n in neurons if n not in set(config.pruned_ffn_neurons.get(i, []))])
            for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.causal = Tensor(np.tril(np.ones((config.n_positions, config.n_positions), np.float32)))

    def construct(self, input_ids, attention_mask=None):
        check_model_inputs("GPT2Model", input_ids, attention_mask, self.max_positions, "n_positions")
        seq = input_ids.shape[1]
        positions = ops.arange(seq).astype(ms.int32)
        hidden = self.drop(self.wte(input_ids) + self.wpe(positions))
        allowed = self.causal[:seq, :seq].reshape(1, 1, seq, seq)
        if attention_mask is not None:
            allowed = allowed * attention_mask.astype(ms.float32).reshape(input_ids.shape[0], 1, 1, seq)
        attention_bias = (1.0 - allowed) * MASK_VALUE
        for block in self.h:
            hidden = block(hidden, attention_bias)
        return self.ln_f(hidden)


class GPT2LMHeadModel(GPT2PreTrainedCell):
    """Returns logits (batch, seq, vocab). The output
    projection is tied to the token embedding, as in GPT-2."""

    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = GPT2Model(config)

    def _backbone(self):
        return self.transformer

    def _backbone_name(self):
        return "transformer."

    def construct(self, input_ids, attention_mask=None):
        hidden = self.transformer(input_ids, attention_mask)
        return ops.matmul(hidden, self.transformer.wte.weight.T)

    def _extra_flops(self, seq_len):
        return 2 * self.config.n_embd * self.config.vocab_size * seq_len


def __getattr__(name):
    if name == "HeadPrunerGPTLRP":
        from ms_prune.heads.lrp import HeadPrunerGPTLRP
        return HeadPrunerGPTLRP
    raise AttributeError(name)
