"""The ms_prune model zoo: ``ms_prune.models.bert`` and ``ms_prune.models.gpt2``.

Submodules are imported on demand so that ``import ms_prune`` stays light.
"""
