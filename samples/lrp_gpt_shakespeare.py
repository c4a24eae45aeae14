"""LRP head pruning of a small GPT-2 trained on tiny Shakespeare with the real GPT-2 BPE.

Train the model, copy it with a Hard-Concrete gate on every head, train weights and gates (a
Lagrangian term brings the expected number of open heads to ``target_fraction``), prune the closed
heads for real, fine-tune briefly, and report validation perplexity before and after. The pruned
model trains for more steps than the first model did, so a copy of that model, unpruned, trains
for the same extra steps at the same learning rates: the fair baseline the pruned model is
compared with.

    python samples/lrp_gpt_shakespeare.py --quick            # CPU, GRAPH_MODE, < 15 minutes
    python samples/lrp_gpt_shakespeare.py --device_target GPU

Tokens are GPT-2 BPE, re-numbered to the ids tiny Shakespeare uses (``compact_vocabulary``) so
that the LM head does not dominate a small model.
"""
import os
import sys
import tempfile
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ms_prune.data import compact_vocabulary, lm_batches, shakespeare_tokens  # noqa: E402
from ms_prune.training import (LMLoss, lm_perplexity, make_train_step, sample_cli, set_context,  # noqa: E402
                               write_json, FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, section_ranges)

KEYS = {"model", "seq_len", "batch_size", "train", "gates", "target_fraction", "recovery", "eval_batches",
        "eval_batches_quick", "log_every", "seed"}
SCHEDULE = dict(steps=POSITIVE, quick_steps=POSITIVE, lr=RATE)
RANGES = {"seq_len": POSITIVE, "batch_size": POSITIVE, "target_fraction": OPEN_FRACTION, "eval_batches": POSITIVE,
          "eval_batches_quick": POSITIVE, "log_every": POSITIVE, "seed": NON_NEGATIVE,
          **section_ranges("model", n_layer=POSITIVE, n_embd=POSITIVE, n_head=POSITIVE, dropout=(0, 1)),
          **section_ranges("train", weight_decay=NON_NEGATIVE, **SCHEDULE),
          **section_ranges("recovery", weight_decay=NON_NEGATIVE, **SCHEDULE),
          **section_ranges("gates", warmup_fraction=FRACTION, gate_lr=RATE, lagrangian_lr=RATE, **SCHEDULE)}


def lm_cross_entropy(logits, labels):
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def train(model, batches, steps, lr, weight_decay, log_every, tag):
    model.set_train(True)
    optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=lr, weight_decay=weight_decay)
    step = make_train_step(LMLoss(model), optimizer)
    start, recent = time.time(), []
    for t in range(steps):
        ids, labels = next(batches)
        recent.append(float(step(Tensor(ids, ms.int32), Tensor(labels, ms.int32)).asnumpy()))
        if (t + 1) % log_every == 0 or t + 1 == steps:
            print(f"  [{tag}] step {t + 1}/{steps} loss {np.mean(recent[-log_every:]):.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.set_train(False)


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "short schedules (< 15 minutes on CPU)", argv, ranges=RANGES)
    set_context("graph", args.device_target, seed=config["seed"])
    from ms_prune.heads import HeadPrunerGPTLRP, train_gated
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel

    quick = args.quick
    pick = lambda section: section["quick_steps"] if quick else section["steps"]  # noqa: E731
    seq, batch, log_every = config["seq_len"], config["batch_size"], config["log_every"]
    eval_batches = config["eval_batches_quick"] if quick else config["eval_batches"]
    t0 = time.time()
    (train_ids, val_ids), vocab_size = compact_vocabulary(*shakespeare_tokens())
    print(f"tiny Shakespeare: {len(train_ids):,} train / {len(val_ids):,} val GPT-2 BPE tokens, {vocab_size} ids",
          flush=True)
    batches = lm_batches(train_ids, batch, seq, np.random.default_rng(config["seed"]))
    ppl = lambda m: lm_perplexity(m, val_ids, batch, seq, eval_batches)  # noqa: E731

    m = config["model"]
    ms.set_seed(config["seed"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=seq, n_embd=m["n_embd"],
                                       n_layer=m["n_layer"], n_head=m["n_head"], resid_pdrop=m["dropout"],
                                       embd_pdrop=m["dropout"], attn_pdrop=m["dropout"]))
    tr = config["train"]
    print(f"training GPT-2 ({m['n_layer']} layers x {m['n_head']} heads, d={m['n_embd']}) for {pick(tr)} steps "
          f"of {batch} x {seq}", flush=True)
    train(model, batches, pick(tr), tr["lr"], tr["weight_decay"], log_every, "train")
    base = {"perplexity": ppl(model), "heads": sum(model.heads_per_layer()), "parameters": model.num_parameters(),
            "flops": model.forward_flops(seq)}
    print(f"trained model: validation perplexity {base['perplexity']:.2f} ({time.time() - t0:.0f} s)", flush=True)

    g, rec = config["gates"], config["recovery"]
    # the fair baseline: unpruned, trained as many more steps as the pruned model will be, at the
    # gated phase's and the recovery's learning rates
    work = tempfile.mkdtemp(prefix="lrp_gpt_shakespeare_")
    model.save_pretrained(work)
    same_steps = GPT2LMHeadModel.from_pretrained(work)
    train(same_steps, batches, pick(g), g["lr"], rec["weight_decay"], log_every, "baseline")
    train(same_steps, batches, pick(rec), rec["lr"], rec["weight_decay"], log_every, "baseline")
    base["perplexity_same_steps"] = ppl(same_steps)
    reference = min(base["perplexity"], base["perplexity_same_steps"])
    del same_steps
    print(f"fair baseline (unpruned, {pick(g) + pick(rec)} more steps): validation perplexity "
          f"{base['perplexity_same_steps']:.2f}; the pruned model is compared with the better one, {reference:.2f} "
          f"({time.time() - t0:.0f} s)", flush=True)

    pruner = HeadPrunerGPTLRP(model, target_fraction=config["target_fraction"],
                              warmup_steps=int(g["warmup_fraction"] * pick(g)))
    gated = pruner.decorate_model()
    print(f"target {pruner.target_heads}/{pruner.total_heads} heads: training gates for {pick(g)} steps", flush=True)
    history = train_gated(pruner, gated, lm_cross_entropy, batches, pick(g), g["lr"], g["gate_lr"],
                          g["lagrangian_lr"], log_every=log_every, log=lambda line: print(line, flush=True))
    gated_ppl = ppl(gated)
    pruned = pruner.prune_model(gated)
    pruned_ppl = ppl(pruned)
    print(f"  gated {gated_ppl:.2f}, pruned (before recovery) {pruned_ppl:.2f}, heads per layer "
          f"{pruned.heads_per_layer()}", flush=True)
    train(pruned, batches, pick(rec), rec["lr"], rec["weight_decay"], log_every, "recovery")
    final_ppl = ppl(pruned)
    run = {"target_heads": pruner.target_heads, "heads": sum(pruned.heads_per_layer()),
           "heads_per_layer": pruned.heads_per_layer(), "pruned_heads": pruned.config.pruned_heads,
           "perplexity_gated": gated_ppl, "perplexity_pruned": pruned_ppl,
           "perplexity_after_recovery": final_ppl, "perplexity_change": final_ppl / reference - 1,
           "parameters": pruned.num_parameters(),
           "flops": pruned.forward_flops(seq), "gate_history": history}
    print(f"kept {run['heads']}/{base['heads']} heads: validation perplexity {reference:.2f} (best baseline) -> "
          f"{final_ppl:.2f} ({100 * run['perplexity_change']:+.1f}%); parameters "
          f"{base['parameters']:,} -> {run['parameters']:,}; FLOPs/sequence {base['flops'] / 1e9:.3f}G -> "
          f"{run['flops'] / 1e9:.3f}G ({time.time() - t0:.0f} s)", flush=True)
    result = {"config": config, "quick": quick, "device": args.device_target, "mode": "GRAPH_MODE",
              "vocab_size": vocab_size, "baseline": base, "run": run, "seconds": time.time() - t0}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
