"""Turn a llama.cpp GGUF file of a Llama-architecture model into a Hugging Face-layout folder
(config.json + model.safetensors + tokenizer.json) that ``LlamaForCausalLM.from_pretrained`` reads.

Quantised tensors are dequantised to float32 with the ``gguf`` package. llama.cpp stores the
rows of the query and key projections permuted for its interleaved rotary embedding; they are put
back in Hugging Face's half-split (``rotate_half``) order. The byte-level BPE tokenizer embedded in
the metadata is rebuilt with the ``tokenizers`` library.
"""
import os

import numpy as np

__all__ = ["gguf_llama_to_hf"]

# llama.cpp tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# pre-tokenizers of llama.cpp whose split we rebuild: digits one by one, then GPT-2's byte-level regex
_PRE_TOKENIZERS = ("smollm",)
_CONTROL_TOKEN = 3  # llama.cpp token type of special tokens


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file has no metadata key {key!r}")
        return default
    return field.contents()


def unpermute_rows(weight, heads):
    """Undo llama.cpp's per-head interleaving of query/key rows (weight (heads*head_dim, ...))."""
    head_dim = weight.shape[0] // heads
    trailing = weight.shape[1:]
    return (weight.reshape(heads, head_dim // 2, 2, *trailing).swapaxes(1, 2)
            .reshape(heads * head_dim, *trailing))


def _config(reader, arch, tied):
    from .llama import LlamaConfig
    key = arch + "."
    heads = int(_field(reader, key + "attention.head_count"))
    hidden = int(_field(reader, key + "embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = LlamaConfig(
        vocab_size=int(_field(reader, key + "vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, key + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, key + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, key + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, key + "rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, key + "context_length")),
        # stored as float32: 9.9999997e-06 means the 1e-5 of the original config
        rms_norm_eps=float(f"{float(_field(reader, key + 'attention.layer_norm_rms_epsilon')):.7g}"),
        rope_theta=float(_field(reader, key + "rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
    )
    config.extra = {"architectures": ["LlamaForCausalLM"]}
    for name in ("bos", "eos", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            config.extra[("pad" if name == "padding" else name) + "_token_id"] = int(field.contents())
    return config


def _tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"cannot rebuild tokenizer model {kind!r} with pre-tokenizer {pre!r}: only byte-level "
                         f"BPE ('gpt2') with pre-tokenizer {list(_PRE_TOKENIZERS)} is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN])
    return tokenizer


def gguf_llama_to_hf(gguf_path, directory):
    """Write config.json, model.safetensors (float32) and tokenizer.json of the Llama-architecture
    GGUF file ``gguf_path`` into ``directory`` (created). Raises ValueError for a file that is not
    a Llama model or holds a tensor we do not know."""
    import gguf
    from safetensors.numpy import save_file
    from .modeling_utils import WEIGHTS_NAME

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not 'llama'")
    names = {t.name for t in reader.tensors}
    config = _config(reader, arch, tied="output.weight" not in names)
    permuted_heads = {"attn_q": config.num_attention_heads, "attn_k": config.kv_heads}
    state = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
            hf_name = f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP_TENSORS:
            hf_name = f"{_TOP_TENSORS[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"{gguf_path}: tensor {tensor.name!r} has no Hugging Face Llama counterpart")
        # dequantize returns numpy's row-major order: (out_features, in_features), as HF stores it
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if parts[0] == "blk" and parts[2] in permuted_heads:
            weight = unpermute_rows(weight, permuted_heads[parts[2]])
        state[hf_name] = np.ascontiguousarray(weight)
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    _tokenizer(reader).save(os.path.join(directory, "tokenizer.json"))
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    return directory
