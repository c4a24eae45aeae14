"""Recipes: algorithms built from a YAML-style mapping, every depth checked by name."""
import pytest

from ms_prune.engine.recipes import ALGORITHMS, accepted_names, algorithm_class, build_algorithms, canonical_name
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


@pytest.mark.parametrize("name,cls", [
    ("lrp", "LRP"), ("LRP", "LRP"), ("pld", "ProgressiveLayerDropping"),
    ("progressive_layer_drop", "ProgressiveLayerDropping"), ("ProgressiveLayerDropping", "ProgressiveLayerDropping"),
    ("random_ltd", "RandomLTD"), ("RandomLTD", "RandomLTD"), ("gradnas", "GradNAS"), ("GradNAS", "GradNAS"),
])
def test_class_names_and_short_names_resolve_to_one_registry_entry(name, cls):
    assert canonical_name(name) in ALGORITHMS
    assert algorithm_class(name).__name__ == cls


def test_an_unknown_name_lists_the_accepted_ones_and_a_name_twice_is_refused():
    with pytest.raises(ValueError, match=r"'algorithms.Lrp'.*allowed at algorithms: .*'LRP'.*'pld'"):
        build_algorithms({"Lrp": {}})
    assert {"LRP", "lrp", "pld", "GradNAS"} <= set(accepted_names())
    with pytest.raises(ValueError, match=r"names \['progressive_layer_drop'\] more than once"):
        build_algorithms({"pld": {}, "ProgressiveLayerDropping": {}})


def test_every_registered_algorithm_has_a_row_in_the_generic_suite():
    from algorithms.algorithm_settings import ALGORITHM_SETTINGS
    missing = sorted(set(ALGORITHMS) - set(ALGORITHM_SETTINGS))
    assert not missing, f"add a row to tests/algorithms/algorithm_settings.py for {missing}"
