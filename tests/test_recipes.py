"""Recipes: algorithms built from a YAML-style mapping, every depth checked by name."""
import pytest

from ms_prune.engine.recipes import build_algorithms
from ms_prune.heads import LRP


def test_a_recipe_builds_its_algorithms_with_caller_arguments():
    (lrp,) = build_algorithms({"lrp": {"target_fraction": 0.5, "gate_lr": 0.2}}, lrp={"warmup_steps": 7})
    assert isinstance(lrp, LRP) and lrp.target_fraction == 0.5 and lrp.gate_lr == 0.2 and lrp.warmup_steps == 7
    assert build_algorithms(None) == []


@pytest.mark.parametrize("spec,match", [
    ({"lpr": {}}, r"unknown key\(s\) \['gates.algorithms.lpr'\]"),
    ({"lrp": {"target_fractoin": 0.5}}, r"gates.algorithms.lrp.target_fractoin.*target_fraction"),
    ({"lrp": {"gate_lr": "fast"}}, "gate_lr"),
])
def test_recipe_mistakes_name_the_full_path(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_algorithms(spec, path="gates.algorithms")
