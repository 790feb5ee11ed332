"""densefuse ops: torch.library ops in the densefuse:: namespace, one module per op family."""

from densefuse.ops._backend import available_backends, use_backend
from densefuse.ops.loss_stats import focal_stats, overlap_stats

__all__ = ["available_backends", "focal_stats", "overlap_stats", "use_backend"]
