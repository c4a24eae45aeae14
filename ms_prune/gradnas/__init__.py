"""GradNAS: gradient-scored structured pruning of attention heads and FFN neurons under a FLOPs
or parameter budget (NVIDIA ModelOpt's gradnas; Kwon et al. 2022). See README.md."""
from .algorithm import GradNAS
from .gradnas import GradNASScores, apply_gradnas, compute_scores

__all__ = ["apply_gradnas", "compute_scores", "GradNAS"]
