"""The ms_prune model zoo: ``ms_prune.models.bert``, ``ms_prune.models.gpt2`` and ``ms_prune.models.llama``.

Submodules are imported on demand so that ``import ms_prune`` stays light.
"""
