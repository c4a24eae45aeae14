"""Algorithms from a recipe: ``{name: {argument: value}}`` as a YAML file lists them, checked at
every depth (an unknown algorithm or argument is an error naming its full path)."""
import importlib
import inspect

from ms_prune.validation import check_keys

__all__ = ["ALGORITHMS", "build_algorithms"]

# recipe name -> (module, class); imported only when a recipe names it
ALGORITHMS = {
    "lrp": ("ms_prune.heads", "LRP"),
    "progressive_layer_drop": ("ms_prune.layer_drop", "ProgressiveLayerDropping"),
    "random_ltd": ("ms_prune.token_drop", "RandomLTD"),
    "gradnas": ("ms_prune.gradnas", "GradNAS"),
}


def algorithm_class(name):
    module, cls = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)


def build_algorithms(spec, path="algorithms", **extra_arguments):
    """``[Algorithm]`` in recipe order from ``{name: {argument: value}}``; ``extra_arguments``
    (``name={argument: value}``) add arguments the caller computes (e.g. a warm-up from a step
    count). Each algorithm's own constructor then checks the values."""
    spec = {} if spec is None else spec
    check_keys("recipe", spec, ALGORITHMS, path=path)
    algorithms = []
    for name, arguments in spec.items():
        arguments = dict(arguments or {}, **extra_arguments.get(name, {}))
        cls = algorithm_class(name)
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        check_keys("recipe", arguments, accepted, path=f"{path}.{name}")
        algorithms.append(cls(**arguments))
    return algorithms
