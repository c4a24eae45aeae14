"""The main job: prune the real SmolLM2-135M-Instruct (a Llama-family decoder: 30 layers, 9 query
heads over 3 key/value heads, SwiGLU, tied embeddings) with ``ms_prune.prune`` and show what
changes: parameters, FLOPs, GRAPH_MODE latency, WikiText-2 test perplexity and the greedy answer to
"The capital of France is", before and after; the pruned model is written as a standard Hugging
Face folder and reloaded.

Calibration is Jane Austen's prose (``../shared/data/austen``); evaluation WikiText-2 *test*, never
seen in calibration.

    python samples/prune_smollm2.py              # 8 evaluation windows (CPU, ~5 minutes): the main job
    python samples/prune_smollm2.py --quick      # 4 windows, 3 timing repeats: a smoke test
"""
import time

from ms_prune.benchmarking import compare_latency
from ms_prune.data import lm_batch_fn, read_austen, read_wikitext2, token_encoder
from ms_prune.training import lm_perplexity, peak_memory_mb, set_context, write_json

from harness import NON_NEGATIVE, OPEN_FRACTION, POSITIVE, sample_cli, section_ranges

KEYS = {"params", "method", "uniform", "refit", "seq_len", "calibration_batches", "eval_windows", "repeats", "quick",
        "prompt", "new_tokens", "output_dir", "seed"}
RANGES = {"params": OPEN_FRACTION, "seq_len": POSITIVE, "calibration_batches": POSITIVE, "eval_windows": POSITIVE,
          "repeats": POSITIVE, "new_tokens": POSITIVE, "seed": NON_NEGATIVE,
          **section_ranges("quick", eval_windows=POSITIVE, repeats=POSITIVE)}
METHODS = ("activation", "flap", "magnitude", "random")


def main(argv=None):
    args, config = sample_cli(__file__, __doc__, KEYS, "4 evaluation windows, 3 timing repeats (a smoke test)", argv,
                              [("--model_dir", dict(default=None, help="a Hugging Face-layout Llama folder with "
                                                    "tokenizer.json (None: SmolLM2-135M-Instruct from "
                                                    "ms_prune.hub.smollm2_dir())"))], ranges=RANGES)
    if config["method"] not in METHODS:
        raise ValueError(f"{args.config}: method must be one of {METHODS}, got {config['method']!r}")
    settings = dict(config, **config["quick"]) if args.quick else config
    set_context("graph", args.device_target, seed=config["seed"])

    import numpy as np
    import ms_prune
    from mindspore import Tensor
    from ms_prune.hub import smollm2_dir
    from ms_prune.models.llama import LlamaForCausalLM, greedy_generate

    started, seq_len = time.time(), config["seq_len"]
    folder = args.model_dir or smollm2_dir()
    encode = token_encoder(folder)
    test = encode(read_wikitext2("test"))
    batch = lm_batch_fn(encode(read_austen()), 2, seq_len, config["seed"])
    calibration = [(batch(i)[0],) for i in range(config["calibration_batches"])]
    prompt = encode(config["prompt"])[None]
    timing_ids = Tensor(test[None, :seq_len].astype(np.int32))

    def measure(model):
        t0 = time.time()
        # padded to the perplexity windows' length: one compiled graph serves both
        continuation = greedy_generate(model, prompt, config["new_tokens"], pad_to=seq_len)[0, prompt.shape[1]:]
        row = {"perplexity": lm_perplexity(model, test, 1, seq_len, settings["eval_windows"]),
               "answer": encode.tokenizer.decode(continuation.tolist()).strip(), "parameters": model.num_parameters(),
               "gflops": model.forward_flops(seq_len) / 1e9, "heads": sum(model.heads_per_layer()),
               "ffn_neurons": sum(model.neurons_per_layer())}
        print(f"  perplexity {row['perplexity']:.2f}, answer {row['answer']!r} ({time.time() - t0:.0f} s)", flush=True)
        return row

    print(f"{folder}; WikiText-2 test, {settings['eval_windows']} windows of "
          f"{seq_len} tokens; calibration {len(calibration)} x 2 x {seq_len} tokens of Jane Austen", flush=True)
    unpruned = LlamaForCausalLM.from_pretrained(folder)
    print("unpruned:", flush=True)
    before = measure(unpruned)

    pruned = LlamaForCausalLM.from_pretrained(folder)
    report = ms_prune.prune(pruned, {"params": f"{100 * config['params']:g}%"}, calibration, method=config["method"],
                            uniform=config["uniform"], refit=config["refit"], seq_len=seq_len)
    pruned.save_pretrained(config["output_dir"], standard=config["uniform"])
    reloaded = LlamaForCausalLM.from_pretrained(config["output_dir"])
    reloaded.set_train(False)
    pruned.set_train(False)
    reload_error = float(np.abs(reloaded(timing_ids).asnumpy() - pruned(timing_ids).asnumpy()).max())
    del reloaded
    print("pruned:", flush=True)
    after = measure(pruned)

    unpruned.set_train(False)
    latency = compare_latency({"unpruned": lambda: unpruned(timing_ids), "pruned": lambda: pruned(timing_ids)},
                              repeats=settings["repeats"])
    result = {"config": config, "quick": args.quick, "model": folder, "device": args.device_target,
              "eval_set": f"WikiText-2 test, {settings['eval_windows']} windows of {seq_len} tokens",
              "unpruned": dict(before, latency_ms=1e3 * latency["unpruned"]),
              "pruned": dict(after, latency_ms=1e3 * latency["pruned"]), "report": report.to_dict(),
              "saved_to": config["output_dir"], "reload_max_abs_difference": reload_error,
              "seconds": time.time() - started, "peak_rss_gb": peak_memory_mb()["host"] / 1024}
    rows = [("parameters", "{:,}"), ("gflops", "{:.2f}"), ("heads", "{}"), ("ffn_neurons", "{:,}"),
            ("latency_ms", "{:.0f}"), ("perplexity", "{:.2f}"), ("answer", "{!r}")]
    print(f"\n{'':14}{'unpruned':>24}{'pruned':>24}")
    for key, fmt in rows:
        print(f"{key:14}{fmt.format(result['unpruned'][key]):>24}{fmt.format(result['pruned'][key]):>24}")
    print(f"\n{report.params_ratio:.3f} of the parameters, {report.flops_ratio:.3f} of the FLOPs at {seq_len} tokens; "
          f"latency x{latency['pruned'] / latency['unpruned']:.3f}; perplexity x"
          f"{after['perplexity'] / before['perplexity']:.2f} with no retraining")
    print(f"pruned model: {config['output_dir']} (a standard Hugging Face Llama folder: "
          f"{config['uniform']}; reloaded, largest logit difference {reload_error:.1e}); "
          f"{result['seconds']:.0f} s, peak memory {result['peak_rss_gb']:.1f} GB", flush=True)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
