"""Knowledge distillation: the student learns a frozen teacher's token distributions (KL with a
temperature, optionally over the teacher's top-k logits, plus an optional hidden-state term),
the teacher run in the same compiled step, the vocabulary taken in chunks. See README.md.

Public: ``Distillation`` (the engine algorithm), ``apply_distillation`` and ``remove_distillation``
(the functional form), ``distillation_loss`` (the KL term alone, e.g. for precomputed teacher
logits) and ``DistillationKL`` (the same as a Cell, with the chunked backward)."""
from .distillation import (Distillation, DistillationKL, DistillationLoss, apply_distillation,  # noqa: F401
                           distillation_loss, remove_distillation, teacher_fingerprint)

__all__ = ["Distillation", "apply_distillation", "remove_distillation", "distillation_loss", "DistillationKL"]
