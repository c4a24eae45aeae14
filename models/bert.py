"""BERT (Devlin et al. 2019) in MindSpore, loading and saving Hugging Face checkpoints.

Parameter names are Hugging Face's except ``attention.self`` -> ``attention.self_attn`` (``self``
cannot name an attribute that graph mode parses). ``pre_layer_norm=True`` gives the pre-LN
("switchable") layout progressive layer dropping needs: x + f(LN(x)) in every sub-layer and one
final LayerNorm (``encoder.LayerNorm``); the default is the original post-LN BERT.

Every transformer layer maps ``(hidden_states, attention_bias) -> hidden_states``:
``attention_bias`` is additive, (batch, 1, 1, seq) here.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .modeling_utils import (Embedding, HeadPrunableAttention, LayerNorm, Linear, NeuronPrunableFFN, OutputBias,
                             PreTrainedCell, PretrainedConfig, PrunedUnits, additive_padding_bias,
                             check_model_inputs)

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "HeadPrunerBertLRP", "mean_pooling"]


class BertConfig(PretrainedConfig):
    model_type = "bert"
    defaults = dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
        initializer_range=0.02, layer_norm_eps=1e-12, num_labels=2, classifier_dropout=None,
        pruned_heads={}, pre_layer_norm=False, pruned_ffn_neurons={},
    )
    activations = ("gelu", "gelu_new", "relu")

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        if "num_labels" not in values and "id2label" in values:
            values["num_labels"] = len(values["id2label"])  # HF stores the label count this way
        return super().from_dict(values)

    def validate(self):
        self._check_positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels")
        self._check_probability("hidden_dropout_prob", "attention_probs_dropout_prob")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in self.activations:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not one of {self.activations}")
        self._check_pruned_heads(self.num_hidden_layers, self.num_attention_heads)
        self._check_pruned_ffn_neurons(self.num_hidden_layers, self.intermediate_size)


def activation(name):
    if name == "gelu":
        return lambda x: ops.gelu(x, approximate="none")
    if name == "gelu_new":
        return lambda x: ops.gelu(x, approximate="tanh")
    return ops.relu


class BertEmbeddings(nn.Cell):
    def __init__(self, config):
        super().__init__()
        std = config.initializer_range
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, std)
        self.position_embeddings = Embedding(config.max_position_embeddings, config.hidden_size, std)
        self.token_type_embeddings = Embedding(config.type_vocab_size, config.hidden_size, std)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(p=config.hidden_dropout_prob)

    def construct(self, input_ids, token_type_ids):
        positions = ops.arange(input_ids.shape[1]).astype(ms.int32)
        embedded = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                    + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(embedded))


class BertSelfAttentionProjections(nn.Cell):
    """HF's ``attention.self``: the Q/K/V projections of the kept heads (None when none)."""

    def __init__(self, config, inner):
        super().__init__()
        std = config.initializer_range
        self.query = Linear(config.hidden_size, inner, std) if inner else None
        self.key = Linear(config.hidden_size, inner, std) if inner else None
        self.value = Linear(config.hidden_size, inner, std) if inner else None


class BertSubLayerOutput(nn.Cell):
    """HF's ``*.output``: projection back to hidden size, dropout, LayerNorm."""

    def __init__(self, config, in_features):
        super().__init__()
        self.dense = (Linear(in_features, config.hidden_size, config.initializer_range) if in_features
                      else OutputBias(np.zeros((config.hidden_size,), np.float32)))
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(p=config.hidden_dropout_prob)


class BertAttention(HeadPrunableAttention):
    def __init__(self, config, kept_heads):
        head_dim = config.hidden_size // config.num_attention_heads
        super().__init__(config.num_attention_heads, head_dim, kept_heads, config.attention_probs_dropout_prob)
        self.pre_layer_norm = config.pre_layer_norm
        inner = self.num_heads * head_dim
        self.self_attn = BertSelfAttentionProjections(config, inner)
        self.output = BertSubLayerOutput(config, inner)

    def construct(self, hidden_states, attention_bias):
        x = self.output.LayerNorm(hidden_states) if self.pre_layer_norm else hidden_states
        if self.num_heads == 0:
            projected = self.output.dense(x)
        else:
            batch, seq = x.shape[0], x.shape[1]
            context = self.attend(self.self_attn.query(x), self.self_attn.key(x), self.self_attn.value(x),
                                  attention_bias, batch, seq)
            projected = self.output.dense(context)
        projected = self.output.dropout(projected)
        if self.pre_layer_norm:
            return hidden_states + projected
        return self.output.LayerNorm(projected + hidden_states)

    def heads(self):
        return self.declare_heads("output.dense", query="self_attn.query", key="self_attn.key",
                                  value="self_attn.value")


class BertIntermediate(NeuronPrunableFFN):
    def __init__(self, config, kept_neurons):
        super().__init__(config.intermediate_size, kept_neurons)
        self.dense = Linear(config.hidden_size, self.num_neurons, config.initializer_range) if self.num_neurons else None
        self.act = activation(config.hidden_act)

    def construct(self, x):
        if self.num_neurons == 0:
            return x  # the output projection is then an OutputBias, which only needs x's shape
        return self.act(self.dense(x))


class BertLayer(nn.Cell):
    def __init__(self, config, kept_heads, kept_neurons=None):
        super().__init__()
        self.pre_layer_norm = config.pre_layer_norm
        self.attention = BertAttention(config, kept_heads)
        if kept_neurons is None:
            kept_neurons = range(config.intermediate_size)
        self.intermediate = BertIntermediate(config, kept_neurons)
        self.output = BertSubLayerOutput(config, self.intermediate.num_neurons)

    def construct(self, hidden_states, attention_bias):
        hidden_states = self.attention(hidden_states, attention_bias)
        x = self.output.LayerNorm(hidden_states) if self.pre_layer_norm else hidden_states
        projected = self.output.dropout(self.output.dense(self.intermediate(x)))
        if self.pre_layer_norm:
            return hidden_states + projected
        return self.output.LayerNorm(projected + hidden_states)


class BertEncoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        heads, neurons = range(config.num_attention_heads), range(config.intermediate_size)
        self.layer = nn.CellList([
            BertLayer(config, [h for h in heads if h not in config.pruned_heads.get(i, [])],
                      [n for n in neurons if n not in set(config.pruned_ffn_neurons.get(i, []))])
            for i in range(config.num_hidden_layers)])
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps) if config.pre_layer_norm else None

    def construct(self, hidden_states, attention_bias):
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_bias)
        if self.LayerNorm is not None:
            hidden_states = self.LayerNorm(hidden_states)
        return hidden_states


class BertPooler(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, config.initializer_range)

    def construct(self, sequence_output):
        return ops.tanh(self.dense(sequence_output[:, 0]))


class BertPreTrainedCell(PreTrainedCell):
    config_class = BertConfig
    backbone_prefix = "bert"
    _hf_renames = ((".attention.self.", ".attention.self_attn."),)
    _ignored_checkpoint_keys = ("embeddings.position_ids", "embeddings.token_type_ids")

    def _backbone(self):
        return self

    def attention_layers(self):
        return [layer.attention for layer in self.transformer_layers()]

    def transformer_layers(self):
        return self._backbone().encoder.layer

    def ffn_layers(self):
        return [layer.intermediate for layer in self.transformer_layers()]

    def ffn_units(self, layer):
        block = self.transformer_layers()[layer]
        return block.intermediate.declare_neurons(block, "intermediate.dense", "output.dense")

    @property
    def skippable_layers(self):
        # post-LN layers compute LN(x + f(x)): skipping one does not leave x
        return self.config.pre_layer_norm

    def _is_embedding_parameter(self, name):
        return ".embeddings." in "." + name

    def _is_per_token(self, cell_name):
        return not any(part in ("pooler", "classifier") for part in cell_name.split("."))

    def _hidden_size(self):
        return self.config.hidden_size

    def _backbone_name(self):
        return ""

    def _prunable_units(self):
        prefix = self._backbone_name()
        units = []
        for i, attention in enumerate(self.attention_layers()):
            base = f"{prefix}encoder.layer.{i}.attention."
            tensors = [(f"{base}self.{name}.{kind}", 0, 1) for name in ("query", "key", "value")
                       for kind in ("weight", "bias")]
            tensors.append((f"{base}output.dense.weight", 1, 1))
            units.append(PrunedUnits("heads", i, attention.total_heads, attention.kept_heads, attention.head_dim,
                                     tensors))
        for i, ffn in enumerate(self.ffn_layers()):
            base = f"{prefix}encoder.layer.{i}."
            tensors = [(f"{base}intermediate.dense.weight", 0, 1), (f"{base}intermediate.dense.bias", 0, 1),
                       (f"{base}output.dense.weight", 1, 1)]
            units.append(PrunedUnits("neurons", i, ffn.total_neurons, ffn.kept_neurons, 1, tensors))
        return units


class BertModel(BertPreTrainedCell):
    """Returns ``(sequence_output, pooled_output)``."""

    _task_head_prefixes = ("pooler.",)

    def __init__(self, config):
        super().__init__(config)
        self.max_positions = config.max_position_embeddings  # a plain int: a graph-mode constant
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def construct(self, input_ids, attention_mask=None, token_type_ids=None):
        check_model_inputs("BertModel", input_ids, attention_mask, self.max_positions,
                           "max_position_embeddings")
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise ValueError(f"BertModel: token_type_ids must have the shape of input_ids {input_ids.shape}, "
                             f"got {token_type_ids.shape}")
        if attention_mask is None:
            attention_mask = ops.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = ops.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        sequence_output = self.encoder(hidden, additive_padding_bias(attention_mask))
        return sequence_output, self.pooler(sequence_output)


class BertForSequenceClassification(BertPreTrainedCell):
    """Returns logits of shape (batch, num_labels)."""

    base_model_prefix = "bert"
    _task_head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p=dropout)
        self.classifier = Linear(config.hidden_size, config.num_labels, config.initializer_range)

    def _backbone(self):
        return self.bert

    def _backbone_name(self):
        return "bert."

    def construct(self, input_ids, attention_mask=None, token_type_ids=None):
        outputs = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(outputs[1]))


def __getattr__(name):
    # The LRP pruner lives with the heads package; import it lazily to keep this file the model.
    if name == "HeadPrunerBertLRP":
        from ms_prune.heads.lrp import HeadPrunerBertLRP
        return HeadPrunerBertLRP
    raise AttributeError(name)


def mean_pooling(sequence_output, attention_mask):
    """Average of the token vectors that the mask keeps: sentence-transformers' sentence embedding."""
    weights = attention_mask.astype(sequence_output.dtype).expand_dims(-1)
    return (sequence_output * weights).sum(axis=1) / ops.clamp(weights.sum(axis=1), min=1e-9)
