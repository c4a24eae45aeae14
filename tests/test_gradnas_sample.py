"""samples/gradnas_bert_sst2.py end to end on the real all-MiniLM-L6-v2 (its first two layers) with
a tiny schedule, and ``--resume``: a run interrupted after some (budget, method) pairs goes on from
there, keeping the fine-tune, the fair baseline and the scores it had."""
import json
import os

import pytest
import yaml

from ms_prune import hub

from conftest import fetch_or_skip, load_script

TINY = {"max_len": 16, "buckets": [16], "batch_size": 4, "eval_batch_size": 32,
        "finetune": {"quick_steps": 2}, "scoring": {"quick_batches": 1, "quick_refit_batches": 1},
        "seq_len": 16, "quick_budgets": [0.6], "methods": ["gradnas_global", "magnitude"],
        "recovery": {"quick_steps": 1}, "latency": {"batch_size": 2, "seq_len": 16, "quick_repeats": 1},
        "log_every": 1}
PER_METHOD = ("accuracy", "accuracy_finetuned", "ratios", "heads_per_layer", "neurons_per_layer")


def first_layers(model_dir, layers, target):
    """``model_dir`` (a Hugging Face BERT folder) cut to its first ``layers`` layers, at ``target``:
    the real pretrained weights and tokenizer at the size that compiles fastest."""
    import re
    import shutil
    from safetensors.numpy import load_file, save_file
    os.makedirs(target)
    for name in os.listdir(model_dir):
        if name.endswith((".json", ".txt")) and name != "config.json":
            shutil.copy(os.path.join(model_dir, name), target)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = layers
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    kept = {k: v for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()
            if int((re.search(r"\.layer\.(\d+)\.", k) or [0, 0])[1]) < layers}
    save_file(kept, os.path.join(target, "model.safetensors"))
    return target


def test_sample_runs_and_resumes_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """On the real MiniLM's first two layers (six compile about three times slower: what is checked
    here, the sample's phases and its resume, does not depend on the depth)."""
    minilm = fetch_or_skip(hub.minilm_dir, "all-MiniLM-L6-v2", "python -m ms_prune.hub minilm")
    model_dir = first_layers(minilm, 2, str(tmp_path / "minilm-2-layers"))
    cache = tmp_path / "cache"  # the tiny fine-tune is cached here, not in the user's cache
    cache.mkdir()
    monkeypatch.setenv("MS_PRUNE_CACHE", str(cache))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = str(tmp_path / "gradnas.json")
    argv = ["--quick", "--config", str(config), "--json", out, "--model_dir", model_dir]
    module = load_script("gradnas_bert_sst2")

    first = module.main(argv)
    entry = first["budgets"][0]
    assert first["complete"] and sorted(entry["accuracy_finetuned"]) == ["gradnas_global", "magnitude"]
    assert entry["flops_ratio"] <= 0.6 and 0 < entry["latency_ratio"]
    assert os.path.isfile(first["scores_file"])

    # the JSON as a run killed during the magnitude fine-tune left it
    with open(out) as f:
        saved = json.load(f)
    for key in PER_METHOD:
        del saved["budgets"][0][key]["magnitude"]
    saved["complete"] = False
    with open(out, "w") as f:
        json.dump(saved, f)
    capsys.readouterr()
    second = module.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert "fine-tuned MiniLM from the cache" in printed
    assert "gradnas_global: kept from the interrupted run" in printed
    assert "magnitude: kept" not in printed and "scored 24 heads" in printed
    assert second["complete"] and second["score_seconds"] == first["score_seconds"]
    assert second["baseline_accuracy_finetuned"] == first["baseline_accuracy_finetuned"]
    redone = second["budgets"][0]
    assert redone["accuracy_finetuned"]["gradnas_global"] == entry["accuracy_finetuned"]["gradnas_global"]
    assert redone["ratios"]["magnitude"] == entry["ratios"]["magnitude"]
    assert redone["accuracy_finetuned"]["magnitude"] == pytest.approx(entry["accuracy_finetuned"]["magnitude"],
                                                                      abs=0.25)


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    out = tmp_path / "gradnas.json"
    out.write_text(json.dumps({"config": {"seed": 5}, "quick": True, "budgets": []}))
    with pytest.raises(ValueError, match="--resume: .* holds a run with other settings"):
        load_script("gradnas_bert_sst2").main(["--quick", "--resume", "--json", str(out)])
