"""densefuse: fused PyTorch ops for highly imbalanced 3D medical image segmentation."""

from densefuse.ops import available_backends, use_backend

__version__ = "0.1.0"
__all__ = ["__version__", "available_backends", "use_backend"]
