"""LRP head pruning of a small GPT-2 trained on tiny Shakespeare with the real GPT-2 BPE.

Train the model, then train it on with the LRP algorithm (a Hard-Concrete gate on every head; a
Lagrangian term brings the expected number of open heads to the recipe's ``target_fraction``),
which prunes the closed heads for real at the end; fine-tune briefly, and report validation
perplexity before and after. Every phase runs on ``ms_prune.engine.Trainer`` and checkpoints;
``--resume`` continues an interrupted run from its last checkpoints. The pruned
model trains for more steps than the first model did, so a copy of that model, unpruned, trains
for the same extra steps at the same learning rates: the fair baseline the pruned model is
compared with.

    python samples/lrp_gpt_shakespeare.py --quick            # CPU, GRAPH_MODE, < 15 minutes
    python samples/lrp_gpt_shakespeare.py --quick --resume   # continue an interrupted run
    python samples/lrp_gpt_shakespeare.py --device_target GPU

Tokens are GPT-2 BPE, re-numbered to the ids tiny Shakespeare uses (``compact_vocabulary``) so
that the LM head does not dominate a small model.
"""
import logging
import os
import tempfile
import time

import mindspore as ms

from ms_prune.data import compact_vocabulary, lm_batch_fn, shakespeare_tokens
from ms_prune.engine.recipes import build_algorithms
from ms_prune.training import lm_cross_entropy, lm_perplexity, set_context, write_json

from harness import FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, sample_cli, section_ranges, train_phase

KEYS = {"model", "seq_len", "batch_size", "train", "gates", "recovery", "eval_batches",
        "eval_batches_quick", "log_every", "seed"}
SCHEDULE = dict(steps=POSITIVE, quick_steps=POSITIVE, lr=RATE)
RANGES = {"seq_len": POSITIVE, "batch_size": POSITIVE, "eval_batches": POSITIVE,
          "eval_batches_quick": POSITIVE, "log_every": POSITIVE, "seed": NON_NEGATIVE,
          **section_ranges("model", n_layer=POSITIVE, n_embd=POSITIVE, n_head=POSITIVE, dropout=(0, 1)),
          **section_ranges("train", weight_decay=NON_NEGATIVE, **SCHEDULE),
          **section_ranges("recovery", weight_decay=NON_NEGATIVE, **SCHEDULE),
          **section_ranges("gates", warmup_fraction=FRACTION, **SCHEDULE),
          **section_ranges("gates.algorithms.lrp", target_fraction=OPEN_FRACTION, gate_lr=RATE, lagrangian_lr=RATE)}


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "short schedules (< 15 minutes on CPU)", argv, ranges=RANGES,
                              extra_arguments=[("--resume", dict(action="store_true",
                                                                 help="continue from the last checkpoints"))])
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    set_context("graph", args.device_target, seed=config["seed"])
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    work = os.path.join(os.path.dirname(os.path.abspath(args.json)), "lrp_gpt_shakespeare_checkpoints")
    phase = lambda name: os.path.join(work, name + ("_quick" if args.quick else ""))  # noqa: E731

    quick = args.quick
    pick = lambda section: section["quick_steps"] if quick else section["steps"]  # noqa: E731
    seq, batch, log_every = config["seq_len"], config["batch_size"], config["log_every"]
    eval_batches = config["eval_batches_quick"] if quick else config["eval_batches"]
    t0 = time.time()
    (train_ids, val_ids), vocab_size = compact_vocabulary(*shakespeare_tokens())
    print(f"tiny Shakespeare: {len(train_ids):,} train / {len(val_ids):,} val GPT-2 BPE tokens, {vocab_size} ids",
          flush=True)
    batches = lm_batch_fn(train_ids, batch, seq, config["seed"])
    ppl = lambda m: lm_perplexity(m, val_ids, batch, seq, eval_batches)  # noqa: E731

    m = config["model"]
    ms.set_seed(config["seed"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=seq, n_embd=m["n_embd"],
                                       n_layer=m["n_layer"], n_head=m["n_head"], resid_pdrop=m["dropout"],
                                       embd_pdrop=m["dropout"], attn_pdrop=m["dropout"]))
    tr = config["train"]
    print(f"training GPT-2 ({m['n_layer']} layers x {m['n_head']} heads, d={m['n_embd']}) for {pick(tr)} steps "
          f"of {batch} x {seq}", flush=True)
    train_phase(model, lm_cross_entropy, batches, 0, pick(tr), tr["lr"], tr["weight_decay"], log_every, phase("train"),
                args.resume)
    base = {"perplexity": ppl(model), "heads": sum(model.heads_per_layer()), "parameters": model.num_parameters(),
            "flops": model.forward_flops(seq)}
    print(f"trained model: validation perplexity {base['perplexity']:.2f} ({time.time() - t0:.0f} s)", flush=True)

    g, rec = config["gates"], config["recovery"]
    # the fair baseline: unpruned, trained as many more steps as the pruned model will be, at the
    # gated phase's and the recovery's learning rates
    copy = tempfile.mkdtemp(prefix="lrp_gpt_shakespeare_")
    model.save_pretrained(copy)
    same_steps = GPT2LMHeadModel.from_pretrained(copy)
    train_phase(same_steps, lm_cross_entropy, batches, pick(tr), pick(g), g["lr"], rec["weight_decay"], log_every,
                phase("baseline_gates"), args.resume)
    train_phase(same_steps, lm_cross_entropy, batches, pick(tr) + pick(g), pick(rec), rec["lr"], rec["weight_decay"],
                log_every, phase("baseline_recovery"), args.resume)
    base["perplexity_same_steps"] = ppl(same_steps)
    reference = min(base["perplexity"], base["perplexity_same_steps"])
    del same_steps
    print(f"fair baseline (unpruned, {pick(g) + pick(rec)} more steps): validation perplexity "
          f"{base['perplexity_same_steps']:.2f}; the pruned model is compared with the better one, {reference:.2f} "
          f"({time.time() - t0:.0f} s)", flush=True)

    heads_before = sum(model.heads_per_layer())
    algorithms = build_algorithms(g["algorithms"], path="gates.algorithms",
                                  lrp={"warmup_steps": int(g["warmup_fraction"] * pick(g))})
    lrp = algorithms[0]
    print(f"LRP {lrp}: training gates for {pick(g)} steps, pruning at the end", flush=True)
    gates = train_phase(model, lm_cross_entropy, batches, pick(tr), pick(g), g["lr"], rec["weight_decay"], log_every,
                        phase("gates"), args.resume, algorithms)
    history = [(r["step"], r["loss"]) for r in gates]
    pruned = model
    pruned_ppl = ppl(pruned)
    print(f"  pruned (before recovery) {pruned_ppl:.2f}, heads per layer {pruned.heads_per_layer()}", flush=True)
    train_phase(pruned, lm_cross_entropy, batches, pick(tr) + pick(g), pick(rec), rec["lr"], rec["weight_decay"],
                log_every, phase("recovery"), args.resume)
    final_ppl = ppl(pruned)
    run = {"target_heads": lrp.target, "heads": sum(pruned.heads_per_layer()),
           "heads_per_layer": pruned.heads_per_layer(), "pruned_heads": pruned.config.pruned_heads,
           "perplexity_pruned": pruned_ppl,
           "perplexity_after_recovery": final_ppl, "perplexity_change": final_ppl / reference - 1,
           "parameters": pruned.num_parameters(),
           "flops": pruned.forward_flops(seq), "gate_phase_losses": history}
    print(f"kept {run['heads']}/{heads_before} heads: validation perplexity {reference:.2f} (best baseline) -> "
          f"{final_ppl:.2f} ({100 * run['perplexity_change']:+.1f}%); parameters "
          f"{base['parameters']:,} -> {run['parameters']:,}; FLOPs/sequence {base['flops'] / 1e9:.3f}G -> "
          f"{run['flops'] / 1e9:.3f}G ({time.time() - t0:.0f} s)", flush=True)
    result = {"config": config, "quick": quick, "device": args.device_target, "mode": "GRAPH_MODE",
              "vocab_size": vocab_size, "baseline": base, "run": run, "seconds": time.time() - t0}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
