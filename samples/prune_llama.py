"""Prune SmolLM2-135M-Instruct (a Llama-family decoder: 30 layers, 9 query heads over 3 key/value
heads, SwiGLU) with ``ms_prune.prune`` to fractions of its parameters, with no retraining:

1. calibration: windows of Jane Austen's six novels (``../shared/data/austen``), never the
   evaluation text;
2. per budget (a fraction of all parameters, embeddings counted) and variant, a fresh copy pruned:
   ``width`` (heads by key/value group and FFN neurons, per-layer widths), ``uniform`` (the same
   shape in every layer: a standard Llama), ``depth`` (whole layers by block influence); per score
   (activation, FLAP, magnitude, random) for the width variants, and for the scores listed in
   ``refit`` a second copy with the least-squares refit of the kept units; scores computed once on
   the unpruned model and reused;
3. WikiText-2 *test* perplexity (consecutive windows of ``seq_len`` tokens) and the greedy answer
   to "The capital of France is", before and after, peak memory, into results/prune_llama.json.

Distillation is not in this sample yet (issue #20).

    python samples/prune_llama.py --quick      # one budget, two scores, 8 windows (~12 min CPU)
    python samples/prune_llama.py              # both budgets, all variants and scores
"""
import time

from ms_prune.data import lm_batch_fn, read_austen, read_wikitext2, token_encoder
from ms_prune.training import lm_perplexity, peak_memory_mb, release_graph_memory, set_context, write_json

from harness import NON_NEGATIVE, OPEN_FRACTION, POSITIVE, sample_cli, section_ranges

KEYS = {"seq_len", "calibration", "budgets", "quick_budgets", "variants", "quick_variants", "methods",
        "quick_methods", "refit", "eval_windows", "quick_eval_windows", "prompt", "new_tokens", "seed"}
RANGES = {"seq_len": POSITIVE, "budgets": OPEN_FRACTION, "quick_budgets": OPEN_FRACTION,
          "eval_windows": NON_NEGATIVE, "quick_eval_windows": NON_NEGATIVE, "new_tokens": NON_NEGATIVE,
          "seed": NON_NEGATIVE,
          **section_ranges("calibration", batches=POSITIVE, quick_batches=POSITIVE, batch_size=POSITIVE)}
VARIANTS = ("width", "uniform", "depth")
METHODS = ("activation", "flap", "magnitude", "random")


def check_config(path, config):
    for key, allowed in (("variants", VARIANTS), ("quick_variants", VARIANTS), ("methods", METHODS),
                         ("quick_methods", METHODS)):
        unknown = sorted(set(config[key]) - set(allowed))
        if unknown or not config[key]:
            raise ValueError(f"{path}: {key} must be a non-empty list of {allowed}, got {config[key]!r}")


def main(argv=None):
    quick_help = "one budget, two scores, 8 evaluation windows (~12 min on CPU)"
    args, config = sample_cli(__file__, __doc__, KEYS, quick_help, argv,
                              [("--model_dir", dict(default=None, help="a Hugging Face-layout Llama folder with "
                                                    "tokenizer.json (None: SmolLM2-135M-Instruct from "
                                                    "ms_prune.hub.smollm2_dir())"))], ranges=RANGES)
    check_config(args.config, config)
    set_context("graph", args.device_target, seed=config["seed"])

    import ms_prune
    from ms_prune.models.llama import LlamaForCausalLM, greedy_generate
    from ms_prune.structured import score_units

    quick, seq_len = args.quick, config["seq_len"]
    pick = lambda key: config[f"quick_{key}"] if quick else config[key]  # noqa: E731
    started = time.time()
    if args.model_dir is None:
        from ms_prune.hub import smollm2_dir
        args.model_dir = smollm2_dir()
    encode = token_encoder(args.model_dir)
    test = encode(read_wikitext2("test"))
    windows = min(pick("eval_windows") or (len(test) - 1) // seq_len, (len(test) - 1) // seq_len)
    cal = config["calibration"]
    batch = lm_batch_fn(encode(read_austen()), cal["batch_size"], seq_len, config["seed"])
    calibration = [(batch(i)[0],) for i in range(cal["quick_batches"] if quick else cal["batches"])]
    prompt = encode(config["prompt"])[None]
    load = lambda: LlamaForCausalLM.from_pretrained(args.model_dir)  # noqa: E731

    def measure(model):
        t0 = time.time()
        perplexity = lm_perplexity(model, test, 1, seq_len, windows)
        continuation = greedy_generate(model, prompt, config["new_tokens"])[0, prompt.shape[1]:]
        answer = encode.tokenizer.decode(continuation.tolist())
        row = {"perplexity": perplexity, "answer": answer, "parameters": model.num_parameters(),
               "flops": model.forward_flops(seq_len), "heads_per_layer": model.heads_per_layer(),
               "neurons_per_layer": model.neurons_per_layer(), "eval_seconds": time.time() - t0}
        release_graph_memory()
        return row

    result = {"config": config, "quick": quick, "model": args.model_dir, "device": args.device_target,
              "eval_set": f"WikiText-2 test, {windows} windows of {seq_len} tokens",
              "calibration": f"{len(calibration)} batches of {cal['batch_size']} x {seq_len} tokens of Jane Austen",
              "recovery": "least-squares refit where named /refit; no distillation", "budgets": [],
              "complete": False}
    print(f"evaluating on {result['eval_set']}; calibration: {result['calibration']}", flush=True)
    model = load()
    base = result["unpruned"] = measure(model)
    print(f"unpruned: perplexity {base['perplexity']:.2f}, {base['parameters']:,} parameters, answer "
          f"{base['answer']!r} ({time.time() - started:.0f} s)", flush=True)
    scores = {}
    for method in pick("methods"):
        scores[method] = score_units(model, method, calibration, seed=config["seed"])
        print(f"scored heads and neurons by {method} in {scores[method].seconds:.1f} s", flush=True)
    del model
    release_graph_memory()
    write_json(args.json, result)

    for fraction in pick("budgets"):
        entry = {"params_fraction": fraction, "variants": {}}
        result["budgets"].append(entry)
        runs = [(variant, method, refit) for variant in pick("variants")
                for method in (["block_influence"] if variant == "depth" else pick("methods"))
                for refit in ([False] if variant == "depth" else [False] + [True] * (method in config["refit"]))]
        for variant, method, refit in runs:
            model = load()
            options = dict(units=("layers",)) if variant == "depth" else \
                dict(scores=scores[method], method=method, uniform=variant == "uniform", refit=refit)
            report = ms_prune.prune(model, {"params": f"{100 * fraction:g}%"}, calibration, seq_len=seq_len,
                                    verbose=False, **options)
            row = measure(model)
            row.update(params_ratio=report.params_ratio, flops_ratio=report.flops_ratio,
                       layers_removed=report.layers_removed, prune_seconds=report.seconds,
                       peak_rss_gb=peak_memory_mb()["host"] / 1024)
            name = f"{variant}/{method}" + ("/refit" if refit else "")
            entry["variants"][name] = row
            print(f"params {100 * fraction:g}% {name}: x{row['params_ratio']:.3f} parameters, "
                  f"x{row['flops_ratio']:.3f} FLOPs, perplexity {base['perplexity']:.2f} -> "
                  f"{row['perplexity']:.2f}, answer {row['answer']!r} ({time.time() - started:.0f} s)", flush=True)
            del model
            release_graph_memory()
            result["seconds"] = time.time() - started
            write_json(args.json, result)
    result.update(complete=True, seconds=time.time() - started, peak_rss_gb=peak_memory_mb()["host"] / 1024)
    write_json(args.json, result)
    print(f"done in {result['seconds']:.0f} s, peak memory {result['peak_rss_gb']:.1f} GB; {args.json}", flush=True)
    return result


if __name__ == "__main__":
    main()
