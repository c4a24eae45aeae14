"""GradNAS on a real pretrained BERT: all-MiniLM-L6-v2 (6 layers x 12 heads x 1536 FFN neurons) on SST-2.

1. fine-tune MiniLM + a new classifier on SST-2 train (cached under ~/.cache/ms_prune, keyed by
   the fine-tune settings, so later runs and samples/lrp_bert_sst2.py reuse it);
2. score every head and FFN neuron once (squared mask gradients over N training batches; the
   scoring pass is timed);
3. per FLOPs budget (at ``seq_len`` tokens) and method, prune a copy: gradnas_bisect (ModelOpt's
   selector), gradnas_global (Kwon et al.'s), gradnas_global_refit (with the least-squares refit),
   magnitude and random (their own scores, same budget and global selector, and the same number of
   heads as gradnas_global keeps at that budget: their head and neuron scores are on different
   scales, so left to choose the split they kept almost no heads); evaluate, fine-tune briefly,
   evaluate again;
4. the fair baseline: the unpruned model trained as many extra steps as every pruned model;
5. SST-2 accuracy (the 872-sentence GLUE dev set = ``read_sst2('test')``), FLOPs, parameters and
   GRAPH_MODE latency ratios into a JSON file (written after every phase) and a PNG figure.

    python samples/gradnas_bert_sst2.py --quick        # CPU, GRAPH_MODE, < 15 minutes
    python samples/gradnas_bert_sst2.py                 # the full schedule (~1 h 50 min on 2 CPU cores)
    python samples/gradnas_bert_sst2.py --resume        # go on with an interrupted run (its --json)

``--resume`` keeps what an interrupted run with the same settings finished: the fine-tune (from its
last checkpoint), the fair baseline, the scores (saved beside the JSON) and every (budget, method)
already in the JSON; so the full schedule can be run in parts.
"""
import logging
import os
import tempfile
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ms_prune.benchmarking import compare_latency
from ms_prune.data import row_batch_fn
from ms_prune.engine.trainer import ModelLoss
from ms_prune.training import classification_accuracy, release_graph_memory, set_context, write_json

from harness import (NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, cross_entropy, fine_tuned_model, freeze,
                     interrupted_run, sample_cli, section_ranges, sst2_rows, train_phase)

KEYS = {"max_len", "buckets", "batch_size", "eval_batch_size", "freeze_word_embeddings", "finetune", "scoring",
        "seq_len", "budgets", "quick_budgets", "methods", "recovery", "latency", "log_every", "seed"}
SCHEDULE = dict(steps=POSITIVE, quick_steps=POSITIVE, lr=RATE, weight_decay=NON_NEGATIVE)
RANGES = {"max_len": (1, 512), "buckets": (1, 512), "batch_size": POSITIVE, "eval_batch_size": POSITIVE,
          "seq_len": (1, 512), "budgets": OPEN_FRACTION, "quick_budgets": OPEN_FRACTION, "log_every": POSITIVE,
          "seed": NON_NEGATIVE, **section_ranges("finetune", **SCHEDULE), **section_ranges("recovery", **SCHEDULE),
          **section_ranges("scoring", batches=POSITIVE, quick_batches=POSITIVE, refit_batches=POSITIVE,
                           quick_refit_batches=POSITIVE),
          **section_ranges("latency", batch_size=POSITIVE, seq_len=(1, 512), repeats=POSITIVE, quick_repeats=POSITIVE)}
METHODS = {  # name -> (score method, selector, refit)
    "gradnas_bisect": ("fisher", "bisect", False),
    "gradnas_global": ("fisher", "global", False),
    "gradnas_global_refit": ("fisher", "global", True),
    "magnitude": ("magnitude", "global", False),
    "random": ("random", "global", False),
}


def check_config(path, config):
    if max(config["buckets"]) < config["max_len"]:
        raise ValueError(f"{path}: the largest bucket must hold max_len={config['max_len']} tokens")
    for key in ("budgets", "quick_budgets"):
        if not config[key] or not all(0 < b <= 1 for b in config[key]):
            raise ValueError(f"{path}: {key} must be FLOPs fractions in (0, 1], got {config[key]}")
    unknown = [m for m in config["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"{path}: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    return config


def unpadded_batches(rows, labels, batch_size, count, rng, min_len=12):
    """Batches of sentences that all have the same length (the most frequent one of at least
    ``min_len`` tokens), so nothing is padded: the refit reconstructs every token's output and
    padding tokens would count like words. One length: one compiled graph."""
    lengths = np.array([len(r) for r in rows])
    values, counts = np.unique(lengths[lengths >= min_len], return_counts=True)
    length = int(values[np.argmax(counts)])
    members = np.flatnonzero(lengths == length)
    batches = []
    for _ in range(count):
        pick = rng.choice(members, batch_size, replace=len(members) < batch_size)
        ids = np.array([rows[i] for i in pick], np.int32)
        batches.append((ids, np.ones_like(ids), labels[pick]))
    return batches


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "short schedules, one budget (< 15 min on CPU)", argv,
                              [("--png", dict(default=None, help="figure path (None: the JSON path with .png)")),
                               ("--model_dir", dict(default=None, help="a Hugging Face-layout BERT folder with "
                                                    "tokenizer.json (None: all-MiniLM-L6-v2 from "
                                                    "ms_prune.hub.minilm_dir())")),
                               ("--resume", dict(action="store_true", help="keep what an interrupted run with these "
                                                 "settings finished (its --json)"))],
                              ranges=RANGES)
    check_config(args.config, config)
    previous = interrupted_run(args.json, config, args.quick) if args.resume else None
    done = {b["flops_target"]: b for b in previous["budgets"]} if previous else {}
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    set_context("graph", args.device_target, seed=config["seed"])

    from ms_prune.gradnas import GradNASScores, apply_gradnas, compute_scores
    from ms_prune.hub import minilm_dir
    from ms_prune.models.bert import BertForSequenceClassification

    quick = args.quick
    pick = lambda section, key="steps": section[f"quick_{key}"] if quick else section[key]  # noqa: E731
    buckets, log_every, seq_len = sorted(config["buckets"]), config["log_every"], config["seq_len"]
    t0 = time.time()
    base_dir = args.model_dir or minilm_dir()
    (train_rows, train_labels), (test_rows, test_labels) = sst2_rows(base_dir, config["max_len"])
    print(f"SST-2: {len(train_rows)} train / {len(test_rows)} test sentences", flush=True)
    batches = row_batch_fn(train_rows, train_labels, config["batch_size"], buckets, config["seed"])
    first_step = pick(config["finetune"])  # every recovery (and the fair baseline) sees the same batches after it
    evaluate = lambda m: classification_accuracy(  # noqa: E731
        m, test_rows, test_labels, config["eval_batch_size"], buckets)

    folder, trained_now = fine_tuned_model(config, quick, batches, log_every, args.resume, args.model_dir)
    model = BertForSequenceClassification.from_pretrained(folder)
    model.set_train(False)
    base_accuracy = evaluate(model)
    print(f"fine-tuned MiniLM: SST-2 accuracy {base_accuracy:.2f}% ({time.time() - t0:.0f} s)", flush=True)
    rec = config["recovery"]
    result = {"config": config, "quick": quick, "device": args.device_target, "mode": "GRAPH_MODE",
              "model": f"{os.path.basename(base_dir.rstrip(os.sep))} + classifier",
              "eval_set": "SST-2 GLUE dev (872)",
              "finetuned_model": folder, "finetuned_now": trained_now, "baseline_accuracy": base_accuracy,
              "seq_len": seq_len, "budgets": [], "complete": False}
    png = args.png or os.path.splitext(args.json)[0] + ".png"

    def save_progress():
        result["seconds"] = time.time() - t0
        write_json(args.json, result)
        if result["budgets"]:
            plot(result, png)

    # the fair baseline: unpruned, trained as many extra steps as every pruned model
    if previous and "baseline_accuracy_finetuned" in previous:
        result["baseline_accuracy_finetuned"] = previous["baseline_accuracy_finetuned"]
    else:
        same_steps = BertForSequenceClassification.from_pretrained(folder)
        freeze(same_steps, config["freeze_word_embeddings"])
        train_phase(same_steps, cross_entropy, batches, first_step, pick(rec), rec["lr"], rec["weight_decay"],
                    log_every, tempfile.mkdtemp(), False, warmup=True)
        result["baseline_accuracy_finetuned"] = evaluate(same_steps)
        del same_steps
        release_graph_memory()
    print(f"fair baseline (+{pick(rec)} steps, unpruned): {result['baseline_accuracy_finetuned']:.2f}%", flush=True)
    save_progress()

    refit_batches = unpadded_batches(train_rows, train_labels, config["batch_size"],
                                     pick(config["scoring"], "refit_batches"), np.random.default_rng(config["seed"] + 2))
    scores_path = os.path.splitext(args.json)[0] + "_scores.json"
    score_count = pick(config["scoring"], "batches")
    if previous and "score_seconds" in previous and os.path.isfile(scores_path):
        fisher = GradNASScores.load(scores_path)
        fisher.check_matches(model, scores_path)
        result["score_seconds"] = previous["score_seconds"]
    else:  # one scoring pass (fixed shape: max_len tokens, one graph); reused for every budget
        scoring = row_batch_fn(train_rows, train_labels, config["batch_size"], [config["max_len"]],
                               config["seed"] + 1)
        score_batches = [scoring(i) for i in range(score_count)]
        start = time.time()
        fisher = compute_scores(model, ModelLoss(model, cross_entropy, -1), score_batches)
        result["score_seconds"] = time.time() - start
        fisher.save(scores_path)
    result["scores_file"] = scores_path
    result["score_batches"] = score_count
    result["refit_tokens"] = int(sum(b[0].size for b in refit_batches))
    release_graph_memory()
    print(f"scored {sum(model.heads_per_layer())} heads and {sum(len(n) for n in fisher.neurons)} neurons on {score_count} batches "
          f"of {config['batch_size']}x{config['max_len']} in {result['score_seconds']:.1f} s", flush=True)
    scores = {"fisher": fisher, "magnitude": compute_scores(model, method="magnitude"),
              "random": compute_scores(model, method="random", seed=config["seed"])}

    lat = config["latency"]
    lat_ids = Tensor(np.random.default_rng(1).integers(1000, 20000, (lat["batch_size"], lat["seq_len"])), ms.int32)
    lat_mask = Tensor(np.ones((lat["batch_size"], lat["seq_len"]), np.int32))
    for target in pick(config, "budgets"):
        entry = done.get(target) or {"flops_target": target, "accuracy": {}, "accuracy_finetuned": {}, "ratios": {},
                                     "heads_per_layer": {}, "neurons_per_layer": {}}
        result["budgets"].append(entry)
        constraints = {"flops": f"{100 * target:g}%"}
        # the baselines keep as many heads as GradNAS's global selection does (the same head/neuron
        # split of the budget): selection only, on a throwaway copy
        split = apply_gradnas(BertForSequenceClassification.from_pretrained(folder), constraints=constraints,
                              selector="global", seq_len=seq_len, scores=fisher)["heads_kept"]
        entry["baseline_heads_kept"] = split
        for name in config["methods"]:
            if name in entry["accuracy_finetuned"]:
                print(f"FLOPs {100 * target:g}% {name}: kept from the interrupted run", flush=True)
                continue
            method, selector, refit = METHODS[name]
            candidate = BertForSequenceClassification.from_pretrained(folder)
            outcome = apply_gradnas(candidate, ModelLoss(candidate, cross_entropy, -1), refit_batches,
                                    constraints=constraints, selector=selector, seq_len=seq_len, refit=refit,
                                    scores=scores[method], heads_kept=None if method == "fisher" else split)
            candidate.set_train(False)
            if refit:
                entry.setdefault("refit_error", {})[name] = outcome["refit"]
                print(f"FLOPs {100 * target:g}% {name}: relative reconstruction error per layer (refit tokens), heads "
                      + ", ".join(f"{a:.3f}->{b:.3f}" for a, b in zip(outcome["refit"]["head_error"],
                                                                     outcome["refit"]["head_error_refit"]))
                      + "; neurons " + ", ".join(f"{a:.3f}->{b:.3f}" for a, b in zip(
                          outcome["refit"]["neuron_error"], outcome["refit"]["neuron_error_refit"])), flush=True)
            entry["accuracy"][name] = evaluate(candidate)
            entry["ratios"][name] = outcome["ratios"]
            entry["heads_per_layer"][name] = outcome["heads_per_layer"]
            entry["neurons_per_layer"][name] = outcome["neurons_per_layer"]
            if name == "gradnas_global":
                entry["flops_ratio"], entry["params_ratio"] = outcome["ratios"]["flops"], outcome["ratios"]["params"]
                times = compare_latency({"unpruned": lambda: model(lat_ids, lat_mask),
                                         "pruned": lambda: candidate(lat_ids, lat_mask)},
                                        repeats=pick(lat, "repeats"))
                entry["latency_ratio"] = times["pruned"] / times["unpruned"]
            freeze(candidate, config["freeze_word_embeddings"])
            train_phase(candidate, cross_entropy, batches, first_step, pick(rec), rec["lr"], rec["weight_decay"],
                        log_every, tempfile.mkdtemp(), False, warmup=True)
            entry["accuracy_finetuned"][name] = evaluate(candidate)
            del candidate
            release_graph_memory()
            print(f"FLOPs {100 * target:g}% {name}: flops x{outcome['ratios']['flops']:.3f}, params "
                  f"x{outcome['ratios']['params']:.3f}, heads {sum(outcome['heads_per_layer'])}/{sum(model.heads_per_layer())}, neurons "
                  f"{sum(outcome['neurons_per_layer'])}/{sum(model.neurons_per_layer())}: accuracy {entry['accuracy'][name]:.2f}% pruned, "
                  f"{entry['accuracy_finetuned'][name]:.2f}% after {pick(rec)} steps ({time.time() - t0:.0f} s)",
                  flush=True)
            save_progress()
        print(f"FLOPs {100 * target:g}%: GRAPH_MODE latency ratio (gradnas_global, batch {lat['batch_size']}x"
              f"{lat['seq_len']}) {entry.get('latency_ratio', float('nan')):.3f}", flush=True)
    result["complete"] = True
    save_progress()
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    methods = result["config"]["methods"]
    fair = result.get("baseline_accuracy_finetuned")
    for ax, key, title in ((axes[0], "accuracy", "after pruning"),
                           (axes[1], "accuracy_finetuned", "after a short fine-tune")):
        for name in methods:
            points = sorted((b["ratios"][name]["flops"], b[key][name]) for b in result["budgets"] if name in b[key])
            if points:
                ax.plot(*zip(*points), "o-", label=name)
        ax.axhline(result["baseline_accuracy"], color="gray", linestyle="--", label="unpruned")
        if key == "accuracy_finetuned" and fair is not None:
            ax.axhline(fair, color="gray", linestyle=":", label="unpruned + the same steps")
        ax.set_xlabel(f"FLOPs ratio (at {result['seq_len']} tokens)")
        ax.set_ylabel("SST-2 accuracy (%)")
        ax.set_title(f"MiniLM, {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
