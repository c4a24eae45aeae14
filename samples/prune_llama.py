"""Prune SmolLM2-135M-Instruct (a Llama-family decoder: 30 layers, 9 query heads over 3 key/value
heads, SwiGLU) with ``ms_prune.prune`` to fractions of its parameters, then recover by knowledge
distillation from the unpruned model:

1. calibration: windows of Jane Austen's six novels (``../shared/data/austen``), never the
   evaluation text;
2. per budget (a fraction of all parameters, embeddings counted) and variant, a fresh copy pruned:
   ``width`` (heads by key/value group and FFN neurons, per-layer widths), ``uniform`` (the same
   shape in every layer: a standard Llama), ``depth`` (whole layers by block influence); per score
   (activation, FLAP, magnitude, random) for the width variants, and for the scores listed in
   ``refit`` a second copy with the least-squares refit of the kept units; scores computed once on
   the unpruned model and reused. Each row is measured as pruned, with no retraining;
3. distillation (``distill.runs``, named as the rows are: ``uniform/activation``,
   ``depth/block_influence``, ...): the pruned copy trains on ``ms_prune.engine.Trainer`` with
   ``ms_prune.distill.Distillation`` (the unpruned model as the frozen teacher, KL of the token
   distributions, the vocabulary in ``vocab_chunk`` columns) on other windows of Jane Austen (drawn
   with seed + 1, not the calibration windows; ``batch_size`` windows a micro-batch,
   ``grad_accumulation`` micro-batches a step: on CPU a distillation step peaked at 14.3 GB with
   one window a micro-batch, 19.5 GB with two), AdamW with warm-up and cosine decay, gradients clipped to norm 1; then measured again;
4. the fair baseline, once per run: the UNPRUNED model trained on the same batches, the same
   steps and optimizer settings, with the plain next-token loss: ``baseline_ppl``. A pruned and
   distilled model is compared with ``reference_ppl = min(teacher_ppl, baseline_ppl)`` (the extra
   text alone may help or hurt the unpruned model);
5. WikiText-2 *test* perplexity (consecutive windows of ``seq_len`` tokens) and the greedy answer
   to "The capital of France is", before and after, peak memory, the issue's goals (75%: no
   retraining <= 2.0x teacher, distilled <= 1.2x reference; 50%: distilled <= 1.6x reference)
   into results/prune_llama.json, written after every row.

``--resume`` keeps what an interrupted run with the same settings (config and ``--quick``) wrote to
its ``--json``: the unpruned and baseline measurements and every finished row (a row to be
distilled counts as finished once distilled); the rest is done.

    python samples/prune_llama.py --quick      # one budget, two scores, 8 windows, one row distilled 3 steps (~14 min CPU)
    python samples/prune_llama.py              # both budgets, all variants and scores, uniform/activation distilled
    python samples/prune_llama.py --resume     # go on with an interrupted run (its --json)
"""
import logging
import math
import time

from ms_prune.data import lm_batch_fn, read_austen, read_wikitext2, token_encoder
from ms_prune.training import (lm_cross_entropy, lm_perplexity, peak_memory_mb, release_graph_memory, set_context,
                               write_json)

from harness import FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, RATE, interrupted_run, sample_cli, section_ranges

KEYS = {"seq_len", "calibration", "budgets", "quick_budgets", "variants", "quick_variants", "methods",
        "quick_methods", "refit", "eval_windows", "quick_eval_windows", "prompt", "new_tokens", "distill", "seed"}
RANGES = {"seq_len": POSITIVE, "budgets": OPEN_FRACTION, "quick_budgets": OPEN_FRACTION,
          "eval_windows": NON_NEGATIVE, "quick_eval_windows": NON_NEGATIVE, "new_tokens": NON_NEGATIVE,
          "seed": NON_NEGATIVE,
          **section_ranges("calibration", batches=POSITIVE, quick_batches=POSITIVE, batch_size=POSITIVE),
          **section_ranges("distill", steps=POSITIVE, quick_steps=POSITIVE, batch_size=POSITIVE,
                           grad_accumulation=POSITIVE, lr=RATE,
                           temperature=RATE, alpha=FRACTION, top_k=POSITIVE, vocab_chunk=POSITIVE,
                           warmup_steps=NON_NEGATIVE, log_every=POSITIVE)}
VARIANTS = ("width", "uniform", "depth")
METHODS = ("activation", "flap", "magnitude", "random")
# the goals: (params fraction, what, the reference it is measured against, at most this ratio)
GOALS = ((0.75, "no_retraining", "teacher_ppl", 2.0), (0.75, "distilled", "reference_ppl", 1.2),
         (0.5, "distilled", "reference_ppl", 1.6))


def runs(variants, methods, refit):
    """The rows of one budget, in order: (name, variant, method, refit)."""
    out = []
    for variant in variants:
        for method in (["block_influence"] if variant == "depth" else methods):
            for with_refit in ([False] if variant == "depth" else [False] + [True] * (method in refit)):
                out.append((f"{variant}/{method}" + ("/refit" if with_refit else ""), variant, method, with_refit))
    return out


def check_config(path, config):
    for key, allowed in (("variants", VARIANTS), ("quick_variants", VARIANTS), ("methods", METHODS),
                         ("quick_methods", METHODS)):
        unknown = sorted(set(config[key]) - set(allowed))
        if unknown or not config[key]:
            raise ValueError(f"{path}: {key} must be a non-empty list of {allowed}, got {config[key]!r}")
    distill = config["distill"]
    for key, prefix in (("runs", ""), ("quick_runs", "quick_")):
        names = [name for name, *_ in runs(config[prefix + "variants"], config[prefix + "methods"], config["refit"])]
        unknown = [name for name in distill[key] if name not in names]
        if unknown:
            raise ValueError(f"{path}: distill.{key} names {unknown}, which the {prefix}variants and {prefix}methods "
                             f"do not run; the runs are {names}")
    top_k = distill["top_k"]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ValueError(f"{path}: distill.top_k must be a positive integer or null (the whole vocabulary), "
                         f"got {top_k!r}")


def goals(result):
    """The issue's goals from the measured numbers: {name: {ratio, target, met, run}}; a goal whose
    budget or distillation was not run is absent."""
    out = {}
    for fraction, what, reference, target in GOALS:
        entry = next((e for e in result["budgets"] if math.isclose(e["params_fraction"], fraction)), None)
        if entry is None or reference not in result:
            continue
        # no retraining: every row as pruned, /refit rows included; distilled: the rows distilled
        key = "ppl_distilled" if what == "distilled" else "ppl_pruned"
        candidates = [(row[key], name) for name, row in entry["variants"].items() if key in row]
        if not candidates:
            continue
        ppl, name = min(candidates)
        ratio = ppl / result[reference]
        out[f"params_{100 * fraction:g}%_{what}"] = {"ppl": ppl, "run": name, "of": reference, "ratio": ratio,
                                                      "target": target, "met": bool(ratio <= target)}
    return out


def summarise(entry):
    """The budget entry's own figures: those of its best row (the lowest distilled perplexity, else
    the lowest perplexity with no retraining, a /refit row counted for its plain row)."""
    rows = {name: row for name, row in entry["variants"].items() if not name.endswith("/refit")}
    if not rows:
        return
    distilled = [(row["ppl_distilled"], name) for name, row in rows.items() if "ppl_distilled" in row]
    best = min(distilled)[1] if distilled else \
        min((min(row["ppl_pruned"], row.get("ppl_refit", math.inf)), name) for name, row in rows.items())[1]
    keys = ("params_ratio", "flops_ratio", "ppl_pruned", "ppl_refit", "ppl_distilled", "distill_tokens",
            "distill_seconds", "answer_distilled", "peak_rss_gb")
    for key in keys:
        entry.pop(key, None)
    entry.update({key: rows[best][key] for key in keys if key in rows[best]}, run=best)


def main(argv=None):
    quick_help = "one budget, two scores, 8 evaluation windows, one row distilled 3 steps (~14 min on CPU)"
    args, config = sample_cli(__file__, __doc__, KEYS, quick_help, argv,
                              [("--model_dir", dict(default=None, help="a Hugging Face-layout Llama folder with "
                                                    "tokenizer.json (None: SmolLM2-135M-Instruct from "
                                                    "ms_prune.hub.smollm2_dir())")),
                               ("--resume", dict(action="store_true", help="keep what an interrupted run with these "
                                                 "settings finished (its --json) and do the rest"))],
                              ranges=RANGES)
    check_config(args.config, config)
    previous = interrupted_run(args.json, config, args.quick) if args.resume else None
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the Trainer's progress lines
    set_context("graph", args.device_target, seed=config["seed"])

    import ms_prune
    from ms_prune.distill import Distillation
    from ms_prune.engine import Trainer
    from ms_prune.models.llama import LlamaForCausalLM, greedy_generate
    from ms_prune.structured import score_units

    quick, seq_len, dist = args.quick, config["seq_len"], config["distill"]
    pick = lambda key: config[f"quick_{key}"] if quick else config[key]  # noqa: E731
    steps = dist["quick_steps"] if quick else dist["steps"]
    per_step = dist["batch_size"] * dist["grad_accumulation"]  # windows per optimizer step
    distilled_runs = dist["quick_runs"] if quick else dist["runs"]
    started = time.time()
    if args.model_dir is None:
        from ms_prune.hub import smollm2_dir
        args.model_dir = smollm2_dir()
    encode = token_encoder(args.model_dir)
    test = encode(read_wikitext2("test"))
    austen = encode(read_austen())
    windows = min(pick("eval_windows") or (len(test) - 1) // seq_len, (len(test) - 1) // seq_len)
    cal = config["calibration"]
    batch = lm_batch_fn(austen, cal["batch_size"], seq_len, config["seed"])
    calibration = [(batch(i)[0],) for i in range(cal["quick_batches"] if quick else cal["batches"])]
    # the distillation text: other windows of the same novels (another seed), the same for every run;
    # batch_size windows per micro-batch, grad_accumulation micro-batches per optimizer step
    distill_batches = lm_batch_fn(austen, dist["batch_size"], seq_len, config["seed"] + 1)
    prompt = encode(config["prompt"])[None]
    load = lambda: LlamaForCausalLM.from_pretrained(args.model_dir)  # noqa: E731
    rss = lambda: peak_memory_mb()["host"] / 1024  # noqa: E731

    def measure(model):
        t0 = time.time()
        perplexity = lm_perplexity(model, test, 1, seq_len, windows)
        # padded to the windows' length: the perplexity's compiled graph serves generation too
        continuation = greedy_generate(model, prompt, config["new_tokens"], pad_to=seq_len)[0, prompt.shape[1]:]
        answer = encode.tokenizer.decode(continuation.tolist())
        row = {"perplexity": perplexity, "answer": answer, "parameters": model.num_parameters(),
               "flops": model.forward_flops(seq_len), "heads_per_layer": model.heads_per_layer(),
               "neurons_per_layer": model.neurons_per_layer(), "eval_seconds": time.time() - t0}
        release_graph_memory()
        return row

    def train(model, name, teacher=None):
        """``steps`` steps on the distillation batches: with ``teacher``, distilled from it (KL only
        at alpha 1); without, the plain next-token loss. Returns {tokens, seconds, losses}."""
        t0 = time.time()
        warmup = min(dist["warmup_steps"], steps // 5)
        algorithms = [Distillation(teacher, temperature=dist["temperature"], alpha=dist["alpha"],
                                   top_k=dist["top_k"], vocab_chunk=dist["vocab_chunk"])] if teacher else []
        print(f"{name}: {steps} steps of {per_step} x {seq_len} tokens of Jane Austen"
              + (f", distilled from the unpruned model (T={dist['temperature']:g}, alpha={dist['alpha']:g})"
                 if teacher else ", plain next-token loss"), flush=True)
        trainer = Trainer(model, lm_cross_entropy, distill_batches, max_steps=steps, algorithms=algorithms,
                          lr=dist["lr"], lr_schedule="cosine", warmup_steps=warmup, max_grad_norm=1.0,
                          grad_accumulation=dist["grad_accumulation"], log_interval=dist["log_every"],
                          seed=config["seed"])
        trainer.fit()
        for algorithm in algorithms:
            algorithm.release()  # the teacher's Parameter names and mode as they were
        model.set_train(False)
        record = {"tokens": trainer.summary["tokens"], "seconds": time.time() - t0,
                  "losses": [trainer.history[0]["loss"], trainer.history[-1]["loss"]]}
        del trainer
        release_graph_memory()
        return record

    result = {"config": config, "quick": quick, "model": args.model_dir, "device": args.device_target,
              "eval_set": f"WikiText-2 test, {windows} windows of {seq_len} tokens",
              "calibration": f"{len(calibration)} batches of {cal['batch_size']} x {seq_len} tokens of Jane Austen",
              "recovery": "least-squares refit where named /refit; knowledge distillation from the unpruned model "
                          "where ppl_distilled is given",
              "distillation": f"{steps} steps of {per_step} x {seq_len} tokens of Jane Austen "
                              f"(seed {config['seed'] + 1}) for {distilled_runs or 'no run'}",
              "budgets": [], "complete": False, "resumed": previous is not None}
    print(f"evaluating on {result['eval_set']}; calibration: {result['calibration']}; distillation: "
          f"{result['distillation']}", flush=True)
    kept = {}  # (fraction, run name) -> the row an interrupted run finished
    for entry in (previous or {}).get("budgets", []):
        for name, row in entry["variants"].items():
            if name not in distilled_runs or "ppl_distilled" in row:
                kept[entry["params_fraction"], name] = row
    budget_runs = runs(pick("variants"), pick("methods"), config["refit"])
    todo = [(fraction, name, method) for fraction in pick("budgets") for name, _, method, _ in budget_runs
            if (fraction, name) not in kept]
    methods = sorted({method for _, _, method in todo if method != "block_influence"},
                     key=pick("methods").index)

    if previous and "unpruned" in previous:
        result["unpruned"] = previous["unpruned"]
        result["teacher_ppl"] = previous["teacher_ppl"]
        print("unpruned: kept from the interrupted run", flush=True)
    scores = {}
    if "unpruned" not in result or methods:
        model = load()
        if "unpruned" not in result:
            result["unpruned"] = measure(model)
            result["teacher_ppl"] = result["unpruned"]["perplexity"]
        for method in methods:
            scores[method] = score_units(model, method, calibration, seed=config["seed"])
            print(f"scored heads and neurons by {method} in {scores[method].seconds:.1f} s", flush=True)
        del model
        release_graph_memory()
    base = result["unpruned"]
    print(f"unpruned: perplexity {base['perplexity']:.2f}, {base['parameters']:,} parameters, answer "
          f"{base['answer']!r} ({time.time() - started:.0f} s)", flush=True)
    write_json(args.json, result)

    # the fair baseline: the unpruned model trained as long as every distilled model, on the same text
    if distilled_runs:
        if previous and "baseline_ppl" in previous:
            result.update({key: previous[key] for key in ("baseline_ppl", "baseline", "reference_ppl")})
            print("fair baseline: kept from the interrupted run", flush=True)
        else:
            model = load()
            record = train(model, "fair baseline (unpruned)")
            row = measure(model)
            del model
            release_graph_memory()
            result["baseline"] = {"perplexity": row["perplexity"], "answer": row["answer"],
                                  "train_tokens": record["tokens"], "train_seconds": record["seconds"],
                                  "train_loss": record["losses"], "eval_seconds": row["eval_seconds"]}
            result["baseline_ppl"] = row["perplexity"]
            result["reference_ppl"] = min(result["teacher_ppl"], result["baseline_ppl"])
        print(f"fair baseline (unpruned + the same {steps} steps, next-token loss): perplexity "
              f"{result['baseline_ppl']:.2f}; reference {result['reference_ppl']:.2f} "
              f"({time.time() - started:.0f} s)", flush=True)
        result["peak_rss_gb"] = rss()
        write_json(args.json, result)

    for fraction in pick("budgets"):
        entry = {"params_fraction": fraction, "variants": {}}
        result["budgets"].append(entry)
        for name, variant, method, refit in budget_runs:
            plain = name[:-len("/refit")] if refit else None
            if (fraction, name) in kept:
                entry["variants"][name] = row = kept[fraction, name]
                print(f"params {100 * fraction:g}% {name}: kept from the interrupted run", flush=True)
            else:
                model = load()
                options = dict(units=("layers",)) if variant == "depth" else \
                    dict(scores=scores[method], method=method, uniform=variant == "uniform", refit=refit)
                report = ms_prune.prune(model, {"params": f"{100 * fraction:g}%"}, calibration, seq_len=seq_len,
                                        verbose=False, **options)
                row = measure(model)
                row.update(ppl_pruned=row["perplexity"], params_ratio=report.params_ratio,
                           flops_ratio=report.flops_ratio, layers_removed=report.layers_removed,
                           prune_seconds=report.seconds, peak_rss_gb=rss())
                entry["variants"][name] = row
                print(f"params {100 * fraction:g}% {name}: x{row['params_ratio']:.3f} parameters, "
                      f"x{row['flops_ratio']:.3f} FLOPs, perplexity {base['perplexity']:.2f} -> "
                      f"{row['perplexity']:.2f}, answer {row['answer']!r} ({time.time() - started:.0f} s)",
                      flush=True)
                if name in distilled_runs:
                    result["seconds"] = time.time() - started
                    write_json(args.json, result)  # the pruned figures, before the long part
                    teacher = load()
                    record = train(model, f"params {100 * fraction:g}% {name}", teacher)
                    del teacher
                    after = measure(model)
                    row.update(ppl_distilled=after["perplexity"], answer_distilled=after["answer"],
                               distill_tokens=record["tokens"], distill_seconds=record["seconds"],
                               distill_loss=record["losses"], peak_rss_gb=rss())
                    print(f"params {100 * fraction:g}% {name}: perplexity {row['ppl_pruned']:.2f} -> "
                          f"{row['ppl_distilled']:.2f} after distillation "
                          f"(x{row['ppl_distilled'] / result['reference_ppl']:.2f} the reference), answer "
                          f"{row['answer_distilled']!r} ({record['seconds']:.0f} s, peak {rss():.1f} GB)", flush=True)
                del model
                release_graph_memory()
            if refit and plain in entry["variants"]:
                entry["variants"][plain]["ppl_refit"] = row["ppl_pruned"]
            summarise(entry)
            result["goals"] = goals(result)
            result["seconds"] = time.time() - started
            write_json(args.json, result)
    result.update(complete=True, seconds=time.time() - started, peak_rss_gb=rss(), goals=goals(result))
    write_json(args.json, result)
    print_summary(result)
    print(f"done in {result['seconds']:.0f} s, peak memory {result['peak_rss_gb']:.1f} GB; {args.json}", flush=True)
    return result


def print_summary(result):
    line = f"summary: teacher (unpruned) perplexity {result['teacher_ppl']:.2f}"
    if "baseline_ppl" in result:
        line += f", fair baseline {result['baseline_ppl']:.2f}, reference {result['reference_ppl']:.2f}"
    print(line, flush=True)
    fmt = lambda row, key: f"{row[key]:.2f}" if key in row else "-"  # noqa: E731
    for entry in result["budgets"]:
        for name, row in entry["variants"].items():
            if not name.endswith("/refit"):
                print(f"  params {100 * entry['params_fraction']:g}% {name:28s} x{row['params_ratio']:.3f} params "
                      f"x{row['flops_ratio']:.3f} FLOPs | perplexity pruned {fmt(row, 'ppl_pruned')}, refit "
                      f"{fmt(row, 'ppl_refit')}, distilled {fmt(row, 'ppl_distilled')}", flush=True)
    for name, goal in result["goals"].items():
        print(f"  goal {name}: {goal['run']} perplexity {goal['ppl']:.2f} = x{goal['ratio']:.2f} {goal['of']} "
              f"(target <= x{goal['target']:g}): {'met' if goal['met'] else 'NOT met'}", flush=True)


if __name__ == "__main__":
    main()
