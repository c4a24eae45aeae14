"""The engine itself: event order and trace, argument checks, rebuilding the step after surgery
(the silent stale-step failure), checkpoints and resume, in GRAPH_MODE and PyNative."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops

from ms_prune.engine import Algorithm, AlgorithmCallback, Engine, Event, State, Trainer
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel


def lm_loss(logits, labels):
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def data(step):
    ids = np.random.default_rng(step).integers(0, 40, (2, 9)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def tiny_gpt2():
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


class Recorder(Algorithm):
    def __init__(self, label, log):
        self.label, self.log = label, log

    def match(self, event, state):
        return event in (Event.FIT_START, Event.BATCH_START, Event.BATCH_END, Event.FIT_END)

    def apply(self, event, state, logger):
        self.log.append((event.value, self.label))

    @property
    def name(self):
        return f"Recorder{self.label}"


def test_after_and_end_events_run_algorithms_in_reverse_order():
    log = []
    state = State(model=nn.Dense(2, 2), algorithms=[Recorder("a", log), Recorder("b", log)])
    engine = Engine(state)
    engine.run_event(Event.BATCH_START)
    engine.run_event(Event.BATCH_END)
    engine.run_event("fit_end")
    assert log == [("batch_start", "a"), ("batch_start", "b"), ("batch_end", "b"), ("batch_end", "a"),
                   ("fit_end", "b"), ("fit_end", "a")]
    assert [e for _, e, _ in engine.trace] == ["batch_start"] * 2 + ["batch_end"] * 2 + ["fit_end"] * 2


def test_engine_refuses_what_is_not_an_algorithm_or_repeats():
    with pytest.raises(TypeError, match=r"algorithms\[0\] must be a Algorithm"):
        Engine(State(nn.Dense(2, 2), algorithms=["pld"]))
    with pytest.raises(ValueError, match="once"):
        Engine(State(nn.Dense(2, 2), algorithms=[Algorithm(), Algorithm()]))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_steps=0), ValueError, "max_steps"), (dict(max_steps=2.5), TypeError, "max_steps"),
    (dict(lr=-1.0), ValueError, "lr"), (dict(lr="1e-4"), TypeError, "lr"),
    (dict(optimizer=nn.Adam(nn.Dense(2, 2).trainable_params())), TypeError, "rebuilt after surgery"),
    (dict(checkpoint_interval=2), ValueError, "checkpoint_dir"), (dict(log_interval=-1), ValueError, "log_interval")])
def test_trainer_arguments_are_checked_by_name(kwargs, error, match):
    settings = dict(max_steps=2)
    settings.update(kwargs)
    with pytest.raises(error, match=match):
        Trainer(tiny_gpt2(), lm_loss, data, **settings)


class PruneAt(Algorithm):
    """Prunes two heads of layer 0 at a step: the surgery case that used to train nothing."""
    changes_graph = True

    def __init__(self, step):
        self.at = step

    def match(self, event, state):
        return event == Event.BATCH_START and state.step == self.at

    def apply(self, event, state, logger):
        state.model.prune_heads({0: [0, 1]})
        state.structure_changed = True


def test_steps_after_surgery_train_the_new_weights(mode):
    model = tiny_gpt2()
    trainer = Trainer(model, lm_loss, data, max_steps=4, algorithms=[PruneAt(2)], log_interval=0)
    trainer.max_steps = 2
    trainer.fit()
    trainer.max_steps = 3
    trainer.fit()  # step 3 prunes, rebuilds, trains
    weight = model.transformer.h[0].attn.c_attn.weight
    before = weight.asnumpy().copy()
    assert weight.shape[1] == 3 * 2 * 4  # two of four heads (head size 4) left
    trainer.max_steps = 4
    trainer.fit()
    assert np.abs(weight.asnumpy() - before).max() > 0, "the step after surgery did not train the pruned weights"


def test_checkpoints_rotate_and_latest_points_to_the_newest(tmp_path):
    trainer = Trainer(tiny_gpt2(), lm_loss, data, max_steps=6, checkpoint_dir=str(tmp_path), checkpoint_interval=2,
                      keep_checkpoints=2, log_interval=0)
    trainer.fit()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_4", "step_6"]
    assert (tmp_path / "latest").read_text() == "step_6"
    saved = json.loads((tmp_path / "step_6" / "trainer_state.json").read_text())
    assert saved["state"]["counters"]["step"] == 6
    resumed = Trainer(tiny_gpt2(), lm_loss, data, max_steps=6, checkpoint_dir=str(tmp_path), resume_from="latest",
                      log_interval=0)
    assert resumed.state.step == 6 and resumed.fit() == []


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    Trainer(tiny_gpt2(), lm_loss, data, max_steps=2, checkpoint_dir=str(tmp_path), log_interval=0).fit()
    with pytest.raises(ValueError, match="algorithms"):
        Trainer(tiny_gpt2(), lm_loss, data, max_steps=2, algorithms=[PruneAt(5)],
                resume_from=str(tmp_path / "step_2"))
    (tmp_path / "step_2" / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="trainer_state.json"):
        Trainer(tiny_gpt2(), lm_loss, data, max_steps=2, resume_from=str(tmp_path / "step_2"))


def test_algorithm_callback_refuses_algorithms_that_need_new_graphs():
    class NeedsGraphs(Algorithm):
        runs_in_model_train = False
    with pytest.raises(ValueError, match="NeedsGraphs.*Trainer"):
        AlgorithmCallback(tiny_gpt2(), [NeedsGraphs()])
