"""What data parallelism, gradient accumulation and each precision cost per Trainer step.

    python benchmarks/data_parallel.py --quick --json results/data_parallel.json

A small GPT-2 trains through ``ms_prune.engine.Trainer`` (GRAPH_MODE) at one global batch:

* ``precision`` (fp16, bf16 vs fp32): each precision that runs on this back-end, timed
  interleaved with fp32 in this process (``compare_latency``); one that cannot run is reported
  with the Trainer's reason;
* ``grad_accumulation`` (k = 2, 4 vs 1): k micro-batches of B/k rows per update, interleaved
  with k = 1 on the whole batch;
* ``data_parallel`` (2 workers vs 1 process): the same run under ``msrun`` (two processes, each
  half of every global batch), timed in the workers, against the 1-process fp32 time of this run.

Every number is a ratio of medians of seconds per update measured within one run of this
script (compilation excluded), so machine load hits both sides alike. On a CPU machine with
two cores, two workers share the cores that one process already uses: data parallel here shows
correctness and the cost of the collectives, not a speed-up.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from mindspore import ops

from ms_prune.benchmarking import compare_latency
from ms_prune.training import set_context, under_msrun, write_json

CPU_NOTE = ("data parallel on a CPU machine: the workers share the machine's cores, so 2 workers are for "
            "correctness (gradients averaged in the step), not speed; expect a ratio above 1")


def lm_loss(logits, labels):  # module-level, with ops imported at the top: graph mode parses it
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def make_trainer(args, micro_batch, **options):
    """A Trainer of a fresh GPT-2 whose batches are ``micro_batch`` rows of one fixed global set."""
    import mindspore as ms
    from ms_prune.engine import Trainer
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.seq_len, n_embd=args.hidden,
                        n_layer=args.layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = np.random.default_rng(0).integers(0, args.vocab_size, (16 * args.batch_size, args.seq_len + 1))
    ids = ids.astype(np.int32)

    def batch(index):
        rows = ids[(index * micro_batch) % len(ids):][:micro_batch]
        return rows[:, :-1], rows[:, 1:]

    ms.set_seed(0)
    return Trainer(GPT2LMHeadModel(config), lm_loss, batch, max_steps=1, lr=1e-4, log_interval=0, **options)


def chunked(trainer, chunk):
    """A zero-argument callable that trains ``chunk`` more updates (what ``compare_latency`` times)."""
    from mindspore import Tensor

    def run():
        trainer.max_steps = trainer.state.step + chunk
        trainer.fit()
        return Tensor(trainer.state.loss)
    return run


def worker(args):
    """One msrun worker: the fp32 run on this worker's half of each global batch, timed alone."""
    from mindspore.communication import get_rank, init
    set_context("graph", args.device_target, seed=0)
    init()
    trainer = make_trainer(args, args.batch_size)  # the global batch: the Trainer gives each worker half
    seconds = compare_latency({"dp": chunked(trainer, args.chunk)}, repeats=args.rounds, warmup=1)["dp"]
    if get_rank() == 0:
        with open(args.worker_json, "w", encoding="utf-8") as f:
            json.dump({"seconds_per_step": seconds / args.chunk, "workers": trainer.state.world_size}, f)


def two_workers(args, script_args):
    """Seconds per step of the 2-worker run (msrun), or (None, why it could not run)."""
    # msrun starts the workers with the `python` on PATH: this one's
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    msrun = shutil.which("msrun", path=path)
    if msrun is None:
        return None, "msrun (MindSpore's launcher) is not installed next to this Python"
    folder = tempfile.mkdtemp(prefix="ms_prune_dp_bench_")
    out = os.path.join(folder, "worker.json")
    port = 20000 + os.getpid() % 20000
    command = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={port}", "--join=True",
               f"--log_dir={os.path.join(folder, 'logs')}", os.path.abspath(__file__), *script_args,
               "--worker_json", out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=dict(os.environ, PATH=path))
    if result.returncode != 0 or not os.path.isfile(out):
        return None, f"msrun failed (exit {result.returncode}); logs in {folder}"
    with open(out, encoding="utf-8") as f:
        seconds = json.load(f)["seconds_per_step"]
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds (a few minutes on CPU)")
    parser.add_argument("--layers", type=int, default=None, help="GPT-2 layers (default 4, --quick 2)")
    parser.add_argument("--hidden", type=int, default=None, help="GPT-2 width (default 256, --quick 128)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 128, --quick 64)")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch (rows per update)")
    parser.add_argument("--vocab_size", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--chunk", type=int, default=3, help="updates per timed call")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per candidate (default 10, --quick 4)")
    parser.add_argument("--device_target", default="CPU", help="CPU, GPU or Ascend")
    parser.add_argument("--json", default="results/data_parallel.json", help="where the result goes")
    parser.add_argument("--worker_json", default=None, help=argparse.SUPPRESS)  # set for the msrun workers
    args = parser.parse_args(argv)
    for name, full, quick in (("layers", 4, 2), ("hidden", 256, 128), ("seq_len", 128, 64), ("rounds", 10, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.batch_size % 4:
        parser.error(f"--batch_size must divide by 4 (k=4 micro-batches, 2 workers), got {args.batch_size}")
    if under_msrun():
        return worker(args)

    set_context("graph", args.device_target, seed=0)
    import mindspore as ms
    runs = {"fp32": make_trainer(args, args.batch_size)}
    skipped = {}
    for precision in ("fp16", "bf16"):
        try:
            runs[precision] = make_trainer(args, args.batch_size, precision=precision)
        except RuntimeError as error:  # the Trainer names the operator and the back-end
            skipped[precision] = str(error)
    for k in (2, 4):
        runs[f"k{k}"] = make_trainer(args, args.batch_size // k, grad_accumulation=k)
    times = compare_latency({name: chunked(trainer, args.chunk) for name, trainer in runs.items()},
                            repeats=args.rounds, warmup=1)
    per_step = {name: seconds / args.chunk for name, seconds in times.items()}

    script_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    script_args = [a for i, a in enumerate(script_args) if a != "--json" and (i == 0 or script_args[i - 1] != "--json")]
    dp_seconds, dp_problem = two_workers(args, script_args)
    backend = ms.get_context("device_target")
    result = {
        "seconds_per_step": dict(per_step, data_parallel_2_workers=dp_seconds),
        "precision_ratio_vs_fp32": {p: per_step[p] / per_step["fp32"] for p in ("fp16", "bf16") if p in per_step},
        "precision_not_run": skipped,
        "grad_accumulation_ratio_vs_k1": {f"k={k}": per_step[f"k{k}"] / per_step["fp32"] for k in (2, 4)},
        "data_parallel_ratio_2_workers_vs_1_process": None if dp_seconds is None else dp_seconds / per_step["fp32"],
        "data_parallel_not_run": dp_problem,
        "note": CPU_NOTE if backend == "CPU" else "",
        "device_target": backend, "cpu_count": os.cpu_count(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker_json")},
    }
    for name, ratio in list(result["precision_ratio_vs_fp32"].items()) + list(
            result["grad_accumulation_ratio_vs_k1"].items()):
        print(f"{name}: {ratio:.2f}x the fp32 k=1 step time")
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")
    if dp_seconds is not None:
        print(f"2 workers: {result['data_parallel_ratio_2_workers_vs_1_process']:.2f}x the 1-process step time")
    else:
        print(f"2 workers: not run ({dp_problem})")
    if result["note"]:
        print(result["note"])
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
