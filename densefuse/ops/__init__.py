"""densefuse ops: torch.library ops in the densefuse:: namespace, one module per op family."""

from densefuse.ops._backend import available_backends, use_backend
from densefuse.ops.dense_block import bn_relu, bn_relu_conv1x1, channel_stats  # noqa: F401 (public)
from densefuse.ops.loss_stats import focal_stats, overlap_stats
from densefuse.ops.patch_fuse import patch_finalize, patch_scatter

__all__ = [
    "available_backends",
    "focal_stats",
    "overlap_stats",
    "patch_finalize",
    "patch_scatter",
    "use_backend",
]
