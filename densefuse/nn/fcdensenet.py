"""FCDenseNet3d: the 3D fully convolutional DenseNet of Hashemi et al. (arXiv 1803.11078), on DenseBlock3d.

Defaults reproduce the paper's network (growth k = 16, five down blocks, one bottleneck block and five
up blocks of five layers each, bottleneck convolutions of 4k = 64 maps, dropout 0.2, BN eps 1.1e-5)::

    input [B, 4, D, H, W]
    stem        Conv 2x2x2 stride 2 (48) - ReLU - Conv 3x3x3 - BN-ReLU - Conv 3x3x3 - BN-ReLU - Conv 3x3x3
    5 x down    DenseBlock3d (5 layers) -> skip;  BN-ReLU-Conv 1x1x1 (channels // 2) - Dropout - MaxPool 2
    bottleneck  DenseBlock3d (5 layers); only its 80 new maps go up
    5 x up      ConvTranspose 3x3x3 stride 2 of the 80 new maps (80) - ReLU, concatenated with the skip
                of the matching down block; DenseBlock3d (5 layers); only its 80 new maps go up
    head        ConvTranspose 2x2x2 stride 2 (48) - ReLU - Conv 1x1x1 -> logits [B, 1, D, H, W]

Channels at 128^3 (stem output 48 maps at 64^3): down blocks 48->128, 64->144, 72->152, 76->156,
78->158 (transitions down to 64, 72, 76, 78, 79), bottleneck 79->159, up blocks 80+158, 80+156, 80+152,
80+144 and 80+128 in, 80 new maps out. With 4 inputs and 1 output that is 3,297,358 parameters, the
paper's "about 3.3 M" (the dense layers' convolutions have no bias, as each feeds a BN; the stem,
transition and head convolutions have one). Every DenseBlock3d runs the same
``implementation`` ("fused" | "checkpoint" | "naive"); it can be changed after construction, and the
parameters and buffers do not depend on it, so state_dicts move freely between implementations.
Under "fused" (in training, with gradients) the transitions and the head also keep only their inputs
(views of the dense-block buffers, kept anyway) and recompute their activations in backward, the
head one depth slab at a time: its head_channels maps at the input's resolution are the largest
activation of the network. Dropout masks are the forward's; running statistics are updated once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from densefuse.nn.dense import DenseBlock3d, _check_eps, _norm_relu, _recompute_as_forward
from densefuse.ops import _validate


def _int_at_least(value: object, least: int) -> int | None:
    """value as a Python int if it is an integer >= least (a Python or NumPy integer or a 0-d integer
    tensor, as MONAI takes them), else None."""
    number = _validate.as_int(value)
    return number if number is not None and number >= least else None


# Depth slabs of the head under "fused": the head's full-resolution hidden maps (head_channels at the
# input's size, the largest activation of the network) exist for one slab at a time.
HEAD_SLABS = 8


class _TransitionDown(nn.Sequential):
    """BN-ReLU-Conv1x1x1 (channels -> channels // 2) - Dropout - MaxPool 2: [B, C, D, H, W] ->
    [B, C // 2, D/2, H/2, W/2]."""

    def __init__(self, channels: int, dropout: float, eps: float, momentum: float) -> None:
        super().__init__(
            nn.BatchNorm3d(channels, eps=eps, momentum=momentum),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels // 2, kernel_size=1),
            nn.Dropout(dropout),
            nn.MaxPool3d(2),
        )

    def forward(self, x: Tensor) -> Tensor:
        norm, _, conv, dropout, pool = self  # the ReLU module stays at index 1: state_dict keys, repr
        return pool(dropout(conv(_norm_relu(norm, x))))  # _norm_relu: running stats updated once


class _TransitionUp(nn.Sequential):
    """ConvTranspose 3x3x3 stride 2 - ReLU: [B, C, D, H, W] -> [B, C, 2D, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.ConvTranspose3d(channels, channels, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(inplace=True),
        )


def _stem(in_channels: int, channels: int, convs: int, eps: float, momentum: float) -> nn.Sequential:
    """Conv 2x2x2 stride 2 - ReLU, then ``convs`` 3x3x3 convolutions with BN-ReLU between them."""
    modules: list[nn.Module] = [nn.Conv3d(in_channels, channels, 2, stride=2), nn.ReLU(inplace=True)]
    for i in range(convs):
        if i:
            modules += [nn.BatchNorm3d(channels, eps=eps, momentum=momentum), nn.ReLU(inplace=True)]
        modules.append(nn.Conv3d(channels, channels, 3, padding=1))
    return nn.Sequential(*modules)


class FCDenseNet3d(nn.Module):
    """3D FC-DenseNet for segmentation: input [B, in_channels, D, H, W] -> logits [B, out_channels, D, H, W].

    Args:
        in_channels: input modalities (the paper: 4, T1/T2/PD/FLAIR).
        out_channels: classes of logits (1 for a sigmoid lesion map).
        growth_rate: k, maps each dense layer adds.
        num_down_blocks: dense blocks on the way down (and up); the input's spatial sizes must be
            multiples of ``2 * 2**num_down_blocks`` (the stem halves them once, each down block once).
        layers_per_block: dense layers per block; an int for every block, or a sequence of
            ``2 * num_down_blocks + 1`` counts (down blocks, the bottleneck block, up blocks).
        bottleneck: width of each dense layer's 1x1x1 convolution as a multiple of k (4: 4k maps),
            or None for layers of BN-ReLU-Conv3x3x3 only.
        stem_channels: maps of the stem's convolutions.
        stem_convs: 3x3x3 convolutions after the stem's strided 2x2x2 convolution.
        head_channels: maps of the head's 2x2x2 transposed convolution (default: stem_channels).
        dropout: dropout probability after each dense layer and each transition down.
        eps, momentum: of every BatchNorm3d.
        implementation: of every DenseBlock3d, "fused" | "checkpoint" | "naive" (see DenseBlock3d).

    The forward works in the input's dtype (fp32, or bf16/fp16 under torch.autocast); the logits have
    the dtype of the last convolution's output.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 1,
        growth_rate: int = 16,
        num_down_blocks: int = 5,
        layers_per_block: int | Sequence[int] = 5,
        bottleneck: int | None = 4,
        stem_channels: int = 48,
        stem_convs: int = 3,
        head_channels: int | None = None,
        dropout: float = 0.2,
        eps: float = 1.1e-5,
        momentum: float = 0.1,
        implementation: str = "fused",
    ) -> None:
        super().__init__()
        head_channels = stem_channels if head_channels is None else head_channels
        sizes = []
        for name, value, least in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("growth_rate", growth_rate, 1),
            ("num_down_blocks", num_down_blocks, 0),
            ("stem_channels", stem_channels, 1),
            ("stem_convs", stem_convs, 0),
            ("head_channels", head_channels, 1),
        ):
            sizes.append(_int_at_least(value, least))
            if sizes[-1] is None:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        in_channels, out_channels, growth_rate, num_down_blocks, stem_channels, stem_convs, head_channels = (
            sizes
        )
        eps = _check_eps(eps)
        blocks = 2 * num_down_blocks + 1
        one = _int_at_least(layers_per_block, 1)
        layers = [one] * blocks if one is not None else layers_per_block
        layers = [_int_at_least(n, 1) for n in layers] if isinstance(layers, Sequence) else []
        if len(layers) != blocks or None in layers:
            raise ValueError(
                f"layers_per_block: expected a positive integer or {blocks} of them (down blocks, bottleneck "
                f"block, up blocks), got {layers_per_block!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_down_blocks = num_down_blocks
        self.size_multiple = 2 * 2**num_down_blocks
        block_args = {
            "bottleneck": bottleneck,
            "dropout": dropout,
            "eps": eps,
            "momentum": momentum,
            "implementation": implementation,
        }

        self.stem = _stem(in_channels, stem_channels, stem_convs, eps, momentum)
        self.down_blocks = nn.ModuleList()
        self.transitions_down = nn.ModuleList()
        skips = []
        channels = stem_channels
        for num_layers in layers[:num_down_blocks]:
            block = DenseBlock3d(channels, growth_rate, num_layers, **block_args)
            skips.append(block.out_channels)
            self.down_blocks.append(block)
            self.transitions_down.append(_TransitionDown(block.out_channels, dropout, eps, momentum))
            channels = block.out_channels // 2
        self.bottleneck_block = DenseBlock3d(channels, growth_rate, layers[num_down_blocks], **block_args)
        new_maps = layers[num_down_blocks] * growth_rate
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for num_layers, skip in zip(layers[num_down_blocks + 1 :], reversed(skips)):
            self.transitions_up.append(_TransitionUp(new_maps))
            block = DenseBlock3d(new_maps + skip, growth_rate, num_layers, **block_args)
            self.up_blocks.append(block)
            new_maps = num_layers * growth_rate
        self.head = nn.Sequential(
            nn.ConvTranspose3d(new_maps, head_channels, 2, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv3d(head_channels, out_channels, 1),
        )
        self._implementation = implementation

    def dense_blocks(self) -> list[DenseBlock3d]:
        """Every DenseBlock3d of the network: down blocks, the bottleneck block, up blocks."""
        return [*self.down_blocks, self.bottleneck_block, *self.up_blocks]

    @property
    def implementation(self) -> str:
        """The implementation every DenseBlock3d runs: "fused" | "checkpoint" | "naive" (settable)."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        for block in self.dense_blocks():  # the first block rejects an unknown value, before any change
            block.implementation = value
        self._implementation = value

    def check_input(self, x: Tensor) -> None:
        """ValueError unless ``x`` is a non-empty [B, in_channels, D, H, W] with D, H, W multiples of
        size_multiple; TypeError unless it is a float tensor."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != self.in_channels or x.numel() == 0:
            raise ValueError(
                f"input: expected a non-empty shape [B, {self.in_channels}, D, H, W], got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input: expected a float tensor (cast integer images first), got {x.dtype}")
        spatial = tuple(x.shape[2:])
        m = self.size_multiple
        if any(size % m for size in spatial):
            padded = tuple(-(-size // m) * m for size in spatial)
            raise ValueError(
                f"input: spatial size {spatial} must be a multiple of {m} in every dimension (2 for the "
                f"stem x 2^{self.num_down_blocks} for the down blocks); pad it to {padded} or crop it"
            )
        if self.training and x.shape[0] * math.prod([size // m for size in spatial]) == 1:  # a list: compiles
            raise ValueError(
                f"input: in training mode the deepest level's batch statistics need more than one value "
                f"per channel, and batch {x.shape[0]} at spatial size {spatial} leaves one voxel there "
                f"(1/{m} of each side); use a larger batch or patch, or eval mode"
            )

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in_channels, D, H, W] -> logits [B, out_channels, D, H, W] (see check_input)."""
        self.check_input(x)
        run = _recomputed if self._implementation == "fused" and torch.is_grad_enabled() else _call
        x = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            x = block(x)
            skips.append(x)
            x = run(down, x)
        x = self.bottleneck_block(x, new_only=True)
        for up, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips)):
            x = block(torch.cat([run(up, x), skip], dim=1), new_only=True)
        if run is _call:
            return self.head(x)
        step = -(-x.shape[2] // HEAD_SLABS)  # the head's kernel equals its stride: slabs are exact
        return torch.cat([run(self.head, x[:, :, z : z + step]) for z in range(0, x.shape[2], step)], dim=2)


def _call(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


def _recomputed(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) keeping only x for backward, where the activations inside are recomputed (same
    dropout masks and training modes; BatchNorm running statistics are updated in the forward only)."""
    return _recompute_as_forward(module, module, x)
