"""random-LTD on models whose first input is not token ids and whose layers take more than
(hidden, mask, position_ids): a timm-style ViT (images in, fused qkv), precomputed rotary tables
without a batch axis (MindFormers' ``freqs_cis``), tuple outputs declared per token or not, and the
error a wrong token count gives instead of silently drawing in the graph."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_prune import protocol
from ms_prune.engine import Algorithm, Event, Trainer
from ms_prune.models.modeling_utils import MASK_VALUE
from ms_prune.protocol import LayerCall
from ms_prune.token_drop import RandomLayerTokenDrop, RandomLTD, TokenDraw, hidden_token_shape
from ms_prune.training import write_parameter

from algorithms.algorithm_settings import classification_loss
from test_token_drop import top_positions

B, HIDDEN, HEADS, PATCH, IMAGE, CLASSES = 2, 16, 2, 4, 8, 3
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 4 patches and the class token


# ---- a timm-style ViT: images in, patch embedding, fused qkv, pre-LN blocks, mean-pool head ----
class ViTBlock(nn.Cell):
    def __init__(self):
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.scale = self.head_dim ** -0.5
        self.norm1 = nn.LayerNorm((HIDDEN,))
        self.qkv = nn.Dense(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Dense(HIDDEN, HIDDEN)
        self.norm2 = nn.LayerNorm((HIDDEN,))
        self.fc1 = nn.Dense(HIDDEN, 2 * HIDDEN, activation="gelu")
        self.fc2 = nn.Dense(2 * HIDDEN, HIDDEN)
        # written inside the compiled step: how many tokens this block really ran on
        self.tokens_seen = Parameter(Tensor(0.0, ms.float32), requires_grad=False)

    def construct(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale, -1)
        x = x + self.proj(ops.matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, n, c))
        ops.assign(self.tokens_seen, ops.ones((), ms.float32) * n)
        return x + self.fc2(self.fc1(self.norm2(x)))


class PatchViT(nn.Cell):
    def __init__(self, layers=3):
        super().__init__()
        rng = np.random.default_rng(0)
        self.embed = nn.Dense(3 * PATCH * PATCH, HIDDEN)
        self.cls_token = Parameter(Tensor(rng.normal(0, 0.02, (1, 1, HIDDEN)).astype(np.float32)), name="cls_token")
        self.pos_embed = Parameter(Tensor(rng.normal(0, 0.02, (1, TOKENS, HIDDEN)).astype(np.float32)),
                                   name="pos_embed")
        self.blocks = nn.CellList([ViTBlock() for _ in range(layers)])
        self.norm = nn.LayerNorm((HIDDEN,))
        self.head = nn.Dense(HIDDEN, CLASSES)

    def construct(self, images):
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 2, 4, 1, 3, 5)
        x = self.embed(patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH))
        x = ops.concat((ops.broadcast_to(self.cls_token, (b, 1, HIDDEN)), x), 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def vit_tokens(images, *targets):
    """The hidden states' (batch, seq): one token per patch plus the class token."""
    return images.shape[0], (images.shape[2] // PATCH) * (images.shape[3] // PATCH) + 1


class ViTAdapter(protocol.TransformerAdapter):
    layer_call = LayerCall(hidden=0, mask=None, token_shape=vit_tokens)
    skippable_layers = True

    def layers(self):
        return self.model.blocks


protocol.register_adapter(PatchViT, ViTAdapter)


def vit_batch(step):
    rng = np.random.default_rng(100 + step)
    return rng.normal(size=(B, 3, IMAGE, IMAGE)).astype(np.float32), rng.integers(0, CLASSES, B).astype(np.int32)


class TokensSeen(Algorithm):
    """Records, per step, the scheduler's kept length (BATCH_START) and the token count the
    wrapped block's compiled graph ran on (AFTER_TRAIN_STEP)."""

    def __init__(self, ltd):
        self.ltd, self.scheduled, self.seen = ltd, [], []

    def match(self, event, state):
        return event in (Event.BATCH_START, Event.AFTER_TRAIN_STEP)

    def apply(self, event, state, logger=None):
        if event == Event.BATCH_START:
            self.scheduled.append(self.ltd.scheduler.kept_length())
        else:
            self.seen.append([int(block.tokens_seen.asnumpy()) for block in state.model.blocks])


def vit_trainer(steps, layer_call=None, **kwargs):
    ms.set_seed(0)
    # kept lengths [2, 2, 4, 4] of the 5 tokens (the first input's axis 1 holds 3 channels)
    ltd = RandomLTD(min_value=2, max_value=4, require_steps=2, seq_per_step=2, layer_call=layer_call)
    seen = TokensSeen(ltd)
    trainer = Trainer(PatchViT(), classification_loss, vit_batch, steps, algorithms=[ltd, seen], lr=1e-2,
                      log_interval=0, **kwargs)
    return trainer, ltd, seen


def test_vit_keeps_the_scheduled_tokens_of_its_hidden_states_and_resumes_exactly(mode, tmp_path):
    trainer, ltd, seen = vit_trainer(4, checkpoint_dir=str(tmp_path), checkpoint_interval=2)
    losses = [record["loss"] for record in trainer.fit()]
    assert seen.scheduled == [2, 2, 4, 4]
    # the wrapped block (1) ran on the scheduled count of the 5 hidden tokens, the others on all 5
    assert seen.seen == [[TOKENS, kept, TOKENS] for kept in seen.scheduled]
    assert ltd.scheduler.consumed_layer_tokens == sum(B * (2 * TOKENS + kept) for kept in seen.scheduled)
    assert ltd.scheduler.consumed_tokens == 4 * B * TOKENS
    assert trainer.compilations == 2  # one step graph per kept length
    assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)

    resumed, _, again = vit_trainer(4, checkpoint_dir=str(tmp_path / "resumed"),
                                    resume_from=str(tmp_path / "step_2"))
    assert [record["loss"] for record in resumed.fit()] == losses[2:]  # kept 4 of 5: tokens dropped
    assert again.seen == seen.seen[2:]


def test_a_token_count_that_is_not_the_hidden_states_is_an_error(mode):
    undeclared, _, _ = vit_trainer(1, layer_call=LayerCall(hidden=0, mask=None))
    with pytest.raises(ValueError, match=r"first model input has shape \(2, 3, 8, 8\) \(float32\), not 2-D integer "
                                         r"token ids.*token_shape"):
        undeclared.fit()
    wrong, _, _ = vit_trainer(1, layer_call=LayerCall(hidden=0, mask=None, token_shape=lambda x, y: (B, 4)))
    with pytest.raises(ValueError, match=r"host wrote token scores of shape \(2, 4\) but this layer's hidden states "
                                         r"have \(batch, seq\) = \(2, 5\).*token_shape"):
        wrong.fit()
    with pytest.raises(ValueError, match=r"LayerCall.token_shape must return \(batch_size, seq_len\), got 5"):
        hidden_token_shape(LayerCall(token_shape=lambda *batch: 5), vit_batch(0))
    assert hidden_token_shape(LayerCall(), (np.zeros((3, 7), np.int64),)) == (3, 7)
    assert hidden_token_shape(LayerCall(), (Tensor(np.zeros((3, 7), np.int32)),), batch_first=False) == (7, 3)


# ---- wrapped-layer checks with known scores ---------------------------------------------------
S = 8


def host_draw(scores):
    """A host-noise TokenDraw holding given scores: the kept tokens are each row's top r."""
    draw = TokenDraw(host_noise=True)
    draw.use_shape(*scores.shape)
    write_parameter(draw.scores, scores)
    return draw


def causal_bias(positions):
    """(b, 1, r, r) additive causal bias among ``positions`` (b, r): by real positions."""
    return ((positions[:, :, None] < positions[:, None, :]) * MASK_VALUE).astype(np.float32)[:, None]


class SharpAttention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.q, self.k, self.v, self.o = (nn.Dense(HIDDEN, HIDDEN) for _ in range(4))
        for dense in (self.q, self.k):  # sharp attention, so positions show in the output
            dense.weight.set_data(dense.weight * 20.0)

    def heads(self, dense, x):
        b, n, _ = x.shape
        return dense(x).reshape(b, n, HEADS, self.head_dim).transpose(0, 2, 1, 3)

    def attend(self, x, q, k, bias):
        b, n, _ = x.shape
        probs = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) + bias, -1)
        return x + self.o(ops.matmul(probs, self.heads(self.v, x)).transpose(0, 2, 1, 3).reshape(b, n, HIDDEN))


class RopeTableLayer(SharpAttention):
    """MindFormers' call: ``layer(x, freqs_cis, mask)`` with ``freqs_cis = (cos, sin, swap_mask)``,
    cos/sin (seq, head_dim) tables broadcast against (batch, heads, seq, head_dim) queries, and
    swap_mask (head_dim, head_dim) not per position."""

    def construct(self, x, freqs_cis, mask):
        cos, sin, swap = freqs_cis
        q, k = self.heads(self.q, x), self.heads(self.k, x)
        return self.attend(x, q * cos + ops.matmul(q, swap) * sin, k * cos + ops.matmul(k, swap) * sin, mask)


class PositionTableLayer(SharpAttention):
    """``layer(x, mask, table)`` with a (seq, hidden) table added to the states (batched (b, r,
    hidden) rows broadcast the same way)."""

    def construct(self, x, mask, table):
        y = x + table
        return self.attend(x, self.heads(self.q, y), self.heads(self.k, y), mask)


def rope_tables():
    half = HIDDEN // HEADS // 2
    angles = np.arange(S)[:, None] / np.power(100.0, np.arange(half) / half)[None, :]
    angles = np.concatenate((angles, angles), 1).astype(np.float32)
    swap = np.zeros((2 * half, 2 * half), np.float32)  # x @ swap = concat(-x2, x1)
    swap[half:, :half] = -np.eye(half)
    swap[:half, half:] = np.eye(half)
    return np.cos(angles), np.sin(angles), swap


@pytest.mark.parametrize("kind", ["rope_tuple", "table"])
def test_per_position_tables_give_the_kept_tokens_their_rows(mode, kind):
    rng = np.random.default_rng(1)
    ms.set_seed(0)
    hidden = rng.normal(size=(B, S, HIDDEN)).astype(np.float32)
    bias = causal_bias(np.broadcast_to(np.arange(S), (B, S)))
    scores = rng.random((B, S)).astype(np.float32)
    kept = 5
    p = top_positions(scores, kept)
    if kind == "rope_tuple":
        layer = RopeTableLayer()
        # MindFormers: cos and sin are tables, swap_mask is not
        call = LayerCall(hidden=0, mask=2, per_position={1: (0, 1)}, position_axis=2)
        cos, sin, swap = rope_tables()

        def run(x, rows, mask):
            tables = (Tensor(cos[rows][:, None]), Tensor(sin[rows][:, None]), Tensor(swap))  # (b, 1, r, d)
            return layer(Tensor(x), tables, Tensor(mask))
        wrapper_args = (Tensor(hidden), (Tensor(cos), Tensor(sin), Tensor(swap)), Tensor(bias))
    else:
        layer = PositionTableLayer()
        call = LayerCall(hidden=0, mask=1, per_position="table")
        table = rng.normal(size=(S, HIDDEN)).astype(np.float32)

        def run(x, rows, mask):
            return layer(Tensor(x), Tensor(mask), Tensor(table[rows]))
        wrapper_args = (Tensor(hidden), Tensor(bias))
    wrapper = RandomLayerTokenDrop(layer, kept_length=kept, call=call)
    wrapper.share_draw(host_draw(scores), draws=False)
    wrapper.set_train(True)
    if kind == "rope_tuple":
        out = wrapper(*wrapper_args).asnumpy()
    else:
        out = wrapper(*wrapper_args, table=Tensor(table)).asnumpy()

    rows = np.arange(B)[:, None]
    layer.set_train(True)
    expected = run(hidden[rows, p], p, causal_bias(p)).asnumpy()
    from_zero = run(hidden[rows, p], np.broadcast_to(np.arange(kept), (B, kept)), causal_bias(p)).asnumpy()
    assert not np.allclose(expected, from_zero, atol=1e-2)  # the rows matter: the check below can fail
    np.testing.assert_allclose(out[rows, p], expected, rtol=1e-5, atol=1e-5)
    for b in range(B):
        dropped = np.setdiff1d(np.arange(S), p[b])
        np.testing.assert_array_equal(out[b, dropped], hidden[b, dropped])


class ThreeOutputs(nn.Cell):
    def construct(self, hidden, bias):
        return hidden * 2.0, hidden[..., :5] * 3.0, hidden[..., :3] + 1.0


def test_only_declared_outputs_are_scattered(mode):
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(B, S, 6)).astype(np.float32)
    scores = rng.random((B, S)).astype(np.float32)
    kept = 4
    wrapper = RandomLayerTokenDrop(ThreeOutputs(), kept_length=kept, call=LayerCall(outputs=3, per_token_outputs=2))
    wrapper.share_draw(host_draw(scores), draws=False)
    wrapper.set_train(True)
    out, undeclared, declared = (x.asnumpy() for x in wrapper(Tensor(hidden), None))
    p = top_positions(scores, kept)
    rows = np.arange(B)[:, None]
    # (batch, r, 5): shaped like per-token output, but not declared: as the layer returned it
    np.testing.assert_allclose(undeclared, hidden[rows, p, :5] * 3.0, rtol=1e-6)
    expected = np.zeros((B, S, 3), np.float32)
    expected[rows, p] = hidden[rows, p, :3] + 1.0
    np.testing.assert_allclose(declared, expected, rtol=1e-6)
    np.testing.assert_allclose(out[rows, p], hidden[rows, p] * 2.0, rtol=1e-6)


class TakesPositions(nn.Cell):
    def construct(self, hidden, bias, position_ids):
        return hidden + position_ids.astype(ms.float32).sum()


def test_wrong_shapes_inside_the_wrapper_are_errors(mode):
    hidden = Tensor(np.zeros((B, S, 4), np.float32))
    scores = np.random.default_rng(3).random((B, S + 1)).astype(np.float32)
    wrapper = RandomLayerTokenDrop(ThreeOutputs(), kept_length=3, call=LayerCall(outputs=3))
    wrapper.share_draw(host_draw(scores), draws=False)
    wrapper.set_train(True)
    with pytest.raises(ValueError, match=r"host wrote token scores of shape \(2, 9\) but this layer's hidden states "
                                         r"have \(batch, seq\) = \(2, 8\).*LayerCall\(token_shape=f\)"):
        wrapper(hidden, None)
    in_graph = TokenDraw()  # drawn in the graph: a mismatched buffer is not used, and that is allowed
    in_graph.use_shape(B, S + 1)
    wrapper.share_draw(in_graph, draws=True)
    assert wrapper(hidden, None)[0].shape == (B, S, 4)

    positions = RandomLayerTokenDrop(TakesPositions(), kept_length=3, call=LayerCall(per_token=2))
    positions.set_train(True)
    with pytest.raises(ValueError, match=r"per_token argument 2 has shape \(8,?\).*per_position"):
        positions(hidden, None, Tensor(np.arange(S, dtype=np.int32)))
    short = RandomLayerTokenDrop(PositionTableLayer(), kept_length=3, call=LayerCall(per_position=2))
    short.set_train(True)
    with pytest.raises(ValueError, match=r"per_position argument 2 has shape \(4, 16\).*at least seq = 8 rows"):
        short(Tensor(np.zeros((B, S, HIDDEN), np.float32)), None, Tensor(np.zeros((4, HIDDEN), np.float32)))


def test_layer_call_declarations_are_checked():
    with pytest.raises(ValueError, match="per_token_outputs .* needs outputs"):
        LayerCall(per_token_outputs=(1,))
    with pytest.raises(ValueError, match=r"per_token_outputs entries must be an int in \[1, 2\], got 3"):
        LayerCall(outputs=3, per_token_outputs=(3,))
    with pytest.raises(ValueError, match=r"position_axis must be an int in \[1, 2\]"):
        LayerCall(per_position="freqs_cis", position_axis=0)
    with pytest.raises(ValueError, match="name the same argument twice"):
        LayerCall(per_token="freqs", per_position="freqs")
    with pytest.raises(TypeError, match="token_shape must be None or a function"):
        LayerCall(token_shape=(2, 8))
    with pytest.raises(TypeError, match="RandomLTD: layer_call must be a LayerCall"):
        RandomLTD(2, 8, 4, layer_call="freqs_cis")
    assert LayerCall(per_position={"freqs_cis": (0, 1)}).per_position == (("freqs_cis", (0, 1)),)
