"""The model protocol: the algorithms depend on it alone, and its pieces check what they are given."""
import ast
import os

import numpy as np
import pytest
from mindspore import Tensor, nn

from ms_prune import protocol
from ms_prune.token_drop.random_ltd import kept_mask

from conftest import ROOT

LIBRARY = os.path.join(ROOT, "ms_prune")
# fetching pretrained models into the zoo (it converts SmolLM2's GGUF with the zoo's converter)
ALLOWED = {"hub.py"}


def imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_the_library_does_not_import_the_model_zoo():
    offenders = []
    for root, _, files in os.walk(LIBRARY):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or os.path.relpath(path, LIBRARY) in ALLOWED:
                continue
            if any(module == "ms_prune.models" or module.startswith("ms_prune.models.")
                   for module in imported_modules(path)):
                offenders.append(os.path.relpath(path, LIBRARY))
    assert offenders == [], f"import ms_prune.models outside the zoo: {offenders}"


def test_no_algorithm_checks_for_our_model_classes():
    names = ("PreTrainedCell", "BertPreTrainedCell", "GPT2PreTrainedCell", "LlamaPreTrainedCell", "BertModel",
             "GPT2Model", "LlamaModel", "HeadPrunableAttention")
    found = []
    for root, _, files in os.walk(LIBRARY):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name), encoding="utf-8").read()
                found += [f"{name}: {n}" for n in names if f"isinstance(model, {n}" in text or f", {n})" in text]
    assert found == []


def test_layer_call_checks_its_arguments():
    with pytest.raises(TypeError, match="hidden must be an argument position"):
        protocol.LayerCall(hidden=1.5)
    with pytest.raises(ValueError, match="the same argument twice"):
        protocol.LayerCall(hidden=0, mask=0)
    with pytest.raises(ValueError, match="outputs must be None"):
        protocol.LayerCall(outputs=0)
    assert protocol.LayerCall(per_token="position_ids").per_token == ("position_ids",)


def test_declarations_check_their_arguments():
    cell = nn.Cell()
    cell.out = nn.Dense(8, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        protocol.AttentionHeads(cell, "out", 2, 4, qkv="out", layout="dense")
    with pytest.raises(AttributeError, match="has no 'proj'"):
        protocol.AttentionHeads(cell, "proj", 2, 4, qkv="out")
    with pytest.raises(ValueError, match="give query, key and value"):
        protocol.AttentionHeads(cell, "out", 2, 4, query="out")
    with pytest.raises(ValueError, match="num_kv_heads must be in"):
        protocol.AttentionHeads(cell, "out", 2, 4, qkv="out", num_kv_heads=5)
    with pytest.raises(TypeError, match="subclass TransformerAdapter"):
        protocol.register_adapter(nn.Cell, object)


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 6), (2, 3, 6, 6), (1, 1, 1, 6), (2, 1, 6, 6)])
def test_kept_mask_takes_rows_and_columns_of_the_kept_tokens(shape):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, shape).astype(np.float32)
    positions = np.array([[0, 2, 5], [1, 3, 4]], np.int32)
    got = kept_mask(Tensor(mask), Tensor(positions), 6).asnumpy()
    full = np.broadcast_to(mask, (2,) + shape[1:])
    rows = np.arange(2)[:, None]
    if len(shape) == 2:
        want = full[rows, positions]
    elif len(shape) == 3:
        want = full[rows[:, :, None], positions[:, :, None], positions[:, None, :]]
    else:
        queries = positions if shape[2] == 6 else np.zeros_like(positions[:, :1])
        want = full[rows[:, None, :, None], np.arange(full.shape[1])[None, :, None, None],
                    queries[:, None, :, None], positions[:, None, None, :]]
    np.testing.assert_array_equal(got, want)
