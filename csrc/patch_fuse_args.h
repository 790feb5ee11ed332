// Plain description of one patch-fusion call, shared by the CPU kernels (csrc/cpu/patch_fuse.cpp) and
// the CUDA launcher (csrc/cuda/patch_fuse.cu). No torch and no CUDA headers: ops.cpp fills it from
// validated tensors. Semantics: densefuse/reference.py (patch_scatter, patch_gather, patch_finalize).
//
// Layout (all contiguous, row-major):
//   acc      [B, C, D, H, W]          fp32 / fp64 (the accumulation dtype T)
//   windows  [N, C, rz, ry, rx]       fp16 / bf16 / fp32 / fp64
//   starts   [N, 4] int64             (batch, z, y, x) of each window's corner; any values
//   wz/wy/wx [rz], [ry], [rx]         in T; the 3-D weight is max((wz[i] * wy[j]) * wx[k], floor)
//   starts_z/_y/_x  [Gz], [Gy], [Gx] int64: the window grid of the normaliser (patch_finalize)
//   flags    int64 [2]                (non-finite window values added inside the volume, windows skipped)
//   volume   [B, C, D, H, W]          any dtype of PatchExtractArgs, any strides (patch_extract)
#pragma once

#include <cstdint>

#include "loss_stats_args.h"  // DType

namespace densefuse {

enum FuseOutput : int32_t { kOutProbabilities = 0, kOutMask = 1 };

// Padding read where an extracted window leaves the volume (reference.PAD_MODES).
enum PadMode : int32_t { kPadConstant = 0, kPadReflect = 1, kPadReplicate = 2, kPadCircular = 3 };

// patch_scatter / patch_gather: acc[b, :, z+i, y+j, x+k] += w(i, j, k) * windows[n, :, i, j, k].
struct PatchScatterArgs {
  int64_t batch = 0, channels = 0;
  int64_t size[3] = {0, 0, 0};  // D, H, W
  void* acc = nullptr;
  DType acc_dtype = DType::Float32;
  int64_t count = 0;           // N
  int64_t roi[3] = {0, 0, 0};  // rz, ry, rx
  const void* windows = nullptr;
  DType windows_dtype = DType::Float32;
  const int64_t* starts = nullptr;
  const void* weights[3] = {nullptr, nullptr, nullptr};  // wz, wy, wx
  double floor = 0.0;
};

// patch_finalize / patch_normalize: v = acc / N, then act(v) or a uint8 mask. N(z, y, x) sums the
// weights of the grid windows starts_z x starts_y x starts_x (sizes len(wz), len(wy), len(wx))
// that cover the voxel; voxels with N < the smallest normal number of T read 0 in every output.
struct PatchFinalizeArgs {
  int64_t batch = 0, channels = 0;
  int64_t size[3] = {0, 0, 0};
  const void* acc = nullptr;
  DType acc_dtype = DType::Float32;
  const int64_t* starts[3] = {nullptr, nullptr, nullptr};
  int64_t grid[3] = {0, 0, 0};  // Gz, Gy, Gx: number of starts per axis
  const void* weights[3] = {nullptr, nullptr, nullptr};
  int64_t roi[3] = {0, 0, 0};  // lengths of wz, wy, wx
  double floor = 0.0;
  int32_t activation = kActNone;  // Activation (loss_stats_args.h)
  int32_t output = kOutProbabilities;
  double threshold = 0.5;  // mask of none/sigmoid: act(v) >= threshold, compared in T
};

// patch_extract: out[n, c, i, j, k] = padded(volume)[b, c, z+i, y+j, x+k] for starts[n] = (b, z, y, x);
// out [N, C, rz, ry, rx] contiguous in the volume's dtype. The padding (PadMode) is computed per axis;
// a window whose batch index is not in [0, B) reads cval.
struct PatchExtractArgs {
  int64_t batch = 0, channels = 0;
  int64_t size[3] = {0, 0, 0};  // D, H, W
  const void* volume = nullptr;
  int64_t strides[5] = {0, 0, 0, 0, 0};  // of volume, in elements
  DType dtype = DType::Float32;          // of volume and out
  int64_t count = 0;                     // N
  int64_t roi[3] = {0, 0, 0};            // rz, ry, rx
  void* out = nullptr;
  const int64_t* starts = nullptr;
  int32_t mode = kPadConstant;
  const void* cval = nullptr;  // one value in dtype (converted as Tensor.fill_ converts it)
};

}  // namespace densefuse
