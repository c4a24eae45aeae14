"""Time to quality (samples/harness.py): the Trainer's per-step timing records, the TimedRun
clock that keeps compilation apart, interleaved races, where a curve first reaches a quality
(against a numpy reference), and the two samples end to end on tiny settings."""
import json
import os

import numpy as np
import pytest
import yaml

from ms_prune.data import shakespeare_chars
from ms_prune.engine import Trainer
from ms_prune.training import lm_cross_entropy

from conftest import load_script
from harness import TimedRun, first_reach, mean_ratio, per_seed, race, run_record, time_to_quality


class FakeState:
    step = 0


class FakeTrainer:
    """A Trainer's interface as TimedRun uses it; step k takes seconds[k - 1], the listed steps compile."""

    def __init__(self, seconds, compiled_steps=(), log=None, name=""):
        self.state, self.history, self.max_steps = FakeState(), [], 0
        self.seconds, self.compiled_steps, self.log, self.name = seconds, set(compiled_steps), log, name

    def fit(self):
        while self.state.step < self.max_steps:
            self.state.step += 1
            self.history.append({"step": self.state.step, "loss": 0.0, "seconds": self.seconds[self.state.step - 1],
                                 "compiled": self.state.step in self.compiled_steps})
        if self.log is not None:
            self.log.append((self.name, self.state.step))


def test_timed_run_counts_compiling_steps_at_the_median_and_the_rest_as_compile_time(tmp_path):
    seconds = [5.0, 1.0, 1.2, 0.8, 7.0, 1.0]  # steps 1 and 5 compile (a new kept length)
    qualities = iter([10.0, 6.0, 4.0])
    run = TimedRun("a", FakeTrainer(seconds, {1, 5}), lambda trainer: next(qualities), str(tmp_path / "curve.json"))
    run.evaluate()
    run.train_to(3)
    run.evaluate()
    run.train_to(6)
    run.evaluate()
    median = np.median([1.0, 1.2, 0.8, 1.0])
    assert run.median_step_seconds == pytest.approx(median)
    assert run.train_seconds == pytest.approx(4.0 + 2 * median)
    assert run.compile_seconds == pytest.approx(12.0 - 2 * median)
    assert [c[0] for c in run.curve] == [0, 3, 6] and [c[2] for c in run.curve] == [10.0, 6.0, 4.0]
    assert run.curve[1][1] == pytest.approx(2.2 + 1.1)  # at step 3 the median was that of 1.0 and 1.2
    record = run_record(run)
    assert record["final_quality"] == 4.0 and record["compiled_steps"] == 2 and len(record["curve"]) == 3

    resumed_trainer = FakeTrainer(seconds, {1, 5})
    resumed_trainer.state.step = 6  # as after Trainer(resume_from=...)
    resumed = TimedRun("a", resumed_trainer, None, str(tmp_path / "curve.json"))
    assert resumed.curve == run.curve and resumed.train_seconds == pytest.approx(run.train_seconds)
    fresh = TimedRun("a", FakeTrainer(seconds), None, str(tmp_path / "curve.json"))
    assert fresh.curve == []  # a run that starts at step 0 does not pick up an old curve


def test_race_interleaves_chunks_and_evaluates_after_each():
    log = []
    runs = [TimedRun(name, FakeTrainer([1.0] * 10, log=log, name=name), lambda t: float(t.state.step))
            for name in ("base", "algo")]
    race(runs, steps=5, eval_every=2, log=None)
    assert log == [("base", 2), ("algo", 2), ("base", 4), ("algo", 4), ("base", 5), ("algo", 5)]
    for run in runs:
        assert [c[0] for c in run.curve] == [0, 2, 4, 5]


def reference_first_reach(xs, ys, target):
    for i in range(1, len(xs)):
        if ys[i] <= target:
            return xs[i - 1] if ys[i - 1] <= target else float(np.interp(target, [ys[i], ys[i - 1]],
                                                                           [xs[i], xs[i - 1]]))
    return None


@pytest.mark.parametrize("seed", range(5))
def test_first_reach_matches_a_numpy_interpolation(seed):
    rng = np.random.default_rng(seed)
    ys = np.cumsum(rng.normal(-0.3, 1.0, 12)) + 20
    xs = np.cumsum(rng.uniform(0.5, 2.0, 12))
    curve = [(i, x, y) for i, (x, y) in enumerate(zip(xs, ys))]
    for target in (ys.min(), ys.min() - 1, np.median(ys), ys[0] + 5):
        expected = reference_first_reach(xs, ys, target)
        got = first_reach(curve, target, axis=1)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected)


def test_time_to_quality_is_the_ratio_of_seconds_to_the_baselines_final_quality():
    base, algo = (TimedRun(n, FakeTrainer([]), None) for n in ("base", "algo"))
    base.curve = [(0, 0.0, 10.0), (10, 10.0, 5.0), (20, 20.0, 4.0)]
    algo.curve = [(0, 0.0, 10.0), (10, 6.0, 4.5), (20, 12.0, 3.5)]
    result = time_to_quality(base, algo)
    assert result["target_quality"] == 4.0 and result["baseline_seconds_to_target"] == 20.0
    assert result["seconds_to_target"] == pytest.approx(9.0)  # halfway from 4.5 to 3.5
    assert result["time_to_baseline_quality"] == pytest.approx(0.45)
    assert result["steps_to_baseline_quality"] == pytest.approx(0.75)
    algo.curve = [(0, 0.0, 10.0), (20, 12.0, 4.2)]
    assert time_to_quality(base, algo)["time_to_baseline_quality"] is None


def test_a_mean_over_seeds_needs_every_seed_to_reach_the_quality():
    assert mean_ratio([0.2, 0.4]) == pytest.approx(0.3)
    assert mean_ratio([0.2, None]) is None and mean_ratio([]) is None
    records = [{"name": "a", "final_quality": 1.0, "compile_seconds": 2.0},
               {"name": "b", "final_quality": 3.0, "compile_seconds": 4.0},
               {"name": "a", "final_quality": 5.0, "compile_seconds": 6.0}]
    assert per_seed(records, ("a", "b")) == {"final_quality": {"a": [1.0, 5.0], "b": [3.0]},
                                              "compile_seconds": {"a": [2.0, 6.0], "b": [4.0]}}


def tiny_lm_data(step):
    ids = np.random.default_rng(step).integers(0, 40, (2, 9)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def test_trainer_records_each_steps_seconds_and_whether_it_compiled(mode):
    import mindspore as ms
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    ms.set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4))
    history = Trainer(model, lm_cross_entropy, tiny_lm_data, max_steps=3, log_interval=0).fit()
    assert all(r["seconds"] > 0 for r in history)
    compiled = [r["compiled"] for r in history]
    assert compiled[1:] == [False, False]  # the same graph again: nothing compiles
    if mode == "graph":
        assert compiled[0] is True


def test_shakespeare_chars_round_trip_to_the_text():
    from ms_prune.data import data_path
    (train, val), chars = shakespeare_chars()
    with open(data_path("tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    assert len(chars) == 65 and len(train) + len(val) == len(text)
    assert "".join(chars[i] for i in train[:200]) == text[:200]
    assert "".join(chars[i] for i in val[-50:]) == text[-50:]


def write_config(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def check_time_to_quality_result(result, out, names):
    with open(out) as f:
        saved = json.load(f)
    assert saved["seeds"] == result["seeds"]
    for name in names:
        assert len(saved["final_quality"][name]) == len(result["seeds"])
        assert all(np.isfinite(q) for q in saved["final_quality"][name])
        assert all(c >= 0 for c in saved["compile_seconds"][name])
    assert os.path.getsize(saved["plot"]) > 0
    for record in saved["runs"]:
        assert [c["step"] for c in record["curve"]] == [0, 2, 4]
        assert record["train_seconds"] > 0


def test_random_ltd_sample_reports_time_to_quality(tmp_path):
    config = write_config(tmp_path, {"model": {"n_layer": 3, "n_embd": 16, "n_head": 2}, "seq_len": 16,
                                     "batch_size": 2, "quick_steps": 4, "eval_every": 2, "eval_batches_quick": 1,
                                     "quick_seeds": [0, 1],
                                     "random_ltd": {"min_value": 8, "max_value": 16, "seq_per_step": 8}})
    out = str(tmp_path / "results" / "rl.json")
    result = load_script("random_ltd_gpt_shakespeare").main(["--quick", "--config", config, "--json", out])
    check_time_to_quality_result(result, out, ("baseline", "random_ltd"))
    assert result["seeds"] == [0, 1] and len(result["time_to_baseline_quality"]["per_seed"]) == 2
    ltd = [r for r in result["runs"] if r["name"] == "random_ltd"][0]
    assert ltd["kept_lengths"] == [8, 16] and ltd["compilations"] >= 2
    assert all(0 < c["layer_tokens_saved"] < 1 for c in result["comparisons"])


def test_pld_sample_reports_time_to_quality_and_sweeps(tmp_path):
    config = write_config(tmp_path, {"model": {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                                               "intermediate_size": 32}, "seq_len": 16, "batch_size": 2,
                                     "quick_steps": 4, "eval_every": 2, "eval_batches_quick": 1,
                                     "output_dir": str(tmp_path / "pld"),
                                     "sweep": [{"learning_rate": 0.002, "theta": 0.5, "gamma_times_steps": 5.0},
                                               {"learning_rate": 0.003, "theta": 0.75, "gamma_times_steps": 1.0}]})
    module = load_script("pld_bert_mlm")
    out = str(tmp_path / "results" / "pld.json")
    result = module.main(["--quick", "--config", config, "--json", out])
    check_time_to_quality_result(result, out, ("baseline", "pld"))
    assert len(result["time_to_baseline_quality"]) == 1 and "goal_met" in result
    swept = module.main(["--quick", "--sweep", "--config", config, "--json", str(tmp_path / "results" / "sweep.json")])
    assert sorted(swept["time_to_baseline_quality"]) == ["pld_gamma_times_steps1_learning_rate0.003_theta0.75",
                                                          "pld_gamma_times_steps5_learning_rate0.002_theta0.5"]
    assert len(swept["runs"]) == 3 and len(swept["comparisons"]) == 2


def test_a_sweep_setting_out_of_range_is_named(tmp_path):
    config = write_config(tmp_path, {"sweep": [{"learning_rate": 0.002, "theta": 1.5, "gamma_times_steps": 5.0}]})
    with pytest.raises(ValueError, match=r"sweep\[0\].theta must be in \(0, 1\], got 1.5"):
        load_script("pld_bert_mlm").main(["--quick", "--sweep", "--config", config])


def test_dynamic_shape_benchmark_reports_both_choices(tmp_path):
    module = load_script("random_ltd_dynamic_shape", folder="benchmarks")
    out = str(tmp_path / "dynamic.json")
    result = module.main(["--layers", "1", "--hidden", "16", "--heads", "2", "--batch_size", "2", "--lengths", "4", "8",
                          "--repeats", "1", "--json", out])
    with open(out) as f:
        assert json.load(f)["lengths"] == [4, 8]
    assert [e["kept_length"] for e in result["per_length"]] == [4, 8]
    assert all(e["static_step_seconds"] > 0 and e["dynamic_step_seconds"] > 0 for e in result["per_length"])
    with pytest.raises(ValueError, match="--lengths must be >= 1, got \\[0\\]"):
        module.main(["--lengths", "0"])
