// CUDA patch scatter (semantics: densefuse/reference.py patch_scatter; layout: patch_fuse_args.h).
//
// Grid: blockIdx.x = one window plane (n, c, i) (window n, channel c, window z index i), blockIdx.y =
// a band of rows_per_block window rows j (rows_per_block is chosen so that at most 65535 bands cover a
// window). A call with more than 2^31 - 1 planes (N * C * rz) is split into launches of at most that
// many planes, each starting at plane first_plane, so no size gives an invalid launch configuration. Every thread computes the window's placement from starts
// (a few loads, the same for the whole block); blocks of unplaced windows exit, and the first block
// of each counts it as skipped. The threads of a block stride over (row, x group) items of the band's
// clipped part; a group is VEC consecutive voxels of acc, aligned to VEC in acc (so the window run is
// covered by groups that may stick out by up to VEC - 1 voxels at either end; those lanes add 0).
// Each item computes w = max((wz[i] * wy[j]) * wx[k], floor) * v for its lanes, counts non-finite v,
// and adds the VEC values with one atomic:
//   sm_90+, fp32 acc: atomicAdd on float4 / float2 (16 / 8 bytes, one L2 atomic for VEC voxels)
//   otherwise (sm_80 builds, fp64 acc): one scalar atomicAdd per lane inside the window.
// VEC = 4 when W % 4 == 0 and acc is 16-byte aligned, 2 for W % 2 == 0 (8 bytes), else 1.
// A lane outside the window adds +0.0 with the vector atomics, which turns a -0.0 in acc into +0.0
// and changes nothing else. Non-finite counts: warp sums, one integer atomic per warp that saw one.
#include "cuda/patch_fuse.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "patch_math.h"

namespace densefuse::cuda {
namespace {

using patch::AxisClip;

constexpr int kThreads = 256;
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

template <class T, class S, int VEC, bool CLAMP>
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const PatchScatterArgs a, int64_t first_plane, int64_t rows_per_block, unsigned long long* flags) {
  const int64_t rz = a.roi[0], ry = a.roi[1], rx = a.roi[2];
  const int64_t plane = first_plane + blockIdx.x;
  const int64_t i = plane % rz;
  const int64_t c = plane / rz % a.channels;
  const int64_t n = plane / (rz * a.channels);
  const patch::Placement at = patch::place_window(a.starts + 4 * n, a.roi, a.batch, a.size);
  if (!at.placed) {
    if (i == 0 && c == 0 && blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(flags + 1, 1ull);
    return;
  }
  const int64_t z = at.axis[0].start + i;
  const AxisClip ys = at.axis[1], xs = at.axis[2];
  const int64_t j_lo = max(ys.offset(), static_cast<int64_t>(blockIdx.y) * rows_per_block);
  const int64_t j_hi = min(ys.hi - ys.start, static_cast<int64_t>(blockIdx.y + 1) * rows_per_block);
  if (z < at.axis[0].lo || z >= at.axis[0].hi || j_lo >= j_hi) return;  // the same for the whole block

  const T* wz = static_cast<const T*>(a.weights[0]);
  const T* wy = static_cast<const T*>(a.weights[1]);
  const T* wx = static_cast<const T*>(a.weights[2]);
  const T floor = static_cast<T>(a.floor);
  const int64_t height = a.size[1], width = a.size[2];
  T* acc = static_cast<T*>(a.acc) + ((at.batch * a.channels + c) * a.size[0] + z) * height * width;
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
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, offset);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(flags, static_cast<unsigned long long>(bad));
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

template <class T, class S, int VEC>
cudaError_t launch(const PatchScatterArgs& a, unsigned long long* flags, cudaStream_t stream) {
  const int64_t ry = a.roi[1];
  const int64_t groups = a.roi[2] / VEC + 2;  // most groups a clipped row can touch
  int64_t rows = (kItemsPerBlock + groups - 1) / groups;
  rows = rows > (ry + kMaxGridY - 1) / kMaxGridY ? rows : (ry + kMaxGridY - 1) / kMaxGridY;
  rows = rows < ry ? rows : ry;
  const int64_t planes = a.count * a.channels * a.roi[0];
  const auto bands = static_cast<unsigned>((ry + rows - 1) / rows);  // <= kMaxGridY
  for (int64_t first = 0; first < planes; first += kMaxGridX) {
    const int64_t count = planes - first < kMaxGridX ? planes - first : kMaxGridX;
    const dim3 grid(static_cast<unsigned>(count), bands);
    if (a.floor > 0) {
      scatter_kernel<T, S, VEC, true><<<grid, kThreads, 0, stream>>>(a, first, rows, flags);
    } else {
      scatter_kernel<T, S, VEC, false><<<grid, kThreads, 0, stream>>>(a, first, rows, flags);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_patch_scatter(const PatchScatterArgs& args, int64_t* flags, cudaStream_t stream) {
  const cudaError_t err = cudaMemsetAsync(flags, 0, 2 * sizeof(int64_t), stream);
  if (err != cudaSuccess || args.count == 0) return err;
  auto* counts = reinterpret_cast<unsigned long long*>(flags);
  return visit_windows(args.windows_dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    if (args.acc_dtype == DType::Float64) return launch<double, S, 1>(args, counts, stream);
    switch (vector_width(args)) {
      case 4: return launch<float, S, 4>(args, counts, stream);
      case 2: return launch<float, S, 2>(args, counts, stream);
      default: return launch<float, S, 1>(args, counts, stream);
    }
  });
}

}  // namespace densefuse::cuda
