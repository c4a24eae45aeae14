"""random-LTD: schedule, token gather/scatter, masks by real positions, gradients, compile count."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_prune.data import lm_batch_fn
from ms_prune.engine import AlgorithmCallback, Trainer
from ms_prune.models.bert import BertConfig, BertModel
from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
from ms_prune.models.modeling_utils import MASK_VALUE
from ms_prune.protocol import LayerCall
from ms_prune.token_drop import (LayerTokenLR, RandomLayerTokenDrop, RandomLTD, RandomLTDScheduler, TokenDraw,
                                 convert_to_random_ltd, forward_flops_with_ltd, kept_attention_bias,
                                 apply_random_ltd, random_ltd_layers, remove_random_ltd, revert_random_ltd, set_learning_rate,
                                 token_draws)
from ms_prune.training import LMLoss, lm_cross_entropy, write_parameter

B, S = 2, 8


def tiny_gpt2(n_layer=2):
    ms.set_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_bert(layers=2):
    ms.set_seed(0)
    return BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


def fixed_draw(scores):
    """A TokenDraw holding given scores, so the kept positions are known: top-r of each row."""
    draw = TokenDraw()
    draw.use_shape(*scores.shape)
    draw.scores.set_data(Tensor(scores.astype(np.float32)))
    return draw


def top_positions(scores, kept):
    return np.sort(np.argsort(-scores, axis=1)[:, :kept], axis=1)


# ------------------------------------------------------------------------------------------ schedule
def test_schedule_fixed_linear_and_rounding_edge():
    sched = RandomLTDScheduler(min_value=8, max_value=64, require_steps=100, seq_per_step=16)
    # DeepSpeed: v = floor(0/100*56 + 8) = 8, 8 - 8 % 16 = 0 -> every token dropped; ours clamps to min.
    assert sched.kept_length(0) == 8
    assert sched.kept_length(14) == 8  # v = 15 -> 0 -> clamped
    assert sched.kept_length(15) == 16  # v = floor(16.4) = 16
    assert sched.kept_length(50) == 32  # v = 36 -> 32
    assert sched.kept_length(99) == 48  # v = 63 -> 48, rounding keeps it below max until require_steps
    assert sched.kept_length(100) == 64 and sched.kept_length(10 ** 6) == 64
    lengths = [sched.kept_length(t) for t in range(120)]
    assert lengths == sorted(lengths) and min(lengths) >= 8
    assert sched.distinct_lengths() == [8, 16, 32, 48, 64]
    with pytest.raises(ValueError, match="max_value"):
        RandomLTDScheduler(min_value=32, max_value=16, require_steps=10)
    with pytest.raises(ValueError, match="require_steps"):
        RandomLTDScheduler(min_value=8, max_value=16, require_steps=0)
    with pytest.raises(ValueError, match="schedule_type"):
        RandomLTDScheduler(8, 16, 10, schedule_type="cosine")


def test_scheduler_counts_layer_tokens_and_resumes_exactly():
    def run(sched, steps):
        return [sched.step(batch_size=4, seq_len=64) for _ in range(steps)]

    reference = RandomLTDScheduler(16, 64, 20, 16, total_layers=6, ltd_layers=4)
    lengths = run(reference, 30)
    expected = sum(4 * (2 * 64 + 4 * r) for r in lengths)
    assert RandomLTDScheduler(16, 64, 20, 16, total_layers=6, ltd_layers=4).planned_layer_tokens(30, 4, 64) == expected
    assert reference.consumed_layer_tokens == expected
    assert reference.consumed_tokens == 30 * 4 * 64

    first = RandomLTDScheduler(16, 64, 20, 16, total_layers=6, ltd_layers=4)
    run(first, 11)
    state = first.state_dict()
    resumed = RandomLTDScheduler(16, 64, 20, 16, total_layers=6, ltd_layers=4)
    resumed.load_state_dict(dict(state))
    assert run(resumed, 19) == lengths[11:]
    assert resumed.consumed_layer_tokens == reference.consumed_layer_tokens
    lr = LayerTokenLR(1e-3, total_layer_tokens=expected, warmup_layer_tokens=1000)
    assert lr(resumed.consumed_layer_tokens) == lr(reference.consumed_layer_tokens) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differs"):
        RandomLTDScheduler(16, 64, 21, 16, total_layers=6, ltd_layers=4).load_state_dict(state)


def test_layer_token_learning_rate():
    lr = LayerTokenLR(1.0, total_layer_tokens=1100, warmup_layer_tokens=100, min_lr=0.1)
    assert lr(0) == pytest.approx(0.01) and lr(99) == pytest.approx(1.0)
    assert lr(100) == pytest.approx(1.0)
    assert lr(600) == pytest.approx(0.55)  # cosine half-way: min + (base - min) / 2
    assert lr(1100) == pytest.approx(0.1) and lr(5000) == pytest.approx(0.1)
    assert LayerTokenLR(1.0, 100, decay="linear")(50) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup"):
        LayerTokenLR(1.0, 100, warmup_layer_tokens=100)


# ------------------------------------------------------------------------------------------ masks
class BiasOf(nn.Cell):
    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def construct(self, bias, positions):
        return kept_attention_bias(bias, positions, self.seq)


def test_kept_bias_uses_real_positions(mode):
    rng = np.random.default_rng(1)
    padding = np.ones((B, S), np.float32)
    padding[0, 5:] = 0  # sequence 0 is padded after 5 tokens
    positions = np.sort(np.stack([rng.choice(S, 4, replace=False) for _ in range(B)]), 1).astype(np.int32)
    causal = np.tril(np.ones((S, S), np.float32))
    gpt_bias = (1 - causal[None, None] * padding[:, None, None, :]) * MASK_VALUE
    bert_bias = (1 - padding[:, None, None, :]) * MASK_VALUE
    gather = BiasOf(S)
    got_gpt = gather(Tensor(gpt_bias), Tensor(positions)).asnumpy()
    got_causal_only = gather(Tensor(((1 - causal) * MASK_VALUE)[None, None]), Tensor(positions)).asnumpy()
    got_bert = gather(Tensor(bert_bias), Tensor(positions)).asnumpy()
    for b in range(B):
        p = positions[b]
        allowed = (p[:, None] >= p[None, :]) * padding[b, p][None, :]
        np.testing.assert_array_equal(got_gpt[b, 0], (1 - allowed) * MASK_VALUE)
        np.testing.assert_array_equal(got_causal_only[b, 0], (1 - (p[:, None] >= p[None, :])) * MASK_VALUE)
        np.testing.assert_array_equal(got_bert[b, 0, 0], (1 - padding[b, p]) * MASK_VALUE)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_wrapped_layer_equals_layer_on_kept_tokens_with_padding(mode, kind):
    """Kept tokens get exactly what the layer computes on the kept sub-sequence with a bias built
    from their real positions; dropped tokens pass unchanged."""
    rng = np.random.default_rng(2)
    model = tiny_bert() if kind == "bert" else tiny_gpt2()
    layer = model.transformer_layers()[0]
    hidden = rng.normal(size=(B, S, 16)).astype(np.float32)
    padding = np.ones((B, S), np.float32)
    padding[1, 6:] = 0
    if kind == "bert":
        bias = (1 - padding[:, None, None, :]) * MASK_VALUE
    else:
        bias = (1 - np.tril(np.ones((S, S), np.float32))[None, None] * padding[:, None, None, :]) * MASK_VALUE
    scores = rng.random((B, S))
    kept = 5
    wrapper = RandomLayerTokenDrop(layer, kept_length=kept)
    wrapper.share_draw(fixed_draw(scores), draws=False)
    wrapper.set_train(True)
    out = wrapper(Tensor(hidden), Tensor(bias.astype(np.float32))).asnumpy()

    positions = top_positions(scores, kept)
    sub_hidden = np.stack([hidden[b, positions[b]] for b in range(B)])
    if kind == "bert":
        sub_bias = np.stack([(1 - padding[b, positions[b]])[None, None, :] for b in range(B)]) * MASK_VALUE
    else:
        sub_bias = np.stack([
            (1 - (positions[b][:, None] >= positions[b][None, :]) * padding[b, positions[b]][None, :])[None]
            for b in range(B)]) * MASK_VALUE
    layer.set_train(True)
    expected = layer(Tensor(sub_hidden), Tensor(sub_bias.astype(np.float32))).asnumpy()
    for b in range(B):
        np.testing.assert_allclose(out[b, positions[b]], expected[b], rtol=1e-5, atol=1e-5)
        dropped = np.setdiff1d(np.arange(S), positions[b])
        np.testing.assert_array_equal(out[b, dropped], hidden[b, dropped])


# ------------------------------------------------------------------------------------------ outputs
class TupleLayer(nn.Cell):
    """Returns (hidden * 2, per-token aux, a scalar, a per-sequence tensor)."""

    def construct(self, hidden, bias):
        aux = hidden[..., :3] + 1.0
        return hidden * 2.0, aux, ops.ones((), ms.float32) * 7.0, hidden.sum(1)[:, :5]


@pytest.mark.parametrize("batch_first", [True, False])
def test_tuple_outputs_go_back_to_their_places(mode, batch_first):
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(3, S, 6)).astype(np.float32)  # batch 3 != kept 4
    scores = rng.random((3, S))
    kept = 4
    call = LayerCall(outputs=4, per_token_outputs=(1,))  # declared: nothing is guessed from shapes
    wrapper = RandomLayerTokenDrop(TupleLayer(), kept_length=kept, batch_first=batch_first, call=call)
    wrapper.share_draw(fixed_draw(scores), draws=False)
    wrapper.set_train(True)
    given = hidden if batch_first else hidden.transpose(1, 0, 2)
    out, aux, scalar, per_seq = wrapper(Tensor(given), None)
    out, aux = out.asnumpy(), aux.asnumpy()
    if not batch_first:
        out, aux = out.transpose(1, 0, 2), aux.transpose(1, 0, 2)
    positions = top_positions(scores, kept)
    for b in range(3):
        p = positions[b]
        dropped = np.setdiff1d(np.arange(S), p)
        np.testing.assert_allclose(out[b, p], hidden[b, p] * 2, rtol=1e-6)
        np.testing.assert_array_equal(out[b, dropped], hidden[b, dropped])
        np.testing.assert_allclose(aux[b, p], hidden[b, p, :3] + 1, rtol=1e-6)
        np.testing.assert_array_equal(aux[b, dropped], 0)
    assert float(scalar) == 7.0
    # not per token: passes as the layer returned it, computed on the kept tokens
    assert per_seq.shape == ((3, 5) if batch_first else (4, 5))


class AddOne(nn.Cell):
    def construct(self, hidden, bias):
        return hidden + 1.0, ops.zeros((), ms.float32)


class Stack(nn.Cell):
    """A model that does not declare the model protocol: its layers are found by class name."""

    def __init__(self, count=4):
        super().__init__()
        self.blocks = nn.CellList([AddOne() for _ in range(count)])

    def construct(self, hidden):
        for block in self.blocks:
            hidden, _ = block(hidden, None)
        return hidden


@pytest.mark.parametrize("share", [True, False])
def test_one_draw_per_step_is_shared(mode, share):
    model = Stack(5)
    wrappers = convert_to_random_ltd(model, layer_ids=[1, 2, 3], layer_class="AddOne", kept_length=3,
                                     share_draw=share)
    if share:
        wrappers[0].token_draw.use_shape(4, S)
    model.set_train(True)
    increments = set()
    for _ in range(2):
        added = model(Tensor(np.zeros((4, S, 2), np.float32))).asnumpy()[..., 0] - 2  # layers 0, 4 are full
        assert ((added > 0).sum(1) >= 3).all()
        increments |= set(np.unique(added).tolist())
    if share:
        assert increments == {0.0, 3.0}  # every token went through all three layers or none
    else:
        assert increments & {1.0, 2.0}


# ------------------------------------------------------------------------------------------ conversion
def test_conversion_defaults_errors_and_revert():
    model = tiny_gpt2(n_layer=4)
    names = [n for n, _ in model.parameters_and_names()]
    wrappers = convert_to_random_ltd(model)
    assert [type(c).__name__ for c in model.transformer_layers()] == [
        "GPT2Block", "RandomLayerTokenDrop", "RandomLayerTokenDrop", "GPT2Block"]
    assert random_ltd_layers(model) == wrappers
    assert wrappers[0].draws and not wrappers[1].draws and wrappers[0].token_draw is wrappers[1].token_draw
    with pytest.raises(ValueError, match="already"):
        convert_to_random_ltd(model)
    assert model.num_parameters() == tiny_gpt2(n_layer=4).num_parameters()  # the draw buffer is not a parameter
    full = model.forward_flops(S, B)
    assert forward_flops_with_ltd(model, S, B) == full  # kept_length None: nothing dropped
    for wrapper in wrappers:
        wrapper.set_kept_length(S // 2)
    per_token = 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)  # c_attn, c_proj, c_fc, mlp.c_proj
    attention = 2 * 2 * 16 * (S * S - (S // 2) ** 2)  # scores and context, all heads
    assert forward_flops_with_ltd(model, S, B) == full - 2 * B * (per_token * (S - S // 2) + attention)
    remove_random_ltd(model)
    assert [n for n, _ in model.parameters_and_names()] == names
    with pytest.raises(ValueError, match="remove_random_ltd: .* no random-LTD"):
        remove_random_ltd(model)
    convert_to_random_ltd(model)
    with pytest.warns(DeprecationWarning, match="revert_random_ltd is deprecated: use remove_random_ltd"):
        revert_random_ltd(model)  # the earlier name still works
    assert [n for n, _ in model.parameters_and_names()] == names

    bert = tiny_bert(layers=3)
    assert len(convert_to_random_ltd(bert)) == 1
    with pytest.raises(ValueError, match=r"layer_ids \[4, -1\].*0\.\.3"):
        convert_to_random_ltd(tiny_gpt2(4), layer_ids=[1, 4, -1])
    with pytest.raises(ValueError, match="distinct"):
        convert_to_random_ltd(tiny_gpt2(4), layer_ids=[1, 1])
    with pytest.raises(ValueError, match="none is left"):
        convert_to_random_ltd(tiny_gpt2(2))
    with pytest.raises(ValueError, match="does not declare the ms_prune model protocol.*layer_class"):
        convert_to_random_ltd(Stack())
    with pytest.raises(ValueError, match="no layers of class 'Block'"):
        convert_to_random_ltd(Stack(), layer_class="Block")
    with pytest.raises(ValueError, match="kept_length"):
        RandomLayerTokenDrop(AddOne(), kept_length=0)
    with pytest.raises(TypeError, match="Cell"):
        RandomLayerTokenDrop(lambda h, b: h)


# ------------------------------------------------------------------------------------------ training
def _grads(model, ids):
    loss_net = LMLoss(model)
    grad_fn = ms.value_and_grad(loss_net, None, model.trainable_params())

    def step(inputs, labels):
        return grad_fn(inputs, labels)

    loss, grads = ms.jit(step)(ids, ids)
    return float(loss), [g.asnumpy() for g in grads]


def test_gradients_through_gather_scatter_match_no_dropping(mode):
    ids = Tensor(np.random.default_rng(4).integers(0, 40, (B, S)), ms.int32)
    model = tiny_gpt2()
    model.set_train(True)
    ref_loss, ref_grads = _grads(model, ids)
    wrappers = convert_to_random_ltd(model, layer_ids=[0, 1], kept_length=S)
    for wrapper in wrappers:
        wrapper.skip_when_full = False  # all tokens kept, but through gather and scatter
    loss, grads = _grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # dropping tokens changes the loss and the gradients still reach every layer
    for wrapper in wrappers:
        wrapper.set_kept_length(S // 2)
    model.refresh_after_surgery()
    loss_dropped, grads_dropped = _grads(model, ids)
    assert loss_dropped != pytest.approx(ref_loss, rel=1e-6)
    assert all(np.abs(g).sum() > 0 for g in grads_dropped)


def test_compilations_equal_distinct_kept_lengths(mode):
    model = tiny_gpt2(n_layer=3)
    ltd = RandomLTD(min_value=2, max_value=S, require_steps=2, seq_per_step=4, layer_ids=[1])
    ltd.apply(model)
    model.set_train(True)
    optimizer = nn.SGD(model.trainable_params(), learning_rate=1e-3)
    lr = LayerTokenLR(1e-3, total_layer_tokens=10 ** 4, warmup_layer_tokens=100)
    step = ltd.train_step(LMLoss(model), optimizer, lr_schedule=lr, max_compilations=3)
    rng = np.random.default_rng(5)
    batches = [Tensor(rng.integers(0, 40, (B, S)), ms.int32) for _ in range(3)]
    used, losses = [], []
    for t in range(6):
        used.append(ltd.scheduler.kept_length())
        losses.append(float(step(batches[t % 3], batches[t % 3])))
    assert used == [2, 4, 8, 8, 8, 8]  # step 0 rounds to 0 in DeepSpeed's formula
    assert step.compilations == len(set(used)) == len(ltd.scheduler.distinct_lengths()) == 3
    assert np.isfinite(losses).all()
    last_step_tokens = B * (2 * S + S)
    assert float(optimizer.learning_rate.asnumpy()) == pytest.approx(
        lr(ltd.scheduler.consumed_layer_tokens - last_step_tokens))
    # resuming from an earlier state reuses the graphs already compiled
    state = ltd.state_dict()
    state.update(current_step=0, consumed_layer_tokens=0, consumed_tokens=0)
    ltd.load_state_dict(state)
    for _ in range(3):
        step(batches[0], batches[0])
    assert step.compilations == 3
    with pytest.raises(RuntimeError, match="max_compilations"):
        step(batches[0][:1], batches[0][:1])
    # the learning rate really reaches the compiled step (a host-side set_data would not)
    before = [p.asnumpy().copy() for p in model.trainable_params()]
    set_learning_rate(optimizer, 0.0)
    step.lr_schedule = None
    step(batches[1], batches[1])
    assert all(np.array_equal(a, p.asnumpy()) for a, p in zip(before, model.trainable_params()))
    set_learning_rate(optimizer, 0.5)
    step(batches[1], batches[1])
    assert not all(np.array_equal(a, p.asnumpy()) for a, p in zip(before, model.trainable_params()))
    assert step.compilations == 3


def test_evaluation_runs_every_token(mode):
    ids = Tensor(np.random.default_rng(6).integers(0, 40, (B, S)), ms.int32)
    mask = Tensor(np.array([[1] * S, [1] * 5 + [0] * 3]), ms.int32)
    model = tiny_gpt2(n_layer=3)
    model.set_train(False)
    reference = model(ids, mask).asnumpy()
    convert_to_random_ltd(model, kept_length=3)
    model.set_train(False)
    np.testing.assert_array_equal(model(ids, mask).asnumpy(), reference)
    model.set_train(True)
    assert not np.allclose(model(ids, mask).asnumpy(), reference, atol=1e-4)


def test_converted_model_checkpoints_keep_their_names(tmp_path):
    model = tiny_gpt2(n_layer=4)
    names = [n for n, _ in model.parameters_and_names()]
    convert_to_random_ltd(model, kept_length=4)
    assert [n for n, _ in model.parameters_and_names()] == names
    model.save_pretrained(str(tmp_path))
    plain = GPT2LMHeadModel.from_pretrained(str(tmp_path))  # strict: every tensor placed
    for (name, a), (_, b) in zip(model.parameters_and_names(), plain.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)


# ------------------------------------------------------------------------------------------ host noise, engine
@pytest.mark.parametrize("share", [True, False])
def test_host_noise_scores_choose_the_tokens(mode, share):
    """With host noise no wrapper draws in the graph: the scores written before the step choose
    the kept tokens (top-3 of each row), in every wrapper that reads them."""
    model = Stack(5)
    wrappers, _ = apply_random_ltd(model, 3, 3, 1, layer_ids=[1, 2, 3], layer_class="AddOne", share_draw=share,
                                   host_noise=True)
    draws = token_draws(wrappers)
    assert len(draws) == (1 if share else 3) and all(d.host_noise for d in draws)
    rng = np.random.default_rng(7)
    scores = [rng.random((4, S)) for _ in draws]
    for wrapper in wrappers:
        wrapper.set_kept_length(3)
    for draw, written in zip(draws, scores):
        draw.use_shape(4, S)
        write_parameter(draw.scores, written)
    model.set_train(True)
    added = model(Tensor(np.zeros((4, S, 2), np.float32))).asnumpy()[..., 0] - 2  # layers 0, 4 are full
    expected = np.zeros((4, S))
    for layer in range(3):
        written = scores[layer if not share else 0]
        for row in range(4):
            expected[row, top_positions(written, 3)[row]] += 1
    np.testing.assert_array_equal(added, expected)
    for draw, written in zip(draws, scores):  # nobody overwrote the scores in the graph
        np.testing.assert_allclose(draw.scores.asnumpy(), written, rtol=1e-6)


lm_batch = lm_batch_fn(np.random.default_rng(0).integers(0, 40, 200).astype(np.int32), B, S, seed=0)


def ltd_trainer(max_steps, checkpoint_dir, **kwargs):
    model = tiny_gpt2(n_layer=3)
    # kept length t + 2 rounded down to even: [2, 2, 4, 4, 6, 6] then 8 = S
    algorithm = RandomLTD(min_value=2, max_value=S, require_steps=6, seq_per_step=2, layer_ids=[1],
                          lr_schedule=LayerTokenLR(1e-2, total_layer_tokens=400, warmup_layer_tokens=50))
    trainer = Trainer(model, lm_cross_entropy, lm_batch, max_steps, algorithms=[algorithm], log_interval=0,
                      checkpoint_dir=checkpoint_dir, **kwargs)
    return trainer, algorithm


def test_algorithm_under_trainer_compiles_per_kept_length_and_resumes_exactly(mode, tmp_path):
    """One compiled step per distinct kept length; the token scores are the run's RNG draws and the
    learning rate follows the layer-tokens, so the run resumed from its step-3 checkpoint (kept
    length 4 < 8 next: tokens are dropped) gives the uninterrupted run's losses."""
    trainer, algorithm = ltd_trainer(6, str(tmp_path), checkpoint_interval=3)
    losses = [record["loss"] for record in trainer.fit()]
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)
    assert trainer.compilations == len(algorithm.scheduler.distinct_lengths(6)) == 3
    assert algorithm.scheduler.current_step == 6
    last_step_tokens = B * (2 * S + 6)
    assert float(trainer.state.optimizer.learning_rate.asnumpy()) == pytest.approx(
        algorithm.lr_schedule(algorithm.scheduler.consumed_layer_tokens - last_step_tokens), rel=1e-6)
    rng = np.random.default_rng(0)  # the Trainer's seed: one (batch, seq) draw per step
    np.testing.assert_allclose(algorithm.draws[0].scores.asnumpy(), [rng.random((B, S)) for _ in range(6)][-1],
                               rtol=1e-6)
    assert random_ltd_layers(trainer.state.model)  # FIT_END leaves the wrappers

    resumed, _ = ltd_trainer(6, str(tmp_path / "resumed"), resume_from=str(tmp_path / "step_3"))
    assert [record["loss"] for record in resumed.fit()] == losses[3:]
    assert resumed.compilations == 2  # kept lengths 4 and 6


def test_algorithm_is_refused_by_model_train_and_checks_arguments():
    model = tiny_gpt2(n_layer=3)
    with pytest.raises(ValueError, match="RandomLTD.*Trainer"):
        AlgorithmCallback(model, [RandomLTD(2, S, 4)])
    assert not random_ltd_layers(model)  # refused before any surgery
    with pytest.raises(ValueError, match="RandomLTD: max_value"):
        RandomLTD(min_value=8, max_value=4, require_steps=4)
    with pytest.raises(TypeError, match="RandomLTD: require_steps"):
        RandomLTD(2, 8, 4.0)
    with pytest.raises(TypeError, match="RandomLTD: lr_schedule"):
        RandomLTD(2, 8, 4, lr_schedule=0.1)
    with pytest.raises(TypeError, match="RandomLTD: share_draw"):
        RandomLTD(2, 8, 4, share_draw="yes")
    with pytest.raises(ValueError, match=r"RandomLTD: layer_ids\[1\] must be an int in \[0, inf\], got -1"):
        RandomLTD(2, 8, 4, layer_ids=[1, -1])
    with pytest.raises(TypeError, match="RandomLTD: layer_ids must be None, an int or a list"):
        RandomLTD(2, 8, 4, layer_ids=1.5)


class DenseBlock(nn.Cell):
    """A layer of a model that is not ours: one tensor out, no penalty."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(8, 8)

    def construct(self, hidden, bias):
        return hidden + ops.tanh(self.dense(hidden))


class TinyLM(nn.Cell):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.blocks = nn.CellList([DenseBlock() for _ in range(3)])
        self.head = nn.Dense(8, 40)

    def construct(self, ids):
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = block(hidden, None)
        return self.head(hidden)


def test_algorithm_trains_a_model_that_is_not_ours(mode):
    """The layers are found by class name (no transformer_layers()); the Trainer trains it."""
    ms.set_seed(0)
    model = TinyLM()
    algorithm = RandomLTD(min_value=2, max_value=S, require_steps=4, seq_per_step=2, layer_class="DenseBlock")
    trainer = Trainer(model, lm_cross_entropy, lm_batch, 4, algorithms=[algorithm], lr=1e-2, log_interval=0)
    losses = [record["loss"] for record in trainer.fit()]
    assert len(algorithm.wrappers) == 1 and isinstance(model.blocks[1], RandomLayerTokenDrop)
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)
    assert trainer.compilations == len(algorithm.scheduler.distinct_lengths(4)) == 3  # kept 2, 2, 4, 6


def tiny_llama(layers=3):
    from ms_prune.models.llama import LlamaConfig, LlamaForCausalLM
    ms.set_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def test_rotary_layer_gets_the_kept_tokens_real_positions(mode):
    """A Llama layer (rotary angles from position_ids) run on the kept tokens sees their real
    positions and the causal bias among them: exactly the layer on that sub-sequence. DeepSpeed
    gives rotary models positions 0..r-1 instead."""
    rng = np.random.default_rng(8)
    model = tiny_llama()
    layer = model.transformer_layers()[0]
    for name, param in layer.parameters_and_names():  # sharp attention, so positions show in the output
        if "q_proj" in name or "k_proj" in name:
            param.set_data(param * 40.0)
    hidden = rng.normal(size=(B, S, 16)).astype(np.float32)
    bias = ((1 - np.tril(np.ones((S, S), np.float32)))[None, None] * MASK_VALUE).repeat(B, 0)
    position_ids = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
    scores = rng.random((B, S))
    kept = 5
    # the model's declared call: position_ids (argument 2) has one entry per token
    wrapper = RandomLayerTokenDrop(layer, kept_length=kept, call=model.layer_call)
    wrapper.share_draw(fixed_draw(scores), draws=False)
    wrapper.set_train(True)
    out = wrapper(Tensor(hidden), Tensor(bias), Tensor(position_ids)).asnumpy()
    p = top_positions(scores, kept).astype(np.int32)
    sub_bias = np.stack([(1 - (p[b][:, None] >= p[b][None, :])) * MASK_VALUE for b in range(B)])[:, None]
    sub_hidden = np.stack([hidden[b, p[b]] for b in range(B)])
    layer.set_train(True)
    expected = layer(Tensor(sub_hidden), Tensor(sub_bias.astype(np.float32)), Tensor(p)).asnumpy()
    from_zero = layer(Tensor(sub_hidden), Tensor(sub_bias.astype(np.float32)),
                      Tensor(np.broadcast_to(np.arange(kept, dtype=np.int32), (B, kept)).copy())).asnumpy()
    assert not np.allclose(expected, from_zero, atol=1e-2)  # the positions matter to this layer
    for b in range(B):
        np.testing.assert_allclose(out[b, p[b]], expected[b], rtol=1e-5, atol=1e-5)
        dropped = np.setdiff1d(np.arange(S), p[b])
        np.testing.assert_array_equal(out[b, dropped], hidden[b, dropped])


def test_algorithm_trains_llama(mode):
    trainer = Trainer(tiny_llama(), lm_cross_entropy, lm_batch, 3, algorithms=[RandomLTD(2, S, 3, seq_per_step=2)],
                      lr=1e-2, log_interval=0)
    losses = [record["loss"] for record in trainer.fit()]
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)
    assert trainer.compilations == 3  # kept 2, 4, 6
