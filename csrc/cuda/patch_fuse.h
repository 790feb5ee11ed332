// CUDA patch-fusion launcher (csrc/cuda/patch_fuse.cu). Plain pointers + PatchScatterArgs + a stream:
// no torch headers, so the .cu builds with bare nvcc. Arguments are validated by ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "patch_fuse_args.h"

namespace densefuse::cuda {

// acc += w * windows with float atomics (vector atomics on float2/float4 on sm_90), all pointers in
// args on the device; flags: device int64 [2], zeroed here, then (non-finite window values added,
// windows skipped). Not deterministic (atomic order). Any N * C * rz (split into several launches past
// the grid limit). Enqueued on `stream`.
cudaError_t launch_patch_scatter(const PatchScatterArgs& args, int64_t* flags, cudaStream_t stream);

}  // namespace densefuse::cuda
