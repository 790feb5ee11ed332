from densefuse.nn.dense import DenseBlock3d, DenseLayer3d
from densefuse.nn.fcdensenet import FCDenseNet3d
from densefuse.nn.losses import DiceLoss, FBetaLoss, FocalLoss, TverskyLoss

__all__ = [
    "DenseBlock3d",
    "DenseLayer3d",
    "DiceLoss",
    "FBetaLoss",
    "FCDenseNet3d",
    "FocalLoss",
    "TverskyLoss",
]
