from densefuse.nn.losses import DiceLoss, FBetaLoss, FocalLoss, TverskyLoss

__all__ = ["DiceLoss", "FBetaLoss", "FocalLoss", "TverskyLoss"]
