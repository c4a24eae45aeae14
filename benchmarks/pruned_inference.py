"""GRAPH_MODE forward latency of all-MiniLM-L6-v2 before and after pruning half the heads of
every layer, against the FLOPs the pruned structure predicts.

    python benchmarks/pruned_inference.py --quick --json results/pruned_inference.json

Goal: latency_ratio <= flops_ratio / 0.9 (the measured speed-up is at least 90% of the FLOPs'
prediction). Both models are timed interleaved in one process; ratios are of medians.
"""
import argparse

from ms_prune.benchmarking import compare_latency, heads_with_smallest_output_norm, random_batch
from ms_prune.hub import minilm_dir
from ms_prune.training import set_context, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed repeats (about a minute)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--keep_heads", type=int, default=6, help="heads kept per layer (of 12)")
    parser.add_argument("--device_target", default="CPU")
    parser.add_argument("--json", default="results/pruned_inference.json")
    args = parser.parse_args(argv)

    set_context("graph", args.device_target)
    from ms_prune.models.bert import BertModel
    directory = minilm_dir()
    dense = BertModel.from_pretrained(directory)
    pruned = BertModel.from_pretrained(directory)
    pruned.prune_heads(heads_with_smallest_output_norm(pruned, args.keep_heads))
    for model in (dense, pruned):
        model.set_train(False)

    ids, mask = random_batch(dense.config.vocab_size, args.batch_size, args.seq_len)
    repeats = 5 if args.quick else 20
    print(f"timing {repeats} interleaved forward passes of each model, batch {args.batch_size} x {args.seq_len}")
    latency = compare_latency({"unpruned": lambda: dense(ids, mask), "pruned": lambda: pruned(ids, mask)},
                              repeats=repeats)
    flops_ratio = pruned.forward_flops(args.seq_len) / dense.forward_flops(args.seq_len)
    latency_ratio = latency["pruned"] / latency["unpruned"]
    result = {
        "model": "all-MiniLM-L6-v2", "mode": "GRAPH_MODE", "device_target": args.device_target,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": repeats,
        "heads_per_layer_before": dense.heads_per_layer(), "heads_per_layer_after": pruned.heads_per_layer(),
        "params_before": dense.num_parameters(), "params_after": pruned.num_parameters(),
        "flops_before": dense.forward_flops(args.seq_len, args.batch_size),
        "flops_after": pruned.forward_flops(args.seq_len, args.batch_size),
        "latency_ms_before": 1e3 * latency["unpruned"], "latency_ms_after": 1e3 * latency["pruned"],
        "flops_ratio": flops_ratio, "latency_ratio": latency_ratio,
        "speedup_fraction_of_predicted": (1 / latency_ratio - 1) / (1 / flops_ratio - 1),
        "goal_met": latency_ratio <= flops_ratio / 0.9,
    }
    for key in ("flops_ratio", "latency_ratio", "latency_ms_before", "latency_ms_after",
                "speedup_fraction_of_predicted", "goal_met"):
        print(f"{key}: {result[key]}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
