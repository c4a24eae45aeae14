"""Checkpoints that cannot be lost and resumes that say what they do (issue #21 item 9): a run owns
what it rotates, folders are written whole (kills simulated by the partial folders and files they
leave), resume falls back to the newest checkpoint that verifies, differing settings are applied
or refused by name, and bad batches, files and folders are named errors at the earliest moment."""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from ms_prune.engine import Algorithm, Event, Trainer
from ms_prune.fileio import verify_checksums, write_checksums
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.training import lm_cross_entropy

VOCAB = 40


def tiny_gpt2(n_head=4):
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=n_head,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def data(step):
    ids = np.random.default_rng(step).integers(0, VOCAB, (2, 9)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def trainer(folder, max_steps=4, model=None, **kwargs):
    settings = dict(checkpoint_interval=2, log_interval=0)
    settings.update(kwargs)
    return Trainer(model or tiny_gpt2(), lm_cross_entropy, data, max_steps=max_steps, checkpoint_dir=str(folder),
                   **settings)


def dead_pid():
    """The id of a process that has exited (what a killed writer leaves in its file names)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def losses(history):
    return [r["loss"] for r in history]


# ---- a run owns what it rotates; a fresh run in a used folder is refused ----------------------
def test_a_fresh_run_in_a_used_folder_is_refused(tmp_path):
    trainer(tmp_path).fit()
    with pytest.raises(ValueError, match=r"already holds checkpoints \(\['step_4', 'step_2'\]\); pass "
                                         r"resume_from='latest'"):
        trainer(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_2", "step_4"]  # nothing touched


def test_a_run_rotates_only_its_own_checkpoints(tmp_path):
    other = tmp_path / "other"
    trainer(other, max_steps=2).fit()
    run = tmp_path / "run"
    first = trainer(run, max_steps=2)
    first.fit()
    resumed = trainer(run, max_steps=8, resume_from=str(run / "step_2"), checkpoint_interval=1, keep_checkpoints=2)
    # another run's checkpoint with a higher step appears in the folder during the run
    shutil.copytree(other / "step_2", run / "step_100")
    resumed.fit()
    assert sorted(os.listdir(run)) == ["latest", "step_100", "step_7", "step_8"]
    assert (run / "latest").read_text() == "step_8"
    # a resumed run in a folder that already holds another run's checkpoints is refused
    with pytest.raises(ValueError, match=r"holds checkpoints of another run \(\['step_100'\]\)"):
        trainer(run, max_steps=8, resume_from="latest")


# ---- every checkpoint is written whole or not at all -------------------------------------------
class PruneAtFitEnd(Algorithm):
    """Prunes two heads of layer 0 at FIT_END (as LRP does), so fit re-saves its last step."""
    changes_graph = True

    def __init__(self):
        self.pruned = False

    def match(self, event, state):
        return event in (Event.FIT_END, Event.AFTER_LOAD) and (event == Event.AFTER_LOAD) == self.pruned

    def apply(self, event, state, logger):
        if state.model.heads_per_layer()[0] == 4:
            state.model.prune_heads({0: [0, 1]})
        self.pruned = True
        state.structure_changed = True

    def state_dict(self):
        return {"pruned": self.pruned}

    def load_state_dict(self, saved):
        self.pruned = saved["pruned"]


def test_a_resave_in_place_is_whole_and_loads(tmp_path):
    run = trainer(tmp_path, algorithms=[PruneAtFitEnd()])
    run.fit()  # step_4 saved at the interval, then again after the pruning at FIT_END
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_2", "step_4"]
    verify_checksums(str(tmp_path / "step_4"))
    model = tiny_gpt2()
    resumed = trainer(tmp_path, model=model, algorithms=[PruneAtFitEnd()], resume_from="latest")
    assert resumed.state.step == 4 and model.heads_per_layer() == [2, 4]


def test_what_a_killed_save_leaves_is_cleaned_or_restored(tmp_path, caplog):
    trainer(tmp_path).fit()
    pid = dead_pid()
    # killed while writing a new step_6, and while writing 'latest'
    shutil.copytree(tmp_path / "step_4", tmp_path / f"step_6.tmp-{pid}")
    (tmp_path / f".latest.tmp-{pid}").write_text("step_")
    # killed between the two renames of a re-save of step_4: only the moved-away old folder is left
    os.rename(tmp_path / "step_4", tmp_path / f"step_4.old-{pid}")
    with caplog.at_level(logging.WARNING, logger="ms_prune.trainer"):
        resumed = trainer(tmp_path, max_steps=6, resume_from="latest")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_2", "step_4"]
    assert any("interrupted saves" in r.getMessage() for r in caplog.records)
    assert resumed.state.step == 4


# ---- resume falls back to the newest checkpoint that verifies ----------------------------------
@pytest.mark.parametrize("damage", ["truncate", "zero", "no checksums"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, caplog, damage, mode):
    uninterrupted = losses(trainer(tmp_path / "full", max_steps=4).fit())
    trainer(tmp_path / "run").fit()
    latest = tmp_path / "run" / "step_4"
    tensors = latest / "tensors.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "zero":
        tensors.write_bytes(bytes(len(tensors.read_bytes())))
    else:
        (latest / "checksums.json").unlink()
    # asked for by name, the damaged one is a named error
    with pytest.raises(ValueError, match=r"step_4 does not verify: .*resume_from='latest' takes the newest"):
        trainer(tmp_path / "elsewhere", resume_from=str(latest))
    with caplog.at_level(logging.WARNING, logger="ms_prune.trainer"):
        resumed = trainer(tmp_path / "run", max_steps=4, resume_from="latest", checkpoint_interval=1,
                          keep_checkpoints=1)
    warned = [r.getMessage() for r in caplog.records if "newest checkpoint that verifies" in r.getMessage()]
    assert len(warned) == 1 and "step_4" in warned[0] and "step_2" in warned[0]
    assert resumed.state.step == 2
    assert losses(resumed.fit()) == uninterrupted[2:]
    verify_checksums(str(latest))  # written again, whole


def test_rotation_keeps_the_last_good_checkpoint(tmp_path):
    trainer(tmp_path).fit()
    tensors = tmp_path / "step_4" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    resumed = trainer(tmp_path, max_steps=6, resume_from="latest", checkpoint_interval=1, keep_checkpoints=1)
    resumed.max_steps = 3
    resumed.fit()  # saves step_3; the corrupt step_4 does not count as kept, step_2 may go
    good = [n for n in os.listdir(tmp_path) if n.startswith("step_") and n != "step_4"]
    assert good == ["step_3"]
    verify_checksums(str(tmp_path / "step_3"))
    resumed.max_steps = 6
    resumed.fit()  # step_4 is written again, whole
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_6"]


# ---- settings that differ from the checkpoint's: applied and logged, or refused by name ----------
def test_a_new_learning_rate_applies_and_is_logged(tmp_path, caplog):
    trainer(tmp_path, lr=1e-3).fit()
    with caplog.at_level(logging.WARNING, logger="ms_prune.trainer"):
        resumed = trainer(tmp_path, max_steps=6, lr=5e-4, resume_from="latest")
    assert float(resumed.state.optimizer.learning_rate.asnumpy()) == pytest.approx(5e-4)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "lr=0.0005 (the checkpoint's run had 0.001)" in messages and "max_steps=6" in messages


def test_max_steps_below_the_checkpoint_and_another_model_are_refused(tmp_path):
    trainer(tmp_path).fit()
    with pytest.raises(ValueError, match=r"max_steps=3 is below the step of the checkpoint .*step_4 \(4\)"):
        trainer(tmp_path, max_steps=3, resume_from="latest")
    # a 2-head model has the tensor shapes of the 4-head one
    with pytest.raises(ValueError, match=r"another model config \(n_head: checkpoint 4, model 2\)"):
        trainer(tmp_path, model=tiny_gpt2(n_head=2), resume_from="latest")


def test_a_finished_run_resumed_with_an_eval_fn_evaluates(tmp_path):
    trainer(tmp_path).fit()
    resumed = trainer(tmp_path, resume_from="latest", eval_fn=lambda model: {"score": 1.0})
    assert resumed.fit() == [{"step": 4, "score": 1.0}]


# ---- named errors at the earliest moment ---------------------------------------------------------
def test_garbage_latest_falls_back_with_a_warning(tmp_path, caplog):
    trainer(tmp_path).fit()
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="ms_prune.trainer"):
        resumed = trainer(tmp_path, resume_from="latest")
    assert resumed.state.step == 4
    assert any("latest does not name a checkpoint" in r.getMessage() for r in caplog.records)


def test_a_state_with_a_missing_key_is_named(tmp_path):
    trainer(tmp_path).fit()
    folder = tmp_path / "step_4"
    saved = json.loads((folder / "trainer_state.json").read_text())
    del saved["state"]["rng"]
    (folder / "trainer_state.json").write_text(json.dumps(saved))
    manifest = json.loads((folder / "checksums.json").read_text())
    write_checksums(str(folder), run_id=manifest["run_id"], step=manifest["step"])  # as an edit by hand would
    with pytest.raises(ValueError, match=r"step_4/trainer_state.json: the saved state lacks the key 'rng'"):
        trainer(tmp_path, resume_from=str(folder))


def test_an_unwritable_checkpoint_dir_is_refused_at_construction(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"checkpoint_dir .*file/checkpoints' is not a writable folder"):
        trainer(tmp_path / "file" / "checkpoints")


def scaled_loss(logits, labels, scale):
    return lm_cross_entropy(logits, labels) * scale.mean()


def test_a_diverging_loss_is_warned_once(mode, caplog):
    def exploding(step):  # the loss grows 1e15-fold from step 3 on, and stays finite
        inputs, labels = data(step)
        return inputs, labels, np.full((2,), 1.0 if step < 2 else 1e15, np.float32)
    run = Trainer(tiny_gpt2(), scaled_loss, exploding, max_steps=4, num_inputs=1, log_interval=0,
                  optimizer=lambda params: nn.SGD(params, 1e-9))
    with caplog.at_level(logging.WARNING, logger="ms_prune.trainer"):
        run.fit()
    warned = [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]
    assert len(warned) == 1 and "at step 3" in warned[0] and "max_grad_norm" in warned[0]


# ---- batches checked against the model and the loss ---------------------------------------------
@pytest.mark.parametrize("batch,error,message", [
    (lambda: (np.full((2, 8), VOCAB, np.int32), data(0)[1]), ValueError,
     rf"batch 0: the model's ids run from 0 to {VOCAB - 1} \(config.vocab_size={VOCAB}\), but batch\[0\] holds ids "
     rf"{VOCAB}..{VOCAB}"),
    (lambda: data(0)[0], TypeError, r"tuple of numpy arrays .* batch 0 is a ndarray of shape \(2, 8\)"),
    (lambda: (data(0)[0],), ValueError, r"batch 0 has 1 array\(s\) .* at least one model input and one target"),
    (lambda: ([[1, 2]], [[2, 3]]), TypeError, r"batch 0\[0\] is a list; each array of a batch must be a numpy array"),
    (lambda: data(0) * 2, ValueError, r"gives GPT2LMHeadModel.construct 3 array\(s\) .* takes 1 to 2 inputs"),
])
def test_bad_batches_are_named(batch, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny_gpt2(), lm_cross_entropy, lambda step: batch(), max_steps=1, log_interval=0).fit()


def test_labels_of_the_wrong_shape_are_named(mode):
    def short_labels(step):
        inputs, labels = data(step)
        return inputs, labels[:, :-1]
    with pytest.raises(ValueError, match=r"failed in loss_fn: .*outputs \(\(2, 8, 40\) Float32\) and the batch's "
                                         r"targets \(\(2, 7\) Int32\)"):
        Trainer(tiny_gpt2(), lm_cross_entropy, short_labels, max_steps=1, log_interval=0).fit()
