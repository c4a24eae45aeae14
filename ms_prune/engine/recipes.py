"""Algorithms from a recipe: ``{name: {argument: value}}`` as a YAML file lists them, checked at
every depth (an unknown algorithm or argument is an error naming its full path).

``ALGORITHMS`` is the one registry of algorithms by name: recipes, the ``ms-prune`` command and
the tests read it. A recipe may name an algorithm by its canonical name, its class name or one
of its aliases; all resolve to the canonical name."""
import importlib
import inspect
from collections import namedtuple

from ms_prune.validation import check_keys

__all__ = ["ALGORITHMS", "AlgorithmEntry", "accepted_names", "algorithm_class", "build_algorithms",
           "canonical_name"]

AlgorithmEntry = namedtuple("AlgorithmEntry", ["module", "cls", "aliases"])

# canonical name -> where its class lives (imported only when a recipe names it) and the other
# names a recipe may use; the class name is always accepted too
ALGORITHMS = {
    "lrp": AlgorithmEntry("ms_prune.heads", "LRP", ()),
    "progressive_layer_drop": AlgorithmEntry("ms_prune.layer_drop", "ProgressiveLayerDropping", ("pld",)),
    "random_ltd": AlgorithmEntry("ms_prune.token_drop", "RandomLTD", ()),
    "gradnas": AlgorithmEntry("ms_prune.gradnas", "GradNAS", ()),
    # its teacher is a model: the caller gives it, build_algorithms(spec, distillation={"teacher": model})
    "distillation": AlgorithmEntry("ms_prune.distill", "Distillation", ("distill", "kd")),
}


def _names():
    """{accepted name: canonical name}."""
    names = {}
    for canonical, entry in ALGORITHMS.items():
        for name in (canonical, entry.cls) + tuple(entry.aliases):
            other = names.setdefault(name, canonical)
            if other != canonical:
                raise RuntimeError(f"ms_prune.engine.recipes: the name {name!r} is given to both {other!r} and "
                                   f"{canonical!r} in ALGORITHMS")
    return names


def accepted_names():
    """Every name a recipe may give an algorithm (canonical, class and alias names), sorted."""
    return sorted(_names())


def canonical_name(name, path="algorithms"):
    """The canonical registry name of ``name`` (any accepted spelling); a ValueError naming
    ``path.name`` and the accepted names when there is none."""
    names = _names()
    if name not in names:
        check_keys("recipe", {name: None}, names, path=path)  # the error, with a did-you-mean
    return names[name]


def algorithm_class(name):
    entry = ALGORITHMS[canonical_name(name)]
    return getattr(importlib.import_module(entry.module), entry.cls)


def build_algorithms(spec, path="algorithms", **extra_arguments):
    """``[Algorithm]`` in recipe order from ``{name: {argument: value}}`` (any accepted name);
    ``extra_arguments`` (``canonical_name={argument: value}``) add arguments the caller computes
    (e.g. a warm-up from a step count) and win over the recipe's. Each algorithm's own
    constructor then checks the values."""
    spec = {} if spec is None else spec
    check_keys("recipe", spec, _names(), path=path)
    canonical = [canonical_name(name, path) for name in spec]
    twice = sorted({c for c in canonical if canonical.count(c) > 1})
    if twice:
        raise ValueError(f"recipe: {path} names {twice} more than once (as {sorted(spec)})")
    algorithms = []
    for (name, arguments), key in zip(spec.items(), canonical):
        if arguments is not None and not isinstance(arguments, dict):
            raise TypeError(f"recipe: {path}.{name} must be a mapping of arguments, got {type(arguments).__name__}")
        arguments = dict(arguments or {}, **extra_arguments.get(key, {}))
        cls = algorithm_class(key)
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        check_keys("recipe", arguments, accepted, path=f"{path}.{name}")
        algorithms.append(cls(**arguments))
    return algorithms
