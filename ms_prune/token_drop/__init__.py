"""Random layer-wise token dropping (random-LTD): chosen transformer layers process a scheduled
random subset of each sequence's tokens in training; see README.md."""
from .random_ltd import (RandomLayerTokenDrop, RandomLTD, RandomLTDTrainStep, TokenDraw, apply_random_ltd,
                         convert_to_random_ltd, forward_flops_with_ltd, gather_tokens, kept_attention_bias, make_random_ltd_train_step,
                         random_ltd_layers, revert_random_ltd, scatter_tokens)
from .scheduler import LayerTokenLR, RandomLTDScheduler, set_learning_rate

__all__ = ["RandomLayerTokenDrop", "RandomLTD", "RandomLTDTrainStep", "TokenDraw", "apply_random_ltd",
           "convert_to_random_ltd", "forward_flops_with_ltd", "gather_tokens", "kept_attention_bias", "make_random_ltd_train_step",
           "random_ltd_layers", "revert_random_ltd", "scatter_tokens", "LayerTokenLR", "RandomLTDScheduler",
           "set_learning_rate"]
