"""GRAPH_MODE training-step time of a GPT-2 without token dropping and with random-LTD keeping
half the tokens in every layer but the first and the last, against the FLOPs' prediction.

    python benchmarks/random_ltd_speed.py --quick --json results/random_ltd_speed.json

Goal: measured_speedup >= 0.9 x theoretical_speedup. Both train steps (forward, backward and
AdamW update) are timed interleaved in one process after warm-up (compilation excluded);
speed-ups are ratios of medians. theoretical_speedup is the ratio of forward FLOPs (training
is about 3x forward for both, so the ratio is the same): projections scale with the kept
length r, attention with r**2, and the LM head runs on all tokens in both.
"""
import argparse

import numpy as np

from ms_prune.benchmarking import compare_latency
from ms_prune.training import LMLoss, make_train_step, set_context, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed repeats (about two minutes on CPU)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8192,
                        help="the LM head runs on every token; GPT-2's 50257 would make it most of the cost")
    parser.add_argument("--kept_fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device_target", default="CPU")
    parser.add_argument("--json", default="results/random_ltd_speed.json")
    args = parser.parse_args(argv)
    if args.layers < 3:
        raise ValueError(f"--layers must be >= 3 (first and last stay full), got {args.layers}")
    if not 0 < args.kept_fraction <= 1:
        raise ValueError(f"--kept_fraction must be in (0, 1], got {args.kept_fraction}")

    set_context("graph", args.device_target, seed=0)
    import mindspore as ms
    from mindspore import Tensor, nn
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from ms_prune.token_drop import (RandomLTDScheduler, convert_to_random_ltd, forward_flops_with_ltd,
                                     make_random_ltd_train_step)

    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.seq_len, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads)
    kept = max(1, int(round(args.seq_len * args.kept_fraction)))
    models, steps = {}, {}
    for name in ("baseline", "random_ltd"):
        ms.set_seed(0)
        model = GPT2LMHeadModel(config)
        model.set_train(True)
        optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-4)
        if name == "baseline":
            steps[name] = make_train_step(LMLoss(model), optimizer)
        else:
            wrappers = convert_to_random_ltd(model, layer_ids=range(1, args.layers - 1))
            scheduler = RandomLTDScheduler(kept, kept, 1, seq_per_step=1, total_layers=args.layers,
                                           ltd_layers=len(wrappers))
            steps[name] = make_random_ltd_train_step(model, LMLoss(model), optimizer, scheduler)
        models[name] = model

    rng = np.random.default_rng(0)
    window = rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len + 1))
    ids, labels = Tensor(window[:, :-1], ms.int32), Tensor(window[:, 1:], ms.int32)
    repeats = args.repeats or (6 if args.quick else 20)
    print(f"GPT-2 {args.layers} layers, d={args.hidden}, {args.heads} heads, vocab {args.vocab_size}; "
          f"batch {args.batch_size} x {args.seq_len} tokens; random-LTD keeps {kept} tokens in layers "
          f"1..{args.layers - 2}; {repeats} interleaved timed steps each", flush=True)
    seconds = compare_latency({name: (lambda name=name: steps[name](ids, labels)) for name in steps},
                              repeats=repeats, warmup=2)

    # the LTD wrappers hold the kept length the step set
    flops = {"baseline": models["baseline"].forward_flops(args.seq_len, args.batch_size),
             "random_ltd": forward_flops_with_ltd(models["random_ltd"], args.seq_len, args.batch_size)}
    theoretical = flops["baseline"] / flops["random_ltd"]
    measured = seconds["baseline"] / seconds["random_ltd"]
    result = {
        "device": args.device_target, "mode": "GRAPH_MODE", "layers": args.layers, "hidden": args.hidden,
        "heads": args.heads, "vocab_size": args.vocab_size, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "kept_length": kept, "ltd_layers": list(range(1, args.layers - 1)),
        "repeats": repeats, "step_seconds_median": seconds,
        "train_flops_per_step": {k: 3 * v for k, v in flops.items()},
        "compilations_random_ltd": steps["random_ltd"].compilations,
        "theoretical_speedup": theoretical, "measured_speedup": measured,
        "measured_over_theoretical": measured / theoretical,
        "goal_met": measured >= 0.9 * theoretical,
    }
    print(f"step time: baseline {seconds['baseline']:.3f} s, random-LTD {seconds['random_ltd']:.3f} s")
    print(f"theoretical_speedup {theoretical:.3f}  measured_speedup {measured:.3f}  "
          f"ratio {measured / theoretical:.3f} (goal >= 0.9)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
