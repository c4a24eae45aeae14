"""GradNAS head pruning of a real pretrained decoder: SmolLM2-135M-Instruct (Llama architecture,
30 layers x 9 query heads sharing 3 key/value heads, 135M parameters).

1. WikiText-2 valid perplexity (``lm_perplexity``, consecutive windows of ``seq_len`` tokens),
   parameters and forward FLOPs of the unpruned model;
2. score every query head once (squared gradients of a mask of ones on each head, GradNAS) on
   calibration text: tiny Shakespeare's first 90% by default (WikiText-2's training split is not in
   the shared data); the scoring pass is timed;
3. per budget (a fraction of the attention FLOPs to keep: projections and score/context matmuls)
   and method, prune a copy with ``apply_gradnas`` under the matching FLOPs budget of the whole
   model: gradnas_global (Kwon et al.'s selector), gradnas_bisect (ModelOpt's),
   gradnas_global_refit (with the least-squares refit), and the baselines magnitude and random (same
   selector and budget, other scores). A key/value head goes when its whole group of query heads
   does. Heads only (``prune=("heads",)``): the budgets are fractions of the attention FLOPs;
4. perplexity, parameters, FLOPs and heads per layer of every pruned model, and the GRAPH_MODE
   latency of the first method's model against the unpruned one (batch 1, median of repeats,
   timed interleaved in the same run);
5. with ``finetune.steps`` > 0: a short fine-tune of the pruned models on the calibration text on
   the engine's Trainer, and the fair baseline: the unpruned model fine-tuned the same steps;
6. a JSON file (written after every phase) and a PNG figure.

    python samples/llama_smollm2.py --quick          # CPU, GRAPH_MODE, < 15 minutes, no fine-tune
    python samples/llama_smollm2.py                  # all of WikiText-2 valid, two budgets, fine-tune
    python samples/llama_smollm2.py --resume         # continue interrupted fine-tunes from checkpoints
"""
import logging
import os
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ms_prune import cost
from ms_prune.benchmarking import compare_latency
from ms_prune.data import data_path, lm_batch_fn, read_wikitext2, token_encoder
from ms_prune.engine.trainer import ModelLoss
from ms_prune.training import lm_cross_entropy, lm_perplexity, release_graph_memory, set_context, write_json

from harness import NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, sample_cli, section_ranges, train_phase

KEYS = {"seq_len", "calibration", "scoring", "budgets", "quick_budgets", "methods", "quick_methods", "eval_windows",
        "quick_eval_windows", "finetune", "latency", "log_every", "seed"}
RANGES = {"seq_len": POSITIVE, "budgets": OPEN_FRACTION, "quick_budgets": OPEN_FRACTION,
          "eval_windows": NON_NEGATIVE, "quick_eval_windows": NON_NEGATIVE, "log_every": POSITIVE,
          "seed": NON_NEGATIVE,
          **section_ranges("scoring", batches=POSITIVE, quick_batches=POSITIVE, batch_size=POSITIVE),
          **section_ranges("finetune", steps=NON_NEGATIVE, quick_steps=NON_NEGATIVE, batch_size=POSITIVE, lr=RATE,
                           weight_decay=NON_NEGATIVE),
          **section_ranges("latency", repeats=POSITIVE, quick_repeats=POSITIVE)}
METHODS = {  # name -> (score method, selector, refit)
    "gradnas_global": ("fisher", "global", False),
    "gradnas_bisect": ("fisher", "bisect", False),
    "gradnas_global_refit": ("fisher", "global", True),
    "magnitude": ("magnitude", "global", False),
    "random": ("random", "global", False),
}
CALIBRATION = ("tinyshakespeare", "wikitext2_test")


def check_config(path, config):
    for key in ("budgets", "quick_budgets", "methods", "quick_methods"):
        if not config[key]:
            raise ValueError(f"{path}: {key} must not be empty")
    unknown = sorted({m for key in ("methods", "quick_methods", "finetune") for m in
                      (config[key]["methods"] if key == "finetune" else config[key])} - set(METHODS))
    if unknown:
        raise ValueError(f"{path}: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    if config["calibration"] not in CALIBRATION:
        raise ValueError(f"{path}: calibration must be one of {list(CALIBRATION)}, got {config['calibration']!r}")
    return config


def calibration_text(name):
    """The text heads are scored (and models fine-tuned) on; never the evaluation split."""
    if name == "wikitext2_test":
        return read_wikitext2("test")
    with open(data_path("tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    return text[:int(0.9 * len(text))]  # the usual train part (the last 10% is validation)


def attention_flops(model, seq_len):
    """FLOPs of one ``seq_len``-token sequence spent in the attention layers (their projections and
    score/context matmuls), counted as ``forward_flops`` counts them (``ms_prune.cost``)."""
    return sum(cost.layer_flops(attention, attention.heads(), seq_len) for attention in model.attention_layers())


def measure(model, ppl, seq_len):
    """What every row of the result reports about a model."""
    return {"perplexity": ppl(model), "parameters": model.num_parameters(), "flops": model.forward_flops(seq_len),
            "attention_flops": attention_flops(model, seq_len), "heads": sum(model.heads_per_layer()),
            "heads_per_layer": model.heads_per_layer(),
            "kv_heads_per_layer": [len(a.kept_kv_heads) for a in model.attention_layers()]}


def main(argv=None):
    quick_help = "16 evaluation windows, one budget, 8 scoring batches, no fine-tune (< 15 min on CPU)"
    args, config = sample_cli(__file__, __doc__, KEYS, quick_help,
                              argv, [("--png", dict(default=None, help="figure path (None: the JSON path with .png)")),
                                     ("--model_dir", dict(default=None, help="a Hugging Face-layout Llama folder with "
                                                          "tokenizer.json (None: SmolLM2-135M-Instruct from "
                                                          "ms_prune.hub.smollm2_dir())")),
                                     ("--resume", dict(action="store_true",
                                                       help="continue interrupted fine-tunes from their checkpoints"))],
                              ranges=RANGES)
    check_config(args.config, config)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    set_context("graph", args.device_target, seed=config["seed"])

    from ms_prune.gradnas import apply_gradnas, compute_scores
    from ms_prune.models.llama import LlamaForCausalLM

    quick = args.quick
    pick = lambda section, key="steps": section[f"quick_{key}"] if quick else section[key]  # noqa: E731
    seq_len, log_every = config["seq_len"], config["log_every"]
    t0 = time.time()
    if args.model_dir is None:
        from ms_prune.hub import smollm2_dir
        args.model_dir = smollm2_dir()
    encode = token_encoder(args.model_dir)
    valid = encode(read_wikitext2("valid"))
    calibration = encode(calibration_text(config["calibration"]))
    windows = config["quick_eval_windows"] if quick else config["eval_windows"]
    windows = min(windows or (len(valid) - 1) // seq_len, (len(valid) - 1) // seq_len)
    print(f"WikiText-2 valid: {len(valid):,} tokens, evaluated on {windows} windows of {seq_len}; calibration "
          f"({config['calibration']}): {len(calibration):,} tokens", flush=True)
    ppl = lambda m: lm_perplexity(m, valid, 1, seq_len, windows)  # noqa: E731
    load = lambda: LlamaForCausalLM.from_pretrained(args.model_dir)  # noqa: E731

    model = load()
    model.set_train(False)
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    result = {"config": config, "quick": quick, "device": args.device_target, "mode": "GRAPH_MODE",
              "model": args.model_dir, "eval_set": f"WikiText-2 valid, {windows} windows of {seq_len} tokens",
              "seq_len": seq_len, "eval_windows": windows, "calibration_tokens": len(calibration),
              "units": "heads only (our Llama declares no prunable FFN)",
              "budgets": [], "complete": False}

    def save_progress():
        result["seconds"] = time.time() - t0
        write_json(args.json, result)
        plot(result, png)

    base = result["baseline"] = measure(model, ppl, seq_len)
    print(f"unpruned: WikiText-2 valid perplexity {base['perplexity']:.2f}, parameters {base['parameters']:,}, "
          f"FLOPs/sequence {base['flops'] / 1e9:.2f}G (attention {base['attention_flops'] / 1e9:.2f}G), heads "
          f"{base['heads']} ({time.time() - t0:.0f} s)", flush=True)
    save_progress()

    # one scoring pass on calibration windows (one shape: one graph), reused for every budget and method
    sc = config["scoring"]
    batch = lm_batch_fn(calibration, sc["batch_size"], seq_len, config["seed"])
    score_batches = [batch(i) for i in range(pick(sc, "batches"))]
    fisher = compute_scores(model, ModelLoss(model, lm_cross_entropy, 1), score_batches)
    result["score_seconds"], result["score_batches"] = fisher.seconds, len(score_batches)
    release_graph_memory()
    print(f"scored {base['heads']} heads on {len(score_batches)} batches of {sc['batch_size']}x{seq_len} in "
          f"{fisher.seconds:.1f} s", flush=True)
    scores = {"fisher": fisher, "magnitude": compute_scores(model, method="magnitude"),
              "random": compute_scores(model, method="random", seed=config["seed"])}

    lat_ids = Tensor(np.asarray(valid[:seq_len])[None], ms.int32)
    ft = config["finetune"]
    ft_batches = lm_batch_fn(calibration, ft["batch_size"], seq_len, config["seed"] + 1)
    checkpoints = os.path.join(os.path.dirname(os.path.abspath(args.json)), "llama_smollm2_checkpoints")

    def finetune(m, tag):
        """pick(ft) steps on the engine's Trainer, every model on the same batches (checkpointed, resumable)."""
        train_phase(m, lm_cross_entropy, ft_batches, 0, pick(ft), ft["lr"], ft["weight_decay"], log_every,
                    os.path.join(checkpoints, tag + ("_quick" if quick else "")), args.resume)

    finetuned = {}  # "<method>_<budget>" -> perplexity after the fine-tune (finetune.methods only)
    for keep in pick(config, "budgets"):
        budget = int(base["flops"] - (1 - keep) * base["attention_flops"])
        entry = {"attention_flops_keep": keep, "flops_budget": budget, "methods": {}}
        result["budgets"].append(entry)
        for name in pick(config, "methods"):
            method, selector, refit = METHODS[name]
            candidate = load()
            outcome = apply_gradnas(candidate, ModelLoss(candidate, lm_cross_entropy, 1), score_batches,
                                    constraints={"flops": budget}, selector=selector, seq_len=seq_len, refit=refit,
                                    scores=scores[method], prune=("heads",))
            candidate.set_train(False)
            row = entry["methods"][name] = measure(candidate, ppl, seq_len)
            row.update(pruned_heads=outcome["pruned_heads"], flops_ratio=row["flops"] / base["flops"],
                       params_ratio=row["parameters"] / base["parameters"],
                       attention_flops_ratio=row["attention_flops"] / base["attention_flops"])
            print(f"attention FLOPs {100 * keep:g}% {name}: heads {row['heads']}/{base['heads']} (key/value heads "
                  f"{sum(row['kv_heads_per_layer'])}/{sum(base['kv_heads_per_layer'])}), parameters "
                  f"{row['parameters']:,} (x{row['params_ratio']:.3f}), FLOPs/sequence {row['flops'] / 1e9:.2f}G "
                  f"(x{row['flops_ratio']:.3f}; attention x{row['attention_flops_ratio']:.3f}): perplexity "
                  f"{base['perplexity']:.2f} -> {row['perplexity']:.2f} ({time.time() - t0:.0f} s)", flush=True)
            if "latency" not in entry:  # the first method's model against the unpruned one
                times = compare_latency({"unpruned": lambda: model(lat_ids), "pruned": lambda: candidate(lat_ids)},
                                        repeats=pick(config["latency"], "repeats"))
                entry["latency"] = {"method": name, "batch": [1, seq_len], "unpruned_ms": 1e3 * times["unpruned"],
                                    "pruned_ms": 1e3 * times["pruned"], "ratio": times["pruned"] / times["unpruned"]}
                print(f"attention FLOPs {100 * keep:g}%: GRAPH_MODE latency ({name}, batch 1 x {seq_len}, median of "
                      f"{pick(config['latency'], 'repeats')}): unpruned {entry['latency']['unpruned_ms']:.1f} ms, "
                      f"pruned {entry['latency']['pruned_ms']:.1f} ms: ratio {entry['latency']['ratio']:.3f}",
                      flush=True)
            if pick(ft) and name in ft["methods"]:
                tag = f"{name}_{keep:g}"
                finetune(candidate, tag)
                row["perplexity_finetuned"] = finetuned[tag] = ppl(candidate)
                print(f"  {name} after {pick(ft)} fine-tune steps: perplexity {row['perplexity_finetuned']:.2f}",
                      flush=True)
            del candidate
            release_graph_memory()
            save_progress()

    if pick(ft):
        # the fair baseline: the unpruned model fine-tuned as many steps on the same batches
        same_steps = load()
        finetune(same_steps, "unpruned")
        base["perplexity_finetuned"] = ppl(same_steps)
        del same_steps
        release_graph_memory()
        print(f"fair baseline (unpruned, {pick(ft)} fine-tune steps): perplexity {base['perplexity_finetuned']:.2f}; "
              + ", ".join(f"{tag} {value:.2f}" for tag, value in finetuned.items()), flush=True)
    else:
        print("no fine-tune (finetune steps 0): perplexities are right after pruning", flush=True)
    result["complete"] = True
    save_progress()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    base = result["baseline"]
    ax = axes[0]
    names = sorted({name for b in result["budgets"] for name in b["methods"]}, key=list(METHODS).index)
    for name in names:
        points = sorted((b["methods"][name]["flops_ratio"], b["methods"][name]["perplexity"])
                        for b in result["budgets"] if name in b["methods"])
        ax.plot(*zip(*points), "o-", label=name)
        tuned = sorted((b["methods"][name]["flops_ratio"], b["methods"][name]["perplexity_finetuned"])
                       for b in result["budgets"] if "perplexity_finetuned" in b["methods"].get(name, {}))
        if tuned:
            ax.plot(*zip(*tuned), "s--", label=f"{name}, fine-tuned")
    ax.plot([1.0], [base["perplexity"]], "k*", markersize=12, label="unpruned")
    if "perplexity_finetuned" in base:
        ax.plot([1.0], [base["perplexity_finetuned"]], "kX", markersize=10, label="unpruned, fine-tuned")
    ax.set_yscale("log")
    ax.set_xlabel(f"FLOPs ratio (one sequence of {result['seq_len']} tokens)")
    ax.set_ylabel("WikiText-2 valid perplexity")
    ax.set_title(f"pruned heads: perplexity ({result['eval_windows']} windows of {result['seq_len']})")
    ax.legend(fontsize=8)
    ax = axes[1]
    layers = np.arange(len(base["heads_per_layer"]))
    ax.bar(layers, base["heads_per_layer"], color="lightgray", label="unpruned")
    for i, entry in enumerate(result["budgets"]):
        if names and names[0] in entry["methods"]:
            row = entry["methods"][names[0]]
            ax.bar(layers + 0.8 * (i + 1) / (len(result["budgets"]) + 1) - 0.4, row["heads_per_layer"],
                   width=0.8 / (len(result["budgets"]) + 1),
                   label=f"{names[0]}, attention FLOPs {100 * entry['attention_flops_keep']:g}%")
    ax.set_xlabel("layer")
    ax.set_ylabel("query heads kept")
    ax.set_title("heads per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
