// CPU patch-fusion kernels (csrc/cpu/patch_fuse.cpp). Arguments are validated by ops.cpp; layouts and
// semantics: patch_fuse_args.h and densefuse/reference.py.
#pragma once

#include <cstdint>

#include "patch_fuse_args.h"

namespace densefuse::cpu {

// acc += w * windows, window by window in index order (the same order as reference.patch_scatter);
// flags int64 [2]. Each (batch, z) plane of acc is written by one thread, so the result is
// deterministic for any thread count.
void patch_scatter(const PatchScatterArgs& args, int64_t* flags);

// The output-stationary variant (reference.patch_gather): each voxel first sums its covering windows'
// w * value in window order starting from 0, then adds that sum to acc once. Bit-identical across runs
// and to the reference, except where acc holds -0.0 or a signalling NaN in the reference's one box over
// all windows but outside the box of the windows' parts in its (batch, z) plane and band of rows: the
// reference adds 0 there (+0.0, a quiet NaN), this leaves it.
void patch_gather(const PatchScatterArgs& args, int64_t* flags);

// out = act(acc / N) in acc's dtype [B, C, D, H, W] (output 0), or a uint8 mask (output 1:
// [B, 1, D, H, W] argmax for softmax, [B, C, D, H, W] act(v) >= threshold otherwise). out may be acc
// itself (patch_normalize: in place).
void patch_finalize(const PatchFinalizeArgs& args, void* out);

// out [N, C, rz, ry, rx] = the windows of volume at starts, padded by args.mode where they leave it.
void patch_extract(const PatchExtractArgs& args);

}  // namespace densefuse::cpu
