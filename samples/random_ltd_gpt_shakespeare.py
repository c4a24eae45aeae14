"""Train the same small GPT-2 on tiny Shakespeare twice, for the same number of steps: once
normally, once with random-LTD (middle layers see a random subset of tokens, growing to all by
the end), and compare validation perplexity and the layer-tokens each run consumed.

    python samples/random_ltd_gpt_shakespeare.py --quick     # CPU, GRAPH_MODE, 300 steps per run: about 11-13 minutes here
    python samples/random_ltd_gpt_shakespeare.py --config samples/configs/random_ltd_gpt_shakespeare.yaml
    python samples/random_ltd_gpt_shakespeare.py --quick --resume   # continue an interrupted run

Both runs train on ``ms_prune.engine.Trainer`` with the ``RandomLTD`` algorithm: the baseline's
keeps every token (min_value = max_value = seq_len), so both runs share one code path, the
layer-token bookkeeping and the learning-rate schedule; checkpoints allow ``--resume``.

Goal: at least 20% fewer layer-tokens with validation perplexity within 3% of the baseline.
Both runs use a learning rate driven by consumed layer-tokens (warm-up, cosine decay over the
run's own layer-token total), as the random-LTD paper does; for the baseline that is the usual
per-step schedule. Tokens are GPT-2 BPE, re-numbered to the 11.7k ids tiny Shakespeare uses so
that the LM head does not dominate a small model.
"""
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ms_prune.data import compact_vocabulary, lm_batch_fn, shakespeare_tokens  # noqa: E402
from ms_prune.engine import Trainer  # noqa: E402
from ms_prune.engine.recipes import build_algorithms  # noqa: E402
from ms_prune.training import (lm_cross_entropy, lm_perplexity, sample_cli, set_context,  # noqa: E402
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


def train(name, config, steps, train_ids, val_ids, vocab_size, eval_batches, checkpoints, resume):
    import mindspore as ms
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from ms_prune.token_drop import LayerTokenLR, RandomLTDScheduler

    m, seq, batch = config["model"], config["seq_len"], config["batch_size"]
    ms.set_seed(config["seed"])
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size, n_positions=seq, n_embd=m["n_embd"], n_layer=m["n_layer"], n_head=m["n_head"],
        resid_pdrop=m["dropout"], embd_pdrop=m["dropout"], attn_pdrop=m["dropout"]))
    arguments = {k: v for k, v in config["random_ltd"].items() if k != "require_fraction"}
    if name == "baseline":  # the same algorithm keeping every token: same bookkeeping, nothing dropped
        arguments.update(min_value=seq, max_value=seq)
    require_steps = max(1, int(config["random_ltd"]["require_fraction"] * steps))
    # the learning rate follows consumed layer-tokens over the run's own total, as in the paper
    planner = RandomLTDScheduler(arguments["min_value"], arguments["max_value"], require_steps,
                                 arguments["seq_per_step"], total_layers=m["n_layer"],
                                 ltd_layers=len(arguments["layer_ids"] or range(1, m["n_layer"] - 1)))
    total = planner.planned_layer_tokens(steps, batch, seq)
    lr = LayerTokenLR(config["learning_rate"], total, int(config["warmup_fraction"] * total),
                      config["min_learning_rate"])
    (ltd,) = build_algorithms({"random_ltd": dict(arguments, require_steps=require_steps, lr_schedule=lr)})
    trainer = Trainer(model, lm_cross_entropy, lm_batch_fn(train_ids, batch, seq, config["seed"]), max_steps=steps,
                      algorithms=[ltd], lr=config["learning_rate"], weight_decay=config["weight_decay"],
                      log_interval=config["log_every"], checkpoint_dir=checkpoints,
                      checkpoint_interval=config["log_every"] * 2,
                      resume_from="latest" if resume and os.path.isfile(os.path.join(checkpoints, "latest")) else None)
    start = time.time()
    history = trainer.fit()
    train_seconds = time.time() - start
    ppl = lm_perplexity(model, val_ids, batch, seq, eval_batches)
    print(f"[{name}] validation perplexity {ppl:.2f}", flush=True)
    scheduler = ltd.scheduler
    losses = [r["loss"] for r in history[-config["log_every"]:]]
    return {"validation_perplexity": ppl, "layer_tokens": scheduler.consumed_layer_tokens,
            "tokens": scheduler.consumed_tokens, "final_train_loss": sum(losses) / max(1, len(losses)),
            "train_seconds": train_seconds, "compilations": trainer.compilations,
            "kept_lengths": scheduler.distinct_lengths(steps), "ltd_layers": scheduler.ltd_layers}


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "quick_steps steps per run (under 15 minutes on CPU)", argv,
                              ranges=RANGES, extra_arguments=[("--resume", dict(
                                  action="store_true", help="continue from the last checkpoints"))])
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    if config["random_ltd"]["max_value"] != config["seq_len"]:
        raise ValueError("random_ltd.max_value must equal seq_len (all tokens kept at the end of the schedule)")

    set_context("graph", args.device_target, seed=config["seed"])
    steps = config["quick_steps"] if args.quick else config["steps"]
    eval_batches = config["eval_batches_quick"] if args.quick else config["eval_batches"]
    (train_ids, val_ids), vocab_size = compact_vocabulary(*shakespeare_tokens())
    print(f"tiny Shakespeare: {len(train_ids):,} train / {len(val_ids):,} val tokens, {vocab_size} ids; "
          f"{steps} steps of {config['batch_size']} x {config['seq_len']} per run", flush=True)

    work = os.path.join(os.path.dirname(os.path.abspath(args.json)), "random_ltd_gpt_shakespeare_checkpoints")
    runs = {name: train(name, config, steps, train_ids, val_ids, vocab_size, eval_batches,
                        os.path.join(work, name + ("_quick" if args.quick else "")), args.resume)
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
