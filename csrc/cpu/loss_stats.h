// CPU loss-statistics kernels (csrc/cpu/loss_stats.cpp). Arguments are validated by ops.cpp.
#pragma once

#include <cstdint>

#include "loss_stats_args.h"

// The block kernels are compiled once per x86-64 level and picked at load time (GCC >= 12
// target_clones); elsewhere they are compiled once for the build's target.
#if defined(DENSEFUSE_X86) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DENSEFUSE_CPU_CLONES 1
#endif

namespace densefuse::cpu {

// stats [B, C, K] (accumulation dtype) and flags int64 [3]; deterministic for any thread count.
void loss_stats_forward(LossKind kind, const LossStatsArgs& args, void* stats, int64_t* flags);

// grad_logits [B, C, V] (logits' dtype, contiguous) from grad_stats [B, C, K] (accumulation dtype).
void loss_stats_backward(LossKind kind, const LossStatsArgs& args, const void* grad_stats, void* grad_logits);

}  // namespace densefuse::cpu
