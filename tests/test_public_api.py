"""One anatomy for every algorithm: the registry names each one; its package exports its public
names in ``__all__`` and lists them in its README; a training algorithm has ``apply_<name>`` that
changes the model in place and returns ``Applied``, undone by ``remove_<name>``; the earlier names
still work, with a DeprecationWarning."""
import importlib
import os

import pytest

from conftest import ROOT
from ms_prune.engine import Algorithm, Applied, lm_cross_entropy
from ms_prune.engine.recipes import ALGORITHMS, algorithm_class

PACKAGES = ["ms_prune.engine", "ms_prune.heads", "ms_prune.gradnas", "ms_prune.token_drop", "ms_prune.layer_drop",
            "ms_prune.structured", "ms_prune.distill"]
# package -> the functional form's name stem (apply_<stem>, remove_<stem>)
FUNCTIONAL = {"ms_prune.heads": "lrp", "ms_prune.token_drop": "random_ltd",
              "ms_prune.layer_drop": "progressive_layer_drop", "ms_prune.distill": "distillation"}


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_are_exported_and_documented(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names what it does not define: {missing}"
    with open(os.path.join(ROOT, *package.split("."), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    undocumented = [name for name in module.__all__ if name not in readme]
    assert not undocumented, f"{package}'s README does not mention its public names {undocumented}"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registered_algorithm_is_public_in_its_package(name):
    entry = ALGORITHMS[name]
    cls = algorithm_class(name)
    assert issubclass(cls, Algorithm)
    assert entry.cls in importlib.import_module(entry.module).__all__
    for alias in (entry.cls,) + tuple(entry.aliases):
        assert algorithm_class(alias) is cls


@pytest.mark.parametrize("package", sorted(FUNCTIONAL))
def test_functional_form_is_apply_and_remove(package):
    module = importlib.import_module(package)
    stem = FUNCTIONAL[package]
    assert {f"apply_{stem}", f"remove_{stem}"} <= set(module.__all__)


def _tiny_gpt2():
    from ms_prune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=3, n_head=2, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0))


def test_apply_returns_applied_and_remove_restores_the_names():
    from ms_prune.distill import apply_distillation, remove_distillation
    from ms_prune.heads import apply_lrp, remove_lrp
    from ms_prune.layer_drop import apply_progressive_layer_drop, remove_progressive_layer_drop
    from ms_prune.token_drop import apply_random_ltd, remove_random_ltd
    forms = [(apply_lrp, {}, remove_lrp, False), (apply_random_ltd, dict(min_value=4, max_value=8, require_steps=2),
                                                  remove_random_ltd, True),
             (apply_progressive_layer_drop, {}, remove_progressive_layer_drop, True),
             (apply_distillation, dict(teacher=_tiny_gpt2(), loss_fn=lm_cross_entropy), remove_distillation, False)]
    for apply, arguments, remove, has_schedule in forms:
        model = _tiny_gpt2()
        names = [n for n, _ in model.parameters_and_names()]
        handle = apply(model, **arguments)
        assert isinstance(handle, Applied), f"{apply.__name__} returned {type(handle).__name__}"
        assert isinstance(handle.cells, list) and handle.cells, apply.__name__
        assert (handle.schedule is not None) == has_schedule, apply.__name__
        remove(model)
        assert [n for n, _ in model.parameters_and_names()] == names, remove.__name__


def test_earlier_names_warn_and_still_work():
    from ms_prune.token_drop import apply_random_ltd, revert_random_ltd
    model = _tiny_gpt2()
    names = [n for n, _ in model.parameters_and_names()]
    wrappers, scheduler = apply_random_ltd(model, min_value=4, max_value=8, require_steps=2)   # it unpacks too
    assert wrappers and scheduler.kept_length() == 4
    with pytest.warns(DeprecationWarning, match="revert_random_ltd is deprecated: use remove_random_ltd"):
        revert_random_ltd(model)
    assert [n for n, _ in model.parameters_and_names()] == names
