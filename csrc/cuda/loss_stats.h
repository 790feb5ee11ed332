// CUDA loss-statistics launchers (csrc/cuda/loss_stats.cu). Plain pointers + LossStatsArgs + a
// stream: no torch headers, so the .cu builds with bare nvcc. Arguments are validated by ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "loss_stats_args.h"

namespace densefuse::cuda {

// Bytes of device workspace launch_loss_stats_forward needs for these arguments (per-block partial
// sums, [B, blocks, C, K] in the accumulation dtype).
size_t loss_stats_workspace_bytes(LossKind kind, const LossStatsArgs& args);

// stats [B, C, K] (accumulation dtype) and flags int64 [3] on the device, deterministic: per-block
// partials in the workspace, then a fixed-order sum over the blocks. Enqueued on `stream`.
cudaError_t launch_loss_stats_forward(LossKind kind, const LossStatsArgs& args, void* workspace, void* stats,
                                      int64_t* flags, cudaStream_t stream);

// grad_logits [B, C, V] (logits' dtype, contiguous) from grad_stats [B, C, K] (accumulation dtype).
cudaError_t launch_loss_stats_backward(LossKind kind, const LossStatsArgs& args, const void* grad_stats,
                                       void* grad_logits, cudaStream_t stream);

}  // namespace densefuse::cuda
