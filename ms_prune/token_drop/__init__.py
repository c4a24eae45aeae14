"""Random layer-wise token dropping (random-LTD): chosen transformer layers process a scheduled
random subset of each sequence's tokens in training; see README.md.

Public: ``RandomLTD`` (the engine algorithm), ``apply_random_ltd`` and ``remove_random_ltd`` (the
functional form). The earlier names (``revert_random_ltd``, deprecated, ``RandomLTDScheduler``, ``LayerTokenLR``,
``convert_to_random_ltd``, ``make_random_ltd_train_step``, ...) stay importable from here for
existing code."""
from .random_ltd import (RandomLayerTokenDrop, RandomLTD, RandomLTDTrainStep, TokenDraw, apply_random_ltd,  # noqa: F401
                         convert_to_random_ltd, forward_flops_with_ltd, gather_rows, gather_tokens,
                         hidden_token_shape, kept_attention_bias, make_random_ltd_train_step, random_ltd_layers,
                         remove_random_ltd, revert_random_ltd, scatter_tokens, token_draws)
from .scheduler import LayerTokenLR, RandomLTDScheduler, set_learning_rate  # noqa: F401

__all__ = ["RandomLTD", "apply_random_ltd", "remove_random_ltd"]
