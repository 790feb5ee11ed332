// CPU kernels for the loss statistics (semantics: densefuse/reference.py; layout: loss_stats_args.h).
//
// Work split: every batch row of V voxels is cut into fixed chunks of kChunk voxels; one work item
// is one (b, chunk). at::parallel_for runs the items; each forward item writes its own partial
// sums [C, K] (accumulated in the accumulation dtype T: fp32, or fp64 for fp64 logits), and the
// partials are summed over the chunks in a fixed order in double. The result therefore does not
// depend on the number of threads.
//
// Inside a chunk the voxels go in blocks of up to `block` voxels (a power of two that shrinks with C):
//   logits  are read in place when they are fp32/fp64 with stride_v == 1 (x[c * stride_c + i]),
//           else gathered and converted into a [C, block] buffer;
//   target  labels are widened to int32/int64 and classified into valid[i] (0 for ignore_index) and
//           a one-hot g[c, i], counting out-of-range labels; float targets are gathered into g
//           (valid = 1), counting non-finite values.
// Then one per-block kernel per op runs `#pragma omp simd` loops over the block, one class at a
// time (softmax first fills max / exp / 1 / sum per voxel); forward kernels also count non-finite
// logits in the pass that reads them. The kernels are cloned for x86-64-v4 (AVX-512), v3 (AVX2 +
// FMA) and baseline x86-64 (GCC target_clones, resolved once at load time) and use branch-free
// exp/log (Cephes polynomials, ~1 ulp) so the loops vectorise without -ffast-math (setup.py adds
// -fno-trapping-math so selects become blends below AVX-512). fp64 uses std::exp / std::log.
#include "cpu/loss_stats.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_dispatch.h"  // DF_CLONES, DF_INLINE, bit_cast
#include "loss_math.h"

namespace densefuse::cpu {
namespace {

using math::select;

constexpr int64_t kChunk = 16384;  // voxels per work item; fixed, so sums do not depend on threads
constexpr int64_t kFusedBlock = 1024;  // block of the fused C == 1 kernels (block_size(1))

// ------------------------------------------------------------------------------------------ math
// exp(x) = 2^n exp(r), n = round(x / ln 2) by the 1.5 * 2^23 trick, r = x - n ln 2 (Cody-Waite),
// exp(r) by the Cephes expf polynomial. 2^n is applied in two halves so that overflow gives inf and
// small results underflow gradually; x is clamped first (NaN passes the clamps and propagates).
DF_INLINE float fast_exp(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const int32_t ni = bit_cast<int32_t>(shifted) - bit_cast<int32_t>(kRound);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  // the exponent fields, shifted as unsigned: a NaN x makes ni arbitrary, and a signed shift of it
  // could overflow (the product is NaN either way)
  const uint32_t e1 = static_cast<uint32_t>(n1 + 127) << 23, e2 = static_cast<uint32_t>(n2 + 127) << 23;
  return p * bit_cast<float>(e1) * bit_cast<float>(e2);
}

// k ln 2 + log(m) for m in [sqrt(1/2), sqrt(2)): the Cephes logf polynomial in f = m - 1.
DF_INLINE float log_reduced(float m, float k) {
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  return f + y + 0.693359375f * k;
}

// log(x) with x = 2^k m split from the float's bits (subnormals rescaled by 2^23 first).
// log(0) = -inf, log(<0) = NaN; +inf and NaN pass through.
DF_INLINE float fast_log(float x) {
  constexpr float kMinNormal = std::numeric_limits<float>::min();
  const bool subnormal = x < kMinNormal;
  const int32_t bits = bit_cast<int32_t>(subnormal ? x * 8388608.0f : x);
  float k = static_cast<float>(((bits >> 23) & 0xff) - (subnormal ? 150 : 127));
  float m = bit_cast<float>((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  k = high ? k + 1.0f : k;
  float result = log_reduced(m, k);
  result = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : result;
  result = x == 0.0f ? -std::numeric_limits<float>::infinity() : result;
  return x <= std::numeric_limits<float>::max() ? result : x + x;  // +inf, NaN
}

// log(u) for u in [1, 2] (NaN passes): no bit split or special cases needed.
DF_INLINE float fast_log_1_2(float u) {
  const bool high = u > 1.41421356f;
  return log_reduced(high ? 0.5f * u : u, high ? 1.0f : 0.0f);
}

// Math policy of the CPU kernels (loss_math.h): fast vectorisable float functions, libm for double.
struct CpuMath {
  DF_INLINE static float exp(float x) { return fast_exp(x); }
  DF_INLINE static float log(float x) { return fast_log(x); }
  DF_INLINE static float log_1_2(float u) { return fast_log_1_2(u); }
  DF_INLINE static float log1p(float x) {  // log(1 + x) with the rounding of 1 + x corrected (x > -1)
    const float u = 1.0f + x;
    return fast_log(u) - ((u - 1.0f) - x) / u;
  }
  DF_INLINE static float abs(float x) { return std::fabs(x); }
  DF_INLINE static double exp(double x) { return std::exp(x); }
  DF_INLINE static double log(double x) { return std::log(x); }
  DF_INLINE static double log_1_2(double u) { return std::log(u); }
  DF_INLINE static double log1p(double x) { return std::log1p(x); }
  DF_INLINE static double abs(double x) { return std::fabs(x); }
};

// ------------------------------------------------------------------------------------ block views
template <class T>
struct Block {
  int64_t channels, n;
  const T* x;  // logits, x[c * ldx + i]
  int64_t ldx;
  const T* g;  // target: one-hot of the labels (0 where ignored) or the float target, g[c * ldg + i]
  int64_t ldg;
  const T* valid;  // 1, or 0 for ignored voxels
  bool hard;       // g is 0 or 1
};

// Per-voxel softmax pieces of a block; filled by softmax_block.
template <class T>
struct Softmax {
  T* e;  // exp(x - max), e[c * lde + i]
  int64_t lde;
  T* max;
  int32_t* argmax;  // first arg-max class
  T* inv_sum;       // 1 / sum_c e
  T* rest;          // sum of e over the classes other than argmax (sum = 1 + rest)
  T* log_sum;       // log(sum) = log1p(rest), when asked for
  T* scratch;       // one free value per voxel for the kernels
};

template <class T>
DF_INLINE void softmax_block(const Block<T> b, const Softmax<T> s, bool with_log) {
  const int64_t n = b.n;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    s.max[i] = b.x[i];
    s.argmax[i] = 0;
    s.inv_sum[i] = 0;
    s.rest[i] = 0;
  }
  for (int64_t c = 1; c < b.channels; ++c) {
    const T* x = b.x + c * b.ldx;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const bool greater = x[i] > s.max[i];
      s.max[i] = select(greater, x[i], s.max[i]);
      s.argmax[i] = select(greater, static_cast<int32_t>(c), s.argmax[i]);
    }
  }
  for (int64_t c = 0; c < b.channels; ++c) {
    const T* x = b.x + c * b.ldx;
    T* e = s.e + c * s.lde;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      e[i] = CpuMath::exp(x[i] - s.max[i]);
      s.inv_sum[i] += e[i];
      s.rest[i] += select(s.argmax[i] == c, T(0), e[i]);
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s.inv_sum[i] = T(1) / s.inv_sum[i];
  if (with_log) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s.log_sum[i] = CpuMath::log1p(s.rest[i]);
  }
}

// ---------------------------------------------------------------------------------- block kernels
template <class T>
DF_INLINE T sigmoid_at(const T* x, int64_t i) {
  const auto parts = math::sigmoid_parts<CpuMath>(x[i]);
  return math::sigmoid_from(x[i], parts.e, parts.r);
}

// acc[0..2] += (sum p g valid, sum p valid, sum g) over the block for class c, p = prob(i).
// Returns the number of non-finite logits of class c (counted here, in the pass that reads them).
template <class T, class Prob>
DF_INLINE int64_t overlap_accumulate(const Block<T> b, int64_t c, Prob prob, T* acc) {
  const T* x = b.x + c * b.ldx;
  const T* g = b.g + c * b.ldg;
  T s_pg = 0, s_p = 0, s_g = 0;
  int32_t bad = 0;
#pragma omp simd reduction(+ : s_pg, s_p, s_g, bad)
  for (int64_t i = 0; i < b.n; ++i) {
    const T p = prob(i) * b.valid[i];
    s_pg += p * g[i];
    s_p += p;
    s_g += g[i];
    bad += math::nonfinite(x[i]);
  }
  acc[0] += s_pg;
  acc[1] += s_p;
  acc[2] += s_g;
  return bad;
}

// Adds the block's sums to acc [C, 3]; returns the number of non-finite logits in the block.
template <class T>
DF_CLONES int64_t overlap_forward_block(const Block<T> b, int act, const Softmax<T> s, T* acc) {
  if (act == kActSoftmax) softmax_block(b, s, false);
  int64_t bad = 0;
  for (int64_t c = 0; c < b.channels; ++c) {
    const T* x = b.x + c * b.ldx;
    const T* e = s.e + c * s.lde;
    if (act == kActSoftmax) {
      bad += overlap_accumulate(b, c, [=](int64_t i) DF_ALWAYS_INLINE { return e[i] * s.inv_sum[i]; }, acc + 3 * c);
    } else if (act == kActSigmoid) {
      bad += overlap_accumulate(b, c, [=](int64_t i) DF_ALWAYS_INLINE { return sigmoid_at(x, i); }, acc + 3 * c);
    } else {
      bad += overlap_accumulate(b, c, [=](int64_t i) DF_ALWAYS_INLINE { return x[i]; }, acc + 3 * c);
    }
  }
  return bad;
}

// Focal loss parameters in the accumulation dtype (alphas default to ones).
template <class T>
struct FocalParams {
  T gamma;
  const T* alpha_pos;  // [C]
  const T* alpha_neg;  // [C]
};

// Weighted focal loss of element (c, i) and its derivative (before the valid mask and dL/dsum).
template <bool HARD, bool SQUARE, class T>
DF_INLINE math::ValueGrad<T> focal_sigmoid_at(const Block<T> b, const FocalParams<T> f, int64_t c, int64_t i) {
  const T g = b.g[c * b.ldg + i];
  const auto term = math::focal_sigmoid<CpuMath, HARD, SQUARE>(b.x[c * b.ldx + i], g, f.gamma);
  const T weight = math::alpha_weight(g, f.alpha_pos[c], f.alpha_neg[c]);
  return {weight * term.value, weight * term.grad};
}

template <bool SQUARE, class T>
DF_INLINE math::ValueGrad<T> focal_softmax_at(const Block<T> b, const Softmax<T> s, const FocalParams<T> f,
                                              int64_t c, int64_t i) {
  const auto term = math::focal_softmax_class<CpuMath, SQUARE>(b.x[c * b.ldx + i], s.e[c * s.lde + i], s.max[i],
                                                               s.inv_sum[i], s.rest[i], s.log_sum[i],
                                                               s.argmax[i] == c, f.gamma);
  const T weight = f.alpha_pos[c] * b.g[c * b.ldg + i];
  return {weight * term.value, weight * term.grad};
}

// Runs visit(term) with term(i) -> ValueGrad for class c: the softmax or the sigmoid term,
// specialised for gamma == 2 (SQUARE) and, for sigmoid, for label targets (HARD).
template <class T, class Visit>
DF_INLINE void with_focal_term(const Block<T> b, int act, const Softmax<T> s, const FocalParams<T> f, int64_t c,
                               Visit&& visit) {
  const bool square = f.gamma == T(2);
  if (act == kActSoftmax && square) {
    visit([=](int64_t i) DF_ALWAYS_INLINE { return focal_softmax_at<true>(b, s, f, c, i); });
  } else if (act == kActSoftmax) {
    visit([=](int64_t i) DF_ALWAYS_INLINE { return focal_softmax_at<false>(b, s, f, c, i); });
  } else if (b.hard && square) {
    visit([=](int64_t i) DF_ALWAYS_INLINE { return focal_sigmoid_at<true, true>(b, f, c, i); });
  } else if (b.hard) {
    visit([=](int64_t i) DF_ALWAYS_INLINE { return focal_sigmoid_at<true, false>(b, f, c, i); });
  } else if (square) {
    visit([=](int64_t i) DF_ALWAYS_INLINE { return focal_sigmoid_at<false, true>(b, f, c, i); });
  } else {
    visit([=](int64_t i) DF_ALWAYS_INLINE { return focal_sigmoid_at<false, false>(b, f, c, i); });
  }
}

// acc[c, 0] += sum of the focal loss, acc[c, 1] += number of valid voxels; returns the number of
// non-finite logits in the block.
template <class T>
DF_CLONES int64_t focal_forward_block(const Block<T> b, int act, const FocalParams<T> f, const Softmax<T> s,
                                      T* acc) {
  T count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < b.n; ++i) count += b.valid[i];
  if (act == kActSoftmax) softmax_block(b, s, true);
  int64_t bad = 0;
  for (int64_t c = 0; c < b.channels; ++c) {
    const T* x = b.x + c * b.ldx;
    with_focal_term(b, act, s, f, c, [&](auto term) DF_ALWAYS_INLINE {
      T sum = 0;
      int32_t bad_c = 0;
#pragma omp simd reduction(+ : sum, bad_c)
      for (int64_t i = 0; i < b.n; ++i) {
        sum += term(i).value * b.valid[i];
        bad_c += math::nonfinite(x[i]);
      }
      acc[2 * c] += sum;
      bad += bad_c;
    });
    acc[2 * c + 1] += count;
  }
  return bad;
}

// Softmax backward on top of the per-class terms o_c = p_c dL/dp_c (or w_c h_c for focal):
// dL/dx_c = o_c - p_c sum_k o_k.
template <class T>
DF_INLINE void softmax_couple(const Block<T> b, const Softmax<T> s, T* out, int64_t ldo) {
  T* dot = s.scratch;
#pragma omp simd
  for (int64_t i = 0; i < b.n; ++i) dot[i] = 0;
  for (int64_t c = 0; c < b.channels; ++c) {
    const T* o = out + c * ldo;
#pragma omp simd
    for (int64_t i = 0; i < b.n; ++i) dot[i] += o[i];
  }
  for (int64_t c = 0; c < b.channels; ++c) {
    const T* e = s.e + c * s.lde;
    T* o = out + c * ldo;
#pragma omp simd
    for (int64_t i = 0; i < b.n; ++i) o[i] -= e[i] * s.inv_sum[i] * dot[i];
  }
}

// out[c, i] = dL/dx from dL/dp = valid (dS_pg g + dS_p); grad = [C, 3] (dS_pg, dS_p, dS_g).
template <class T>
DF_CLONES void overlap_backward_block(const Block<T> b, int act, const Softmax<T> s, const T* grad, T* out,
                                      int64_t ldo) {
  if (act == kActSoftmax) softmax_block(b, s, false);
  for (int64_t c = 0; c < b.channels; ++c) {
    const T* x = b.x + c * b.ldx;
    const T* g = b.g + c * b.ldg;
    const T* e = s.e + c * s.lde;
    const T d_pg = grad[3 * c], d_p = grad[3 * c + 1];
    T* o = out + c * ldo;
    if (act == kActSoftmax) {
#pragma omp simd
      for (int64_t i = 0; i < b.n; ++i) o[i] = e[i] * s.inv_sum[i] * math::overlap_grad_p(g[i], b.valid[i], d_pg, d_p);
    } else if (act == kActSigmoid) {
#pragma omp simd
      for (int64_t i = 0; i < b.n; ++i) {
        const auto parts = math::sigmoid_parts<CpuMath>(x[i]);
        o[i] = math::overlap_grad_p(g[i], b.valid[i], d_pg, d_p) * math::sigmoid_slope(parts.e, parts.r);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < b.n; ++i) o[i] = math::overlap_grad_p(g[i], b.valid[i], d_pg, d_p);
    }
  }
  if (act == kActSoftmax) softmax_couple(b, s, out, ldo);
}

// out[c, i] = dL/dx; grad = [C, 2] (dL/dsum, dL/dcount).
template <class T>
DF_CLONES void focal_backward_block(const Block<T> b, int act, const FocalParams<T> f, const Softmax<T> s,
                                    const T* grad, T* out, int64_t ldo) {
  if (act == kActSoftmax) softmax_block(b, s, true);
  for (int64_t c = 0; c < b.channels; ++c) {
    T* o = out + c * ldo;
    const T coef = grad[2 * c];
    with_focal_term(b, act, s, f, c, [&](auto term) DF_ALWAYS_INLINE {
#pragma omp simd
      for (int64_t i = 0; i < b.n; ++i) o[i] = coef * b.valid[i] * term(i).grad;
    });
  }
  if (act == kActSoftmax) softmax_couple(b, s, out, ldo);
}

// ------------------------------------------------------------------------------- label kernels
// Labels are compared in W (int32, or int64 for int64 labels), where they cannot overflow.
template <class L>
using Widened = std::conditional_t<sizeof(L) == 8, int64_t, int32_t>;

// C == 1: class 0 is label 1 and valid labels are {0, 1}; C > 1: class c is label c, valid [0, C).
// An ignore_index that W cannot hold matches no label.
template <class W>
struct LabelRule {
  W offset, upper, ignore;
  bool has_ignore;
  explicit LabelRule(const LossStatsArgs& a)
      : offset(a.channels == 1 ? 1 : 0),
        upper(a.channels == 1 ? 2 : static_cast<W>(a.channels)),
        ignore(0),
        has_ignore(a.has_ignore && a.ignore_index >= std::numeric_limits<W>::min() &&
                   a.ignore_index <= std::numeric_limits<W>::max()) {
    if (has_ignore) ignore = static_cast<W>(a.ignore_index);
  }
};

template <class L, class W, class Stride>
DF_INLINE void widen(const L* src, Stride stride, int64_t n, W* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(src[i * stride]);
}

// dst[i] = src[i * stride] as W: labels are classified from a contiguous W array, where the
// classification loop vectorises at full width (GCC narrows it to the label width otherwise).
template <class L, class W>
DF_CLONES void widen_labels(const L* src, int64_t stride, int64_t n, W* dst) {
  if (stride == 1) {
    widen(src, std::integral_constant<int64_t, 1>{}, n, dst);
  } else {
    widen(src, stride, n, dst);
  }
}

// valid[i] = label != ignore_index, cls[i] = class of the label or -1 (as T); returns the number of
// out-of-range labels among the valid voxels. 0/1 values are W integers rather than bools and cls
// is computed arithmetically: GCC does not if-convert chains of conditions.
template <class W, class T>
DF_CLONES int64_t classify_labels(const W* labels, int64_t n, const LabelRule<W> r, T* valid, T* cls) {
  const W no_ignore = !r.has_ignore;
  W bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) {
    const W label = labels[i];
    const W keep = static_cast<W>(label != r.ignore) | no_ignore;
    const W in_range = static_cast<W>(label >= r.offset) & static_cast<W>(label < r.upper);
    bad += keep & (static_cast<W>(label < 0) | static_cast<W>(label >= r.upper));
    valid[i] = static_cast<T>(keep);
    cls[i] = static_cast<T>(keep & in_range) * (static_cast<T>(label) - static_cast<T>(r.offset) + T(1)) - T(1);
  }
  return bad;
}

// g[c, i] = [cls[i] == c]
template <class T>
DF_CLONES void one_hot(const T* cls, int64_t n, int64_t channels, T* g, int64_t ldg) {
  for (int64_t c = 0; c < channels; ++c) {
    T* gc = g + c * ldg;
    const T class_id = static_cast<T>(c);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gc[i] = select(cls[i] == class_id, T(1), T(0));
  }
}

// ---------------------------------------------------------------------- fused single-class kernels
// Fast path for C == 1, integer labels with stride 1, fp32 logits read in place and sigmoid or no
// activation (focal: sigmoid): one loop per block reads the labels (as W: narrower labels are widened
// first, see with_fused_block) and the logits, classifies the label as classify_labels does
// (valid = label != ignore_index, g = valid & label == 1, out-of-range = valid & label not in {0, 1})
// and applies the op, with no valid / one-hot buffers. Per-element values and the block's sums are
// the same as those of the general path.
template <class W>
struct LabelVoxel {
  float valid, g;
  W bad;
};

template <class W>
DF_INLINE LabelVoxel<W> classify_label(W label, const LabelRule<W> r, W no_ignore) {
  const W keep = static_cast<W>(label != r.ignore) | no_ignore;
  const W bad = keep & (static_cast<W>(label < 0) | static_cast<W>(label >= r.upper));
  return {static_cast<float>(keep), static_cast<float>(keep & static_cast<W>(label == r.offset)), bad};
}

// acc[0..2] += (S_pg, S_p, S_g) of the block; counts[0] += out-of-range labels, counts[1] +=
// non-finite logits.
template <class W, bool SIGMOID>
DF_CLONES void overlap_forward_fused(const float* x, const W* labels, int64_t n, const LabelRule<W> r, float* acc,
                                     int64_t* counts) {
  const W no_ignore = !r.has_ignore;
  float s_pg = 0, s_p = 0, s_g = 0;
  W bad_label = 0;
  int32_t bad_x = 0;
#pragma omp simd reduction(+ : s_pg, s_p, s_g, bad_label, bad_x)
  for (int64_t i = 0; i < n; ++i) {
    const LabelVoxel<W> v = classify_label(labels[i], r, no_ignore);
    float p = x[i];
    if constexpr (SIGMOID) p = sigmoid_at(x, i);
    p *= v.valid;
    s_pg += p * v.g;
    s_p += p;
    s_g += v.g;
    bad_label += v.bad;
    bad_x += math::nonfinite(x[i]);
  }
  acc[0] += s_pg;
  acc[1] += s_p;
  acc[2] += s_g;
  counts[0] += bad_label;
  counts[1] += bad_x;
}

// out[i] = dL/dx from grad = (dS_pg, dS_p, dS_g).
template <class W, bool SIGMOID>
DF_CLONES void overlap_backward_fused(const float* x, const W* labels, int64_t n, const LabelRule<W> r,
                                      const float* grad, float* out) {
  const W no_ignore = !r.has_ignore;
  const float d_pg = grad[0], d_p = grad[1];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const LabelVoxel<W> v = classify_label(labels[i], r, no_ignore);
    float o = math::overlap_grad_p(v.g, v.valid, d_pg, d_p);
    if constexpr (SIGMOID) {
      const auto parts = math::sigmoid_parts<CpuMath>(x[i]);
      o *= math::sigmoid_slope(parts.e, parts.r);
    }
    out[i] = o;
  }
}

// Sigmoid focal term of a hard label, weighted by alpha (as focal_sigmoid_at).
template <bool SQUARE>
DF_INLINE math::ValueGrad<float> focal_label_at(float x, float g, const FocalParams<float> f) {
  const auto term = math::focal_sigmoid<CpuMath, true, SQUARE>(x, g, f.gamma);
  const float weight = math::alpha_weight(g, f.alpha_pos[0], f.alpha_neg[0]);
  return {weight * term.value, weight * term.grad};
}

// acc[0] += sum of the focal loss, acc[1] += valid voxels; counts as overlap_forward_fused.
template <class W, bool SQUARE>
DF_CLONES void focal_forward_fused(const float* x, const W* labels, int64_t n, const LabelRule<W> r,
                                   const FocalParams<float> f, float* acc, int64_t* counts) {
  const W no_ignore = !r.has_ignore;
  float sum = 0, count = 0;
  W bad_label = 0;
  int32_t bad_x = 0;
#pragma omp simd reduction(+ : sum, count, bad_label, bad_x)
  for (int64_t i = 0; i < n; ++i) {
    const LabelVoxel<W> v = classify_label(labels[i], r, no_ignore);
    sum += focal_label_at<SQUARE>(x[i], v.g, f).value * v.valid;
    count += v.valid;
    bad_label += v.bad;
    bad_x += math::nonfinite(x[i]);
  }
  acc[0] += sum;
  acc[1] += count;
  counts[0] += bad_label;
  counts[1] += bad_x;
}

// out[i] = dL/dx from grad = (dL/dsum, dL/dcount).
template <class W, bool SQUARE>
DF_CLONES void focal_backward_fused(const float* x, const W* labels, int64_t n, const LabelRule<W> r,
                                    const FocalParams<float> f, const float* grad, float* out) {
  const W no_ignore = !r.has_ignore;
  const float coef = grad[0];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const LabelVoxel<W> v = classify_label(labels[i], r, no_ignore);
    out[i] = coef * v.valid * focal_label_at<SQUARE>(x[i], v.g, f).grad;
  }
}

// ------------------------------------------------------------------------------- loading blocks
template <class T>
struct Tag {
  using type = T;
};

template <class F>
void visit_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16: return f(Tag<c10::Half>{});
    case DType::BFloat16: return f(Tag<c10::BFloat16>{});
    case DType::Float32: return f(Tag<float>{});
    case DType::Float64: return f(Tag<double>{});
    default: TORCH_INTERNAL_ASSERT(false, "densefuse: not a float dtype");
  }
}

template <class F>
void visit_label(DType dtype, F&& f) {
  switch (dtype) {
    case DType::UInt8: return f(Tag<uint8_t>{});
    case DType::Int8: return f(Tag<int8_t>{});
    case DType::Int16: return f(Tag<int16_t>{});
    case DType::Int32: return f(Tag<int32_t>{});
    case DType::Int64: return f(Tag<int64_t>{});
    default: TORCH_INTERNAL_ASSERT(false, "densefuse: not a label dtype");
  }
}

// Float value of a stored element, wide enough to keep it finite or not (fp64 stays fp64).
template <class S>
using Wide = std::conditional_t<std::is_same_v<S, double>, double, float>;

inline int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::UInt8:
    case DType::Int8: return 1;
    case DType::Float16:
    case DType::BFloat16:
    case DType::Int16: return 2;
    case DType::Float32:
    case DType::Int32: return 4;
    default: return 8;
  }
}

struct Counts {
  int64_t labels = 0, logits = 0, targets = 0;
};

inline int64_t block_size(int64_t channels) {  // power of two dividing kChunk, ~2048 values per block
  int64_t block = 1024;
  while (block > 16 && block * channels > 2048) block /= 2;
  return block;
}

// Owns one thread's buffers and turns (b, v0, n) into a Block, converting and counting as needed.
template <class T>
class BlockLoader {
 public:
  explicit BlockLoader(const LossStatsArgs& a)
      : a_(a),
        block_(block_size(a.channels)),
        x_(a.channels * block_),
        g_(a.channels * block_),
        valid_(block_),
        ones_(block_, T(1)),
        e_(a.channels * block_),
        per_voxel_(5 * block_),
        argmax_(block_),
        labels32_(block_),
        labels64_(block_),
        cls_(block_) {}

  int64_t block() const { return block_; }

  Block<T> load(int64_t b, int64_t v0, int64_t n, Counts* counts) {
    Block<T> out{a_.channels, n, nullptr, 0, g_.data(), block_, valid_.data(), !a_.dense_target};
    load_logits(b, v0, n, &out);
    if (a_.dense_target) {
      out.valid = ones_.data();
      counts->targets += load_dense_target(b, v0, n);
    } else {
      counts->labels += load_labels(b, v0, n);
    }
    return out;
  }

  Softmax<T> softmax() {
    T* v = per_voxel_.data();
    return {e_.data(), block_, v, argmax_.data(), v + block_, v + 2 * block_, v + 3 * block_, v + 4 * block_};
  }

  // Asks for the cache lines of the block at (b, v0) ahead of use, where rows are contiguous.
  void prefetch(int64_t b, int64_t v0) const {
    if (v0 >= a_.voxels) return;
    const int64_t n = std::min(block_, a_.voxels - v0);
    const auto rows = [&](const void* base, int64_t elem, const int64_t* st, int64_t count) {
      if (st[2] != 1) return;
      const char* p = static_cast<const char*>(base) + (b * st[0] + v0) * elem;
      for (int64_t c = 0; c < count; ++c) {
        for (int64_t off = 0; off < n * elem; off += 64) __builtin_prefetch(p + c * st[1] * elem + off);
      }
    };
    rows(a_.logits, dtype_size(a_.logits_dtype), a_.logits_stride, a_.channels);
    rows(a_.target, dtype_size(a_.target_dtype), a_.target_stride, a_.dense_target ? a_.channels : 1);
  }

  // [C, block] buffer for gradients that are converted to a low-precision logits dtype.
  T* out_buffer() {
    out_.resize(a_.channels * block_);
    return out_.data();
  }

 private:
  void load_logits(int64_t b, int64_t v0, int64_t n, Block<T>* out) {
    const int64_t* st = a_.logits_stride;
    visit_float(a_.logits_dtype, [&](auto tag) {
      using S = typename decltype(tag)::type;
      const S* src = static_cast<const S*>(a_.logits) + b * st[0] + v0 * st[2];
      if constexpr (std::is_same_v<S, T>) {
        if (st[2] == 1) {  // in place
          out->x = src;
          out->ldx = st[1];
          return;
        }
      }
      if constexpr (std::is_same_v<Wide<S>, T>) {
        for (int64_t c = 0; c < a_.channels; ++c) {
          T* dst = x_.data() + c * block_;
          for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[c * st[1] + i * st[2]]);
        }
        out->x = x_.data();
        out->ldx = block_;
      } else {
        TORCH_INTERNAL_ASSERT(false, "densefuse: logits dtype does not match the accumulation dtype");
      }
    });
  }

  int64_t load_dense_target(int64_t b, int64_t v0, int64_t n) {
    const int64_t* st = a_.target_stride;
    int64_t bad = 0;
    visit_float(a_.target_dtype, [&](auto tag) {
      using S = typename decltype(tag)::type;
      using W = Wide<S>;
      const S* src = static_cast<const S*>(a_.target) + b * st[0] + v0 * st[2];
      for (int64_t c = 0; c < a_.channels; ++c) {
        T* dst = g_.data() + c * block_;
        for (int64_t i = 0; i < n; ++i) {
          const W v = static_cast<W>(src[c * st[1] + i * st[2]]);
          bad += math::nonfinite(v);
          dst[i] = static_cast<T>(v);
        }
      }
    });
    return bad;
  }

  int64_t load_labels(int64_t b, int64_t v0, int64_t n) {
    const int64_t stride = a_.target_stride[2];
    int64_t bad = 0;
    visit_label(a_.target_dtype, [&](auto tag) {
      using L = typename decltype(tag)::type;
      using W = Widened<L>;
      const L* src = static_cast<const L*>(a_.target) + b * a_.target_stride[0] + v0 * stride;
      const W* labels = nullptr;
      if constexpr (std::is_same_v<L, W>) {
        if (stride == 1) labels = src;  // in place
      }
      if (labels == nullptr) {
        W* buffer = nullptr;
        if constexpr (std::is_same_v<W, int64_t>) {
          buffer = labels64_.data();
        } else {
          buffer = labels32_.data();
        }
        widen_labels(src, stride, n, buffer);
        labels = buffer;
      }
      bad = classify_labels(labels, n, LabelRule<W>(a_), valid_.data(), cls_.data());
    });
    one_hot(cls_.data(), n, a_.channels, g_.data(), block_);
    return bad;
  }

  const LossStatsArgs& a_;
  int64_t block_;
  std::vector<T> x_, g_, valid_, ones_, e_, per_voxel_, out_;
  std::vector<int32_t> argmax_, labels32_;
  std::vector<int64_t> labels64_;
  std::vector<T> cls_;
};

// ------------------------------------------------------------------------------------- drivers
struct Chunking {
  int64_t chunks, items;
  explicit Chunking(const LossStatsArgs& a) : chunks((a.voxels + kChunk - 1) / kChunk), items(a.batch * chunks) {}
};

// visit(loader, item, b, v0, n) for every block of every work item. Worker w (an OpenMP thread) takes
// the contiguous run of items [w, w + 1) * items / workers (items are equal chunks of voxels), the
// same on every call, so that the forward's and backward's reads of a chunk and its per-item partial
// sums stay with one thread (a shared counter of next items spread neighbouring items, and their
// partial sums' cache lines, over both threads). The price: a preempted thread delays the call.
template <class T, class Visit>
void for_each_block(const LossStatsArgs& a, const Chunking& ch, Visit&& visit) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ch.items);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    BlockLoader<T> loader(a);
    for (int64_t item = ch.items * w0 / workers; item < ch.items * w1 / workers; ++item) {
      const int64_t b = item / ch.chunks;
      const int64_t v_begin = (item % ch.chunks) * kChunk;
      const int64_t v_end = std::min(a.voxels, v_begin + kChunk);
      for (int64_t v0 = v_begin; v0 < v_end; v0 += loader.block()) {
        loader.prefetch(b, v0 + loader.block());
        visit(loader, item, b, v0, std::min(loader.block(), v_end - v0));
      }
    }
  });
}

template <class T>
FocalParams<T> focal_params(const LossStatsArgs& a, const std::vector<T>& ones) {
  const auto alpha = [&](const void* p) { return p ? static_cast<const T*>(p) : ones.data(); };
  return {static_cast<T>(a.gamma), alpha(a.alpha_pos), alpha(a.alpha_neg)};
}

// The fused kernels apply: one class, integer labels and fp32 logits both read in place, and an
// activation other than softmax (overlap: sigmoid or none; focal: sigmoid).
inline bool use_fused(const LossStatsArgs& a) {
  return a.channels == 1 && !a.dense_target && a.logits_dtype == DType::Float32 && a.logits_stride[2] == 1 &&
         a.target_stride[2] == 1 && a.activation != kActSoftmax;
}

// Runs the fused kernel for the block (b, v0, n <= block_size(1)): visit(x, labels, rule) with the labels
// as W, widened first into a stack buffer unless already W (narrow labels in the fused loop would
// make GCC pick a narrow vector width for all of it).
template <class Visit>
void with_fused_block(const LossStatsArgs& a, int64_t b, int64_t v0, int64_t n, Visit&& visit) {
  const float* x = static_cast<const float*>(a.logits) + b * a.logits_stride[0] + v0;
  visit_label(a.target_dtype, [&](auto tag) {
    using L = typename decltype(tag)::type;
    using W = Widened<L>;
    const L* src = static_cast<const L*>(a.target) + b * a.target_stride[0] + v0;
    if constexpr (std::is_same_v<L, W>) {
      visit(x, src, LabelRule<W>(a));
    } else {
      alignas(64) W buffer[kFusedBlock];
      TORCH_INTERNAL_ASSERT(n <= kFusedBlock);
      widen_labels(src, 1, n, buffer);
      visit(x, static_cast<const W*>(buffer), LabelRule<W>(a));
    }
  });
}

void forward_fused(LossKind kind, const LossStatsArgs& a, const FocalParams<float> f, int64_t b, int64_t v0,
                   int64_t n, float* acc, Counts* cnt) {
  int64_t bad[2] = {0, 0};  // labels, logits
  with_fused_block(a, b, v0, n, [&](const float* x, const auto* labels, const auto rule) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(labels)>>;
    if (kind == LossKind::Overlap && a.activation == kActSigmoid) {
      overlap_forward_fused<W, true>(x, labels, n, rule, acc, bad);
    } else if (kind == LossKind::Overlap) {
      overlap_forward_fused<W, false>(x, labels, n, rule, acc, bad);
    } else if (f.gamma == 2.0f) {
      focal_forward_fused<W, true>(x, labels, n, rule, f, acc, bad);
    } else {
      focal_forward_fused<W, false>(x, labels, n, rule, f, acc, bad);
    }
  });
  cnt->labels += bad[0];
  cnt->logits += bad[1];
}

void backward_fused(LossKind kind, const LossStatsArgs& a, const FocalParams<float> f, int64_t b, int64_t v0,
                    int64_t n, const float* grad, float* out) {
  with_fused_block(a, b, v0, n, [&](const float* x, const auto* labels, const auto rule) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(labels)>>;
    if (kind == LossKind::Overlap && a.activation == kActSigmoid) {
      overlap_backward_fused<W, true>(x, labels, n, rule, grad, out);
    } else if (kind == LossKind::Overlap) {
      overlap_backward_fused<W, false>(x, labels, n, rule, grad, out);
    } else if (f.gamma == 2.0f) {
      focal_backward_fused<W, true>(x, labels, n, rule, f, grad, out);
    } else {
      focal_backward_fused<W, false>(x, labels, n, rule, f, grad, out);
    }
  });
}

template <class T>
void forward(LossKind kind, const LossStatsArgs& a, T* stats, int64_t* flags) {
  const int64_t channels = a.channels;
  const int k = stats_per_class(kind);
  const Chunking ch(a);
  const std::vector<T> ones(channels, T(1));
  const FocalParams<T> focal = focal_params(a, ones);
  std::vector<T> partial(ch.items * channels * k, T(0));  // [B, chunks, C, K]
  std::vector<Counts> counts(ch.items);
  const bool fused = use_fused(a);
  for_each_block<T>(a, ch, [&](BlockLoader<T>& loader, int64_t item, int64_t b, int64_t v0, int64_t n) {
    Counts& cnt = counts[item];
    T* acc = partial.data() + item * channels * k;
    if constexpr (std::is_same_v<T, float>) {
      if (fused) return forward_fused(kind, a, focal, b, v0, n, acc, &cnt);
    }
    const Block<T> blk = loader.load(b, v0, n, &cnt);
    cnt.logits += kind == LossKind::Overlap ? overlap_forward_block(blk, a.activation, loader.softmax(), acc)
                                            : focal_forward_block(blk, a.activation, focal, loader.softmax(), acc);
  });
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t j = 0; j < channels * k; ++j) {
      double sum = 0;
      for (int64_t chunk = 0; chunk < ch.chunks; ++chunk) sum += partial[(b * ch.chunks + chunk) * channels * k + j];
      stats[b * channels * k + j] = static_cast<T>(sum);
    }
  }
  flags[0] = flags[1] = flags[2] = 0;
  for (const Counts& c : counts) {
    flags[0] += c.labels;
    flags[1] += c.logits;
    flags[2] += c.targets;
  }
}

template <class T>
void backward(LossKind kind, const LossStatsArgs& a, const T* grad_stats, void* grad_logits) {
  const int64_t channels = a.channels, voxels = a.voxels;
  const int k = stats_per_class(kind);
  const Chunking ch(a);
  const std::vector<T> ones(channels, T(1));
  const FocalParams<T> focal = focal_params(a, ones);
  const bool fused = use_fused(a);
  for_each_block<T>(a, ch, [&](BlockLoader<T>& loader, int64_t, int64_t b, int64_t v0, int64_t n) {
    const T* grad = grad_stats + b * channels * k;
    if constexpr (std::is_same_v<T, float>) {
      if (fused) return backward_fused(kind, a, focal, b, v0, n, grad, static_cast<float*>(grad_logits) + b * voxels + v0);
    }
    Counts unused;  // the forward counted the flags; one per block, so that no two threads share it
    const Block<T> blk = loader.load(b, v0, n, &unused);
    visit_float(a.logits_dtype, [&](auto tag) {
      using S = typename decltype(tag)::type;
      S* dst = static_cast<S*>(grad_logits) + b * channels * voxels + v0;
      T* out = nullptr;
      int64_t ldo = voxels;
      if constexpr (std::is_same_v<S, T>) {
        out = dst;  // write in place
      } else {
        out = loader.out_buffer();
        ldo = loader.block();
      }
      if (kind == LossKind::Overlap) {
        overlap_backward_block(blk, a.activation, loader.softmax(), grad, out, ldo);
      } else {
        focal_backward_block(blk, a.activation, focal, loader.softmax(), grad, out, ldo);
      }
      if constexpr (!std::is_same_v<S, T>) {
        for (int64_t c = 0; c < channels; ++c) {
          for (int64_t i = 0; i < n; ++i) dst[c * voxels + i] = static_cast<S>(out[c * ldo + i]);
        }
      }
    });
  });
}

}  // namespace

void loss_stats_forward(LossKind kind, const LossStatsArgs& args, void* stats, int64_t* flags) {
  if (args.logits_dtype == DType::Float64) {
    forward(kind, args, static_cast<double*>(stats), flags);
  } else {
    forward(kind, args, static_cast<float*>(stats), flags);
  }
}

void loss_stats_backward(LossKind kind, const LossStatsArgs& args, const void* grad_stats, void* grad_logits) {
  if (args.logits_dtype == DType::Float64) {
    backward(kind, args, static_cast<const double*>(grad_stats), grad_logits);
  } else {
    backward(kind, args, static_cast<const float*>(grad_stats), grad_logits);
  }
}

}  // namespace densefuse::cpu
