"""Nothing lost, nothing silent: bad model inputs and damaged or interrupted checkpoints give
errors that name the argument or the file."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ms_prune import protocol
from ms_prune.models.bert import BertConfig, BertForSequenceClassification
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel

from conftest import ROOT

BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            max_position_embeddings=16)
GPT2 = dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)


def bert():
    ms.set_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT)).set_train(False)


def gpt2():
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).set_train(False)


def ids(shape, dtype=ms.int32):
    return Tensor(np.random.default_rng(0).integers(0, 50, shape), dtype)


# ---- item 2: inputs are checked where shapes are known (graph build / eager) ------------------
@pytest.mark.parametrize("make,owner,table", [(bert, "BertModel", "max_position_embeddings"),
                                              (gpt2, "GPT2Model", "n_positions")], ids=["bert", "gpt2"])
def test_bad_inputs_name_the_argument(mode, make, owner, table):
    model = make()
    model(ids((2, 16)), Tensor(np.ones((2, 16)), ms.int32))  # the longest allowed input runs
    cases = [
        ((ids((2, 17)),), ValueError, rf"{owner}: input_ids has 17 tokens .* 16 positions .*config\.{table}"),
        ((ids((2, 5), ms.float32),), TypeError, rf"{owner}: input_ids must hold int32 or int64 .* got dtype Float32"),
        ((ids((5,)),), ValueError, rf"{owner}: input_ids must be 2-D \(batch, seq\).* got shape \(5,?\)"),
        ((ids((2, 5)), Tensor(np.ones((2, 6)), ms.int32)), ValueError,
         rf"{owner}: attention_mask must have the shape of input_ids \(2, 5\), got \(2, 6\)"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            model(*args)


def test_bert_token_type_ids_shape_is_checked(mode):
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of input_ids \(2, 5\), got \(2, 4\)"):
        bert()(ids((2, 5)), None, Tensor(np.zeros((2, 4)), ms.int32))


# ---- item 3: damaged files name the file; saves are atomic and say when they overwrite -----------
@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:len(b) // 2], "incomplete metadata"),
    (lambda b: b"this is not a safetensors file", "header too large"),
    (lambda b: b"", "header too small"),
])
def test_damaged_weights_name_the_file(tmp_path, damage, message):
    bert().save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"{path}.* not a readable safetensors file .*{message}.*truncated or corrupt"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage,message", [
    (lambda t: t[:len(t) // 2], r"is not valid JSON \(.* at line \d+, column \d+\).*truncated or corrupt"),
    (lambda t: "[1, 2]", "must hold a JSON object of config keys, got a list"),
    (lambda t: "\udcff", "is not UTF-8 text"),
])
def test_damaged_config_names_the_file(tmp_path, damage, message):
    bert().save_pretrained(str(tmp_path))
    path = tmp_path / "config.json"
    text = damage(path.read_text())
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=rf"{path} {message}"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_checkpoint_mismatch_names_both_files(tmp_path):
    bert().save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 41
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors with .*config.json: .*intermediate.dense.weight"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_save_warns_when_it_overwrites_and_leaves_no_temporary_files(tmp_path, caplog):
    model = bert()
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(str(tmp_path))
    assert not [r for r in caplog.records if "overwriting" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "overwriting" in r.getMessage()]
    assert len(warned) == 1 and "config.json" in warned[0] and str(tmp_path) in warned[0]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


SAVER = """
import sys
import numpy as np
from mindspore import Tensor
sys.path.insert(0, {root!r})
from ms_prune.models.bert import BertForSequenceClassification
model = BertForSequenceClassification.from_pretrained({directory!r})
for param in model.get_parameters():  # the new checkpoint: every tensor + 1
    param.set_data(Tensor(param.asnumpy() + 1.0))
print("ready", flush=True)
while True:
    model.save_pretrained({directory!r})
    print("saved", flush=True)
"""


def test_kill_during_save_leaves_a_checkpoint_that_loads(tmp_path):
    # a few MB of weights, so a kill lands inside the write rather than between saves
    ms.set_seed(0)
    first = BertForSequenceClassification(BertConfig(**{**BERT, "vocab_size": 12000}))
    directory = str(tmp_path / "model")
    first.save_pretrained(directory)
    before = {n: p.asnumpy() for n, p in first.parameters_and_names()}
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=ROOT, directory=directory))
    for _ in range(2):  # two kills at random moments: a non-atomic save fails this most of the time
        child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            started = time.perf_counter()
            assert child.stdout.readline().strip() == "saved"
            one_save = time.perf_counter() - started
            time.sleep(np.random.default_rng().uniform(0, one_save))  # somewhere inside a later save
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        reloaded = BertForSequenceClassification.from_pretrained(directory)
        offsets = {round(float(np.max(np.abs(p.asnumpy() - before[n]))), 3)
                   for n, p in reloaded.parameters_and_names()}
        # each child adds 1 to what it loaded: any single offset is a whole checkpoint
        assert len(offsets) == 1 and offsets <= {0.0, 1.0, 2.0}, f"a mix of old and new tensors: {offsets}"


# ---- item 4: LRP prune_model runs once per gated copy ---------------------------------------------
def test_lrp_prune_model_twice_says_it_already_pruned():
    from ms_prune.heads.lrp import HeadPrunerBertLRP
    model = bert()
    pruner = HeadPrunerBertLRP(model)
    gated = pruner.decorate_model()
    for gate, log_a in zip(protocol.gates_of(gated, "head"), [[3.0, -3.0, 3.0, 3.0], [3.0] * 4]):
        gate.set_log_a(log_a)
    pruner.prune_model(gated)
    assert model.heads_per_layer() == [3, 4]
    weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    with pytest.raises(ValueError, match=r"prune_model: the model was already pruned \(heads \{0: \[1\]\} removed; "
                                         r"heads per layer now \[3, 4\]\).*call decorate_model\(\) again"):
        pruner.prune_model(gated)
    assert all(np.array_equal(p.asnumpy(), weights[n]) for n, p in model.parameters_and_names())
    # a second round the supported way: a new gated copy of the pruned model
    again = pruner.decorate_model()
    pruner.prune_model(again)
    assert model.heads_per_layer() == [3, 4]
