// CPU loss-statistics kernels (csrc/cpu/loss_stats.cpp). Arguments are validated by ops.cpp.
#pragma once

#include <cstdint>

#include "loss_stats_args.h"

namespace densefuse::cpu {

// stats [B, C, K] (accumulation dtype) and flags int64 [3]; deterministic for any thread count.
void loss_stats_forward(LossKind kind, const LossStatsArgs& args, void* stats, int64_t* flags);

// grad_logits [B, C, V] (logits' dtype, contiguous) from grad_stats [B, C, K] (accumulation dtype).
void loss_stats_backward(LossKind kind, const LossStatsArgs& args, const void* grad_stats, void* grad_logits);

}  // namespace densefuse::cpu
