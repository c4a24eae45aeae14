"""The ``ms-prune`` command (ms_prune.cli): prune, train, eval and fetch on tiny models saved into a
temporary folder with a tiny tokenizer, in-process (``main([...])``) except where the console
script itself is the subject."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from ms_prune import cli
from ms_prune.data import token_encoder
from ms_prune.training import lm_perplexity, set_context

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch the quiet river and "
         "every morning bright birds sing songs of green hills").split()


def _text(seed, sentences):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 8)) + "." for _ in range(sentences))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A text, TSV and JSONL file, a word-level tokenizer, and tiny Llama, GPT-2 and BERT-classifier
    folders (save_pretrained + tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from ms_prune.models.bert import BertConfig, BertForSequenceClassification
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text(_text(0, 120))
    rows = [(" ".join(np.random.default_rng(i).choice(WORDS, 6)), i % 2) for i in range(40)]
    (root / "labelled.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows))
    vocab = {w: i for i, w in enumerate(["[UNK]", "."] + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    set_context("graph", seed=0)
    made = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "bert": BertForSequenceClassification(BertConfig(
            vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)),
    }
    paths = {"root": root, "text": str(text), "tsv": str(root / "labelled.tsv"), "jsonl": str(root / "texts.jsonl"),
             "tokenizer": str(root)}
    for name, model in made.items():
        model.save_pretrained(str(root / name))
        shutil.copy(root / "tokenizer.json", root / name / "tokenizer.json")
        paths[name] = str(root / name)
    return paths


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``ms-prune ARGV`` in this process."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


# ---- the commands exist ------------------------------------------------------------------------
def test_help_runs_as_a_module_and_as_the_console_script_from_another_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    module = subprocess.run([sys.executable, "-m", "ms_prune", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 0, module.stderr
    assert all(c in module.stdout for c in ("prune", "train", "eval", "fetch"))
    script = shutil.which("ms-prune", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the console script is not installed next to this Python (pip install -e .)")
    proc = subprocess.run([script, "prune", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(default: activation)" in proc.stdout and "--params" in proc.stdout  # defaults shown


def test_setup_declares_the_console_script():
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert '"ms-prune=ms_prune.cli:main"' in f.read()


@pytest.mark.parametrize("argv,named", [
    (["prune", "{llama}", "{out}", "--params", "150%"], "--params"),
    (["prune", "{llama}", "{out}", "--params", "half"], "--params"),
    (["prune", "{llama}", "{out}", "--method", "best"], "--method"),
    (["prune", "{root}/nothing", "{out}", "--params", "50%"], "MODEL_DIR"),
    (["prune", "{llama}", "{out}", "--params", "50%", "--flops", "50%"], "one budget"),
    (["prune", "{llama}", "{out}", "--samples", "0", "--params", "50%"], "--samples"),
    (["eval", "{llama}", "--seq-len", "-3"], "--seq-len"),
    (["fetch", "bert-large"], "model"),
])
def test_bad_arguments_are_argparse_errors_naming_the_argument(folders, tmp_path, capsys, argv, named):
    argv = [a.format(out=tmp_path / "out", **folders) for a in argv]
    status, _, err = run_cli(capsys, *argv)
    assert status == 2 and "error:" in err and named in err, err


# ---- prune -------------------------------------------------------------------------------------
def test_prune_llama_uniform_writes_models_that_reload_with_the_reported_size(folders, tmp_path, capsys):
    from ms_prune.models.llama import LlamaForCausalLM
    out = tmp_path / "pruned"
    status, stdout, err = run_cli(capsys, "prune", folders["llama"], out, "--params", "80%", "--uniform",
                                  "--data", folders["text"], "--samples", 4, "--batch-size", 2, "--seq-len", 16)
    assert status == 0, err
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params_after"] <= 0.8 * report["params_before"] and report["method"] == "activation"
    assert report["constraints"] == {"params": "80%"} and report["seq_len"] == 16 and report["uniform"]
    for folder in (out, out / "standard"):
        reloaded = LlamaForCausalLM.from_pretrained(str(folder))
        assert reloaded.num_parameters() == report["params_after"]
        assert (folder / "tokenizer.json").is_file()
    standard = json.loads((out / "standard" / "config.json").read_text())
    assert "pruned_heads" not in standard or not standard["pruned_heads"]
    assert f"{report['params_after']:,}" in stdout and "calibration" in err  # the table; progress


@pytest.mark.parametrize("model,options", [
    ("gpt2", ["--flops", "70%", "--method", "flap", "--data", "{tsv}", "--mode", "pynative"]),
    ("bert", ["--params", "90%", "--method", "magnitude"]),   # no data needed
    ("llama", ["--heads", "2", "--ffn", "24", "--data", "{jsonl}", "--method", "gradnas"]),
    ("llama", ["--layers", "1", "--data", "{text}"]),
    ("llama", ["--hidden-size", "24", "--data", "{text}"]),
])
def test_prune_each_architecture_budget_and_shape(folders, tmp_path, capsys, model, options):
    out = tmp_path / "pruned"
    options = [o.format(**folders) for o in options]
    status, _, err = run_cli(capsys, "prune", folders[model], out, *options, "--samples", 2, "--batch-size", 2,
                             "--seq-len", 8)
    assert status == 0, err
    report = json.loads((out / "prune_report.json").read_text())
    cls, _ = cli.model_class(str(out))
    assert cls.from_pretrained(str(out)).num_parameters() == report["params_after"] < report["params_before"]
    if "--heads" in options:
        assert report["heads_per_layer"] == [2, 2] and report["neurons_per_layer"] == [24, 24]
    if "--layers" in options:
        assert len(report["layers_removed"]) == 1
    if "--hidden-size" in options:
        assert report["hidden_size_after"] == 24 < report["hidden_size_before"]


def test_prune_mistakes_found_later_are_one_line_errors(folders, tmp_path, capsys):
    status, _, err = run_cli(capsys, "prune", folders["bert"], tmp_path / "o", "--params", "50%", "--method",
                             "gradnas", "--data", folders["text"], "--seq-len", 8)
    assert status == 1 and "--method gradnas" in err and "Traceback" not in err
    status, _, err = run_cli(capsys, "prune", folders["gpt2"], tmp_path / "o", "--params", "50%", "--seq-len", 64)
    assert status == 1 and "--seq-len 64" in err and "32 positions" in err


# ---- eval --------------------------------------------------------------------------------------
def test_eval_prints_the_library_perplexity(folders, capsys):
    from ms_prune.models.llama import LlamaForCausalLM
    status, stdout, err = run_cli(capsys, "eval", folders["llama"], "--data", folders["text"], "--seq-len", 16,
                                  "--batch-size", 2, "--max-batches", 3)
    assert status == 0, err
    printed = float(re.search(r"^perplexity\s+([\d.]+)$", stdout, re.M).group(1))
    tokens = token_encoder(folders["llama"])(_text(0, 120))
    expected = lm_perplexity(LlamaForCausalLM.from_pretrained(folders["llama"]), tokens, 2, 16, 3)
    assert printed == pytest.approx(round(expected, 4), abs=1e-4)


def test_eval_prints_classifier_accuracy(folders, capsys):
    status, stdout, err = run_cli(capsys, "eval", folders["bert"], "--data", folders["tsv"], "--seq-len", 16,
                                  "--batch-size", 8, "--mode", "pynative")
    assert status == 0, err
    assert 0 <= float(re.search(r"^accuracy_percent\s+([\d.]+)$", stdout, re.M).group(1)) <= 100
    status, _, err = run_cli(capsys, "eval", folders["bert"], "--data", folders["text"], "--seq-len", 16)
    assert status == 1 and "labelled" in err


# ---- train -------------------------------------------------------------------------------------
def write_recipe(path, **changes):
    recipe = {"model": changes.pop("model"), "data": {"train": changes.pop("train"), "seq_len": 8, "batch_size": 4},
              "trainer": {"max_steps": 4, "lr": "1e-3", "log_interval": 2, "checkpoint_interval": 2},
              "algorithms": {"pld": {"theta": 0.5, "gamma": 0.1}}, "output": str(path.parent / "run")}
    for key, value in changes.items():
        recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_runs_a_recipe_resumes_and_saves_the_model(folders, tmp_path, capsys):
    from ms_prune.models.gpt2 import GPT2LMHeadModel
    recipe = write_recipe(tmp_path / "recipe.yaml", model=folders["gpt2"], train=folders["text"])
    status, stdout, err = run_cli(capsys, "train", recipe)
    assert status == 0, err
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert [r["step"] for r in report["history"]] == [1, 2, 3, 4] and "last loss" in stdout
    status, _, err = run_cli(capsys, "train", recipe)  # the folder holds this run's checkpoints
    assert status == 1 and "--resume" in err
    write_recipe(recipe, model=folders["gpt2"], train=folders["text"],
                 trainer={"max_steps": 6, "lr": 1e-3, "log_interval": 2, "checkpoint_interval": 2})
    status, _, err = run_cli(capsys, "train", recipe, "--resume")
    assert status == 0, err
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert [r["step"] for r in report["history"]] == [5, 6]  # went on from step 4
    assert GPT2LMHeadModel.from_pretrained(report["model"]).num_parameters() == report["parameters"]


def test_train_a_classifier_from_a_zoo_config_with_lrp_and_eval(folders, tmp_path, capsys):
    config = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    recipe = write_recipe(tmp_path / "recipe.yaml", model={"type": "bert", "class": "BertForSequenceClassification",
                                                           "config": config},
                          train=folders["tsv"], algorithms={"LRP": {"target_heads": 4, "warmup_steps": 1}})
    values = yaml.safe_load(recipe.read_text())
    values["data"].update(tokenizer=folders["tokenizer"], eval=folders["tsv"], eval_batches=2)
    recipe.write_text(yaml.safe_dump(values))
    status, stdout, err = run_cli(capsys, "train", recipe)
    assert status == 0, err
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert sum(report["heads_per_layer"]) == 4 and "accuracy_percent" in report["history"][-1]
    assert "accuracy_percent" in stdout


@pytest.mark.parametrize("change,named", [
    ({"data": {"train": "austen", "seq_lne": 8}}, r"data.seq_lne.*did you mean 'data.seq_len'"),
    ({"trainer": {"max_steps": 2, "lrr": 0.1}}, r"trainer.lrr.*did you mean 'trainer.lr'"),
    ({"trainer": {"lr": 0.1}}, r"missing key\(s\) \['trainer.max_steps'\]"),
    ({"algorithms": {"lpr": {}}}, r"algorithms.lpr.*allowed at algorithms: .*'LRP'.*'pld'"),
    ({"algorithms": {"pld": {"thetta": 0.5}}}, r"algorithms.pld.thetta.*did you mean 'algorithms.pld.theta'"),
    ({"model": {"type": "gpt2", "config": {"n_layers": 2}}},
     r"model.config.n_layers.*did you mean 'model.config.n_layer'"),
    ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_recipe_mistakes_name_their_full_path(folders, tmp_path, capsys, change, named):
    recipe = write_recipe(tmp_path / "recipe.yaml", **{"model": folders["gpt2"], "train": folders["text"], **change})
    status, _, err = run_cli(capsys, "train", recipe)
    assert status == 1 and re.search(named, err), err


def test_the_documented_recipe_is_valid():
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
    assert blocks
    for block in blocks:
        recipe = yaml.safe_load(block)
        cli._check_recipe("docs/cli.md", recipe)


# ---- fetch -------------------------------------------------------------------------------------
def test_fetch_prints_the_folder_the_hub_gives(monkeypatch, tmp_path, capsys):
    from ms_prune import hub
    monkeypatch.setitem(hub.MODELS, "minilm", lambda cache_dir: os.path.join(cache_dir, "all-MiniLM-L6-v2"))
    status, stdout, _ = run_cli(capsys, "fetch", "minilm", "--cache-dir", tmp_path)
    assert status == 0 and stdout.strip().splitlines()[-1] == os.path.join(str(tmp_path), "all-MiniLM-L6-v2")

    def offline(cache_dir):
        raise RuntimeError("Could not download all-MiniLM-L6-v2")
    monkeypatch.setitem(hub.MODELS, "minilm", offline)
    status, _, err = run_cli(capsys, "fetch", "minilm")
    assert status == 1 and "Could not download" in err
