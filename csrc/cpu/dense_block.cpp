// CPU kernels of the dense-block BN ops (semantics: densefuse/reference.py; layout: dense_block_args.h).
//
// Each does in one pass what the reference does in several ATen passes: bn_relu (addcmul, relu_, a
// cast), bn_relu_backward (the affine recomputed, threshold_backward, batch_norm_backward's two
// reductions, addcmul_ into grad_x), bn_correction (addcmul, sub_) and dropout (a counter-based hash,
// no random tensor). Elementwise work runs at::parallel_for over (b, c) rows of V values (dropout:
// over the flat values); the backward runs over channels, each channel's sums
// by one thread in a fixed order (blocks of kBlock values summed in A by `omp simd`, the blocks in
// double), so the results do not depend on the thread count. The row loops are cloned per x86-64
// level (cpu_dispatch.h).
#include "cpu/dense_block.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_dispatch.h"  // DF_CLONES, DF_INLINE, bit_cast

namespace densefuse::cpu {
namespace {

constexpr int64_t kBlock = 1024;     // values per partial sum of the backward's reductions
constexpr int64_t kGrain = 1 << 15;  // values per parallel work item, at least

template <class T>
struct Tag {
  using type = T;
};

template <class F>
void visit_float(DType dtype, const char* name, F&& f) {
  switch (dtype) {
    case DType::Float16: return f(Tag<c10::Half>{});
    case DType::BFloat16: return f(Tag<c10::BFloat16>{});
    case DType::Float32: return f(Tag<float>{});
    case DType::Float64: return f(Tag<double>{});
    default: TORCH_CHECK(false, name, ": expected a float16/bfloat16/float32/float64 tensor");
  }
}

template <class X>
using Acc = std::conditional_t<std::is_same_v<X, double>, double, float>;

// Element conversions. bf16 by bit operations (c10::BFloat16's own rounding, NaN -> 0x7FC0, written
// branch-free so that the loops vectorise); the other types by static_cast.
template <class A, class T>
DF_INLINE A load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<A>(bit_cast<float>(static_cast<uint32_t>(p[i].x) << 16));
  } else {
    return static_cast<A>(p[i]);
  }
}

template <class T, class A>
DF_INLINE void store(T* p, int64_t i, A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    const uint32_t u = bit_cast<uint32_t>(f);
    const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
    p[i].x = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  } else {
    p[i] = static_cast<T>(v);
  }
}

// relu that keeps NaN (as torch.relu_).
template <class A>
DF_INLINE A relu(A v) {
  return v < A(0) ? A(0) : v;
}

// Channel c's pre = x * scale + shift, as the reference forms them: scale = weight * invstd,
// shift = bias - mean * scale.
template <class A>
struct Affine {
  A scale, shift;
  DF_INLINE Affine(const DenseBnArgs& a, int64_t c) {
    scale = static_cast<const A*>(a.weight)[c] * static_cast<const A*>(a.invstd)[c];
    shift = static_cast<const A*>(a.bias)[c] - static_cast<const A*>(a.mean)[c] * scale;
  }
};

template <class T>
DF_INLINE T* row(const DenseView& t, int64_t b, int64_t c) {
  return static_cast<T*>(t.data) + b * t.strides[0] + c * t.strides[1];
}

template <class X, class Y>
DF_CLONES void bn_relu_rows(const DenseBnArgs& a, const DenseView& out, int64_t r0, int64_t r1) {
  using A = Acc<X>;
  const int64_t n = a.voxels, sx = a.x.strides[2], sy = out.strides[2];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.channels, c = r % a.channels;
    const Affine<A> f(a, c);
    const X* x = row<const X>(a.x, b, c);
    Y* y = row<Y>(out, b, c);
    if (sx == 1 && sy == 1) {
#pragma omp simd
      for (int64_t v = 0; v < n; ++v) store(y, v, relu(load<A>(x, v) * f.scale + f.shift));
    } else {
      for (int64_t v = 0; v < n; ++v) store(y, v * sy, relu(load<A>(x, v * sx) * f.scale + f.shift));
    }
  }
}

// One block of n values of a row: grad_x += g * scale (added in A, rounded to GX); returns
// (sum g, sum g * (x - mean)) in A.
template <class X, class G, class GX, class A, bool kUnit>
DF_INLINE void backward_block(const X* x, const G* gy, GX* gx, int64_t n, const int64_t* s, const Affine<A>& f,
                              A mean, A& sum_g, A& sum_gx) {
  A sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t v = 0; v < n; ++v) {
    const A xv = load<A>(x, kUnit ? v : v * s[0]);
    const A gv = load<A>(gy, kUnit ? v : v * s[1]);  // loaded unconditionally: a blend, no masks
    const A g = xv * f.scale + f.shift > A(0) ? gv : A(0);
    sg += g;
    sgx += g * (xv - mean);
    const int64_t i = kUnit ? v : v * s[2];
    store(gx, i, load<A>(gx, i) + g * f.scale);
  }
  sum_g = sg;
  sum_gx = sgx;
}

// Channel c: the blocks of every row in order, partial sums added in double.
template <class X, class G, class GX, class A, bool kUnit>
DF_INLINE void backward_channel(const DenseBnArgs& a, const DenseView& grad_y, const DenseView& grad_x,
                                const int64_t* s, int64_t c, A* dweight, A* dbias) {
  const Affine<A> f(a, c);
  const A mean = static_cast<const A*>(a.mean)[c];
  double total_g = 0, total_gx = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const X* x = row<const X>(a.x, b, c);
    const G* gy = row<const G>(grad_y, b, c);
    GX* gx = row<GX>(grad_x, b, c);
    for (int64_t v = 0; v < a.voxels; v += kBlock) {
      const int64_t n = std::min(kBlock, a.voxels - v);
      A sg, sgx;
      backward_block<X, G, GX, A, kUnit>(x + v * s[0], gy + v * s[1], gx + v * s[2], n, s, f, mean, sg, sgx);
      total_g += sg;
      total_gx += sgx;
    }
  }
  dbias[c] = static_cast<A>(total_g);
  dweight[c] = static_cast<A>(total_gx) * static_cast<const A*>(a.invstd)[c];
}

template <class X, class G, class GX>
DF_CLONES void bn_relu_backward_channels(const DenseBnArgs& a, const DenseView& grad_y, const DenseView& grad_x,
                                         Acc<X>* dweight, Acc<X>* dbias, int64_t c0, int64_t c1) {
  using A = Acc<X>;
  const int64_t s[3] = {a.x.strides[2], grad_y.strides[2], grad_x.strides[2]};
  if (s[0] == 1 && s[1] == 1 && s[2] == 1) {
    for (int64_t c = c0; c < c1; ++c) backward_channel<X, G, GX, A, true>(a, grad_y, grad_x, s, c, dweight, dbias);
  } else {
    for (int64_t c = c0; c < c1; ++c) backward_channel<X, G, GX, A, false>(a, grad_y, grad_x, s, c, dweight, dbias);
  }
}

template <class X, class GX>
DF_CLONES void correction_rows(const DenseBnArgs& a, const DenseView& grad_x, int64_t r0, int64_t r1) {
  using A = Acc<X>;
  const A count = static_cast<A>(a.batch * a.voxels);
  const int64_t n = a.voxels, sx = a.x.strides[2], sg = grad_x.strides[2];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.channels, c = r % a.channels;
    const A mean = static_cast<const A*>(a.mean)[c], ca = static_cast<const A*>(a.weight)[c];
    const A cb = static_cast<const A*>(a.bias)[c];
    const A k0 = (ca - mean * cb) / count, k1 = cb / count;
    const X* x = row<const X>(a.x, b, c);
    GX* gx = row<GX>(grad_x, b, c);
    if (sx == 1 && sg == 1) {
#pragma omp simd
      for (int64_t v = 0; v < n; ++v) store(gx, v, load<A>(gx, v) - (k0 + load<A>(x, v) * k1));
    } else {
      for (int64_t v = 0; v < n; ++v) store(gx, v * sg, load<A>(gx, v * sg) - (k0 + load<A>(x, v * sx) * k1));
    }
  }
}

// C. Wellons' lowbias32 integer hash (reference._lowbias32).
DF_INLINE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

template <class T>
DF_CLONES void dropout_range(T* x, int64_t i0, int64_t i1, uint32_t key, uint64_t threshold, Acc<T> scale) {
  using A = Acc<T>;
  while (i0 < i1) {  // hi32(i) is constant up to the next multiple of 2^32
    const uint64_t hi = static_cast<uint64_t>(i0) >> 32;
    const int64_t end = std::min<int64_t>(i1, static_cast<int64_t>((hi + 1) << 32));
    const uint32_t k = lowbias32(key + static_cast<uint32_t>(hi));
#pragma omp simd
    for (int64_t i = i0; i < end; ++i) {
      const uint32_t h = lowbias32(static_cast<uint32_t>(i) ^ k);
      const A v = load<A>(x, i) * scale;
      store(x, i, static_cast<uint64_t>(h) >= threshold ? v : A(0));
    }
    i0 = end;
  }
}

// Work items per parallel chunk when each item covers `values` values.
int64_t grain(int64_t values) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, values)); }

}  // namespace

void dense_bn_relu(const DenseBnArgs& args, const DenseView& out) {
  visit_float(args.x.dtype, "x", [&](auto xt) {
    using X = typename decltype(xt)::type;
    visit_float(out.dtype, "out_dtype", [&](auto yt) {
      using Y = typename decltype(yt)::type;
      at::parallel_for(0, args.batch * args.channels, grain(args.voxels),
                       [&](int64_t r0, int64_t r1) { bn_relu_rows<X, Y>(args, out, r0, r1); });
    });
  });
}

void dense_bn_relu_backward(const DenseBnArgs& args, const DenseView& grad_y, const DenseView& grad_x,
                            void* dweight, void* dbias) {
  visit_float(args.x.dtype, "x", [&](auto xt) {
    using X = typename decltype(xt)::type;
    using A = Acc<X>;
    visit_float(grad_y.dtype, "grad_y", [&](auto gt) {
      using G = typename decltype(gt)::type;
      visit_float(grad_x.dtype, "grad_x", [&](auto gxt) {
        using GX = typename decltype(gxt)::type;
        at::parallel_for(0, args.channels, grain(args.batch * args.voxels), [&](int64_t c0, int64_t c1) {
          bn_relu_backward_channels<X, G, GX>(args, grad_y, grad_x, static_cast<A*>(dweight),
                                              static_cast<A*>(dbias), c0, c1);
        });
      });
    });
  });
}

void dense_bn_correction(const DenseBnArgs& args, const DenseView& grad_x) {
  visit_float(args.x.dtype, "x", [&](auto xt) {
    using X = typename decltype(xt)::type;
    visit_float(grad_x.dtype, "grad_x", [&](auto gxt) {
      using GX = typename decltype(gxt)::type;
      at::parallel_for(0, args.batch * args.channels, grain(args.voxels),
                       [&](int64_t r0, int64_t r1) { correction_rows<X, GX>(args, grad_x, r0, r1); });
    });
  });
}

void dense_dropout(void* x, DType dtype, int64_t n, int64_t seed, double p) {
  const auto s = static_cast<uint64_t>(seed);
  const uint32_t key = lowbias32(static_cast<uint32_t>(s) ^ lowbias32(static_cast<uint32_t>(s >> 32)));
  const auto threshold = static_cast<uint64_t>(p * 4294967296.0);  // floor(p 2^32), exact
  const double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  visit_float(dtype, "x", [&](auto xt) {
    using X = typename decltype(xt)::type;
    X* data = static_cast<X*>(x);
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      dropout_range<X>(data, i0, i1, key, threshold, static_cast<Acc<X>>(scale));
    });
  });
}

}  // namespace densefuse::cpu
