// CUDA patch-fusion kernels (semantics: densefuse/reference.py patch_*; layout: patch_fuse_args.h).
//
// Window-plane grids (scatter, gather, extract): blockIdx.x = one window plane (n, c, i) (window n,
// channel c, window z index i), blockIdx.y = a band of rows_per_block window rows j (chosen so that at
// most 65535 bands cover a window). A call with more than 2^31 - 1 planes (N * C * rz) is split into
// launches of at most that many planes, each starting at plane first_plane, so no size gives an
// invalid launch configuration. Every thread computes the window's placement from starts (a few
// loads, the same for the whole block); blocks of unplaced windows exit, and the first block of each
// counts it as skipped (scatter, gather).
//
// Scatter. The threads of a block stride over (row, x group) items of the band's clipped part; a
// group is VEC consecutive voxels of acc, aligned to VEC in acc (so the window run is covered by
// groups that may stick out by up to VEC - 1 voxels at either end; those lanes add 0). Each item
// computes w = max((wz[i] * wy[j]) * wx[k], floor) * v for its lanes, counts non-finite v, and adds
// the VEC values with one atomic:
//   sm_90+, fp32 acc: atomicAdd on float4 / float2 (16 / 8 bytes, one L2 atomic for VEC voxels)
//   otherwise (sm_80 builds, fp64 acc): one scalar atomicAdd per lane inside the window.
// VEC = 4 when W % 4 == 0 and acc is 16-byte aligned, 2 for W % 2 == 0 (8 bytes), else 1.
// A lane outside the window adds +0.0 with the vector atomics, which turns a -0.0 in acc into +0.0.
// fp32 atomics flush subnormal inputs and results to zero (PTX ISA, atom.add.f32): a weighted value
// below 2^-126 is added as 0 (the gather and fp64 keep it), and such a lane also flushes a subnormal
// already in acc. Non-finite counts: warp sums, one integer atomic per warp that saw one.
//
// Gather (deterministic, no atomics on acc): the same grid and items, one voxel each. A voxel is owned
// by the first window (in index order) that covers it: the thread of window n at voxel v returns at
// once if an earlier window covers v; otherwise it sums w_m * v_m over the windows m >= n that cover
// v, in index order, starting from 0, and adds that sum to acc[v] (reference.patch_gather). Each
// voxel has one owner, so the result is the same bits on every run; each (window, voxel) value is
// read once, so the non-finite count is the scatter's. Products are not fused into FMAs, so the sums
// are reference.patch_gather's bits. Work per voxel: one start test per window of
// the call (sw_batch_size of them in sliding-window inference).
//
// Extract: the same grid over the windows of out; each thread copies one value, reading the
// volume (any strides) at patch::pad_index of every axis, or cval; or, for a window inside the
// volume along y and x where the layout allows, 16 bytes at a time (no padding arithmetic).
//
// Finalise: one block per tile of 32 rows x 32 columns of a plane (b, z), four voxels of a column per
// thread, every channel. N = (Sz[z] * Sy[y]) * Sx[x] from three 1-D sums made first by a small kernel (floor == 0),
// or the clamped weights of the covering grid windows summed in grid order (a, b, c) (floor > 0), as
// the CPU kernel: the windows that meet the tile are found by tests the block shares, and per voxel
// each adds its weight or 0. v = acc / N (0 where N is
// below the smallest normal T), then the activation (softmax over C in three passes over the voxel's
// channels: max, sum of exp, output) and the output: floats (out may be acc), an argmax label (first
// maximum, NaN wins, as torch.argmax) or a threshold mask.
#include "cuda/patch_fuse.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "patch_math.h"

// A kernel launch, DF_LAUNCH(grid, block, stream, kernel)(args...). tests/cuda_emulation.cpp defines
// it (and DENSEFUSE_CUDA_EMULATION) to run the kernels on the CPU, thread after thread.
#ifndef DF_LAUNCH
#define DF_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace densefuse::cuda {
namespace {

using patch::AxisClip;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;             // finalise: grid-stride loop past this many blocks
constexpr int64_t kItemsPerBlock = 4 * kThreads;  // (row, group) items a block aims for
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

template <class T>
struct Tag {
  using type = T;
};

// A window value in the type it is tested for NaN/Inf in (before rounding to acc's dtype).
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

// dst[e] += v[e] for the VEC lanes; lanes outside `inside` hold 0 and are skipped by scalar atomics.
template <int VEC>
__device__ __forceinline__ void atomic_add_lanes(float* dst, const float (&v)[VEC], unsigned inside) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC == 4) {
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v[0], v[1], v[2], v[3]));
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
  } else {
    if (inside & 1u) atomicAdd(dst, v[0]);
  }
#else
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (inside >> e & 1u) atomicAdd(dst + e, v[e]);
  }
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_lanes(double* dst, const double (&v)[VEC], unsigned inside) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (inside >> e & 1u) atomicAdd(dst + e, v[e]);
  }
}

// The part of window plane (n, c, i) that block (blockIdx.x, blockIdx.y) covers: window rows
// [j_lo, j_hi) inside the volume, at acc plane z; `active` is false where the block has nothing to
// do (the same for the whole block). The first block of an unplaced window counts it in flags[1].
struct PlaneBand {
  int64_t n, c, i, z, j_lo, j_hi;
  patch::Placement at;
  bool active;
};

__device__ __forceinline__ PlaneBand plane_band(const PatchScatterArgs& a, int64_t first_plane, int64_t rows_per_block,
                                                unsigned long long* flags) {
  PlaneBand p{};
  const int64_t rz = a.roi[0];
  const int64_t plane = first_plane + blockIdx.x;
  p.i = plane % rz;
  p.c = plane / rz % a.channels;
  p.n = plane / (rz * a.channels);
  p.at = patch::place_window(a.starts + 4 * p.n, a.roi, a.batch, a.size);
  if (!p.at.placed) {
    if (p.i == 0 && p.c == 0 && blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(flags + 1, 1ull);
    return p;
  }
  p.z = p.at.axis[0].start + p.i;
  const AxisClip ys = p.at.axis[1];
  p.j_lo = max(ys.offset(), static_cast<int64_t>(blockIdx.y) * rows_per_block);
  p.j_hi = min(ys.hi - ys.start, static_cast<int64_t>(blockIdx.y + 1) * rows_per_block);
  p.active = p.z >= p.at.axis[0].lo && p.z < p.at.axis[0].hi && p.j_lo < p.j_hi;
  return p;
}

// bad summed over the warp, then one integer atomic per warp that saw a non-finite value (emulated
// threads run one at a time: each adds its own).
__device__ __forceinline__ void add_nonfinite(unsigned bad, unsigned long long* flags) {
#ifndef DENSEFUSE_CUDA_EMULATION
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, offset);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(flags, static_cast<unsigned long long>(bad));
#else
  if (bad) atomicAdd(flags, static_cast<unsigned long long>(bad));
#endif
}

template <class T, class S, int VEC, bool CLAMP>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const PatchScatterArgs a, int64_t first_plane, int64_t rows_per_block, unsigned long long* flags) {
  const PlaneBand p = plane_band(a, first_plane, rows_per_block, flags);
  if (!p.active) return;
  const int64_t rz = a.roi[0], ry = a.roi[1], rx = a.roi[2];
  const int64_t i = p.i, c = p.c, n = p.n, z = p.z, j_lo = p.j_lo, j_hi = p.j_hi;
  const AxisClip ys = p.at.axis[1], xs = p.at.axis[2];
  const T* wz = static_cast<const T*>(a.weights[0]);
  const T* wy = static_cast<const T*>(a.weights[1]);
  const T* wx = static_cast<const T*>(a.weights[2]);
  const T floor = static_cast<T>(a.floor);
  const int64_t height = a.size[1], width = a.size[2];
  T* acc = static_cast<T*>(a.acc) + ((p.at.batch * a.channels + c) * a.size[0] + z) * height * width;
  const S* win = static_cast<const S*>(a.windows) + ((n * a.channels + c) * rz + i) * ry * rx;
  const int64_t g0 = xs.lo / VEC;
  const int64_t groups = (xs.hi + VEC - 1) / VEC - g0;
  const int64_t items = (j_hi - j_lo) * groups;
  unsigned bad = 0;
  for (int64_t t = threadIdx.x; t < items; t += kThreads) {
    const int64_t j = j_lo + t / groups;
    const int64_t x0 = (g0 + t % groups) * VEC;
    const T pzy = wz[i] * wy[j];
    T v[VEC];
    unsigned inside = 0;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t x = x0 + e, k = x - xs.start;
      v[e] = T(0);
      if (x >= xs.lo && x < xs.hi) {
        const auto raw = widen(win[j * rx + k]);
        bad += math::nonfinite(raw);
        v[e] = patch::weight<CLAMP>(pzy, wx[k], floor) * static_cast<T>(raw);
        inside |= 1u << e;
      }
    }
    atomic_add_lanes<VEC>(acc + (ys.start + j) * width + x0, v, inside);
  }
  add_nonfinite(bad, flags);
}

// Whether a window starting at s of length roi covers coordinate v in [0, size) (no overflow for any
// int64 start).
__device__ __forceinline__ bool covers_axis(int64_t s, int64_t roi, int64_t v) { return s <= v && s > v - roi; }

// Whether the window at s = (b, z, y, x) of size roi covers voxel (b, z, y, x) of the volume.
__device__ __forceinline__ bool covers(const int64_t* s, const int64_t* roi, int64_t b, int64_t z, int64_t y,
                                       int64_t x) {
  return s[0] == b && covers_axis(s[1], roi[0], z) && covers_axis(s[2], roi[1], y) && covers_axis(s[3], roi[2], x);
}

// a * b rounded on its own (never fused with the add that follows into an FMA): the gather's sums
// then round as reference.patch_gather's, which multiplies and adds in separate kernels.
__device__ __forceinline__ float product(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product(double a, double b) { return __dmul_rn(a, b); }

template <class T, class S, bool CLAMP>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const PatchScatterArgs a, int64_t first_plane, int64_t rows_per_block, unsigned long long* flags) {
  const PlaneBand p = plane_band(a, first_plane, rows_per_block, flags);
  if (!p.active) return;
  const int64_t rz = a.roi[0], ry = a.roi[1], rx = a.roi[2];
  const T* wz = static_cast<const T*>(a.weights[0]);
  const T* wy = static_cast<const T*>(a.weights[1]);
  const T* wx = static_cast<const T*>(a.weights[2]);
  const T floor = static_cast<T>(a.floor);
  const int64_t b = p.at.batch, width = a.size[2];
  T* acc = static_cast<T*>(a.acc) + ((b * a.channels + p.c) * a.size[0] + p.z) * a.size[1] * width;
  const S* windows = static_cast<const S*>(a.windows);
  const AxisClip ys = p.at.axis[1], xs = p.at.axis[2];
  const int64_t nx = xs.hi - xs.lo;
  const int64_t items = (p.j_hi - p.j_lo) * nx;
  unsigned bad = 0;
  for (int64_t t = threadIdx.x; t < items; t += kThreads) {
    const int64_t y = ys.start + p.j_lo + t / nx, x = xs.lo + t % nx;
    bool owner = true;  // no earlier window covers (z, y, x)
    for (int64_t m = 0; m < p.n && owner; ++m) owner = !covers(a.starts + 4 * m, a.roi, b, p.z, y, x);
    if (!owner) continue;
    T sum = T(0);
    for (int64_t m = p.n; m < a.count; ++m) {
      const int64_t* s = a.starts + 4 * m;
      if (!covers(s, a.roi, b, p.z, y, x)) continue;
      const int64_t i = p.z - s[1], j = y - s[2], k = x - s[3];
      const auto raw = widen(windows[(((m * a.channels + p.c) * rz + i) * ry + j) * rx + k]);
      bad += math::nonfinite(raw);
      sum += product(patch::weight<CLAMP>(wz[i] * wy[j], wx[k], floor), static_cast<T>(raw));
    }
    acc[y * width + x] += sum;
  }
  add_nonfinite(bad, flags);
}

// out[n, c, i, j, k] = padded(volume)[b, c, z + i, y + j, x + k] (E: an unsigned integer of the element
// size: values are only moved). VEC > 1 (16 / sizeof(E), chosen by launch_extract where x has unit
// stride and every row of the volume and of out starts 16-byte aligned): a window lying inside the
// volume along y and x, starting at an x divisible by VEC, is copied 16 bytes per load and store.
template <class E, int VEC>
__global__ void __launch_bounds__(kThreads)
    extract_kernel(const PatchExtractArgs a, E cval, int64_t first_plane, int64_t rows_per_block) {
  const int64_t rz = a.roi[0], ry = a.roi[1], rx = a.roi[2];
  const int64_t plane = first_plane + blockIdx.x;
  const int64_t i = plane % rz, c = plane / rz % a.channels, n = plane / (rz * a.channels);
  const int64_t j_lo = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t j_hi = min(ry, j_lo + rows_per_block);
  const int64_t* s = a.starts + 4 * n;
  const int64_t* st = a.strides;
  const bool in_batch = s[0] >= 0 && s[0] < a.batch;
  const int64_t z = in_batch ? patch::pad_index(s[1], i, a.size[0], a.mode) : -1;
  const E* src = z >= 0 ? static_cast<const E*>(a.volume) + s[0] * st[0] + c * st[1] + z * st[2] : nullptr;
  E* dst = static_cast<E*>(a.out) + (plane * ry + j_lo) * rx;
  if constexpr (VEC > 1) {
    const bool inside = s[2] >= 0 && s[2] <= a.size[1] - ry && s[3] >= 0 && s[3] <= a.size[2] - rx;
    if (src != nullptr && inside && s[3] % VEC == 0) {
      const int64_t per_row = rx / VEC;
      const E* row0 = src + (s[2] + j_lo) * st[3] + s[3];
      for (int64_t t = threadIdx.x; t < (j_hi - j_lo) * per_row; t += kThreads) {
        const int64_t j = t / per_row, k = t % per_row;
        reinterpret_cast<uint4*>(dst)[t] = reinterpret_cast<const uint4*>(row0 + j * st[3])[k];
      }
      return;
    }
  }
  const int64_t items = (j_hi - j_lo) * rx;
  for (int64_t t = threadIdx.x; t < items; t += kThreads) {
    E value = cval;
    if (src != nullptr) {
      const int64_t y = patch::pad_index(s[2], j_lo + t / rx, a.size[1], a.mode);
      const int64_t x = patch::pad_index(s[3], t % rx, a.size[2], a.mode);
      if (y >= 0 && x >= 0) value = src[y * st[3] + x * st[4]];
    }
    dst[t] = value;
  }
}

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
template <class T>
__device__ __forceinline__ T smallest_normal();
template <>
__device__ __forceinline__ float smallest_normal<float>() {
  return FLT_MIN;
}
template <>
__device__ __forceinline__ double smallest_normal<double>() {
  return DBL_MIN;
}

// sums [D + H + W] = the axis sums S of reference.axis_normalizer for z, then y, then x (floor == 0).
template <class T>
__global__ void __launch_bounds__(kThreads) axis_sums_kernel(const PatchFinalizeArgs a, T* sums) {
  const int64_t total = a.size[0] + a.size[1] + a.size[2];
  for (int64_t t = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * kThreads) {
    int d = 0;
    int64_t v = t;
    while (v >= a.size[d]) v -= a.size[d++];
    const int64_t* starts = a.starts[d];
    const T* w = static_cast<const T*>(a.weights[d]);
    T sum = T(0);
    for (int64_t g = 0; g < a.grid[d]; ++g) {
      if (covers_axis(starts[g], a.roi[d], v)) sum += w[v - starts[g]];
    }
    sums[t] = sum;
  }
}

// Whether a window starting at s of length roi meets [lo, hi) (no overflow for any int64 start).
__device__ __forceinline__ bool meets(int64_t s, int64_t roi, int64_t lo, int64_t hi) { return s < hi && s > lo - roi; }

// Voxel s = (z H + y) W + x of batch b, every channel (channel stride volume), with normaliser n:
// v = acc / n (0 where n is below the smallest normal T), then the output (see the file comment).
template <class T>
__device__ __forceinline__ void finalize_voxel(const PatchFinalizeArgs& a, int64_t b, int64_t s, T n, void* out) {
  const int64_t volume = a.size[0] * a.size[1] * a.size[2], channels = a.channels;
  const bool covered = n >= smallest_normal<T>();
  const T* acc = static_cast<const T*>(a.acc) + b * channels * volume + s;
  const auto value = [&](int64_t c) {
    const T q = acc[c * volume] / n;
    return covered ? q : T(0);
  };
  if (a.output == kOutMask && a.activation == kActSoftmax) {
    T best = value(0);
    int64_t arg = 0;
    for (int64_t c = 1; c < channels && best == best; ++c) {
      const T v = value(c);
      if (v > best || v != v) {
        best = v;
        arg = c;
      }
    }
    static_cast<uint8_t*>(out)[b * volume + s] = covered ? static_cast<uint8_t>(arg) : uint8_t(0);
  } else if (a.output == kOutMask) {
    const T level = static_cast<T>(a.threshold);
    uint8_t* o = static_cast<uint8_t*>(out) + b * channels * volume + s;
    for (int64_t c = 0; c < channels; ++c) {
      const T v = value(c);
      const T p = a.activation == kActSigmoid ? T(1) / (T(1) + exp_of(-v)) : v;
      o[c * volume] = covered && p >= level;
    }
  } else {
    T* o = static_cast<T*>(out) + b * channels * volume + s;  // may be acc: each value is read first
    if (!covered || a.activation != kActSoftmax) {
      for (int64_t c = 0; c < channels; ++c) {
        const T v = value(c);
        o[c * volume] = !covered ? T(0) : a.activation == kActSigmoid ? T(1) / (T(1) + exp_of(-v)) : v;
      }
      return;
    }
    T max = value(0);
    for (int64_t c = 1; c < channels; ++c) max = value(c) > max ? value(c) : max;
    T sum = T(0);
    for (int64_t c = 0; c < channels; ++c) sum += exp_of(value(c) - max);
    for (int64_t c = 0; c < channels; ++c) o[c * volume] = exp_of(value(c) - max) / sum;
  }
}

// finalise: a block (kTileThreads threads: kTileColumns columns x kTileThreads / kTileColumns rows)
// covers a tile of kTileRows rows x kTileColumns columns; each thread kRowsPerThread voxels of one
// column, kTileThreads / kTileColumns rows apart (a warp reads and writes one row's 32 columns).
constexpr int kTileColumns = 32, kRowsPerThread = 4, kTileThreads = 256;
constexpr int kTileRows = kTileThreads / kTileColumns * kRowsPerThread;

// A tile of one plane (b, z) per block (blockIdx.x: the column tile; blockIdx.y: (b, z, row tile),
// grid-stride), every channel. N: (Sz Sy) Sx from the axis sums, or the clamped weights of the
// covering grid windows summed in grid order (a, b, c): a window missing the tile along an axis is
// skipped by a test the whole block shares; one that meets the tile but not a voxel adds 0 there
// (the same bits). A thread reads a window's x weight once for its kRowsPerThread voxels.
template <class T, bool CLAMP>
__global__ void __launch_bounds__(kTileThreads) finalize_kernel(const PatchFinalizeArgs a, const T* sums, void* out) {
  constexpr int kRowStep = kTileThreads / kTileColumns;
  const int64_t depth = a.size[0], height = a.size[1], width = a.size[2];
  const int64_t row_tiles = (height + kTileRows - 1) / kTileRows, tiles = a.batch * depth * row_tiles;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kTileColumns, x = x0 + threadIdx.x % kTileColumns;
  const int64_t x1 = min(width, x0 + kTileColumns);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t plane = tile / row_tiles, z = plane % depth, b = plane / depth;
    const int64_t y0 = tile % row_tiles * kTileRows, y1 = min(height, y0 + kTileRows);
    const int64_t first_y = y0 + threadIdx.x / kTileColumns;  // rows first_y + k kRowStep
    if (x >= width || first_y >= height) continue;
    T n[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) n[k] = T(0);
    if constexpr (!CLAMP) {
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int64_t y = min(first_y + k * kRowStep, height - 1);  // rows past the end: not written
        n[k] = (sums[z] * sums[depth + y]) * sums[depth + height + x];
      }
    } else {
      const T* wz = static_cast<const T*>(a.weights[0]);
      const T* wy = static_cast<const T*>(a.weights[1]);
      const T* wx = static_cast<const T*>(a.weights[2]);
      const int64_t *sz = a.starts[0], *sy = a.starts[1], *sx = a.starts[2];
      const T floor = static_cast<T>(a.floor);
      for (int64_t p = 0; p < a.grid[0]; ++p) {
        if (!covers_axis(sz[p], a.roi[0], z)) continue;  // z: the same for the whole tile
        const T weight_z = wz[z - sz[p]];
        for (int64_t q = 0; q < a.grid[1]; ++q) {
          if (!meets(sy[q], a.roi[1], y0, y1)) continue;
          bool in_y[kRowsPerThread];
          T pzy[kRowsPerThread];
#pragma unroll
          for (int k = 0; k < kRowsPerThread; ++k) {
            const int64_t y = first_y + k * kRowStep;
            in_y[k] = covers_axis(sy[q], a.roi[1], y);
            pzy[k] = weight_z * wy[in_y[k] ? y - sy[q] : 0];
          }
          for (int64_t r = 0; r < a.grid[2]; ++r) {
            if (!meets(sx[r], a.roi[2], x0, x1)) continue;
            const bool in_x = covers_axis(sx[r], a.roi[2], x);
            const T weight_x = wx[in_x ? x - sx[r] : 0];
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
              const T w = patch::weight<true>(pzy[k], weight_x, floor);
              n[k] += in_y[k] && in_x ? w : T(0);
            }
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t y = first_y + k * kRowStep;
      if (y < height) finalize_voxel<T>(a, b, (z * height + y) * width + x, n[k], out);
    }
  }
}

template <class F>
cudaError_t visit_windows(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16: return f(Tag<__half>{});
    case DType::BFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::Float32: return f(Tag<float>{});
    case DType::Float64: return f(Tag<double>{});
    default: return cudaErrorInvalidValue;
  }
}

// The widest vector (4, 2 or 1 voxels) whose groups are aligned in acc for every row.
int vector_width(const PatchScatterArgs& a) {
  if (a.acc_dtype != DType::Float32) return 1;
  const auto address = reinterpret_cast<uintptr_t>(a.acc);
  for (int vec : {4, 2}) {
    if (a.size[2] % vec == 0 && address % (vec * sizeof(float)) == 0) return vec;
  }
  return 1;
}

// Rows per band for windows of ry rows of per_row items each: about kItemsPerBlock items per block,
// and at most kMaxGridY bands.
int64_t band_rows(int64_t ry, int64_t per_row) {
  int64_t rows = (kItemsPerBlock + per_row - 1) / per_row;
  const int64_t fewest = (ry + kMaxGridY - 1) / kMaxGridY;
  rows = rows > fewest ? rows : fewest;
  return rows < ry ? rows : ry;
}

// launch(grid, first_plane) for the N * C * rz window planes, in grids of at most kMaxGridX planes.
template <class F>
cudaError_t for_plane_grids(const int64_t* roi, int64_t count, int64_t channels, int64_t rows, F&& launch) {
  const int64_t planes = count * channels * roi[0];
  const auto bands = static_cast<unsigned>((roi[1] + rows - 1) / rows);  // <= kMaxGridY
  for (int64_t first = 0; first < planes; first += kMaxGridX) {
    const int64_t size = planes - first < kMaxGridX ? planes - first : kMaxGridX;
    launch(dim3(static_cast<unsigned>(size), bands), first);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <class T, class S, int VEC>
cudaError_t launch_scatter(const PatchScatterArgs& a, unsigned long long* flags, cudaStream_t stream) {
  const int64_t rows = band_rows(a.roi[1], a.roi[2] / VEC + 2);  // most groups a clipped row can touch
  return for_plane_grids(a.roi, a.count, a.channels, rows, [&](dim3 grid, int64_t first) {
    if (a.floor > 0) {
      DF_LAUNCH(grid, kThreads, stream, scatter_kernel<T, S, VEC, true>)(a, first, rows, flags);
    } else {
      DF_LAUNCH(grid, kThreads, stream, scatter_kernel<T, S, VEC, false>)(a, first, rows, flags);
    }
  });
}

template <class T, class S>
cudaError_t launch_gather(const PatchScatterArgs& a, unsigned long long* flags, cudaStream_t stream) {
  const int64_t rows = band_rows(a.roi[1], a.roi[2]);
  return for_plane_grids(a.roi, a.count, a.channels, rows, [&](dim3 grid, int64_t first) {
    if (a.floor > 0) {
      DF_LAUNCH(grid, kThreads, stream, gather_kernel<T, S, true>)(a, first, rows, flags);
    } else {
      DF_LAUNCH(grid, kThreads, stream, gather_kernel<T, S, false>)(a, first, rows, flags);
    }
  });
}

// Whether the 16-byte copy of extract_kernel<E, 16 / sizeof(E)> fits: x of unit stride, rows of whole
// vectors, and the volume's and out's rows 16-byte aligned.
template <class E>
bool extract_vectorizable(const PatchExtractArgs& a) {
  constexpr int64_t vec = 16 / sizeof(E);
  bool fits = a.strides[4] == 1 && a.roi[2] % vec == 0 && reinterpret_cast<uintptr_t>(a.volume) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  for (int d = 0; d < 4; ++d) fits = fits && a.strides[d] % vec == 0;
  return fits;
}

template <class E>
cudaError_t launch_extract(const PatchExtractArgs& a, cudaStream_t stream) {
  E cval;
  std::memcpy(&cval, a.cval, sizeof(E));  // a host value
  const int64_t rows = band_rows(a.roi[1], a.roi[2]);
  const bool vectorized = extract_vectorizable<E>(a);
  return for_plane_grids(a.roi, a.count, a.channels, rows, [&](dim3 grid, int64_t first) {
    if (vectorized) {
      DF_LAUNCH(grid, kThreads, stream, extract_kernel<E, 16 / sizeof(E)>)(a, cval, first, rows);
    } else {
      DF_LAUNCH(grid, kThreads, stream, extract_kernel<E, 1>)(a, cval, first, rows);
    }
  });
}

unsigned blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <class T>
cudaError_t launch_finalize(const PatchFinalizeArgs& a, void* out, int64_t* scratch, cudaStream_t stream) {
  T* sums = reinterpret_cast<T*>(scratch);
  if (a.floor <= 0) {
    DF_LAUNCH(blocks_for(a.size[0] + a.size[1] + a.size[2]), kThreads, stream, axis_sums_kernel<T>)(a, sums);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = a.batch * a.size[0] * ((a.size[1] + kTileRows - 1) / kTileRows);
  const dim3 grid(static_cast<unsigned>((a.size[2] + kTileColumns - 1) / kTileColumns),
                  static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY));
  if (a.floor > 0) {
    DF_LAUNCH(grid, kTileThreads, stream, finalize_kernel<T, true>)(a, sums, out);
  } else {
    DF_LAUNCH(grid, kTileThreads, stream, finalize_kernel<T, false>)(a, sums, out);
  }
  return cudaGetLastError();
}

// The window launcher for the windows' dtype and acc's dtype (and, for the scatter, its vector width).
template <bool GATHER>
cudaError_t launch_windows(const PatchScatterArgs& args, int64_t* flags, cudaStream_t stream) {
  const cudaError_t err = cudaMemsetAsync(flags, 0, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess || args.count == 0) return err;
  auto* counts = reinterpret_cast<unsigned long long*>(flags);
  return visit_windows(args.windows_dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    if constexpr (GATHER) {
      if (args.acc_dtype == DType::Float64) return launch_gather<double, S>(args, counts, stream);
      return launch_gather<float, S>(args, counts, stream);
    } else {
      if (args.acc_dtype == DType::Float64) return launch_scatter<double, S, 1>(args, counts, stream);
      switch (vector_width(args)) {
        case 4: return launch_scatter<float, S, 4>(args, counts, stream);
        case 2: return launch_scatter<float, S, 2>(args, counts, stream);
        default: return launch_scatter<float, S, 1>(args, counts, stream);
      }
    }
  });
}

}  // namespace

cudaError_t launch_patch_scatter(const PatchScatterArgs& args, int64_t* flags, cudaStream_t stream) {
  return launch_windows<false>(args, flags, stream);
}

cudaError_t launch_patch_gather(const PatchScatterArgs& args, int64_t* flags, cudaStream_t stream) {
  return launch_windows<true>(args, flags, stream);
}

cudaError_t launch_patch_finalize(const PatchFinalizeArgs& args, void* out, int64_t* scratch, cudaStream_t stream) {
  if (args.acc_dtype == DType::Float64) return launch_finalize<double>(args, out, scratch, stream);
  return launch_finalize<float>(args, out, scratch, stream);
}

cudaError_t launch_patch_extract(const PatchExtractArgs& args, cudaStream_t stream) {
  if (args.count == 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::Float16:
    case DType::BFloat16: return launch_extract<uint16_t>(args, stream);
    case DType::Float32: return launch_extract<uint32_t>(args, stream);
    case DType::Float64: return launch_extract<uint64_t>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace densefuse::cuda
