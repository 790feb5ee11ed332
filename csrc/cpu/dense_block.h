// CPU kernels of the dense-block BN ops (csrc/cpu/dense_block.cpp). Arguments are validated by
// ops.cpp; layouts and semantics: dense_block_args.h and densefuse/reference.py.
#pragma once

#include "dense_block_args.h"

namespace densefuse::cpu {

// out [B, C, V] contiguous (its own dtype) = relu(x * scale + shift), computed in A.
void dense_bn_relu(const DenseBnArgs& args, const DenseView& out);

// g = grad_y where pre > 0, else 0:  grad_x (any float dtype, added in A) += g * scale;
// dweight [C] = sum g * (x - mean) * invstd, dbias [C] = sum g over B*V (A). Each channel is reduced by one
// thread in a fixed order.
void dense_bn_relu_backward(const DenseBnArgs& args, const DenseView& grad_y, const DenseView& grad_x,
                            void* dweight, void* dbias);

// grad_x (any float dtype, computed in A) -= (a + (x - mean) * b) / (B * V) per channel; a, b in args.weight,
// args.bias.
void dense_bn_correction(const DenseBnArgs& args, const DenseView& grad_x);

// In place on n contiguous values of dtype, p in [0, 1]: x[i] = x[i] / (1 - p) where hash(seed, i) >=
// floor(p 2^32), else 0 (the counter-based dropout of reference.dropout, bit for bit).
void dense_dropout(void* x, DType dtype, int64_t n, int64_t seed, double p);

}  // namespace densefuse::cpu
