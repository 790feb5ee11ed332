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

// The index in [0, size) that padding `mode` (PadMode, reference.pad_index) reads at position
// start + offset of an axis (0 <= offset, a window index): that position inside; outside, the edge
// (replicate), the position mod size (circular), its mirror image without repeating the edge,
// periodic with period 2 (size - 1) (reflect), or -1 (constant: read cval). Exact for any int64
// start (start + offset itself is never formed).
DF_HD int64_t pad_index(int64_t start, int64_t offset, int64_t size, int32_t mode) {
  const auto floor_mod = [](int64_t a, int64_t m) { return ((a % m) + m) % m; };
  if (start >= -offset && start < size - offset) return start + offset;
  if (mode == kPadReplicate) return start < -offset ? 0 : size - 1;
  if (mode == kPadCircular) return (floor_mod(start, size) + offset % size) % size;
  if (mode == kPadReflect) {
    if (size == 1) return 0;
    const int64_t period = 2 * (size - 1);
    const int64_t q = (floor_mod(start, period) + offset % period) % period;
    return q < size ? q : period - q;
  }
  return -1;
}

}  // namespace densefuse::patch
