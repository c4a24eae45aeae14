"""Random-LTD's compile-or-not choice, measured: one static-shape graph per kept length (what
ms_prune does, with ``seq_per_step`` bounding the lengths) against one graph for every length
with MindSpore's dynamic shapes (``Cell.set_inputs`` with a ``None`` sequence dimension).

    python benchmarks/random_ltd_dynamic_shape.py --quick --json results/random_ltd_dynamic_shape.json

The timed step is what random-LTD changes: a GRAPH_MODE training step (forward, backward, AdamW)
of the layers random-LTD wraps (GPT-2 blocks, default: the 4 middle layers of the
``samples/random_ltd_gpt_shakespeare.py`` model) on (batch, kept, hidden) states. Compile time is
the first call's time less the median step time. Step times are medians of interleaved calls
(static and dynamic in turn, so load from elsewhere hits both alike). ``break_even_steps`` is
how many steps at each length the dynamic graph's slower steps take to cost the compilations it
saves (None where it is not slower).
"""
import argparse
import time

import numpy as np

from ms_prune.benchmarking import compare_latency
from ms_prune.training import make_train_step, set_context, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed repeats (a few minutes on CPU)")
    parser.add_argument("--layers", type=int, default=4, help="the wrapped layers")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 192, 256],
                        help="kept lengths (the sample's seq_per_step 64 over 256 tokens)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device_target", default="CPU")
    parser.add_argument("--json", default="results/random_ltd_dynamic_shape.json")
    args = parser.parse_args(argv)
    for flag in ("layers", "hidden", "heads", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if min(args.lengths) < 1:
        raise ValueError(f"--lengths must be >= 1, got {args.lengths}")

    set_context("graph", args.device_target, seed=0)
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from ms_prune.models.gpt2 import GPT2Block, GPT2Config

    class BlocksLoss(nn.Cell):
        def __init__(self, config):
            super().__init__()
            self.blocks = nn.CellList([GPT2Block(config, range(config.n_head), range(config.inner_size))
                                       for _ in range(args.layers)])

        def construct(self, hidden, attention_bias):
            for block in self.blocks:
                hidden = block(hidden, attention_bias)
            return ops.mean(hidden * hidden)

    config = GPT2Config(vocab_size=8, n_positions=max(args.lengths), n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)

    def train_step():
        ms.set_seed(0)
        loss_net = BlocksLoss(config)
        return make_train_step(loss_net, nn.AdamWeightDecay(loss_net.trainable_params(), learning_rate=1e-4))

    rng = np.random.default_rng(0)
    inputs = {}
    for r in args.lengths:
        causal = np.tril(np.ones((r, r), np.float32))
        inputs[r] = (Tensor(rng.standard_normal((args.batch_size, r, args.hidden)).astype(np.float32)),
                     Tensor(((1.0 - causal) * -1e4).reshape(1, 1, r, r)))
    static = {r: train_step() for r in args.lengths}
    dynamic = train_step()
    dynamic.set_inputs(Tensor(shape=[args.batch_size, None, args.hidden], dtype=ms.float32),
                       Tensor(shape=[1, 1, None, None], dtype=ms.float32))

    def first_call(step, r):
        start = time.perf_counter()
        step(*inputs[r]).asnumpy()
        return time.perf_counter() - start

    first = {("static", r): first_call(static[r], r) for r in args.lengths}
    first.update({("dynamic", r): first_call(dynamic, r) for r in args.lengths})
    repeats = args.repeats or (8 if args.quick else 30)
    print(f"{args.layers} GPT-2 blocks, d={args.hidden}, batch {args.batch_size}; kept lengths {args.lengths}; "
          f"{repeats} interleaved timed steps each", flush=True)
    candidates = {}
    for r in args.lengths:
        candidates[f"static_{r}"] = lambda r=r: static[r](*inputs[r])
        candidates[f"dynamic_{r}"] = lambda r=r: dynamic(*inputs[r])
    seconds = compare_latency(candidates, repeats=repeats, warmup=1)

    per_length = []
    for r in args.lengths:
        s, d = seconds[f"static_{r}"], seconds[f"dynamic_{r}"]
        per_length.append({"kept_length": r, "static_step_seconds": s, "dynamic_step_seconds": d,
                           "dynamic_over_static": d / s,
                           "static_compile_seconds": max(0.0, first[("static", r)] - s),
                           "dynamic_first_call_seconds": first[("dynamic", r)]})
        print(f"kept {r}: step static {s * 1e3:.1f} ms, dynamic {d * 1e3:.1f} ms (x{d / s:.3f}); first call static "
              f"{first[('static', r)]:.2f} s, dynamic {first[('dynamic', r)]:.2f} s", flush=True)
    static_compile = sum(e["static_compile_seconds"] for e in per_length)
    dynamic_compile = max(0.0, first[("dynamic", args.lengths[0])] - seconds[f"dynamic_{args.lengths[0]}"])
    extra_per_step = float(np.mean([e["dynamic_step_seconds"] - e["static_step_seconds"] for e in per_length]))
    saved = static_compile - dynamic_compile
    break_even = saved / extra_per_step if extra_per_step > 0 else None
    result = {
        "device": args.device_target, "mode": "GRAPH_MODE", "layers": args.layers, "hidden": args.hidden,
        "heads": args.heads, "batch_size": args.batch_size, "lengths": args.lengths, "repeats": repeats,
        "per_length": per_length, "static_compile_seconds": static_compile,
        "dynamic_compile_seconds": dynamic_compile, "dynamic_extra_seconds_per_step": extra_per_step,
        "break_even_steps": break_even,
    }
    print(f"compilation: static {static_compile:.1f} s for {len(args.lengths)} graphs, dynamic {dynamic_compile:.1f} s "
          f"for one; dynamic costs {extra_per_step * 1e3:+.1f} ms per step on average, so it pays off for runs "
          + (f"shorter than {break_even:.0f} steps" if break_even is not None else "of any length"), flush=True)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
