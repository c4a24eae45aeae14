"""GradNAS: mask gradients against finite differences, in-graph accumulation, FFN neuron surgery
(against a masked reference, save/reload), budgets met exactly-or-under by both selectors (or a
named error), the refit, score files, baselines, the algorithm class and two-worker scoring."""
import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune import protocol
from ms_prune.heads import apply_lrp
from ms_prune.gradnas import GradNAS, apply_gradnas, compute_scores
from ms_prune.gradnas import masks as gradnas_masks
from ms_prune.gradnas.gradnas import GradNASScores
from ms_prune.cost import CostModel
from ms_prune.models.bert import BertConfig, BertForSequenceClassification
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
from ms_prune.models.modeling_utils import MASK_VALUE
from ms_prune.training import LMLoss, set_context

from conftest import run_two_workers

HERE = os.path.dirname(os.path.abspath(__file__))
BERT = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=16, initializer_range=0.3)
GPT2 = dict(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=24, initializer_range=0.3)
SEQ = 8


def bert(seed=0):
    ms.set_seed(seed)
    return BertForSequenceClassification(BertConfig(**BERT))


def gpt2(seed=0):
    ms.set_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2))


def bert_batches(count, seed=0, batch=4):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 40, (batch, SEQ)).astype(np.int32), rng.integers(0, 2, batch).astype(np.int32))
            for _ in range(count)]


def gpt2_batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(np.split(rng.integers(0, 40, (4, 2 * SEQ)).astype(np.int32), 2, axis=1)) for _ in range(count)]


def bert_loss(model):
    return nn.WithLossCell(model, nn.CrossEntropyLoss())


def weights(model):
    return {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}


def logits(model, ids):
    model.set_train(False)
    out = model(Tensor(ids))
    return out.asnumpy()


# ---- masks and scores ----------------------------------------------------------------------------
def test_mask_gradients_match_finite_differences(mode):
    """|d loss / d mask| from the compiled scoring step equals a central finite difference of the
    loss in each mask entry; the squared method gives its square; the weights, parameter names
    and graph are left as they were."""
    model = bert()
    loss_net = bert_loss(model)
    batch = bert_batches(1)
    before = weights(model)
    absolute = compute_scores(model, loss_net, batch, method="abs_grad")
    squared = compute_scores(model, loss_net, batch, method="fisher")
    after = weights(model)
    assert list(after) == list(before)  # masks removed, names as before
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    for a, s in zip(absolute.heads + absolute.neurons, squared.heads + squared.neurons):
        np.testing.assert_allclose(s, a * a, rtol=1e-5, atol=1e-12)

    head_cells, neuron_cells = gradnas_masks.attach_masks(model)
    model.set_train(False)
    ids, labels = (Tensor(x) for x in batch[0])
    eps = 1e-2
    checked = 0
    for cells, scores in ((head_cells, absolute.heads), (neuron_cells, absolute.neurons)):
        for cell, layer_scores in zip(cells, scores):
            for position in (0, len(layer_scores) - 1):
                values = []
                for delta in (eps, -eps):
                    mask = np.ones(cell.mask.shape, np.float32)
                    mask[position] += delta
                    cell.mask.set_data(Tensor(mask))
                    values.append(float(loss_net(ids, labels).asnumpy()))
                cell.mask.set_data(Tensor(np.ones(cell.mask.shape, np.float32)))
                difference = abs(values[0] - values[1]) / (2 * eps)
                np.testing.assert_allclose(layer_scores[position], difference, rtol=3e-2, atol=3e-4)
                checked += 1
    gradnas_masks.detach(model)
    assert checked == 8
    assert max(float(s.max()) for s in absolute.heads + absolute.neurons) > 1e-2  # not trivially 0


def test_scores_accumulate_over_batches_in_the_graph(mode):
    model = gpt2()
    loss_net = LMLoss(model)
    batches = gpt2_batches(2)
    both = compute_scores(model, loss_net, batches)
    # each part: the first batch of an iterator (num_batches=1 reads no further)
    parts = [compute_scores(model, loss_net, iter(batches[i:]), num_batches=1) for i in range(len(batches))]
    for kind in ("heads", "neurons"):
        for layer in range(2):
            total = sum(getattr(p, kind)[layer] for p in parts)
            np.testing.assert_allclose(getattr(both, kind)[layer], total, rtol=1e-5, atol=1e-12)
    assert both.num_batches == 2 and [p.num_batches for p in parts] == [1, 1]


def test_existing_gate_is_refused():
    model = bert()
    apply_lrp(model)
    with pytest.raises(ValueError, match=r"already has a head gate \(ConcreteGate.*remove_lrp\(model\)"):
        compute_scores(model, bert_loss(model), bert_batches(1))


# ---- FFN neuron surgery --------------------------------------------------------------------------
def _zero_neurons(model, neurons):
    """The masked reference: the same model with those neurons' output-projection columns zeroed."""
    for layer, units in neurons.items():
        declared = model.ffn_units(layer)
        projection, layout = declared.output_projection(), declared.layout
        weight = projection.weight.asnumpy().copy()
        if layout == "linear":
            weight[:, units] = 0
        else:
            weight[units, :] = 0
        projection.weight.set_data(Tensor(weight))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_ffn_pruning_equals_masked_reference_and_round_trips(mode, family, tmp_path):
    make, width = (bert, BERT["intermediate_size"]) if family == "bert" else (gpt2, GPT2["n_inner"])
    neurons = {0: [1, 5, 6, 20], 1: list(range(width))}  # layer 1 keeps no neuron at all
    ids = np.random.default_rng(3).integers(0, 40, (2, SEQ)).astype(np.int32)
    reference = make()
    _zero_neurons(reference, neurons)
    model = make()
    params, flops = model.num_parameters(), model.forward_flops(SEQ)
    model.prune_ffn_neurons({0: [1, 5]}).prune_ffn_neurons({0: [5, 6, 20], 1: neurons[1]})  # merges
    assert model.neurons_per_layer() == [width - 4, 0]
    assert model.config.pruned_ffn_neurons == neurons
    assert model.ffn_layers()[0].kept_neurons == [n for n in range(width) if n not in neurons[0]]
    hidden = model.config.hidden_size if family == "bert" else model.config.n_embd
    assert params - model.num_parameters() == (width + 4) * (2 * hidden + 1)
    assert flops - model.forward_flops(SEQ) == (width + 4) * 4 * hidden * SEQ
    np.testing.assert_allclose(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["pruned_ffn_neurons"] == {"0": neurons[0], "1": neurons[1]}
    reloaded = type(model).from_pretrained(str(tmp_path))
    assert reloaded.neurons_per_layer() == model.neurons_per_layer()
    np.testing.assert_array_equal(logits(reloaded, ids), logits(model, ids))
    # the dense Hugging Face export: full widths, removed neurons zeroed, the same outputs
    model.export_hf_dense(str(tmp_path / "dense"))
    dense = type(model).from_pretrained(str(tmp_path / "dense"))
    assert dense.neurons_per_layer() == [width, width] and dense.config.pruned_ffn_neurons == {}
    np.testing.assert_allclose(logits(dense, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_ffn_pruning_errors_name_the_bad_index():
    model = bert()
    with pytest.raises(ValueError, match=r"prune_ffn_neurons: layer 0 has neurons 0..23; neuron\(s\) \[24\]"):
        model.prune_ffn_neurons({0: [3, 24]})
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        model.prune_ffn_neurons({2: [0]})
    assert model.neurons_per_layer() == [24, 24]
    with pytest.raises(ValueError, match=r"pruned_ffn_neurons of layer 1 names neuron\(s\) \[30\]"):
        BertConfig(**BERT, pruned_ffn_neurons={1: [30]})
    unpruned = BertConfig(**BERT).to_dict()
    assert "pruned_ffn_neurons" not in unpruned  # an unpruned config.json stays Hugging Face's


# ---- budgets ------------------------------------------------------------------------------------
def _leftover_check(result, metric):
    """Cost <= budget, and no pruned unit would still have fitted (as close as units allow)."""
    cost, budget = result["after"][metric], result["budget"]
    assert cost <= budget
    pruned_unit_costs = [result["unit_costs"]["head"][layer] for layer in result["pruned_heads"]] + [
        result["unit_costs"]["neuron"][layer] for layer in result["pruned_neurons"]]
    if pruned_unit_costs:
        assert budget - cost < min(pruned_unit_costs)


@pytest.mark.parametrize("selector", ["global", "bisect"])
@pytest.mark.parametrize("constraint", [{"flops": "60%"}, {"flops": "25%"}, {"params": "80%"}, {"flops": 150000}])
def test_selectors_meet_the_budget_or_under(selector, constraint):
    for family, make in (("bert", bert), ("gpt2", gpt2)):
        model = make()
        scores = compute_scores(model, method="random", seed=1)
        result = apply_gradnas(model, constraints=constraint, selector=selector, seq_len=SEQ, scores=scores)
        metric = next(iter(constraint))
        assert result["after"][metric] == (model.forward_flops(SEQ) if metric == "flops" else model.num_parameters())
        _leftover_check(result, metric)
        assert result["ratios"][metric] < 1.0


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_llama_grouped_query_heads_meet_the_budget(metric):
    """Llama with 6 query heads sharing 2 key/value heads per layer, and its SwiGLU FFN: a key/value
    head goes only with its whole query group, and the model after surgery costs no more than the
    cost model predicts (apply_gradnas raises otherwise)."""
    groups_removed = 0
    for seed, fraction in enumerate(["90%", "75%", "60%", "50%"]):
        ms.set_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=16, num_hidden_layers=3,
                                             num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True))
        scores = compute_scores(model, method="random", seed=seed)
        result = apply_gradnas(model, constraints={metric: fraction}, seq_len=SEQ, scores=scores)
        assert result["after"][metric] <= result["budget"] and result["pruned_heads"]
        for attention in model.attention_layers():
            assert attention.kept_kv_heads == sorted({h // 3 for h in attention.kept_heads})
            kv_rows = attention.k_proj.out_features if attention.num_heads else 0
            assert len(attention.kept_kv_heads) * attention.head_dim == kv_rows
            groups_removed += 2 - len(attention.kept_kv_heads)
    assert groups_removed  # the per-group cost correction was exercised


def test_llama_reachable_floor_is_what_pruning_everything_reaches():
    """The floor GradNAS reports counts the key/value heads that leave with their last query heads
    (it once reported 0.799 of FLOPs for SmolLM2 while the same call went down to 0.753)."""
    ms.set_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2))
    scores = compute_scores(model, method="random")
    floor = CostModel(model, "flops", SEQ).floor
    result = apply_gradnas(model, constraints={"flops": floor}, seq_len=SEQ, scores=scores)
    assert model.heads_per_layer() == [0, 0] and result["after"]["flops"] == floor
    with pytest.raises(ValueError, match=f"smallest reachable flops is {floor:,}"):
        apply_gradnas(LlamaForCausalLM(model.config.copy(pruned_heads={})), constraints={"flops": floor - 1},
                      seq_len=SEQ, scores=scores)


def test_prune_limits_the_unit_kinds():
    """``prune=("heads",)``: the FFN stays whole and its cost counts against the budget."""
    ms.set_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2))
    scores = compute_scores(model, method="random")
    result = apply_gradnas(model, constraints={"flops": "90%"}, seq_len=SEQ, scores=scores, prune=("heads",))
    assert model.neurons_per_layer() == [16, 16] and sum(model.heads_per_layer()) < 12
    assert result["after"]["flops"] <= result["budget"]
    with pytest.raises(ValueError, match=r"keeps the neurons it may not prune \(heads only\)"):
        apply_gradnas(model, constraints={"flops": "30%"}, seq_len=SEQ, scores=compute_scores(model, method="random"),
                      prune="heads")  # above the floor (every unit gone), below it with the FFN whole
    with pytest.raises(ValueError, match="prune entries"):
        apply_gradnas(model, constraints={"flops": "90%"}, seq_len=SEQ, scores=scores, prune=("layers",))


def test_llama_fisher_scores_and_refit(mode):
    ms.set_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2))
    result = apply_gradnas(model, LMLoss(model), gpt2_batches(2), constraints={"flops": "90%"}, seq_len=SEQ,
                           refit=True)
    assert result["scores"].method == "fisher" and all(h.sum() > 0 for h in result["scores"].heads)
    assert sum(model.heads_per_layer()) + sum(model.neurons_per_layer()) < 12 + 32  # SwiGLU neurons count too
    assert model.neurons_per_layer() == result["neurons_per_layer"] and result["after"]["flops"] <= result["budget"]


def test_unsatisfiable_budget_names_the_reachable_range():
    model = bert()
    full = model.forward_flops(SEQ)
    with pytest.raises(ValueError, match=r"smallest reachable flops is [\d,]+ .* largest " + f"{full:,}"):
        apply_gradnas(model, constraints={"flops": 1000}, seq_len=SEQ, method="random")
    assert model.heads_per_layer() == [4, 4]  # nothing pruned
    result = apply_gradnas(model, constraints={"flops": 10 * full}, seq_len=SEQ, method="random")
    assert result["pruned_heads"] == {} and result["pruned_neurons"] == {}


@pytest.mark.parametrize("constraints,seq_len,message", [
    ({"latency": "50%"}, SEQ, "exactly one key of"),
    ({"flops": "60%", "params": "60%"}, SEQ, "exactly one key of"),
    ({"flops": "160%"}, SEQ, r"percentage such as '60%'"),
    ({"flops": "sixty"}, SEQ, r"percentage such as '60%'"),
    ({"flops": -5}, SEQ, r"must be in \(0"),
    ({"flops": "60%"}, None, "seq_len"),
])
def test_bad_constraints_are_named(constraints, seq_len, message):
    with pytest.raises((ValueError, TypeError), match=message):
        apply_gradnas(bert(), constraints=constraints, seq_len=seq_len, method="random")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="selector must be one of"):
        apply_gradnas(bert(), constraints={"params": "50%"}, selector="greedy", method="random")
    with pytest.raises(ValueError, match="method must be one of"):
        compute_scores(bert(), method="taylor")
    with pytest.raises(TypeError, match="loss_net must be a Cell"):
        compute_scores(bert(), None, bert_batches(1))


def test_global_keeps_more_score_than_bisect_on_the_same_budget():
    """Kwon's global ranking maximises the kept total score; bisect maximises the worst layer's
    share. With the same scores and budget, global's kept score is >= bisect's."""
    kept = {}
    for selector in ("global", "bisect"):
        model = bert()
        scores = compute_scores(model, method="random", seed=4)
        result = apply_gradnas(model, constraints={"flops": "50%"}, selector=selector, seq_len=SEQ, scores=scores)
        total = 0.0
        for kind, pruned, per_layer in (("heads", result["pruned_heads"], scores.kept_heads),
                                        ("neurons", result["pruned_neurons"], scores.kept_neurons)):
            for layer, units in enumerate(per_layer):
                gone = set(pruned.get(layer, []))
                total += sum(s for u, s in zip(units, getattr(scores, kind)[layer]) if u not in gone)
        kept[selector] = total
    assert kept["global"] >= kept["bisect"] - 1e-9


def test_heads_kept_fixes_the_split_for_baselines_on_another_scale():
    """Random scores in [0, 1) for units of very different costs: left alone, global selection
    keeps (almost) no heads; with ``heads_kept`` (e.g. GradNAS's split) it keeps exactly that many,
    the best by their own score, and still meets the budget exactly-or-under."""
    model = bert()
    scores = compute_scores(model, method="random", seed=2)
    free = apply_gradnas(bert(), constraints={"flops": "60%"}, seq_len=SEQ, scores=scores)
    fixed = apply_gradnas(model, constraints={"flops": "60%"}, seq_len=SEQ, scores=scores, heads_kept=5)
    assert sum(fixed["heads_per_layer"]) == 5 != sum(free["heads_per_layer"])
    assert fixed["after"]["flops"] <= fixed["budget"]
    kept = [s for layer in range(2) for h, s in zip(scores.kept_heads[layer], scores.heads[layer])
            if h not in fixed["pruned_heads"].get(layer, [])]
    assert min(kept) >= max(s for layer in range(2) for h, s in zip(scores.kept_heads[layer], scores.heads[layer])
                            if h in fixed["pruned_heads"].get(layer, []))
    with pytest.raises(ValueError, match="heads_kept needs selector='global'"):
        apply_gradnas(bert(), constraints={"flops": "60%"}, seq_len=SEQ, scores=scores, selector="bisect",
                      heads_kept=2)
    with pytest.raises(ValueError, match="do not fit in the budget"):
        apply_gradnas(bert(), constraints={"flops": "30%"}, seq_len=SEQ, scores=scores, heads_kept=8)


# ---- refit -----------------------------------------------------------------------------------------
def test_refit_lowers_the_layer_reconstruction_error(mode):
    """GPT-2 layer 0 (pre-LN: the attention and MLP outputs are the refit's targets): the pruned
    sub-layers reconstruct the unpruned ones better with the refit than without, on the refit
    tokens, and the measured error is the one the Gram matrices predicted."""
    batches = gpt2_batches(2)
    full = gpt2()
    scores = compute_scores(full, method="magnitude")
    models = {}
    results = {}
    for refit in (False, True):
        models[refit] = gpt2()
        results[refit] = apply_gradnas(models[refit], LMLoss(models[refit]), batches, constraints={"flops": "55%"},
                                       seq_len=SEQ, scores=scores, refit=refit)
    assert results[True]["pruned_heads"] == results[False]["pruned_heads"]
    report = results[True]["refit"]
    for kind in ("head", "neuron"):
        assert all(r <= e + 1e-9 for r, e in zip(report[f"{kind}_error_refit"], report[f"{kind}_error"]))
    full.set_train(False)
    ids = Tensor(np.concatenate([b[0] for b in batches]))
    hidden = full.transformer.wte(ids) + full.transformer.wpe(Tensor(np.arange(SEQ, dtype=np.int32)))
    bias = Tensor((1.0 - np.tril(np.ones((1, 1, SEQ, SEQ), np.float32))) * MASK_VALUE)  # causal, as in scoring
    block = full.transformer.h[0]
    attn_in = block.ln_1(hidden)
    mlp_in = block.ln_2(hidden + block.attn(attn_in, bias))
    targets = {"attn": block.attn(attn_in, bias).asnumpy(), "mlp": block.mlp(mlp_in).asnumpy()}
    offsets = {"attn": block.attn.c_proj.bias.asnumpy(), "mlp": block.mlp.c_proj.bias.asnumpy()}
    errors = {}
    for refit, model in models.items():
        model.set_train(False)
        pruned = model.transformer.h[0]
        outputs = {"attn": pruned.attn(attn_in, bias).asnumpy(), "mlp": pruned.mlp(mlp_in).asnumpy()}
        errors[refit] = {k: float(np.sum((outputs[k] - targets[k]) ** 2) / np.sum((targets[k] - offsets[k]) ** 2))
                         for k in targets}
    assert errors[True]["attn"] < errors[False]["attn"]
    assert errors[True]["mlp"] < errors[False]["mlp"]
    # The errors the refit computed from its Gram matrices are the ones measured here.
    for refit, suffix in ((False, "error"), (True, "error_refit")):
        assert errors[refit]["attn"] == pytest.approx(report[f"head_{suffix}"][0], rel=1e-3)
        assert errors[refit]["mlp"] == pytest.approx(report[f"neuron_{suffix}"][0], rel=1e-3)


# ---- scores files and baselines ---------------------------------------------------------------------
def test_scores_save_load_and_a_second_budget_without_rescoring(tmp_path):
    model = bert()
    scores = compute_scores(model, bert_loss(model), bert_batches(2))
    path = scores.save(str(tmp_path / "scores.json"))
    loaded = GradNASScores.load(path)
    for a, b in zip(scores.heads + scores.neurons, loaded.heads + loaded.neurons):
        np.testing.assert_array_equal(a, b)
    assert loaded.method == "fisher" and loaded.num_batches == 2
    results = []
    for s in (scores, loaded):
        copy = bert()
        results.append(apply_gradnas(copy, constraints={"params": "70%"}, seq_len=SEQ, scores=s))
    assert results[0]["pruned_heads"] == results[1]["pruned_heads"]
    assert results[0]["pruned_neurons"] == results[1]["pruned_neurons"]
    with pytest.raises(ValueError, match="score it again"):
        apply_gradnas(model.prune_heads({0: [0]}), constraints={"params": "70%"}, scores=loaded)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a GradNAS score file"):
        GradNASScores.load(str(tmp_path / "other.json"))


def test_magnitude_and_random_baselines():
    model = bert()
    magnitude = compute_scores(model, method="magnitude")
    dense = model.bert.encoder.layer[1].attention.output.dense.weight.asnumpy()
    head_dim = 8
    assert magnitude.heads[1][2] == pytest.approx(float(np.sum(dense[:, 2 * head_dim:3 * head_dim] ** 2)), rel=1e-6)
    out = model.bert.encoder.layer[0].output.dense.weight.asnumpy()
    assert magnitude.neurons[0][7] == pytest.approx(float(np.sum(out[:, 7] ** 2)), rel=1e-6)
    a, b, c = (compute_scores(model, method="random", seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.neurons[1], b.neurons[1])
    assert not np.array_equal(a.neurons[1], c.neurons[1])


# ---- the algorithm class -------------------------------------------------------------------
class _State:
    def __init__(self, model, loss_net):
        self.model, self.loss_net, self.step, self.batch, self.structure_changed = model, loss_net, 0, None, False


def test_algorithm_prunes_once_at_fit_start():
    model = bert()
    state = _State(model, bert_loss(model))
    algorithm = GradNAS(bert_batches(2), constraints={"flops": "70%"}, seq_len=SEQ, selector="bisect")
    assert algorithm.changes_graph and algorithm.match("INIT", state)
    algorithm.apply("INIT", state, None)  # a reachable budget: nothing to say, nothing changed
    assert model.heads_per_layer() == [4, 4] and not state.structure_changed
    with pytest.raises(ValueError, match="reachable range"):
        GradNAS(bert_batches(1), constraints={"params": 100}).apply("INIT", state, None)
    assert not algorithm.match("BATCH_START", state)
    assert algorithm.match("FIT_START", state)
    algorithm.apply("FIT_START", state, None)
    assert state.structure_changed and algorithm.result["ratios"]["flops"] <= 0.7
    assert not algorithm.match("FIT_START", state)
    # a resumed run: the saved decision is redone at AFTER_LOAD on a fresh model, without scoring
    saved = json.loads(json.dumps(algorithm.state_dict()))
    resumed_state = _State(bert(seed=1), None)
    resumed = GradNAS(bert_batches(1), constraints={"flops": "70%"}, seq_len=SEQ, at_step=3)
    resumed.load_state_dict(saved)
    assert resumed.match("AFTER_LOAD", resumed_state)
    resumed.apply("AFTER_LOAD", resumed_state, None)
    assert resumed_state.structure_changed and not resumed.match("BATCH_START", state)
    assert resumed_state.model.config.pruned_heads == model.config.pruned_heads
    assert resumed_state.model.config.pruned_ffn_neurons == model.config.pruned_ffn_neurons
    assert not resumed.match("AFTER_LOAD", resumed_state)
    late = GradNAS(bert_batches(1), constraints={"flops": "70%"}, seq_len=SEQ, at_step=3)
    state.step = 2
    assert not late.match("BATCH_START", state)
    state.step = 3
    assert late.match("BATCH_START", state) and not late.match("FIT_START", state)
    with pytest.raises(ValueError, match="needs batches"):
        GradNAS(None, constraints={"flops": "70%"}, seq_len=SEQ)


# ---- data parallelism --------------------------------------------------------------------------------
def test_two_workers_score_like_one_process(tmp_path):
    """msrun, two CPU workers, each scoring half of the batches: after the all-reduce both hold the
    scores this process computes from all the batches."""
    set_context("graph")
    model = bert()
    model.save_pretrained(str(tmp_path / "model"))
    batches = bert_batches(4, seed=5)
    np.savez(tmp_path / "batches.npz", ids=np.stack([b[0] for b in batches]), labels=np.stack([b[1] for b in batches]))
    expected = compute_scores(model, bert_loss(model), batches)
    set_context("pynative")
    run_two_workers(os.path.join(HERE, "dist_gradnas_worker.py"), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2] and [r["batches"] for r in ranks] == [2, 2]
    for rank in ranks:
        for kind in ("heads", "neurons"):
            for got, want in zip(rank["scores"][kind], getattr(expected, kind)):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


# ---- with the training engine -------------------------------------------------------------------
def lm_loss(logits, labels):
    return ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_trainer_prunes_at_a_step_and_a_resumed_run_rebuilds_the_pruned_model(tmp_path):
    """Under ms_prune.engine.Trainer: GradNAS scores with the trainer's loss net at step 2, the
    trainer rebuilds its step and keeps training the smaller model; a run resumed from the final
    checkpoint starts from a fresh unpruned model, redoes the surgery (AFTER_LOAD) and continues."""
    engine = pytest.importorskip("ms_prune.engine")
    set_context("graph")

    def data(step):
        return gpt2_batches(1, seed=100 + step)[0]

    def run(max_steps, resume):
        model = gpt2()
        algorithm = GradNAS(gpt2_batches(2), constraints={"flops": "60%"}, seq_len=SEQ, at_step=2)
        trainer = engine.Trainer(model, lm_loss, data, max_steps=max_steps, lr=1e-3, algorithms=[algorithm],
                                 checkpoint_dir=str(tmp_path), log_interval=0,
                                 resume_from="latest" if resume else None)
        return model, algorithm, trainer.fit()

    model, algorithm, history = run(4, resume=False)
    assert algorithm.done and algorithm.result["ratios"]["flops"] <= 0.6
    assert [r["step"] for r in history] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in history)
    assert model.heads_per_layer() == algorithm.result["heads_per_layer"]
    resumed, resumed_algorithm, resumed_history = run(5, resume=True)
    assert resumed_algorithm.result is None  # no second scoring pass
    assert resumed.heads_per_layer() == model.heads_per_layer()
    assert resumed.neurons_per_layer() == model.neurons_per_layer()
    assert [r["step"] for r in resumed_history] == [5] and np.isfinite(resumed_history[0]["loss"])
