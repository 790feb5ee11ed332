// Plain description of one dense-block BN call, for the CPU kernels (csrc/cpu/dense_block.cpp). No
// torch headers: ops.cpp fills it from validated tensors. Semantics: densefuse/reference.py (bn_relu,
// bn_relu_backward, bn_stats_correction).
//
// Every tensor is a [B, C, V] view with any strides (a channel slice of a dense block's buffer);
// per-channel vectors [C] are contiguous in the accumulation dtype A: fp32, or fp64 when x is fp64.
// pre = (x - mean) * invstd * weight + bias = x * scale + shift, scale = weight * invstd.
#pragma once

#include <cstdint>

#include "loss_stats_args.h"  // DType

namespace densefuse {

struct DenseView {  // one [B, C, V] tensor
  void* data = nullptr;
  DType dtype = DType::Float32;
  int64_t strides[3] = {0, 0, 0};
};

struct DenseBnArgs {
  int64_t batch = 0, channels = 0, voxels = 0;
  DenseView x;
  // [C] in A (double when x is fp64, else float): the statistics and the BN affine parameters.
  // bn_stats_correction reads mean, and a / b in place of weight / bias.
  const void* mean = nullptr;
  const void* invstd = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
};

}  // namespace densefuse
