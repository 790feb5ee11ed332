// CUDA kernels for the loss statistics (semantics: densefuse/reference.py; layout: loss_stats_args.h).
//
// One thread handles one voxel at a time (VEC = 4 consecutive voxels with vector loads when the
// logits are contiguous along V, aligned and V % 4 == 0), grid-striding over the voxels of one
// (batch row, channel group). A block covers a group of CG channels (CG = 1 for C == 1, else 4;
// blockIdx.y walks (b, group) pairs), so its per-thread accumulators acc[CG][K] stay in registers;
// softmax statistics (max, sum of exps) of a voxel read all C logits of that voxel.
//
// Forward: fp32 accumulation (fp64 for fp64 logits) per thread, warp shuffles + shared memory for
// the block sum, one partial [CG, K] per block written to the workspace [B, blocks, C, K]; a second
// kernel sums the partials over the blocks in a fixed order in double. No float atomics, so the
// result is deterministic. Flags (integer counts) are added with atomics, which is exact.
// Backward: same traversal, writes dL/dlogits [B, C, V] in the logits' dtype.
// Per-element math is shared with the CPU kernels (loss_math.h).
#include "cuda/loss_stats.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "loss_math.h"

namespace densefuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 4;                  // voxels per thread step on the vector path
constexpr int kGroup = 4;                // channels per block when C > 1
constexpr int64_t kMaxBlocks = 1024;     // blocks per launch; threads grid-stride beyond
constexpr int64_t kStepsPerThread = 4;   // grid-stride steps per thread before more blocks are used
constexpr int64_t kMaxGridY = 65535;

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_acc(Acc<T> v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Math policy of the CUDA kernels (loss_math.h).
struct GpuMath {
  __host__ __device__ static float exp(float x) { return expf(x); }
  __host__ __device__ static float log(float x) { return logf(x); }
  __host__ __device__ static float log_1_2(float x) { return logf(x); }
  __host__ __device__ static float log1p(float x) { return log1pf(x); }
  __host__ __device__ static float abs(float x) { return fabsf(x); }
  __host__ __device__ static double exp(double x) { return ::exp(x); }
  __host__ __device__ static double log(double x) { return ::log(x); }
  __host__ __device__ static double log_1_2(double x) { return ::log(x); }
  __host__ __device__ static double log1p(double x) { return ::log1p(x); }
  __host__ __device__ static double abs(double x) { return ::fabs(x); }
};

// VEC elements loaded or stored with one vector access.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ------------------------------------------------------------------------------------ loading
__device__ __forceinline__ int64_t load_label(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::UInt8: return static_cast<const uint8_t*>(p)[i];
    case DType::Int8: return static_cast<const int8_t*>(p)[i];
    case DType::Int16: return static_cast<const int16_t*>(p)[i];
    case DType::Int32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const int64_t*>(p)[i];
  }
}

template <class A>
__device__ __forceinline__ A load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::Float16: return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    case DType::BFloat16: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    case DType::Float32: return static_cast<A>(static_cast<const float*>(p)[i]);
    default: return static_cast<A>(static_cast<const double*>(p)[i]);
  }
}

// Non-finite test on the stored value (an fp64 target is tested before any rounding to fp32).
__device__ __forceinline__ bool target_nonfinite(const void* p, DType dtype, int64_t i) {
  return dtype == DType::Float64 ? math::nonfinite(load_float<double>(p, dtype, i))
                                 : math::nonfinite(load_float<float>(p, dtype, i));
}

// x[k][j] = logits[c0 + k, v + j] (0 past the last channel); column points at (b, 0, v).
template <class T, int CG, int VEC>
__device__ __forceinline__ void load_logits(const LossStatsArgs& a, const T* column, int64_t c0,
                                            Acc<T> (&x)[CG][VEC]) {
#pragma unroll
  for (int k = 0; k < CG; ++k) {
    const int64_t c = c0 + k;
    if (c < a.channels) {
      const T* p = column + c * a.logits_stride[1];
      if constexpr (VEC == 1) {
        x[k][0] = to_acc(*p);
      } else {
        const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[k][j] = to_acc(pack.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) x[k][j] = 0;
    }
  }
}

// ------------------------------------------------------------------------------------ per voxel
template <class A>
struct SoftmaxStats {
  A max, inv_sum, rest, log_sum;  // rest = sum of the exps of the classes other than argmax
  int64_t argmax;
};

// Everything about one voxel the per-class math needs besides its own logit and target.
template <class A>
struct Voxel {
  A valid;          // 0 for ignore_index
  int64_t cls;      // class of the label, -1 if none (dense targets: unused)
  bool bad_label;   // out-of-range label that is not ignored
  SoftmaxStats<A> softmax;
};

template <class T>
__device__ SoftmaxStats<Acc<T>> softmax_stats(const LossStatsArgs& a, const T* column) {
  using A = Acc<T>;
  const int64_t stride = a.logits_stride[1];
  A max = to_acc(column[0]);
  int64_t argmax = 0;
  for (int64_t c = 1; c < a.channels; ++c) {
    const A x = to_acc(column[c * stride]);
    if (x > max) {
      max = x;
      argmax = c;
    }
  }
  A sum = 0, rest = 0;
  for (int64_t c = 0; c < a.channels; ++c) {
    const A e = GpuMath::exp(to_acc(column[c * stride]) - max);
    sum += e;
    rest += c == argmax ? A(0) : e;
  }
  return {max, A(1) / sum, rest, GpuMath::log1p(rest), argmax};
}

// C == 1: class 0 is label 1 and valid labels are {0, 1}; C > 1: class c is label c, valid [0, C).
template <class T>
__device__ Voxel<Acc<T>> load_voxel(const LossStatsArgs& a, int64_t b, int64_t v, const T* column) {
  using A = Acc<T>;
  Voxel<A> vox{A(1), -1, false, {}};
  if (!a.dense_target) {
    const int64_t label = load_label(a.target, a.target_dtype, b * a.target_stride[0] + v * a.target_stride[2]);
    const bool binary = a.channels == 1;
    const int64_t offset = binary ? 1 : 0;
    const int64_t upper = binary ? 2 : a.channels;
    const bool keep = !(a.has_ignore && label == a.ignore_index);
    vox.valid = keep ? A(1) : A(0);
    vox.cls = keep && label >= offset && label < upper ? label - offset : -1;
    vox.bad_label = keep && (label < 0 || label >= upper);
  }
  if (a.activation == kActSoftmax) vox.softmax = softmax_stats(a, column);
  return vox;
}

template <class A>
__device__ __forceinline__ A class_target(const LossStatsArgs& a, const Voxel<A>& vox, int64_t b, int64_t c,
                                          int64_t v) {
  if (a.dense_target) {
    return load_float<A>(a.target, a.target_dtype,
                         b * a.target_stride[0] + c * a.target_stride[1] + v * a.target_stride[2]);
  }
  return vox.cls == c ? A(1) : A(0);
}

template <class A>
__device__ __forceinline__ A softmax_prob(const SoftmaxStats<A>& s, A x) {
  return GpuMath::exp(x - s.max) * s.inv_sum;
}

template <class A>
__device__ __forceinline__ A probability(int activation, A x, const SoftmaxStats<A>& s) {
  if (activation == kActSoftmax) return softmax_prob(s, x);
  if (activation == kActSigmoid) {
    const auto parts = math::sigmoid_parts<GpuMath>(x);
    return math::sigmoid_from(x, parts.e, parts.r);
  }
  return x;
}

// Weighted focal loss of class c at one voxel and its dL/dx-part (before valid and dL/dsum).
template <class A>
__device__ math::ValueGrad<A> focal_term(const LossStatsArgs& a, const SoftmaxStats<A>& s, int64_t c, A x, A g) {
  const A gamma = static_cast<A>(a.gamma);
  const A alpha_pos = a.alpha_pos ? static_cast<const A*>(a.alpha_pos)[c] : A(1);
  math::ValueGrad<A> term;
  A weight;
  const bool square = gamma == A(2);
  if (a.activation == kActSoftmax) {
    const A e = GpuMath::exp(x - s.max);
    const bool is_max = c == s.argmax;
    term = square ? math::focal_softmax_class<GpuMath, true>(x, e, s.max, s.inv_sum, s.rest, s.log_sum, is_max, gamma)
                  : math::focal_softmax_class<GpuMath, false>(x, e, s.max, s.inv_sum, s.rest, s.log_sum, is_max, gamma);
    weight = alpha_pos * g;
  } else {
    if (a.dense_target) {
      term = square ? math::focal_sigmoid<GpuMath, false, true>(x, g, gamma)
                    : math::focal_sigmoid<GpuMath, false, false>(x, g, gamma);
    } else {
      term = square ? math::focal_sigmoid<GpuMath, true, true>(x, g, gamma)
                    : math::focal_sigmoid<GpuMath, true, false>(x, g, gamma);
    }
    const A alpha_neg = a.alpha_neg ? static_cast<const A*>(a.alpha_neg)[c] : A(1);
    weight = math::alpha_weight(g, alpha_pos, alpha_neg);
  }
  return {weight * term.value, weight * term.grad};
}

// Per-class backward term o_c: dL/dx_c directly, or for softmax the part before the coupling
// dL/dx_c = o_c - p_c sum_k o_k (o_c = p_c dL/dp_c for overlap, w_c h_c for focal).
template <LossKind KIND, class A>
__device__ A class_grad(const LossStatsArgs& a, const Voxel<A>& vox, const A* grad, int64_t c, A x, A g) {
  if constexpr (KIND == LossKind::Overlap) {
    const A grad_p = math::overlap_grad_p(g, vox.valid, grad[3 * c], grad[3 * c + 1]);
    if (a.activation == kActSoftmax) return softmax_prob(vox.softmax, x) * grad_p;
    if (a.activation == kActSigmoid) {
      const auto parts = math::sigmoid_parts<GpuMath>(x);
      return grad_p * math::sigmoid_slope(parts.e, parts.r);
    }
    return grad_p;
  } else {
    return grad[2 * c] * vox.valid * focal_term(a, vox.softmax, c, x, g).grad;
  }
}

// ------------------------------------------------------------------------------------ reduction
// out[q] = sum over the block of vals[q] for q < n_out, in a fixed order (warp shuffles, then warps).
template <class A, int N>
__device__ __forceinline__ void block_sum(const A (&vals)[N], A* out, int n_out) {
  __shared__ A partial[kWarps][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < N; ++q) {
    A v = vals[q];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[warp][q] = v;
  }
  __syncthreads();
  if (threadIdx.x < n_out) {
    A sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][threadIdx.x];
    out[threadIdx.x] = sum;
  }
  __syncthreads();  // `partial` is reused by the block's next (b, group)
}

// ------------------------------------------------------------------------------------ kernels
template <class T, int CG, int VEC, LossKind KIND>
__global__ void __launch_bounds__(kThreads)
    stats_forward_kernel(const LossStatsArgs a, Acc<T>* partials, unsigned long long* flags) {
  using A = Acc<T>;
  constexpr int K = KIND == LossKind::Overlap ? 3 : 2;
  const int64_t channels = a.channels;
  const int64_t groups = (channels + CG - 1) / CG;
  const int64_t items = a.voxels / VEC;
  unsigned long long bad_labels = 0, bad_logits = 0, bad_targets = 0;
  for (int64_t bg = blockIdx.y; bg < a.batch * groups; bg += gridDim.y) {
    const int64_t b = bg / groups, c0 = (bg % groups) * CG;
    const T* row = static_cast<const T*>(a.logits) + b * a.logits_stride[0];
    A acc[CG * K];
#pragma unroll
    for (int q = 0; q < CG * K; ++q) acc[q] = 0;
    for (int64_t item = blockIdx.x * int64_t{kThreads} + threadIdx.x; item < items;
         item += int64_t{gridDim.x} * kThreads) {
      const int64_t v0 = item * VEC;
      A x[CG][VEC];
      load_logits<T, CG, VEC>(a, row + v0 * a.logits_stride[2], c0, x);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t v = v0 + j;
        const Voxel<A> vox = load_voxel<T>(a, b, v, row + v * a.logits_stride[2]);
        bad_labels += c0 == 0 && vox.bad_label;
#pragma unroll
        for (int k = 0; k < CG; ++k) {
          const int64_t c = c0 + k;
          if (c >= channels) break;
          const A g = class_target(a, vox, b, c, v);
          bad_logits += math::nonfinite(x[k][j]);
          if (a.dense_target) {
            bad_targets += target_nonfinite(a.target, a.target_dtype,
                                            b * a.target_stride[0] + c * a.target_stride[1] + v * a.target_stride[2]);
          }
          if constexpr (KIND == LossKind::Overlap) {
            const A p = probability(a.activation, x[k][j], vox.softmax) * vox.valid;
            acc[3 * k] += p * g;
            acc[3 * k + 1] += p;
            acc[3 * k + 2] += g;
          } else {
            acc[2 * k] += focal_term(a, vox.softmax, c, x[k][j], g).value * vox.valid;
            acc[2 * k + 1] += vox.valid;
          }
        }
      }
    }
    const int64_t n_classes = channels - c0 < CG ? channels - c0 : CG;
    block_sum(acc, partials + ((b * gridDim.x + blockIdx.x) * channels + c0) * K, static_cast<int>(n_classes * K));
  }
  if (bad_labels) atomicAdd(flags + 0, bad_labels);
  if (bad_logits) atomicAdd(flags + 1, bad_logits);
  if (bad_targets) atomicAdd(flags + 2, bad_targets);
}

// stats[b, j] = sum over the blocks of partials[b, block, j] (j runs over C * K), in double.
template <class A>
__global__ void stats_finalize_kernel(const A* partials, int64_t batch, int64_t blocks, int64_t per_batch, A* stats) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= batch * per_batch) return;
  const int64_t b = i / per_batch, j = i % per_batch;
  double sum = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) sum += partials[(b * blocks + blk) * per_batch + j];
  stats[i] = static_cast<A>(sum);
}

template <class T, int CG, int VEC, LossKind KIND>
__global__ void __launch_bounds__(kThreads)
    stats_backward_kernel(const LossStatsArgs a, const Acc<T>* grad_stats, T* grad_logits) {
  using A = Acc<T>;
  constexpr int K = KIND == LossKind::Overlap ? 3 : 2;
  const int64_t channels = a.channels, voxels = a.voxels;
  const int64_t groups = (channels + CG - 1) / CG;
  const int64_t items = voxels / VEC;
  const bool softmax = a.activation == kActSoftmax;
  for (int64_t bg = blockIdx.y; bg < a.batch * groups; bg += gridDim.y) {
    const int64_t b = bg / groups, c0 = (bg % groups) * CG;
    const T* row = static_cast<const T*>(a.logits) + b * a.logits_stride[0];
    const A* grad = grad_stats + b * channels * K;
    for (int64_t item = blockIdx.x * int64_t{kThreads} + threadIdx.x; item < items;
         item += int64_t{gridDim.x} * kThreads) {
      const int64_t v0 = item * VEC;
      A x[CG][VEC], out[CG][VEC];
      load_logits<T, CG, VEC>(a, row + v0 * a.logits_stride[2], c0, x);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t v = v0 + j;
        const T* column = row + v * a.logits_stride[2];
        const Voxel<A> vox = load_voxel<T>(a, b, v, column);
        A coupling = 0;  // softmax: sum_k o_k over all classes
        if (softmax) {
          for (int64_t c = 0; c < channels; ++c) {
            const A xc = to_acc(column[c * a.logits_stride[1]]);
            coupling += class_grad<KIND>(a, vox, grad, c, xc, class_target(a, vox, b, c, v));
          }
        }
#pragma unroll
        for (int k = 0; k < CG; ++k) {
          const int64_t c = c0 + k;
          if (c >= channels) break;
          const A own = class_grad<KIND>(a, vox, grad, c, x[k][j], class_target(a, vox, b, c, v));
          out[k][j] = softmax ? own - softmax_prob(vox.softmax, x[k][j]) * coupling : own;
        }
      }
#pragma unroll
      for (int k = 0; k < CG; ++k) {
        const int64_t c = c0 + k;
        if (c >= channels) break;
        T* dst = grad_logits + (b * channels + c) * voxels + v0;
        if constexpr (VEC == 1) {
          *dst = from_acc<T>(out[k][0]);
        } else {
          Pack<T, VEC> pack;
#pragma unroll
          for (int j = 0; j < VEC; ++j) pack.v[j] = from_acc<T>(out[k][j]);
          *reinterpret_cast<Pack<T, VEC>*>(dst) = pack;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------ launching
template <class T>
struct Tag {
  using type = T;
};

template <class F>
cudaError_t visit_logits_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16: return f(Tag<__half>{});
    case DType::BFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::Float32: return f(Tag<float>{});
    case DType::Float64: return f(Tag<double>{});
    default: return cudaErrorInvalidValue;
  }
}

int64_t logits_elem_size(DType dtype) {
  return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2;
}

struct Plan {
  int group;       // CG
  int vec;         // VEC
  int64_t blocks;  // gridDim.x
  int64_t grid_y;  // (b, group) pairs walked by blockIdx.y
};

Plan make_plan(const LossStatsArgs& a) {
  Plan p{};
  p.group = a.channels == 1 ? 1 : kGroup;
  const int64_t elem = logits_elem_size(a.logits_dtype);
  const int64_t* st = a.logits_stride;
  const bool vector = st[2] == 1 && a.voxels % kVec == 0 && st[0] % kVec == 0 && st[1] % kVec == 0 &&
                      reinterpret_cast<uintptr_t>(a.logits) % (kVec * elem) == 0;
  p.vec = vector ? kVec : 1;
  const int64_t pairs = a.batch * ((a.channels + p.group - 1) / p.group);
  p.grid_y = pairs < kMaxGridY ? pairs : kMaxGridY;
  const int64_t items = a.voxels / p.vec;
  const int64_t wanted = (items + kThreads * kStepsPerThread - 1) / (kThreads * kStepsPerThread);
  const int64_t cap = kMaxBlocks / p.grid_y > 1 ? kMaxBlocks / p.grid_y : 1;
  p.blocks = wanted < 1 ? 1 : (wanted < cap ? wanted : cap);
  return p;
}

// f(CG, VEC) with both as integral constants.
template <class F>
cudaError_t with_shape(const Plan& p, F&& f) {
  using One = std::integral_constant<int, 1>;
  using Group = std::integral_constant<int, kGroup>;
  using Vec = std::integral_constant<int, kVec>;
  if (p.group == 1) return p.vec == kVec ? f(One{}, Vec{}) : f(One{}, One{});
  return p.vec == kVec ? f(Group{}, Vec{}) : f(Group{}, One{});
}

template <class F>
cudaError_t with_kind(LossKind kind, F&& f) {
  if (kind == LossKind::Overlap) return f(std::integral_constant<LossKind, LossKind::Overlap>{});
  return f(std::integral_constant<LossKind, LossKind::Focal>{});
}

}  // namespace

size_t loss_stats_workspace_bytes(LossKind kind, const LossStatsArgs& args) {
  const Plan p = make_plan(args);
  const size_t acc = args.logits_dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(args.batch * p.blocks * args.channels * stats_per_class(kind)) * acc;
}

cudaError_t launch_loss_stats_forward(LossKind kind, const LossStatsArgs& args, void* workspace, void* stats,
                                      int64_t* flags, cudaStream_t stream) {
  const Plan p = make_plan(args);
  cudaError_t err = cudaMemsetAsync(flags, 0, 3 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  auto* counts = reinterpret_cast<unsigned long long*>(flags);
  err = visit_logits_dtype(args.logits_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    A* partials = static_cast<A*>(workspace);
    return with_kind(kind, [&](auto k) {
      return with_shape(p, [&](auto cg, auto vec) {
        const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.grid_y));
        stats_forward_kernel<T, decltype(cg)::value, decltype(vec)::value, decltype(k)::value>
            <<<grid, kThreads, 0, stream>>>(args, partials, counts);
        const int64_t per_batch = args.channels * stats_per_class(kind);
        const int64_t total = args.batch * per_batch;
        stats_finalize_kernel<A><<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            partials, args.batch, p.blocks, per_batch, static_cast<A*>(stats));
        return cudaGetLastError();
      });
    });
  });
  return err;
}

cudaError_t launch_loss_stats_backward(LossKind kind, const LossStatsArgs& args, const void* grad_stats,
                                       void* grad_logits, cudaStream_t stream) {
  const Plan p = make_plan(args);
  return visit_logits_dtype(args.logits_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    return with_kind(kind, [&](auto k) {
      return with_shape(p, [&](auto cg, auto vec) {
        const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.grid_y));
        stats_backward_kernel<T, decltype(cg)::value, decltype(vec)::value, decltype(k)::value>
            <<<grid, kThreads, 0, stream>>>(args, static_cast<const A*>(grad_stats), static_cast<T*>(grad_logits));
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace densefuse::cuda
