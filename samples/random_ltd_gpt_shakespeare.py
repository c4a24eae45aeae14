"""Train the same small GPT-2 on tiny Shakespeare twice, for the same number of steps: once
normally, once with random-LTD (middle layers see a random subset of tokens, growing to all by
the end), and compare validation perplexity and the layer-tokens each run consumed.

    python samples/random_ltd_gpt_shakespeare.py --quick     # CPU, GRAPH_MODE, 300 steps per run: about 11-13 minutes here
    python samples/random_ltd_gpt_shakespeare.py --config samples/configs/random_ltd_gpt_shakespeare.yaml

Goal: at least 20% fewer layer-tokens with validation perplexity within 3% of the baseline.
Both runs use a learning rate driven by consumed layer-tokens (warm-up, cosine decay over the
run's own layer-token total), as the random-LTD paper does; for the baseline that is the usual
per-step schedule. Tokens are GPT-2 BPE, re-numbered to the 11.7k ids tiny Shakespeare uses so
that the LM head does not dominate a small model.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ms_prune.data import compact_vocabulary, lm_batches, shakespeare_tokens  # noqa: E402
from ms_prune.training import (LMLoss, lm_perplexity, make_train_step, sample_cli, set_context,  # noqa: E402
                               write_json, FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, section_ranges)

KEYS = {"model", "seq_len", "batch_size", "steps", "quick_steps", "learning_rate", "min_learning_rate",
        "warmup_fraction", "weight_decay", "random_ltd", "eval_batches", "eval_batches_quick", "log_every", "seed"}
RANGES = {"seq_len": POSITIVE, "batch_size": POSITIVE, "steps": POSITIVE, "quick_steps": POSITIVE,
          "learning_rate": RATE, "min_learning_rate": NON_NEGATIVE, "warmup_fraction": FRACTION,
          "weight_decay": NON_NEGATIVE, "eval_batches": POSITIVE, "eval_batches_quick": POSITIVE,
          "log_every": POSITIVE, "seed": NON_NEGATIVE,
          **section_ranges("model", n_layer=POSITIVE, n_embd=POSITIVE, n_head=POSITIVE, dropout=(0, 1)),
          # layer_ids (default null: the middle layers) are checked against the model by convert_to_random_ltd
          **section_ranges("random_ltd", min_value=POSITIVE, max_value=POSITIVE, seq_per_step=POSITIVE,
                           require_fraction=OPEN_FRACTION, layer_ids=NON_NEGATIVE)}


def train(name, config, steps, train_ids, val_ids, vocab_size, eval_batches):
    import mindspore as ms
    from mindspore import Tensor, nn
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from ms_prune.token_drop import LayerTokenLR, RandomLTDScheduler, apply_random_ltd, set_learning_rate
    from ms_prune.token_drop import make_random_ltd_train_step

    m, seq, batch = config["model"], config["seq_len"], config["batch_size"]
    ms.set_seed(config["seed"])
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size, n_positions=seq, n_embd=m["n_embd"], n_layer=m["n_layer"], n_head=m["n_head"],
        resid_pdrop=m["dropout"], embd_pdrop=m["dropout"], attn_pdrop=m["dropout"]))
    if name == "random_ltd":
        ltd = config["random_ltd"]
        _, scheduler = apply_random_ltd(model, ltd["min_value"], ltd["max_value"],
                                        max(1, int(ltd["require_fraction"] * steps)), ltd["seq_per_step"],
                                        layer_ids=ltd["layer_ids"])
    else:  # the same bookkeeping, nothing dropped
        scheduler = RandomLTDScheduler(seq, seq, 1, 1, total_layers=m["n_layer"], ltd_layers=0)
    model.set_train(True)
    total = scheduler.planned_layer_tokens(steps, batch, seq)
    lr = LayerTokenLR(config["learning_rate"], total, int(config["warmup_fraction"] * total),
                      config["min_learning_rate"])
    optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=config["learning_rate"],
                                   weight_decay=config["weight_decay"])
    if name == "random_ltd":
        step = make_random_ltd_train_step(model, LMLoss(model), optimizer, scheduler, lr_schedule=lr)
    else:
        plain = make_train_step(LMLoss(model), optimizer)

        def step(ids, labels):
            set_learning_rate(optimizer, lr(scheduler.consumed_layer_tokens))
            loss = plain(ids, labels)
            scheduler.step(batch, seq)
            return loss

    batches = lm_batches(train_ids, batch, seq, np.random.default_rng(config["seed"]))
    start, losses = time.time(), []
    for t in range(steps):
        ids, labels = next(batches)
        kept = scheduler.kept_length()
        losses.append(float(step(Tensor(ids, ms.int32), Tensor(labels, ms.int32))))
        if (t + 1) % config["log_every"] == 0 or t + 1 == steps:
            print(f"[{name}] step {t + 1}/{steps} loss {np.mean(losses[-config['log_every']:]):.3f} kept {kept} "
                  f"layer-tokens {scheduler.consumed_layer_tokens:,} ({time.time() - start:.0f} s)", flush=True)
    train_seconds = time.time() - start
    ppl = lm_perplexity(model, val_ids, batch, seq, eval_batches)
    print(f"[{name}] validation perplexity {ppl:.2f}", flush=True)
    result = {"validation_perplexity": ppl, "layer_tokens": scheduler.consumed_layer_tokens,
              "tokens": scheduler.consumed_tokens, "final_train_loss": float(np.mean(losses[-config["log_every"]:])),
              "train_seconds": train_seconds}
    if name == "random_ltd":
        result.update(compilations=step.compilations, kept_lengths=scheduler.distinct_lengths(steps),
                      ltd_layers=scheduler.ltd_layers)
    return result


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "quick_steps steps per run (under 15 minutes on CPU)", argv,
                              ranges=RANGES)
    if config["random_ltd"]["max_value"] != config["seq_len"]:
        raise ValueError("random_ltd.max_value must equal seq_len (all tokens kept at the end of the schedule)")

    set_context("graph", args.device_target, seed=config["seed"])
    steps = config["quick_steps"] if args.quick else config["steps"]
    eval_batches = config["eval_batches_quick"] if args.quick else config["eval_batches"]
    (train_ids, val_ids), vocab_size = compact_vocabulary(*shakespeare_tokens())
    print(f"tiny Shakespeare: {len(train_ids):,} train / {len(val_ids):,} val tokens, {vocab_size} ids; "
          f"{steps} steps of {config['batch_size']} x {config['seq_len']} per run", flush=True)

    runs = {name: train(name, config, steps, train_ids, val_ids, vocab_size, eval_batches)
            for name in ("baseline", "random_ltd")}
    base, ltd = runs["baseline"], runs["random_ltd"]
    saved = 1 - ltd["layer_tokens"] / base["layer_tokens"]
    ppl_change = ltd["validation_perplexity"] / base["validation_perplexity"] - 1
    result = {"config": config, "quick": args.quick, "steps": steps, "device": args.device_target,
              "mode": "GRAPH_MODE", "vocab_size": vocab_size, "runs": runs,
              "layer_tokens_saved": saved, "perplexity_change": ppl_change,
              "goal_met": saved >= 0.2 and ppl_change <= 0.03}
    print(f"layer-tokens: baseline {base['layer_tokens']:,}, random-LTD {ltd['layer_tokens']:,} "
          f"({100 * saved:.1f}% fewer)")
    print(f"validation perplexity: baseline {base['validation_perplexity']:.2f}, random-LTD "
          f"{ltd['validation_perplexity']:.2f} ({100 * ppl_change:+.1f}%); goal (>= 20% fewer, <= +3%) "
          f"{'met' if result['goal_met'] else 'NOT met'}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
