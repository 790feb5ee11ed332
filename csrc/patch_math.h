// Window placement and weight math shared by the CPU kernels and the CUDA kernels (host + device).
//
// A window of length r starting at s covers [s, s + r) along an axis of size n; its part inside the
// volume is [lo, hi) = [max(s, 0), min(s + r, n)), window index = volume index - s. A window is
// placed when its batch index is in [0, B) and that part is non-empty along all three axes; the
// others are skipped (counted in the flags). Starts may be any int64: no sum here can overflow.
// Weight of window voxel (i, j, k): max((wz[i] * wy[j]) * wx[k], floor), in the accumulation dtype;
// with floor == 0 there is no clamp (so the weight stays separable, as in densefuse.reference).
#pragma once

#include <cstdint>

#include "loss_math.h"        // DF_HD, math::nonfinite
#include "patch_fuse_args.h"  // PadMode

namespace densefuse::patch {

// The part [lo, hi) of [start, start + length) inside [0, size); empty when lo >= hi.
struct AxisClip {
  int64_t start, lo, hi;
  DF_HD bool empty() const { return lo >= hi; }
  DF_HD int64_t offset() const { return lo - start; }  // window index of lo
};

DF_HD AxisClip clip_axis(int64_t start, int64_t length, int64_t size) {
  if (start >= size || start <= -length) return {start, 0, 0};
  const int64_t lo = start > 0 ? start : 0;
  const int64_t hi = (start < size - length ? start : size - length) + length;  // min(start + length, size)
  return {start, lo, hi};
}

// Where window n lands: its batch index and its clipped extent along z, y, x.
struct Placement {
  int64_t batch;
  AxisClip axis[3];
  bool placed;
};

// start4 = (b, z, y, x); roi and size are (z, y, x) lengths.
DF_HD Placement place_window(const int64_t* start4, const int64_t* roi, int64_t batch, const int64_t* size) {
  Placement p{start4[0], {}, start4[0] >= 0 && start4[0] < batch};
  for (int d = 0; d < 3; ++d) {
    p.axis[d] = clip_axis(start4[d + 1], roi[d], size[d]);
    p.placed = p.placed && !p.axis[d].empty();
  }
  return p;
}

// max(pzy * wx, floor) where CLAMP (floor > 0), else pzy * wx; pzy = wz[i] * wy[j]. NaN propagates.
template <bool CLAMP, class T>
DF_HD T weight(T pzy, T wx, T floor) {
  const T w = pzy * wx;
  if constexpr (CLAMP) return w < floor ? floor : w;
  return w;
}

// The index in [0, size) that padding `mode` (PadMode, reference.pad_index) reads at position p of an
// axis: p itself inside; outside, the edge (replicate), p mod size (circular), the mirror image without
// repeating the edge, periodic with period 2 (size - 1) (reflect), or -1 (constant: read cval).
DF_HD int64_t pad_index(int64_t p, int64_t size, int32_t mode) {
  if (p >= 0 && p < size) return p;
  if (mode == kPadReplicate) return p < 0 ? 0 : size - 1;
  if (mode == kPadCircular) return ((p % size) + size) % size;
  if (mode == kPadReflect) {
    if (size == 1) return 0;
    const int64_t period = 2 * (size - 1), q = ((p % period) + period) % period;
    return q < size ? q : period - q;
  }
  return -1;
}

}  // namespace densefuse::patch
