"""Progressive layer dropping (PLD): skip whole pre-LN transformer layers at random in training,
deeper layers more often and more as training goes on. See README.md.

Public: ``ProgressiveLayerDropping`` (the engine algorithm), ``apply_progressive_layer_drop`` and
``remove_progressive_layer_drop`` (the functional form). The earlier names (``ProgressiveLayerDrop``,
``PLDLayer``, ``convert_to_pld``, ...) stay importable from here for existing code."""
from .pld import (PLDLayer, ProgressiveLayerDrop, ProgressiveLayerDropping, apply_progressive_layer_drop,  # noqa: F401
                  convert_to_pld, expected_layers_run, keep_probabilities, pld_layers, pld_noise, pld_theta,
                  remove_pld, remove_progressive_layer_drop)

__all__ = ["ProgressiveLayerDropping", "apply_progressive_layer_drop", "remove_progressive_layer_drop"]
