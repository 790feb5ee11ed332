// Per-element loss math shared by the CPU kernels and the CUDA kernels (host + device).
//
// Each function takes a math policy M with static exp, log, log1p, abs and log_1_2 (log of a value
// in [1, 2], which allows a cheaper reduction) for the scalar type T, so the CPU can plug in its
// vectorisable exp/log and CUDA its own functions. Formulas (densefuse/reference.py):
//   sigmoid      p = 1 / (1 + e) for x >= 0, e / (1 + e) otherwise, e = exp(-|x|);  dp/dx = e/(1+e)^2
//   focal, sigmoid (s = 2g - 1, z = -s x):
//     BCE = max(x, 0) - x g + log1p(e),  m = (1 - p_t)^gamma = exp(gamma * logsigmoid(z)),
//     l = m * BCE,  dl/dx = m * ((sigmoid(x) - g) - gamma * s * sigmoid(s x) * BCE)
//   focal, softmax (one class, t = 1 - p computed without cancellation by the caller):
//     l = -t^gamma * log p,  h = gamma t^(gamma-1) p log p - t^gamma  (dpow term 0 where t == 0)
#pragma once

#if defined(__CUDACC__)
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline __attribute__((always_inline))
#endif

namespace densefuse::math {

template <class T>
DF_HD T select(bool c, T a, T b) {
  return c ? a : b;
}

// sigmoid(x) from e = exp(-|x|) and r = 1 / (1 + e). The select picks a factor, not r or e r, so
// that compilers do not sink the division into both arms of the select.
template <class T>
DF_HD T sigmoid_from(T x, T e, T r) {
  return r * select(x >= T(0), T(1), e);
}

// d sigmoid / dx = sigmoid(x) sigmoid(-x) = e r^2 (exact for large |x|, unlike p (1 - p)).
template <class T>
DF_HD T sigmoid_slope(T e, T r) {
  return e * r * r;
}

// dL/dp of one element of the overlap sums: valid * (dL/dS_pg * g + dL/dS_p).
template <class T>
DF_HD T overlap_grad_p(T g, T valid, T d_pg, T d_p) {
  return (d_pg * g + d_p) * valid;
}

// A value and its derivative.
template <class T>
struct ValueGrad {
  T value, grad;
};

// Pieces of the sigmoid of y from e = exp(-|y|): r = 1 / (1 + e) and softplus(-|y|) = log1p(e),
// the latter as log(1 + e) with the rounding of 1 + e corrected through r (no second division).
template <class T>
struct SigmoidParts {
  T e, r, log1p_e;
};

template <class M, class T>
DF_HD SigmoidParts<T> sigmoid_parts(T y) {
  const T e = M::exp(-M::abs(y));
  const T u = T(1) + e;
  const T r = T(1) / u;
  return {e, r, M::log_1_2(u) - ((u - T(1)) - e) * r};
}

// Sigmoid focal loss of one element without its alpha weight, and its derivative in x.
// HARD: g is 0 or 1 (label maps), so |z| = |x| and the sigmoid parts of x serve z too.
// SQUARE: gamma == 2, the modulator is sigmoid(z)^2 (one exp less).
template <class M, bool HARD, bool SQUARE, class T>
DF_HD ValueGrad<T> focal_sigmoid(T x, T g, T gamma) {
  const T zero(0), one(1);
  const SigmoidParts<T> px = sigmoid_parts<M>(x);
  const T s = T(2) * g - one;
  const T z = -x * s;
  SigmoidParts<T> pz = px;
  T bce;  // max(x, 0) - x g + log1p(e), which is softplus(z) = max(z, 0) + log1p(e) when g is 0 or 1
  if constexpr (HARD) {
    bce = select(z > zero, z, zero) + px.log1p_e;
  } else {
    bce = select(x > zero, x, zero) - x * g + px.log1p_e;
    pz = sigmoid_parts<M>(z);
  }
  T modulator;  // (1 - p_t)^gamma = sigmoid(z)^gamma
  if constexpr (SQUARE) {
    const T sig_z = sigmoid_from(z, pz.e, pz.r);
    modulator = sig_z * sig_z;
  } else {
    modulator = M::exp(gamma * (select(z < zero, z, zero) - pz.log1p_e));
  }
  const T sig_sx = sigmoid_from(-z, pz.e, pz.r);  // sigmoid(s x) = sigmoid(-z)
  const T slope = modulator * ((sigmoid_from(x, px.e, px.r) - g) - gamma * s * sig_sx * bce);
  return {modulator * bce, slope};
}

// 1 - p_c of a stable softmax: for the arg-max class (e = 1) the sum of the other exps over the
// total, else 1 - p_c (p_c <= 1/2 there, so no cancellation).
template <class T>
DF_HD T softmax_complement(bool is_max, T e, T rest, T inv_sum) {
  return select(is_max, rest * inv_sum, T(1) - e * inv_sum);
}

// Softmax focal loss of one class without alpha * g, -t^gamma log p, and
// h = gamma t^(gamma-1) p log p - t^gamma, so that with w_c = dL/dl_c * alpha_c * g_c
// dL/dx_j = w_j h_j - p_j sum_c w_c h_c. SQUARE: gamma == 2, t^2 and 2 t p log p directly.
template <class M, bool SQUARE, class T>
DF_HD ValueGrad<T> focal_softmax(T log_p, T p, T t, T gamma) {
  const T zero(0), one(1);
  if constexpr (SQUARE) {
    const T t_pow = t * t;
    return {-t_pow * log_p, T(2) * t * p * log_p - t_pow};
  } else {
    const bool pos = t > zero;
    const T t_pow = select(pos, M::exp(gamma * M::log(t)), select(gamma > zero, zero, one));
    const T h = select(pos, gamma * t_pow / t * p * log_p, zero) - t_pow;
    return {-t_pow * log_p, h};
  }
}

// Focal term of class c of a stable softmax from the voxel's pieces: e = exp(x - max),
// inv_sum = 1 / sum_k e_k, rest = sum of e_k over k != argmax, log_sum = log1p(rest) = log sum_k e_k.
template <class M, bool SQUARE, class T>
DF_HD ValueGrad<T> focal_softmax_class(T x, T e, T max, T inv_sum, T rest, T log_sum, bool is_max, T gamma) {
  return focal_softmax<M, SQUARE>((x - max) - log_sum, e * inv_sum, softmax_complement(is_max, e, rest, inv_sum),
                                  gamma);
}

// Sigmoid focal weight a = g alpha_pos + (1 - g) alpha_neg.
template <class T>
DF_HD T alpha_weight(T g, T alpha_pos, T alpha_neg) {
  return g * alpha_pos + (T(1) - g) * alpha_neg;
}

// True for NaN and +-Inf.
template <class T>
DF_HD bool nonfinite(T x) {
  return !(x - x == T(0));  // x - x is NaN exactly for NaN and +-Inf (one compare, no branch)
}

}  // namespace densefuse::math
