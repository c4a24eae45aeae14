"""Samples' command lines and configs (samples/harness.py's sample_cli), and where the data is
found: every mistake is an error that names the setting, what was expected and what came. And the
scripts run from an installed ms_prune: none edits sys.path, no sample imports another."""
import ast
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import ms_prune
from ms_prune import data
from ms_prune.training import device_target_name

from conftest import ROOT, SAMPLES_DIR, load_script
from harness import sample_cli

# every script in samples/ but the harness they share
SAMPLES = sorted(f[:-3] for f in os.listdir(SAMPLES_DIR) if f.endswith(".py") and f != "harness.py")


def default_config(name):
    with open(os.path.join(ROOT, "samples", "configs", name + ".yaml")) as f:
        return yaml.safe_load(f)


def cli(module, argv):
    return sample_cli(module.__file__, module.__doc__, module.KEYS, "quick", argv, ranges=module.RANGES)


def write(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


# ---- item 6: command lines ------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_has_quick_help_with_defaults_and_says_where_outputs_go(name, capsys):
    module = load_script(name)
    with pytest.raises(SystemExit):
        cli(module, ["--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--quick", "--device_target", "--json"):
        assert flag in text
    assert text.count("(default:") >= 4, text
    args, config = cli(module, ["--quick", "--device_target", "cpu"])
    assert args.quick and args.device_target == "CPU" and config == default_config(name)
    assert f"results go to {os.path.abspath(args.json)}" in capsys.readouterr().out



def test_sample_cli_names_bad_config_keys(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "x.yaml").write_text("steps: 2\nseed: 0\n")  # the sample's default config
    script = str(tmp_path / "x.py")
    config = tmp_path / "c.yaml"
    config.write_text("steps: 3\nstepz: 4\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]; allowed at the top level: \['seed', 'steps'\]"):
        sample_cli(script, "doc", {"steps", "seed"}, "quick", ["--config", str(config)])
    config.write_text("steps: 3\n")
    args, values = sample_cli(script, "doc", {"steps", "seed"}, "quick", ["--config", str(config), "--quick"])
    assert args.quick and args.json == "results/x.json" and values == {"steps": 3, "seed": 0}


VARIANTS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "samples", "configs"))
                  if f.endswith(".yaml") and f[:-5] not in SAMPLES)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_config_is_valid_for_its_sample(variant):
    # a variant (e.g. pld_bert_mlm_4_layers) overrides some settings of the sample its name starts with
    sample = max((s for s in SAMPLES if variant.startswith(s + "_")), key=len)
    path = os.path.join(ROOT, "samples", "configs", variant + ".yaml")
    _, config = cli(load_script(sample), ["--config", path])
    with open(path) as f:
        overrides = yaml.safe_load(f)
    assert overrides and set(overrides) <= set(config)
    assert {k: v for k, v in config.items() if k not in overrides} == \
        {k: v for k, v in default_config(sample).items() if k not in overrides}


@pytest.mark.parametrize("given,name", [("cpu", "CPU"), ("Cpu", "CPU"), ("gpu", "GPU"), ("ASCEND", "Ascend"),
                                        (" ascend ", "Ascend")])
def test_device_target_in_any_case(given, name):
    assert device_target_name(given) == name


def test_unknown_device_target_is_named(capsys):
    with pytest.raises(SystemExit):
        cli(load_script("prune_minilm"), ["--device_target", "tpu"])
    assert "device_target must be one of ['CPU', 'GPU', 'Ascend'] (any case), got 'tpu'" in capsys.readouterr().err


def test_unavailable_backend_says_so():
    # a subprocess: a failed set_device must not change this process's context
    code = "from ms_prune.training import set_context\nset_context('graph', 'gpu')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode == 0:
        pytest.skip("this MindSpore can run on GPU")
    assert "RuntimeError: device_target 'GPU' is not available here" in proc.stderr
    assert "--device_target CPU" in proc.stderr


# ---- item 4: configs checked at every depth -------------------------------------------------
def test_unknown_and_misspelled_nested_keys_name_their_path(tmp_path):
    module = load_script("lrp_bert_sst2")
    config = default_config("lrp_bert_sst2")
    config["finetune"]["lrr"] = config["finetune"].pop("lr")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['finetune.lrr'\]; allowed at finetune: "
                                         r"\['lr', 'quick_steps', 'steps', 'weight_decay'\].*did you mean 'finetune.lr'"):
        cli(module, ["--config", write(tmp_path, config)])
    config = default_config("lrp_bert_sst2")
    config["gates"]["extra"] = 1
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gates.extra'\]"):
        cli(module, ["--config", write(tmp_path, config)])


def test_yaml_1e_4_is_a_float_and_left_out_keys_take_the_default(tmp_path):
    module = load_script("lrp_gpt_shakespeare")
    args, config = cli(module, ["--config", write(tmp_path, "train: {lr: 1e-4}\nseed: 3\n")])
    assert config["train"]["lr"] == 1e-4 and isinstance(config["train"]["lr"], float)
    assert config["seed"] == 3 and config["train"]["steps"] == default_config("lrp_gpt_shakespeare")["train"]["steps"]
    assert config["gates"] == default_config("lrp_gpt_shakespeare")["gates"]


@pytest.mark.parametrize("text,error,message", [
    ("train: {lr: fast}\n", TypeError, r"train.lr must be a number, got 'fast' \(str\)"),
    ("batch_size: '16'\n", TypeError, r"batch_size must be an int, got '16' \(str\)"),
    ("batch_size: 16.5\n", TypeError, r"batch_size must be an int, got 16.5 \(float\)"),
    ("train: 5\n", TypeError, r"train must be a mapping, got int"),
    ("model: {n_head: -2}\n", ValueError, r"model.n_head must be an int in \[1, inf\], got -2"),
    ("gates: {algorithms: {lrp: {target_fraction: 1.5}}}\n", ValueError,
     r"gates.algorithms.lrp.target_fraction must be in \(0, 1\], got 1.5"),
    ("train: {lr: 0}\n", ValueError, r"train.lr must be in \(0, inf\], got 0.0"),
    ("- 1\n- 2\n", ValueError, r"expected a YAML mapping of settings, got list"),
])
def test_wrong_types_and_ranges_are_named(tmp_path, text, error, message):
    path = write(tmp_path, text)
    with pytest.raises(error, match=rf"{path}: {message}" if "mapping of" not in message else message):
        cli(load_script("lrp_gpt_shakespeare"), ["--config", path])


def test_list_items_are_checked(tmp_path):
    with pytest.raises(TypeError, match=r"targets\[1\] must be a number, got 'half'"):
        cli(load_script("lrp_bert_sst2"), ["--config", write(tmp_path, "targets: [0.5, half]\n")])
    with pytest.raises(ValueError, match=r"random_ltd.layer_ids\[0\] must be an int in \[0, inf\], got -1"):
        cli(load_script("random_ltd_gpt_shakespeare"), ["--config", write(tmp_path, "random_ltd: {layer_ids: [-1]}\n")])


@pytest.mark.parametrize("keep,error,message", [
    (-1, ValueError, r"keep_heads_per_layer must be an int in \[0, inf\], got -1"),
    (13, ValueError, r"keep_per_layer \(heads kept of the 12 per layer\) must be an int in \[0, 12\], got 13"),
    (6.0, TypeError, r"keep_heads_per_layer must be an int, got 6.0"),
])
def test_keep_heads_per_layer_is_checked_against_the_model(tmp_path, keep, error, message):
    from ms_prune.benchmarking import heads_with_smallest_output_norm
    from ms_prune.models.bert import BertConfig, BertModel
    with pytest.raises(error, match=message):
        _, config = cli(load_script("prune_minilm"), ["--config", write(tmp_path, {"keep_heads_per_layer": keep})])
        model = BertModel(BertConfig(vocab_size=20, hidden_size=24, num_hidden_layers=1, num_attention_heads=12,
                                     intermediate_size=8))
        heads_with_smallest_output_norm(model, config["keep_heads_per_layer"])


def test_prune_minilm_quick_uses_the_quick_section(tmp_path):
    args, config = cli(load_script("prune_minilm"), ["--quick"])
    assert args.quick and config["quick"] == {"batch_size": 8, "repeats": 3}


# ---- item 5: data ---------------------------------------------------------------------------
def test_missing_ms_prune_data_is_an_error_naming_it(monkeypatch, tmp_path):
    missing = str(tmp_path / "nowhere")
    monkeypatch.setenv("MS_PRUNE_DATA", missing)
    with pytest.raises(FileNotFoundError, match=rf"MS_PRUNE_DATA='{missing}' is not a folder"):
        data.read_sst2("dev")
    with pytest.raises(FileNotFoundError, match=rf"data_dir='{missing}' is not a folder"):
        data.read_sst2("dev", data_dir=missing)


def test_data_found_from_any_directory_by_argument_or_variable(monkeypatch, tmp_path):
    shared = data.data_dir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_REPO_ROOT", str(tmp_path))  # as installed: no checkout around the package
    monkeypatch.delenv("MS_PRUNE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"no data folder found: set MS_PRUNE_DATA=/path/to/data .* "
                                                r"or pass data_dir=\.\.\. to the reader"):
        data.read_sst2("dev")
    sentences, labels = data.read_sst2("dev", data_dir=shared)
    assert len(sentences) == len(labels) > 0
    monkeypatch.setenv("MS_PRUNE_DATA", shared)
    assert data.read_sst2("dev")[0] == sentences


def test_an_installed_copy_finds_data_through_ms_prune_data(tmp_path):
    shared = data.data_dir()
    site, elsewhere = tmp_path / "site-packages", tmp_path / "work"
    shutil.copytree(os.path.dirname(ms_prune.__file__), site / "ms_prune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere.mkdir()
    code = "from ms_prune.data import read_sst2; print(len(read_sst2('dev')[0]))"
    env = {k: v for k, v in os.environ.items() if k != "MS_PRUNE_DATA"}
    env["PYTHONPATH"] = str(site)
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere,
                           env={**env, "MS_PRUNE_DATA": shared})
    assert found.returncode == 0, found.stderr
    assert int(found.stdout.strip()) == len(data.read_sst2("dev")[0])
    lost = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert lost.returncode != 0 and "set MS_PRUNE_DATA=" in lost.stderr


# ---- item 7: the SmolLM2 sample, end to end on a tiny random Llama --------------------------
def tiny_llama_dir(directory):
    """A random grouped-query Llama (2 layers x 6 query heads sharing 2 key/value heads) and a
    byte-level tokenizer (256 ids, no merges) in a Hugging Face-layout folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(alphabet), hidden_size=48, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    model.save_pretrained(str(directory))
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


def test_llama_smollm2_runs_end_to_end_on_a_tiny_llama(tmp_path):
    module = load_script("llama_smollm2")
    model_dir = tiny_llama_dir(tmp_path / "tiny")
    config = write(tmp_path, {"seq_len": 16, "scoring": {"quick_batches": 2}, "quick_budgets": [0.5],
                              "quick_methods": ["gradnas_global", "random"], "quick_eval_windows": 2,
                              "finetune": {"quick_steps": 2, "methods": ["gradnas_global"]},
                              "latency": {"quick_repeats": 2}, "log_every": 1})
    out = tmp_path / "results" / "r.json"
    result = module.main(["--quick", "--config", config, "--model_dir", model_dir, "--json", str(out)])
    with open(out) as f:
        assert json.load(f)["complete"] is True
    assert (tmp_path / "results" / "r.png").stat().st_size > 0
    base, (entry,) = result["baseline"], result["budgets"]
    assert base["heads"] == 12 and base["kv_heads_per_layer"] == [2, 2] and result["eval_windows"] == 2
    assert entry["flops_budget"] == int(base["flops"] - 0.5 * base["attention_flops"])
    for name in ("gradnas_global", "random"):
        row = entry["methods"][name]
        assert row["flops"] <= entry["flops_budget"] and row["heads"] < 12 and np.isfinite(row["perplexity"])
        assert row["attention_flops_ratio"] <= 0.5 and row["parameters"] < base["parameters"]
    assert entry["latency"]["method"] == "gradnas_global" and entry["latency"]["ratio"] > 0
    assert np.isfinite(entry["methods"]["gradnas_global"]["perplexity_finetuned"])
    assert np.isfinite(base["perplexity_finetuned"]) and "perplexity_finetuned" not in entry["methods"]["random"]


def test_prune_llama_runs_end_to_end_on_a_tiny_llama(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="ms_prune.trainer")  # the Trainer's progress lines
    module = load_script("prune_llama")
    model_dir = tiny_llama_dir(tmp_path / "tiny")
    config = write(tmp_path, {"seq_len": 16, "calibration": {"quick_batches": 2, "batch_size": 2},
                              "quick_budgets": [0.75], "quick_variants": ["width", "uniform", "depth"],
                              "quick_methods": ["flap", "random"], "refit": ["flap"], "quick_eval_windows": 2,
                              "new_tokens": 2, "distill": {"quick_runs": ["uniform/flap"], "quick_steps": 2,
                                                           "batch_size": 1, "grad_accumulation": 2,
                                                           "vocab_chunk": 100, "log_every": 1}})
    out = tmp_path / "results" / "r.json"
    argv = ["--quick", "--config", config, "--model_dir", model_dir, "--json", str(out)]
    result = module.main(argv)
    printed = capsys.readouterr().out
    with open(out) as f:
        assert json.load(f)["complete"] is True
    (entry,) = result["budgets"]
    assert sorted(entry["variants"]) == ["depth/block_influence", "uniform/flap", "uniform/flap/refit",
                                         "uniform/random", "width/flap", "width/flap/refit", "width/random"]
    for name, row in entry["variants"].items():
        assert row["params_ratio"] <= 0.75 and np.isfinite(row["perplexity"]) and isinstance(row["answer"], str)
        assert row["ppl_pruned"] == row["perplexity"] and row["peak_rss_gb"] > 0 and 0 < row["flops_ratio"] <= 1
    assert entry["variants"]["depth/block_influence"]["layers_removed"] == [0] or \
        entry["variants"]["depth/block_influence"]["layers_removed"] == [1]
    assert len(set(entry["variants"]["uniform/flap"]["neurons_per_layer"])) == 1
    assert np.isfinite(result["unpruned"]["perplexity"]) and result["unpruned"]["parameters"] > 0
    # distillation of uniform/flap (2 steps of 2 micro-batches of 1 x 16 tokens) and the fair baseline
    assert result["teacher_ppl"] == result["unpruned"]["perplexity"] and np.isfinite(result["baseline_ppl"])
    assert result["reference_ppl"] == min(result["teacher_ppl"], result["baseline_ppl"])
    assert result["baseline"]["train_tokens"] == 2 * 2 * 16
    distilled = entry["variants"]["uniform/flap"]
    assert distilled["ppl_refit"] == entry["variants"]["uniform/flap/refit"]["perplexity"]
    assert np.isfinite(distilled["ppl_distilled"]) and isinstance(distilled["answer_distilled"], str)
    assert distilled["distill_tokens"] == 2 * 2 * 16 and distilled["distill_seconds"] > 0
    assert all("ppl_distilled" not in row for name, row in entry["variants"].items() if name != "uniform/flap")
    assert entry["run"] == "uniform/flap" and entry["ppl_distilled"] == distilled["ppl_distilled"]
    assert entry["distill_tokens"] == 64 and entry["ppl_refit"] == distilled["ppl_refit"]
    goals = result["goals"]
    assert sorted(goals) == ["params_75%_distilled", "params_75%_no_retraining"]
    assert goals["params_75%_distilled"]["ratio"] == pytest.approx(distilled["ppl_distilled"] / result["reference_ppl"])
    assert all(np.isfinite(g["ratio"]) and isinstance(g["met"], bool) for g in goals.values())
    assert "step 2/2 | loss" in caplog.text and "goal params_75%_distilled" in printed

    # --resume after a run killed during width/random: the other rows and the baseline are kept
    with open(out) as f:
        saved = json.load(f)
    del saved["budgets"][0]["variants"]["width/random"]
    saved["complete"] = False
    with open(out, "w") as f:
        json.dump(saved, f)
    second = module.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert "uniform/flap: kept from the interrupted run" in printed and "fair baseline: kept" in printed
    assert "width/random: kept" not in printed and "width/random: x" in printed
    assert "distilled from" not in printed and "scored heads and neurons by flap" not in printed
    again = second["budgets"][0]["variants"]
    assert list(again) == list(entry["variants"]) and second["complete"] and second["resumed"]
    for name, row in entry["variants"].items():
        assert (again[name] == row) == (name != "width/random"), name
    assert again["width/random"]["params_ratio"] == entry["variants"]["width/random"]["params_ratio"]
    assert second["baseline_ppl"] == result["baseline_ppl"] and second["goals"] == goals


def test_prune_smollm2_main_job_runs_end_to_end_on_a_tiny_llama(tmp_path):
    module = load_script("prune_smollm2")
    model_dir = tiny_llama_dir(tmp_path / "tiny")
    config = write(tmp_path, {"params": 0.8, "seq_len": 16, "calibration_batches": 2, "new_tokens": 2,
                              "output_dir": str(tmp_path / "pruned")})
    out = tmp_path / "results" / "r.json"
    result = module.main(["--quick", "--config", config, "--model_dir", model_dir, "--json", str(out)])
    with open(out) as f:
        assert json.load(f)["pruned"]["parameters"] == result["pruned"]["parameters"]
    assert result["report"]["params_ratio"] <= 0.8
    assert result["pruned"]["parameters"] < result["unpruned"]["parameters"]
    assert result["reload_max_abs_difference"] < 1e-5   # the standard folder reloads to the same logits
    with open(tmp_path / "pruned" / "config.json") as f:
        assert "pruned_ffn_neurons" not in json.load(f)   # a plain Hugging Face LlamaConfig
    for row in (result["unpruned"], result["pruned"]):
        assert np.isfinite(row["perplexity"]) and row["latency_ms"] > 0 and isinstance(row["answer"], str)

# ---- scripts run from an installed ms_prune ---------------------------------------------------
def script_offences(source, samples, harness_visible):
    """What in one script's ``source`` needs the checkout rather than the installed package: any
    use of ``sys.path``, an import of another sample (``samples``: their module names), or, where
    the harness is not beside the script (``harness_visible`` False: benchmarks/), of the harness."""
    forbidden = set(samples) | (set() if harness_visible else {"harness"})
    offences = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            offences.append((node.lineno, "uses sys.path"))
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            offences.append((node.lineno, "imports sys.path"))
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in modules:
            if module.split(".")[0] in forbidden:
                offences.append((node.lineno, f"imports {module}"))
    return [f"line {line}: {what}" for line, what in sorted(offences)]


def test_script_offences_are_found():
    bad = ("import sys, os\nsys.path.insert(0, os.getcwd())\nfrom sys import path\n"
           "from lrp_bert_sst2 import train\nimport harness\n")
    assert script_offences(bad, ["lrp_bert_sst2"], harness_visible=False) == [
        "line 2: uses sys.path", "line 3: imports sys.path", "line 4: imports lrp_bert_sst2", "line 5: imports harness"]
    assert script_offences("import sys\nfrom harness import sample_cli\nprint(sys.argv)\n", ["lrp_bert_sst2"],
                           harness_visible=True) == []


@pytest.mark.parametrize("folder", ["samples", "benchmarks"])
def test_no_script_edits_sys_path_or_imports_a_sample(folder):
    # a sample takes what it shares with others from samples/harness.py (beside it, so on its
    # path); benchmarks/ has no harness and uses the library alone
    offences = []
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, folder, name), encoding="utf-8") as f:
                found = script_offences(f.read(), SAMPLES, harness_visible=folder == "samples")
            offences += [f"{folder}/{name} {offence}" for offence in found]
    assert not offences, offences
