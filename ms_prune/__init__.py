"""ms_prune: make MindSpore transformers cheaper to train and to run.

* ``ms_prune.engine``: the algorithm engine (Event, State, Algorithm, Engine, the graph-mode
  Trainer, AlgorithmCallback for ``Model.train``) on which every algorithm below runs.
* ``ms_prune.protocol``: the model protocol, what a transformer declares (its layers, how a layer is
  called, where its heads and FFN neurons are) so that every algorithm works on it; the
  algorithms know no model class.
* ``ms_prune.models``: BERT, GPT-2 and Llama Cells that load and save Hugging Face checkpoints and
  physically prune attention heads (and FFN neurons).
* ``ms_prune.heads``: LRP (Hard-Concrete / L0) head pruning.
* ``ms_prune.gradnas``: GradNAS, gradient-scored pruning of heads and FFN neurons under a FLOPs or
  parameter budget.
* ``ms_prune.token_drop``: random layer-wise token dropping (random-LTD).
* ``ms_prune.layer_drop``: progressive layer dropping (PLD).
* ``ms_prune.prune`` (``ms_prune.structured``): one call that prunes heads (by key/value group) and
  FFN neurons of any protocol model to a budget or a target shape, by activation, FLAP, GradNAS,
  magnitude or random scores.
"""
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _attach_source_model_zoo():
    """Make ``ms_prune.models`` importable from a source checkout.

    An installed ms_prune carries the zoo as the subpackage ``ms_prune/models``; in the source
    tree it is the sibling folder ``models/`` (see setup.py), so map it explicitly.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "models")) or "ms_prune.models" in sys.modules:
        return
    source = os.path.join(os.path.dirname(here), "models")
    init = os.path.join(source, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "ms_prune.models", init, submodule_search_locations=[source])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ms_prune.models"] = module
    spec.loader.exec_module(module)


_attach_source_model_zoo()


def __getattr__(name):
    # ``ms_prune.prune`` without importing MindSpore for a bare ``import ms_prune``
    if name == "prune":
        from ms_prune.structured import prune  # pylint: disable=import-outside-toplevel
        return prune
    raise AttributeError(f"module 'ms_prune' has no attribute {name!r}")
