"""Data-parallel training with ms_prune.engine.Trainer: the same script runs alone or as N
workers under MindSpore's ``msrun``, and gives the same losses and weights.

A small character-level GPT-2 trains on tiny Shakespeare with the recipe's algorithms
(progressive layer dropping and LRP head gates by default). Under msrun the script calls
``mindspore.communication.init()``; nothing else changes: the Trainer gives each worker its
contiguous share of every global batch, averages the loss and gradients over the workers inside
the compiled step, draws the algorithms' noise alike on every worker, and lets worker 0 alone
write checkpoints, progress lines and the results file.

    python samples/data_parallel.py --quick
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True --log_dir=results/msrun_logs \\
        samples/data_parallel.py --quick --json results/data_parallel_2_workers.json

The global batch (``batch_size``) must divide by the number of workers.
"""
import logging
import os
import time

import mindspore as ms

from ms_prune.data import lm_batch_fn, shakespeare_chars
from ms_prune.engine import Trainer
from ms_prune.engine.recipes import build_algorithms
from ms_prune.training import lm_cross_entropy, lm_perplexity, set_context, under_msrun, write_json

from harness import NON_NEGATIVE, POSITIVE, RATE, resume_from_checkpoints, sample_cli, section_ranges

KEYS = {"model", "seq_len", "batch_size", "steps", "quick_steps", "lr", "algorithms", "eval_batches",
        "log_every", "seed"}
RANGES = {"seq_len": POSITIVE, "batch_size": POSITIVE, "steps": POSITIVE, "quick_steps": POSITIVE, "lr": RATE,
          "eval_batches": POSITIVE, "log_every": POSITIVE, "seed": NON_NEGATIVE,
          **section_ranges("model", n_layer=POSITIVE, n_embd=POSITIVE, n_head=POSITIVE)}


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "a short run (about a minute on CPU)", argv, ranges=RANGES,
                              extra_arguments=[("--resume", dict(action="store_true",
                                                                 help="continue from the last checkpoint"))])
    set_context("graph", args.device_target, seed=config["seed"])
    rank, workers = 0, 1
    if under_msrun():
        from mindspore.communication import get_group_size, get_rank, init
        init()
        rank, workers = get_rank(), get_group_size()
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="  %(message)s")
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    steps = config["quick_steps"] if args.quick else config["steps"]
    seq, batch = config["seq_len"], config["batch_size"]
    t0 = time.time()
    (train_ids, val_ids), chars = shakespeare_chars()
    m = config["model"]
    ms.set_seed(config["seed"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(chars), n_positions=seq, n_embd=m["n_embd"],
                                       n_layer=m["n_layer"], n_head=m["n_head"], resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    if rank == 0:
        print(f"GPT-2 ({m['n_layer']} layers x {m['n_head']} heads, d={m['n_embd']}), {steps} steps of a global "
              f"batch {batch} x {seq} characters on {workers} worker(s), {batch // workers} rows each", flush=True)
    checkpoints = os.path.join(os.path.dirname(os.path.abspath(args.json)),
                               f"data_parallel_checkpoints_{workers}_workers" + ("_quick" if args.quick else ""))
    # every worker evaluates the same windows (the Trainer averages eval_fn's numbers over them)
    eval_fn = lambda model: {"perplexity": lm_perplexity(model, val_ids, batch, seq, config["eval_batches"])}  # noqa: E731
    resume = "latest" if args.resume and os.path.isfile(os.path.join(checkpoints, "latest")) else None
    if resume is None and rank == 0:
        resume_from_checkpoints(checkpoints, False)  # a fresh run: the old checkpoints go
    trainer = Trainer(model, lm_cross_entropy, lm_batch_fn(train_ids, batch, seq, config["seed"]), max_steps=steps,
                      algorithms=build_algorithms(config["algorithms"]), lr=config["lr"], eval_fn=eval_fn,
                      log_interval=config["log_every"], checkpoint_dir=checkpoints,
                      checkpoint_interval=config["log_every"] * 2, resume_from=resume)
    history = trainer.fit()
    result = {"config": config, "quick": args.quick, "device": args.device_target, "mode": "GRAPH_MODE",
              "workers": workers, "losses": [r["loss"] for r in history], "perplexity": history[-1]["perplexity"],
              "heads_per_layer": model.heads_per_layer(), "seconds": time.time() - t0}
    if rank == 0:
        print(f"final validation perplexity {result['perplexity']:.3f}, heads per layer "
              f"{result['heads_per_layer']} ({result['seconds']:.0f} s)", flush=True)
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
