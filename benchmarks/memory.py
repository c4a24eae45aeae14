"""Peak memory of one process that fine-tunes all-MiniLM-L6-v2 on SST-2 with the Trainer, prunes it
with GradNAS to half its FLOPs and evaluates it on the dev set (issue #21, bounded memory).

    python benchmarks/memory.py --quick --json results/memory.json
    python benchmarks/memory.py --quick --no-release --json results/memory_no_release.json

Goal: peak resident memory (VmHWM) <= 4096 MB. Each phase's own peak is measured by resetting
the kernel's high-water mark at its start (/proc/self/clear_refs); ``rss_after_mb`` is what the
process still holds when the phase is over. ``--no-release`` turns off
``ms_prune.training.release_graphs`` (graphs that cannot run again are then kept, as before), so
the two modes give before/after on the same code. --quick: 24 steps on sentences of <= 32 tokens,
4 scoring batches (a few minutes on CPU); the full run uses samples/gradnas_bert_sst2.py's
settings (1200 steps, <= 64 tokens in buckets 16/32/64, 64 scoring batches).
"""
import argparse
import time

from mindspore import ops

from ms_prune import training
from ms_prune.training import classification_accuracy, live_graph_count, set_context, write_json

GOAL_MB = 4096
QUICK = dict(steps=24, max_len=32, buckets=[16, 32], score_batches=4)
FULL = dict(steps=1200, max_len=64, buckets=[16, 32, 64], score_batches=64)


def _status_mb(field):
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak():
    """Start a new high-water mark (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cross_entropy(logits, labels):
    return ops.cross_entropy(logits, labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short schedule and sequences (a few minutes)")
    parser.add_argument("--no-release", action="store_true",
                        help="keep every compiled graph (ms_prune.training.GRAPH_RELEASE off): the 'before' figure")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device_target", default="CPU")
    parser.add_argument("--json", default="results/memory.json")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    training.GRAPH_RELEASE["enabled"] = not args.no_release
    set_context("graph", args.device_target, seed=args.seed)

    from mindspore import nn
    from ms_prune.data import read_sst2, row_batch_fn, token_rows
    from ms_prune.engine import Trainer
    from ms_prune.engine.trainer import ModelLoss
    from ms_prune.gradnas import apply_gradnas
    from ms_prune.hub import minilm_dir
    from ms_prune.models.bert import BertForSequenceClassification

    started = time.time()
    phases = {}
    peaks_are_per_phase = _reset_peak()

    def phase_done(name, **extra):
        phases[name] = dict(peak_mb=_status_mb("VmHWM"), rss_after_mb=_status_mb("VmRSS"),
                            live_graphs=live_graph_count(), seconds=time.time() - started, **extra)
        print(f"{name}: peak {phases[name]['peak_mb']:.0f} MB, {phases[name]['rss_after_mb']:.0f} MB held after, "
              f"{phases[name]['live_graphs']} graphs alive ({phases[name]['seconds']:.0f} s)", flush=True)
        _reset_peak()

    directory = minilm_dir()
    data = {}
    for split in ("train", "test"):
        sentences, labels = read_sst2(split)
        data[split] = (token_rows(directory, sentences, settings["max_len"]), labels)
    model = BertForSequenceClassification.from_pretrained(directory, num_labels=2)
    for name, param in model.parameters_and_names():  # as the sample: 11.7M embedding weights stay
        if name.endswith("embeddings.word_embeddings.weight"):
            param.requires_grad = False
    phase_done("load")

    batches = row_batch_fn(*data["train"], args.batch_size, settings["buckets"], args.seed)

    def adamw(params):
        return nn.AdamWeightDecay(params, learning_rate=args.lr, weight_decay=0.01)
    trainer = Trainer(model, _cross_entropy, batches, max_steps=settings["steps"], optimizer=adamw,
                      warmup_steps=max(1, settings["steps"] // 10), lr_schedule="linear",
                      log_interval=max(10, settings["steps"] // 10))
    trainer.fit()
    del trainer  # a finished phase: its train steps can never run again
    phase_done("finetune")

    accuracy = classification_accuracy(model, *data["test"], args.batch_size, settings["buckets"])
    phase_done("evaluate_finetuned", accuracy=accuracy)

    scoring = row_batch_fn(*data["train"], args.batch_size, [settings["max_len"]], args.seed + 1)
    outcome = apply_gradnas(model, ModelLoss(model, _cross_entropy, -1),
                            [scoring(i) for i in range(settings["score_batches"])], constraints={"flops": "50%"},
                            seq_len=settings["max_len"])
    phase_done("gradnas", flops_ratio=outcome["ratios"]["flops"], params_ratio=outcome["ratios"]["params"])

    accuracy = classification_accuracy(model, *data["test"], args.batch_size, settings["buckets"])
    phase_done("evaluate_pruned", accuracy=accuracy)

    peak = max(p["peak_mb"] for p in phases.values())
    result = {"model": "all-MiniLM-L6-v2 + classifier", "mode": "GRAPH_MODE", "device_target": args.device_target,
              "quick": args.quick, "release": not args.no_release, "settings": dict(settings, batch_size=args.batch_size),
              "phases": phases, "peaks_are_per_phase": peaks_are_per_phase, "final_peak_mb": peak,
              "goal_mb": GOAL_MB, "met": peak <= GOAL_MB, "seconds": time.time() - started}
    print(f"peak {peak:.0f} MB (goal {GOAL_MB} MB: {'met' if result['met'] else 'not met'}), release "
          f"{'on' if result['release'] else 'off'}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
