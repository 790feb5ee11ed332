// Plain description of one loss-statistics call, shared by the CPU kernels (csrc/cpu) and the CUDA
// launchers (csrc/cuda). No torch and no CUDA headers: ops.cpp fills it from tensors.
//
// Layout (element strides; nothing is assumed contiguous):
//   logits  [B, C, V]                 fp16 / bf16 / fp32 / fp64
//   target  [B, V] integer labels     uint8 / int8 / int16 / int32 / int64   (dense_target = false)
//           [B, C, V] float target    fp16 / bf16 / fp32 / fp64              (dense_target = true)
//   alpha_pos, alpha_neg  [C] contiguous in the accumulation dtype, or null (= 1)
// The accumulation dtype is fp64 for fp64 logits and fp32 otherwise; stats [B, C, K] and
// grad_stats [B, C, K] are contiguous in it (K = 3 overlap, 2 focal); grad_logits [B, C, V] is
// contiguous in the logits' dtype; flags int64 [3] = (out-of-range labels among the voxels not
// ignored, non-finite logits, non-finite float-target values).
#pragma once

#include <cstdint>

namespace densefuse {

enum class DType : int32_t { Float16, BFloat16, Float32, Float64, UInt8, Int8, Int16, Int32, Int64 };

enum class LossKind : int32_t {
  Overlap,  // stats (S_pg, S_p, S_g)
  Focal,    // stats (sum focal loss, valid voxels)
};

enum Activation : int32_t { kActNone = 0, kActSigmoid = 1, kActSoftmax = 2 };

inline int stats_per_class(LossKind kind) { return kind == LossKind::Overlap ? 3 : 2; }

struct LossStatsArgs {
  int64_t batch = 0, channels = 0, voxels = 0;
  const void* logits = nullptr;
  DType logits_dtype = DType::Float32;
  int64_t logits_stride[3] = {0, 0, 0};  // b, c, v
  const void* target = nullptr;
  DType target_dtype = DType::UInt8;
  bool dense_target = false;
  int64_t target_stride[3] = {0, 0, 0};  // b, c (dense only), v
  int32_t activation = kActSigmoid;
  bool has_ignore = false;
  int64_t ignore_index = 0;
  double gamma = 0.0;                    // focal only
  const void* alpha_pos = nullptr;       // focal only
  const void* alpha_neg = nullptr;       // focal only
};

}  // namespace densefuse
