"""Progressive layer dropping (PLD): skip whole pre-LN transformer layers at random in training,
deeper layers more often and more as training goes on. See README.md."""
from .pld import (PLDLayer, ProgressiveLayerDrop, convert_to_pld, expected_layers_run, keep_probabilities,
                  pld_layers, pld_theta, remove_pld)

__all__ = ["ProgressiveLayerDrop", "PLDLayer", "convert_to_pld", "remove_pld", "pld_layers", "pld_theta",
           "keep_probabilities", "expected_layers_run"]
