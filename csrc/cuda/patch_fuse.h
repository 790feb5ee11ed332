// CUDA patch-fusion launchers (csrc/cuda/patch_fuse.cu). Plain pointers + PatchScatterArgs + a stream:
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

// The same sum output-stationary (reference.patch_gather): each voxel is owned by the first window
// that covers it, whose thread sums every covering window in index order and adds the sum to acc
// once. Deterministic (the same bits on every run); flags as launch_patch_scatter.
cudaError_t launch_patch_gather(const PatchScatterArgs& args, int64_t* flags, cudaStream_t stream);

// out = act(acc / N) in acc's dtype (out may be acc) or a uint8 mask, as args.output says; scratch:
// device memory for D + H + W int64 (room for the axis sums in acc's dtype, made here).
cudaError_t launch_patch_finalize(const PatchFinalizeArgs& args, void* out, int64_t* scratch, cudaStream_t stream);

// args.out = the windows of args.volume (device pointers; args.cval points to one value on the host).
cudaError_t launch_patch_extract(const PatchExtractArgs& args, cudaStream_t stream);

}  // namespace densefuse::cuda
