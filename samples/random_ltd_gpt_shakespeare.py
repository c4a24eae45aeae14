"""Does random-LTD train a GPT faster to the same quality? The same small GPT-2 is trained on tiny
Shakespeare with and without random-LTD (middle layers see a random subset of the tokens, growing
to all of them by ``require_fraction`` of the run), interleaved in one process, for each seed; the
measure is the wall-clock time each run needs to first reach the baseline's final validation
perplexity (``time_to_baseline_quality`` = random-LTD / baseline; below 1 is faster).

    python samples/random_ltd_gpt_shakespeare.py --quick     # CPU, GRAPH_MODE, one seed: 7 minutes here
    python samples/random_ltd_gpt_shakespeare.py              # the full run: two seeds, 1500 steps each
    python samples/random_ltd_gpt_shakespeare.py --quick --resume   # continue an interrupted run

Setting: character-level tiny Shakespeare (65 ids, nanoGPT's setting), so that the transformer
layers are the cost, as they are in the large models random-LTD was made for (there the LM head is
a few percent of the FLOPs); with GPT-2's 50k-id head a small model spends its time in the head,
where dropping tokens in the middle layers saves nothing. ``data: gpt2`` keeps that setting (BPE
ids re-numbered to the 11.7k that tiny Shakespeare uses) for comparison.

Both runs are ``ms_prune.engine.Trainer`` runs with the ``RandomLTD`` algorithm; the baseline's
keeps every token (min_value = max_value = seq_len), so both share the code path, the layer-token
bookkeeping and the learning-rate schedule (warm-up and cosine decay over the run's own planned
layer-tokens, as in the random-LTD paper). Training time counts each run's own steps only: the
steps that compiled a graph count at the run's median step time and the rest of their time is
reported as ``compile_seconds`` (one graph per kept length: ``seq_per_step`` bounds how many), and
evaluation is excluded. Writes a JSON (``--json``) and a PNG of perplexity against steps and time.
"""
import logging
import os

from ms_prune.data import compact_vocabulary, lm_batch_fn, shakespeare_chars, shakespeare_tokens
from ms_prune.engine import Trainer
from ms_prune.engine.recipes import build_algorithms
from ms_prune.training import lm_cross_entropy, lm_perplexity, set_context, write_json

from harness import (FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, TimedRun, mean_ratio, per_seed,
                     plot_time_to_quality, race, resume_from_checkpoints, run_record, sample_cli, section_ranges,
                     time_to_quality)

KEYS = {"data", "model", "seq_len", "batch_size", "steps", "quick_steps", "learning_rate", "min_learning_rate",
        "warmup_fraction", "weight_decay", "random_ltd", "eval_every", "eval_batches", "eval_batches_quick",
        "seeds", "quick_seeds"}
RANGES = {"seq_len": POSITIVE, "batch_size": POSITIVE, "steps": POSITIVE, "quick_steps": POSITIVE,
          "learning_rate": RATE, "min_learning_rate": NON_NEGATIVE, "warmup_fraction": FRACTION,
          "weight_decay": NON_NEGATIVE, "eval_every": POSITIVE, "eval_batches": POSITIVE,
          "eval_batches_quick": POSITIVE, "seeds": NON_NEGATIVE, "quick_seeds": NON_NEGATIVE,
          **section_ranges("model", n_layer=POSITIVE, n_embd=POSITIVE, n_head=POSITIVE, dropout=(0, 1)),
          # layer_ids (default null: the middle layers) are checked against the model by convert_to_random_ltd
          **section_ranges("random_ltd", min_value=POSITIVE, max_value=POSITIVE, seq_per_step=POSITIVE,
                           require_fraction=OPEN_FRACTION, layer_ids=NON_NEGATIVE)}
DATA = ("char", "gpt2")


def timed_run(name, config, seed, steps, data, eval_batches, checkpoints, resume):
    import mindspore as ms
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from ms_prune.token_drop import LayerTokenLR, RandomLTDScheduler

    (train_ids, val_ids), vocab_size = data
    m, seq, batch = config["model"], config["seq_len"], config["batch_size"]
    ms.set_seed(seed)  # both runs of a seed start from the same weights and see the same batches
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size, n_positions=seq, n_embd=m["n_embd"], n_layer=m["n_layer"], n_head=m["n_head"],
        resid_pdrop=m["dropout"], embd_pdrop=m["dropout"], attn_pdrop=m["dropout"]))
    arguments = {k: v for k, v in config["random_ltd"].items() if k != "require_fraction"}
    if name == "baseline":  # the same algorithm keeping every token: same bookkeeping, nothing dropped
        arguments.update(min_value=seq, max_value=seq)
    require_steps = max(1, int(config["random_ltd"]["require_fraction"] * steps))
    planner = RandomLTDScheduler(arguments["min_value"], arguments["max_value"], require_steps,
                                 arguments["seq_per_step"], total_layers=m["n_layer"],
                                 ltd_layers=len(arguments["layer_ids"] or range(1, m["n_layer"] - 1)))
    total = planner.planned_layer_tokens(steps, batch, seq)
    lr = LayerTokenLR(config["learning_rate"], total, int(config["warmup_fraction"] * total),
                      config["min_learning_rate"])
    (ltd,) = build_algorithms({"random_ltd": dict(arguments, require_steps=require_steps, lr_schedule=lr)})
    trainer = Trainer(model, lm_cross_entropy, lm_batch_fn(train_ids, batch, seq, seed), max_steps=steps,
                      algorithms=[ltd], lr=config["learning_rate"], weight_decay=config["weight_decay"],
                      log_interval=0, checkpoint_dir=checkpoints, checkpoint_interval=config["eval_every"], seed=seed,
                      resume_from=resume_from_checkpoints(checkpoints, resume))
    run = TimedRun(name, trainer, lambda t: lm_perplexity(t.state.model, val_ids, batch, seq, eval_batches),
                   os.path.join(checkpoints, "curve.json"))
    run.scheduler = ltd.scheduler
    return run


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "quick_steps steps, quick_seeds (under 15 minutes on CPU)",
                              argv, ranges=RANGES, extra_arguments=[("--resume", dict(
                                  action="store_true", help="continue from the last checkpoints"))])
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    if config["random_ltd"]["max_value"] != config["seq_len"]:
        raise ValueError("random_ltd.max_value must equal seq_len (all tokens kept at the end of the schedule)")
    if config["data"] not in DATA:
        raise ValueError(f"{args.config}: data must be one of {DATA}, got {config['data']!r}")

    seeds = config["quick_seeds"] if args.quick else config["seeds"]
    set_context("graph", args.device_target, seed=seeds[0])
    steps = config["quick_steps"] if args.quick else config["steps"]
    eval_batches = config["eval_batches_quick"] if args.quick else config["eval_batches"]
    if config["data"] == "char":
        streams, chars = shakespeare_chars()
        data = (streams, len(chars))
    else:
        data = compact_vocabulary(*shakespeare_tokens())
    (train_ids, val_ids), vocab_size = data
    print(f"tiny Shakespeare ({config['data']}): {len(train_ids):,} train / {len(val_ids):,} val tokens, "
          f"{vocab_size} ids; {steps} steps of {config['batch_size']} x {config['seq_len']} per run, "
          f"seeds {seeds}", flush=True)

    work = os.path.join(os.path.dirname(os.path.abspath(args.json)),
                        os.path.splitext(os.path.basename(args.json))[0] + "_checkpoints")
    comparisons, records = [], []
    for seed in seeds:
        pair = [timed_run(name, config, seed, steps, data, eval_batches,
                          os.path.join(work, f"{name}_seed{seed}"), args.resume) for name in ("baseline", "random_ltd")]
        race(pair, steps, config["eval_every"], log=lambda line: print(f"seed {seed} {line}", flush=True))
        base, ltd = pair
        comparison = dict(time_to_quality(base, ltd), seed=seed,
                          layer_tokens_saved=1 - ltd.scheduler.consumed_layer_tokens / base.scheduler.consumed_layer_tokens,
                          time_per_step_ratio=ltd.median_step_seconds / base.median_step_seconds)
        comparisons.append(comparison)
        for run in pair:
            record = dict(run_record(run), seed=seed, label=f"{run.name} (seed {seed})",
                          layer_tokens=run.scheduler.consumed_layer_tokens,
                          kept_lengths=run.scheduler.distinct_lengths(steps),
                          compilations=run.trainer.compilations)
            records.append(record)
        ratio = comparison["time_to_baseline_quality"]
        print(f"seed {seed}: final perplexity baseline {base.curve[-1][2]:.3f}, random-LTD {ltd.curve[-1][2]:.3f}; "
              f"{100 * comparison['layer_tokens_saved']:.1f}% fewer layer-tokens, time per step x"
              f"{comparison['time_per_step_ratio']:.3f}; time to the baseline's final perplexity: "
              + (f"x{ratio:.3f} of the baseline's" if ratio is not None else "not reached")
              + f"; compile {base.compile_seconds:.1f} s (baseline) / {ltd.compile_seconds:.1f} s (random-LTD, "
              f"{ltd.trainer.compilations} graphs)", flush=True)

    ratios = [c["time_to_baseline_quality"] for c in comparisons]
    mean = mean_ratio(ratios)
    result = {
        "config": config, "quick": args.quick, "steps": steps, "device": args.device_target, "mode": "GRAPH_MODE",
        "vocab_size": vocab_size, "seeds": seeds, "quality": "validation perplexity (lower is better)",
        "time_to_baseline_quality": {"per_seed": ratios, "mean": mean},
        **per_seed(records, ("baseline", "random_ltd")),
        "comparisons": comparisons, "runs": records,
        "goal_met": mean is not None and mean <= 0.8,
    }
    png = os.path.splitext(args.json)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    result["plot"] = plot_time_to_quality(records, png, "validation perplexity",
                                          f"GPT-2 {config['model']['n_layer']}x{config['model']['n_embd']} on tiny "
                                          f"Shakespeare ({config['data']}): baseline vs random-LTD")
    print("time to the baseline's final perplexity (random-LTD / baseline): "
          + ", ".join("not reached" if r is None else f"{r:.3f}" for r in ratios)
          + f"; goal (<= 0.8 on average over the seeds) {'met' if result['goal_met'] else 'NOT met'}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
