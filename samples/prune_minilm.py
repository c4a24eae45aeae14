"""The main job: load the real all-MiniLM-L6-v2, prune half of its attention heads, and show
what changes: parameters, FLOPs, GRAPH_MODE latency, and sentence similarity.

    python samples/prune_minilm.py                  # CPU, GRAPH_MODE
    python samples/prune_minilm.py --quick          # a smaller latency batch, fewer repeats
    python samples/prune_minilm.py --device_target GPU

The heads are chosen by a cheap data-free criterion (output-projection norm) to show the
mechanics; `samples/lrp_bert_sst2.py` learns which heads a task can lose.
"""
import os

import numpy as np

from ms_prune.benchmarking import compare_latency, heads_with_smallest_output_norm, random_batch
from ms_prune.hub import minilm_dir
from ms_prune.training import set_context, write_json

from harness import NON_NEGATIVE, POSITIVE, sample_cli, section_ranges

KEYS = {"keep_heads_per_layer", "batch_size", "seq_len", "repeats", "quick", "output_dir"}
RANGES = {"keep_heads_per_layer": NON_NEGATIVE, "batch_size": POSITIVE, "seq_len": POSITIVE, "repeats": POSITIVE,
          **section_ranges("quick", batch_size=POSITIVE, repeats=POSITIVE)}

PAIRS = [("A man is eating food.", "A man is eating a piece of bread."),
         ("A man is eating food.", "The girl is carrying a baby."),
         ("A man is riding a horse.", "A man is riding a white horse on an enclosed ground."),
         ("A woman is playing violin.", "A monkey is playing drums.")]


def cosine_similarities(model, tokenizer, pairs):
    """Mean-pooled sentence embeddings (sentence-transformers' recipe) -> cosine per pair."""
    from mindspore import Tensor
    import mindspore as ms
    from ms_prune.models.bert import mean_pooling
    sentences = [s for pair in pairs for s in pair]
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(sentences)
    ids = Tensor(np.array([e.ids for e in encoded]), ms.int32)
    mask = Tensor(np.array([e.attention_mask for e in encoded]), ms.int32)
    embeddings = mean_pooling(model(ids, mask)[0], mask).asnumpy()
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return [float(embeddings[2 * i] @ embeddings[2 * i + 1]) for i in range(len(pairs))]


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "latency with quick.batch_size and quick.repeats", argv,
                              ranges=RANGES)
    if args.quick:
        config = {**config, **config["quick"]}
    print(f"the pruned model is saved to {os.path.abspath(config['output_dir'])}", flush=True)
    set_context("graph", args.device_target)
    from tokenizers import Tokenizer
    from ms_prune.models.bert import BertModel

    directory = minilm_dir()
    print(f"loading all-MiniLM-L6-v2 from {directory}")
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    dense = BertModel.from_pretrained(directory)
    pruned = BertModel.from_pretrained(directory)
    from ms_prune.validation import check_int
    check_int(args.config, f"seq_len (at most the model's {dense.config.max_position_embeddings} positions)",
              config["seq_len"], 1, dense.config.max_position_embeddings)
    check_int(args.config, f"keep_heads_per_layer (of the model's {dense.config.num_attention_heads} heads per layer)",
              config["keep_heads_per_layer"], 0, dense.config.num_attention_heads)
    heads = heads_with_smallest_output_norm(pruned, config["keep_heads_per_layer"])
    print(f"pruning {sum(map(len, heads.values()))} of {sum(dense.heads_per_layer())} heads: {heads}")
    pruned.prune_heads(heads)
    for model in (dense, pruned):
        model.set_train(False)

    pruned.save_pretrained(config["output_dir"])
    reloaded = BertModel.from_pretrained(config["output_dir"])
    reloaded.set_train(False)
    similarity = {"unpruned": cosine_similarities(dense, tokenizer, PAIRS),
                  "pruned": cosine_similarities(pruned, tokenizer, PAIRS),
                  "pruned_reloaded": cosine_similarities(reloaded, tokenizer, PAIRS)}

    seq, batch = config["seq_len"], config["batch_size"]
    ids, mask = random_batch(dense.config.vocab_size, batch, seq)
    print(f"timing GRAPH_MODE forward, batch {batch} x {seq} tokens, {config['repeats']} interleaved repeats")
    latency = compare_latency({"unpruned": lambda: dense(ids, mask), "pruned": lambda: pruned(ids, mask)},
                              repeats=config["repeats"])
    result = {
        "heads_pruned": {str(k): v for k, v in heads.items()},
        "heads_per_layer": {"unpruned": dense.heads_per_layer(), "pruned": pruned.heads_per_layer()},
        "parameters": {"unpruned": dense.num_parameters(), "pruned": pruned.num_parameters()},
        "forward_gflops": {"unpruned": dense.forward_flops(seq, batch) / 1e9,
                           "pruned": pruned.forward_flops(seq, batch) / 1e9},
        "latency_ms": {k: 1e3 * v for k, v in latency.items()},
        "similarity": similarity, "pairs": PAIRS, "saved_to": config["output_dir"], "quick": args.quick,
    }
    print(f"\n{'':28}{'unpruned':>12}{'pruned':>12}")
    print(f"{'heads':28}{sum(dense.heads_per_layer()):>12}{sum(pruned.heads_per_layer()):>12}")
    for key, fmt in (("parameters", "{:>12,}"), ("forward_gflops", "{:>12.2f}"), ("latency_ms", "{:>12.1f}")):
        print(f"{key:28}" + fmt.format(result[key]["unpruned"]) + fmt.format(result[key]["pruned"]))
    for i, (a, b) in enumerate(PAIRS):
        print(f"cos({a!r}, {b!r}): {similarity['unpruned'][i]:.4f} -> {similarity['pruned'][i]:.4f}")
    print(f"(published for the first pair, unpruned: 0.7553; pruned model saved to {config['output_dir']} "
          f"and reloaded: {similarity['pruned_reloaded'] == similarity['pruned']})")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
