"""What the engine's Trainer costs per GRAPH_MODE training step, against a bare loop.

    python benchmarks/engine_overhead.py --quick --json results/engine_overhead.json

A small GPT-2 trains through ``ms_prune.engine.Trainer`` (no algorithms) and through a bare
``nn.TrainOneStepCell`` loop that does what any user loop does per step (numpy batch to
Tensor, loss to a float). Both are timed interleaved in one process after warm-up (compilation
excluded), ``chunk`` steps per timed call; ``overhead_ratio`` is the ratio of the medians
(Trainer / bare). Goal: at most 1.03.
"""
import argparse

import numpy as np

from ms_prune.benchmarking import compare_latency
from ms_prune.training import set_context, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds (about two minutes on CPU)")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 layers")
    parser.add_argument("--hidden", type=int, default=256, help="GPT-2 width")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--vocab_size", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--chunk", type=int, default=5, help="training steps per timed call")
    parser.add_argument("--device_target", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--json", default="results/engine_overhead.json", help="where the result goes")
    args = parser.parse_args(argv)
    rounds = 6 if args.quick else 20

    set_context("graph", args.device_target, seed=0)
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from ms_prune.engine import Trainer
    from ms_prune.engine.trainer import ModelLoss
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.seq_len, n_embd=args.hidden,
                        n_layer=args.layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len + 1)).astype(np.int32)
               for _ in range(16)]

    def batch(step):
        ids = batches[step % len(batches)]
        return ids[:, :-1], ids[:, 1:]

    def lm_loss(logits, labels):
        return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    ms.set_seed(0)
    bare_model = GPT2LMHeadModel(config)
    bare_model.set_train(True)
    bare_step = nn.TrainOneStepCell(ModelLoss(bare_model, lm_loss, 1),
                                    nn.AdamWeightDecay(bare_model.trainable_params(), learning_rate=1e-4))
    bare_count = [0]

    def bare():
        loss = None
        for _ in range(args.chunk):
            inputs, labels = batch(bare_count[0])
            loss = float(bare_step(Tensor(inputs), Tensor(labels)).asnumpy())
            bare_count[0] += 1
        return Tensor(loss)

    ms.set_seed(0)
    trainer = Trainer(GPT2LMHeadModel(config), lm_loss, batch, max_steps=1, lr=1e-4, log_interval=0)

    def engine():
        trainer.max_steps = trainer.state.step + args.chunk
        trainer.fit()
        return Tensor(trainer.state.loss)

    times = compare_latency({"bare": bare, "trainer": engine}, repeats=rounds, warmup=1)
    result = {
        "overhead_ratio": times["trainer"] / times["bare"],
        "seconds_per_step": {k: v / args.chunk for k, v in times.items()},
        "rounds": rounds, "chunk": args.chunk, "goal": "overhead_ratio <= 1.03",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(f"bare {result['seconds_per_step']['bare'] * 1000:.1f} ms/step, trainer "
          f"{result['seconds_per_step']['trainer'] * 1000:.1f} ms/step: overhead_ratio {result['overhead_ratio']:.3f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
