// densefuse._C: the densefuse_ext:: operator library and build_info().
//
// Schemas mirror densefuse/reference.py (same arguments, same results):
//   overlap_stats(logits [B,C,V], target, activation, ignore_index)            -> (stats [B,C,3], flags [3])
//   overlap_stats_backward(grad_stats [B,C,3], logits, target, activation, ignore_index) -> grad [B,C,V]
//   focal_stats(logits, target, activation, gamma, alpha_pos, alpha_neg, ignore_index) -> (stats [B,C,2], flags)
//   focal_stats_backward(grad_stats [B,C,2], logits, target, ...)                    -> grad [B,C,V]
// target is an integer label map [B, V] or a float target [B, C, V]; any strides everywhere.
// One implementation per op validates the tensors, describes them as a LossStatsArgs (pointers +
// strides + dtype codes) and hands that to the CPU kernels (csrc/cpu) or, for CUDA tensors, to the
// CUDA launchers (csrc/cuda) on the current stream. Meta kernels give shapes for fake tensors.
//
// Patch fusion (densefuse/reference.py patch_*; csrc/patch_fuse_args.h):
//   patch_scatter(acc! [B,C,D,H,W], windows [N,C,rz,ry,rx], starts [N,4], wz, wy, wx, floor) -> flags [2]
//   patch_gather(...same...)                                                                -> flags [2]
//   patch_normalize(acc!, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation)      -> ()
//   patch_finalize(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation, output, threshold)
//                                                        -> act(acc / N) [B,C,...] or a uint8 mask
//   patch_extract(out! [N,C,rz,ry,rx], volume [B,C,D,H,W], starts [N,4], padding, cval)    -> ()
// CPU and CUDA for all five (CUDA: the scatter with vector atomics, the gather by first-window owners).
//
// Dense-block BN (densefuse/reference.py bn_relu, bn_relu_backward, bn_stats_correction; CPU only;
// x [B,C,V] any strides, per-channel vectors [C] in the accumulation dtype):
//   dense_bn_relu(x, mean, invstd, weight, bias, out_dtype)                  -> y [B,C,V] contiguous
//   dense_bn_relu_backward_(grad_y, x, mean, invstd, weight, bias, grad_x!)  -> (dweight [C], dbias [C])
//   dense_bn_correction_(grad_x!, x, mean, a, b)                              -> ()
//   dense_dropout_(x!, seed, p)                                               -> ()
//
// build_info() reports what was compiled, including "ops": the ops registered per dispatch key, as
// recorded by the TORCH_LIBRARY_IMPL blocks at the end (densefuse/ops asks it which backends have
// kernels, instead of a private torch dispatcher query).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/cpu_dispatch.h"  // DENSEFUSE_CPU_CLONES
#include "cpu/dense_block.h"
#include "cpu/loss_stats.h"
#include "cpu/patch_fuse.h"
#include "dense_block_args.h"
#include "loss_stats_args.h"
#include "patch_fuse_args.h"

#ifdef DENSEFUSE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/loss_stats.h"
#include "cuda/patch_fuse.h"
#endif

namespace densefuse {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::optional<DType> dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kByte: return DType::UInt8;
    case at::kBool: return DType::UInt8;  // stored as 0/1 bytes
    case at::kChar: return DType::Int8;
    case at::kShort: return DType::Int16;
    case at::kInt: return DType::Int32;
    case at::kLong: return DType::Int64;
    default: return std::nullopt;
  }
}

at::ScalarType accumulate_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Validated inputs of one call: the kernel arguments and the tensors they point into.
struct Call {
  LossKind kind;
  Tensor logits, target, alpha_pos, alpha_neg;
  LossStatsArgs args;
};

Tensor checked_alpha(const char* name, const OptTensor& alpha, const Tensor& logits) {
  if (!alpha.has_value()) return Tensor();
  TORCH_CHECK(alpha->device() == logits.device(), name, ": expected a tensor on ", logits.device(),
              " like logits, got ", alpha->device());
  TORCH_CHECK(alpha->dim() == 1 && alpha->size(0) == logits.size(1), name, ": expected shape (", logits.size(1),
              ",) (one per class), got ", alpha->sizes());
  TORCH_CHECK(alpha->is_floating_point(), name, ": expected a float tensor, got ", alpha->scalar_type());
  return alpha->to(accumulate_dtype(logits)).contiguous();
}

Call prepare(LossKind kind, const Tensor& logits, const Tensor& target, int64_t activation,
             std::optional<int64_t> ignore_index, double gamma = 0.0, const OptTensor& alpha_pos = std::nullopt,
             const OptTensor& alpha_neg = std::nullopt) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected shape [B, C, V], got ", logits.sizes());
  const auto logits_code = dtype_code(logits.scalar_type());
  TORCH_CHECK(logits.is_floating_point() && logits_code,
              "logits: expected a float16/bfloat16/float32/float64 tensor, got ", logits.scalar_type());
  TORCH_CHECK(logits.numel() > 0, "logits: expected a non-empty tensor, got shape ", logits.sizes());
  TORCH_CHECK(target.device() == logits.device(), "target: expected a tensor on ", logits.device(),
              " like logits, got ", target.device());
  const auto target_code = dtype_code(target.scalar_type());
  TORCH_CHECK(target_code, "target: expected integer labels or a float target, got ", target.scalar_type());
  const bool dense = target.is_floating_point();
  const int64_t batch = logits.size(0), channels = logits.size(1), voxels = logits.size(2);
  if (dense) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "target: a float target must have the logits' shape ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(!ignore_index.has_value(),
                "ignore_index: needs integer class labels ([B, 1, *spatial] or [B, *spatial]), got a float "
                "target (one-hot, soft or float labels: cast labels to an integer dtype)");
  } else {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == batch && target.size(1) == voxels,
                "target: expected a label map of shape [", batch, ", ", voxels, "], got ", target.sizes());
  }
  if (kind == LossKind::Focal) {
    TORCH_CHECK(activation == kActSigmoid || activation == kActSoftmax,
                "activation: focal loss needs sigmoid (1) or softmax (2), got ", activation);
    TORCH_CHECK(std::isfinite(gamma) && gamma >= 0, "gamma: expected a finite number >= 0, got ", gamma);
  } else {
    TORCH_CHECK(activation >= kActNone && activation <= kActSoftmax,
                "activation: expected 0 (none), 1 (sigmoid) or 2 (softmax), got ", activation);
  }

  Call call{kind, logits, target, checked_alpha("alpha_pos", alpha_pos, logits),
            checked_alpha("alpha_neg", alpha_neg, logits), LossStatsArgs{}};
  LossStatsArgs& a = call.args;
  a.batch = batch;
  a.channels = channels;
  a.voxels = voxels;
  a.logits = logits.data_ptr();
  a.logits_dtype = *logits_code;
  for (int d = 0; d < 3; ++d) a.logits_stride[d] = logits.stride(d);
  a.target = target.data_ptr();
  a.target_dtype = *target_code;
  a.dense_target = dense;
  a.target_stride[0] = target.stride(0);
  a.target_stride[1] = dense ? target.stride(1) : 0;
  a.target_stride[2] = target.stride(dense ? 2 : 1);
  a.activation = static_cast<int32_t>(activation);
  a.has_ignore = ignore_index.has_value();
  a.ignore_index = ignore_index.value_or(0);
  a.gamma = gamma;
  a.alpha_pos = call.alpha_pos.defined() ? call.alpha_pos.data_ptr() : nullptr;
  a.alpha_neg = call.alpha_neg.defined() ? call.alpha_neg.data_ptr() : nullptr;
  return call;
}

std::tuple<Tensor, Tensor> run_forward(const Call& call) {
  const Tensor& logits = call.logits;
  const int k = stats_per_class(call.kind);
  Tensor stats = at::empty({logits.size(0), logits.size(1), k}, logits.options().dtype(accumulate_dtype(logits)));
  Tensor flags = at::empty({3}, logits.options().dtype(at::kLong));
  if (logits.is_cuda()) {
#ifdef DENSEFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    const auto bytes = static_cast<int64_t>(cuda::loss_stats_workspace_bytes(call.kind, call.args));
    Tensor workspace = at::empty({bytes}, logits.options().dtype(at::kByte));
    const cudaError_t err =
        cuda::launch_loss_stats_forward(call.kind, call.args, workspace.data_ptr(), stats.data_ptr(),
                                        flags.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "densefuse: CUDA loss-stats forward failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "densefuse._C was built without CUDA");
#endif
  } else {
    cpu::loss_stats_forward(call.kind, call.args, stats.data_ptr(), flags.data_ptr<int64_t>());
  }
  return {stats, flags};
}

Tensor run_backward(const Call& call, const Tensor& grad_stats) {
  const Tensor& logits = call.logits;
  const int k = stats_per_class(call.kind);
  TORCH_CHECK(grad_stats.device() == logits.device(), "grad_stats: expected a tensor on ", logits.device(),
              " like logits, got ", grad_stats.device());
  TORCH_CHECK(grad_stats.dim() == 3 && grad_stats.size(0) == logits.size(0) &&
                  grad_stats.size(1) == logits.size(1) && grad_stats.size(2) == k,
              "grad_stats: expected shape [", logits.size(0), ", ", logits.size(1), ", ", k, "], got ",
              grad_stats.sizes());
  TORCH_CHECK(grad_stats.is_floating_point(), "grad_stats: expected a float tensor, got ", grad_stats.scalar_type());
  const Tensor grad = grad_stats.to(accumulate_dtype(logits)).contiguous();
  Tensor grad_logits = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (logits.is_cuda()) {
#ifdef DENSEFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    const cudaError_t err = cuda::launch_loss_stats_backward(call.kind, call.args, grad.data_ptr(),
                                                             grad_logits.data_ptr(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "densefuse: CUDA loss-stats backward failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "densefuse._C was built without CUDA");
#endif
  } else {
    cpu::loss_stats_backward(call.kind, call.args, grad.data_ptr(), grad_logits.data_ptr());
  }
  return grad_logits;
}

// ------------------------------------------------------------------------------------------- ops
std::tuple<Tensor, Tensor> overlap_stats(const Tensor& logits, const Tensor& target, int64_t activation,
                                         std::optional<int64_t> ignore_index) {
  return run_forward(prepare(LossKind::Overlap, logits, target, activation, ignore_index));
}

Tensor overlap_stats_backward(const Tensor& grad_stats, const Tensor& logits, const Tensor& target, int64_t activation,
                              std::optional<int64_t> ignore_index) {
  return run_backward(prepare(LossKind::Overlap, logits, target, activation, ignore_index), grad_stats);
}

std::tuple<Tensor, Tensor> focal_stats(const Tensor& logits, const Tensor& target, int64_t activation, double gamma,
                                       const OptTensor& alpha_pos, const OptTensor& alpha_neg,
                                       std::optional<int64_t> ignore_index) {
  return run_forward(prepare(LossKind::Focal, logits, target, activation, ignore_index, gamma, alpha_pos, alpha_neg));
}

Tensor focal_stats_backward(const Tensor& grad_stats, const Tensor& logits, const Tensor& target, int64_t activation,
                            double gamma, const OptTensor& alpha_pos, const OptTensor& alpha_neg,
                            std::optional<int64_t> ignore_index) {
  return run_backward(prepare(LossKind::Focal, logits, target, activation, ignore_index, gamma, alpha_pos, alpha_neg),
                      grad_stats);
}

// ------------------------------------------------------------------------------------------ meta
std::tuple<Tensor, Tensor> stats_meta(const Tensor& logits, int64_t k) {
  const auto options = logits.options().dtype(accumulate_dtype(logits));
  return {at::empty_symint({logits.sym_size(0), logits.sym_size(1), c10::SymInt(k)}, options),
          at::empty({3}, logits.options().dtype(at::kLong))};
}

Tensor grad_meta(const Tensor& logits) {
  return at::empty_symint(logits.sym_sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
}

std::tuple<Tensor, Tensor> overlap_stats_meta(const Tensor& logits, const Tensor&, int64_t, std::optional<int64_t>) {
  return stats_meta(logits, 3);
}

Tensor overlap_stats_backward_meta(const Tensor&, const Tensor& logits, const Tensor&, int64_t,
                                   std::optional<int64_t>) {
  return grad_meta(logits);
}

std::tuple<Tensor, Tensor> focal_stats_meta(const Tensor& logits, const Tensor&, int64_t, double, const OptTensor&,
                                            const OptTensor&, std::optional<int64_t>) {
  return stats_meta(logits, 2);
}

Tensor focal_stats_backward_meta(const Tensor&, const Tensor& logits, const Tensor&, int64_t, double,
                                 const OptTensor&, const OptTensor&, std::optional<int64_t>) {
  return grad_meta(logits);
}

// ------------------------------------------------------------------------------------ patch fusion
// Inputs are validated at the Python boundary (densefuse/ops/patch_fuse.py); these checks keep a
// direct torch.ops.densefuse_ext call from reading out of bounds and name the argument.
DType float_code(const char* name, const Tensor& t) {
  const auto code = dtype_code(t.scalar_type());
  TORCH_CHECK(t.is_floating_point() && code, name, ": expected a float16/bfloat16/float32/float64 tensor, got ",
              t.scalar_type());
  return *code;
}

Tensor checked_acc(const Tensor& acc, bool in_place) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "acc: expected a float32/float64 accumulator, got ", acc.scalar_type());
  TORCH_CHECK(acc.dim() == 5 && acc.numel() > 0, "acc: expected a non-empty [B, C, D, H, W] tensor, got shape ",
              acc.sizes());
  TORCH_CHECK(!in_place || acc.is_contiguous(), "acc: expected a contiguous tensor (it is written in place)");
  return acc.contiguous();
}

// A small argument on acc's device (it may come from the CPU) in `dtype`, contiguous.
Tensor to_acc_device(const char* name, const Tensor& t, const Tensor& acc, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == acc.device() || t.device().is_cpu(), name, ": expected a tensor on ", acc.device(),
              " (or the CPU), got ", t.device());
  if (t.device() == acc.device() && t.scalar_type() == dtype && t.is_contiguous()) return t;  // no dispatch
  return t.to(acc.device(), dtype).contiguous();
}

Tensor checked_ints(const char* name, const Tensor& t, const Tensor& acc) {
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool, name,
              ": expected an integer tensor, got ", t.scalar_type());
  return to_acc_device(name, t, acc, at::kLong);
}

// A 1-D weight vector in acc's dtype; length < 0: any length >= 1.
Tensor checked_weights(const char* name, const Tensor& w, int64_t length, const Tensor& acc) {
  TORCH_CHECK(w.is_floating_point(), name, ": expected a float weight vector, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.numel() >= 1 && (length < 0 || w.numel() == length), name,
              ": expected a 1-D vector of length ", length < 0 ? std::string(">= 1") : std::to_string(length),
              ", got shape ", w.sizes());
  return to_acc_device(name, w, acc, acc.scalar_type());
}

void check_floor(double floor) {
  TORCH_CHECK(std::isfinite(floor) && floor >= 0, "floor: expected a finite number >= 0, got ", floor);
}

void fill_volume(const Tensor& acc, int64_t& batch, int64_t& channels, int64_t (&size)[3]) {
  batch = acc.size(0);
  channels = acc.size(1);
  for (int d = 0; d < 3; ++d) size[d] = acc.size(d + 2);
}

// Validated scatter inputs: the kernel arguments and the tensors they point into.
struct ScatterCall {
  Tensor acc, windows, starts, weights[3];
  PatchScatterArgs args;
};

ScatterCall prepare_scatter(const Tensor& acc, const Tensor& windows, const Tensor& starts, const Tensor& wz,
                            const Tensor& wy, const Tensor& wx, double floor) {
  ScatterCall call;
  call.acc = checked_acc(acc, true);
  PatchScatterArgs& a = call.args;
  a.windows_dtype = float_code("windows", windows);
  TORCH_CHECK(windows.dim() == 5 && windows.size(1) == acc.size(1), "windows: expected shape [N, ", acc.size(1),
              ", rz, ry, rx] (channels of acc), got ", windows.sizes());
  TORCH_CHECK(windows.device() == acc.device(), "windows: expected a tensor on ", acc.device(), " like acc, got ",
              windows.device());
  call.windows = windows.contiguous();
  call.starts = checked_ints("starts", starts, acc);
  TORCH_CHECK(call.starts.dim() == 2 && call.starts.size(0) == windows.size(0) && call.starts.size(1) == 4,
              "starts: expected shape (", windows.size(0), ", 4) = (batch, z, y, x) per window, got ", starts.sizes());
  const char* names[3] = {"wz", "wy", "wx"};
  const Tensor* vectors[3] = {&wz, &wy, &wx};
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(windows.size(d + 2) >= 1, "windows: window size must be >= 1 along every axis, got ",
                windows.sizes().slice(2));
    call.weights[d] = checked_weights(names[d], *vectors[d], windows.size(d + 2), acc);
    a.roi[d] = windows.size(d + 2);
    a.weights[d] = call.weights[d].data_ptr();
  }
  check_floor(floor);
  fill_volume(call.acc, a.batch, a.channels, a.size);
  a.acc = call.acc.data_ptr();
  a.acc_dtype = acc.scalar_type() == at::kDouble ? DType::Float64 : DType::Float32;
  a.count = windows.size(0);
  a.windows = call.windows.data_ptr();
  a.starts = call.starts.data_ptr<int64_t>();
  a.floor = floor;
  return call;
}

// gather: the output-stationary kernel (deterministic).
Tensor run_scatter(const ScatterCall& call, bool gather) {
  // zeroed by the CUDA launcher on the stream, or here on the CPU (no fill op either way)
  Tensor flags = at::empty({2}, call.acc.options().dtype(at::kLong));
  if (!call.acc.is_cuda()) flags.data_ptr<int64_t>()[0] = flags.data_ptr<int64_t>()[1] = 0;
  if (call.acc.is_cuda()) {
#ifdef DENSEFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(call.acc.device());
    const auto launch = gather ? cuda::launch_patch_gather : cuda::launch_patch_scatter;
    const cudaError_t err = launch(call.args, flags.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
    // Any window count, channel count and size launch (the launcher splits grids past the CUDA
    // limits), so an error here comes from the device: say which call it was.
    TORCH_CHECK(err == cudaSuccess, "densefuse: CUDA ", gather ? "patch_gather" : "patch_scatter",
                " failed for acc ", call.acc.sizes(), " and windows ", call.windows.sizes(), ": ",
                cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "densefuse._C was built without CUDA");
#endif
  } else if (call.args.count > 0) {
    (gather ? cpu::patch_gather : cpu::patch_scatter)(call.args, flags.data_ptr<int64_t>());
  }
  return flags;
}

Tensor patch_scatter(const Tensor& acc, const Tensor& windows, const Tensor& starts, const Tensor& wz,
                     const Tensor& wy, const Tensor& wx, double floor) {
  return run_scatter(prepare_scatter(acc, windows, starts, wz, wy, wx, floor), false);
}

Tensor patch_gather(const Tensor& acc, const Tensor& windows, const Tensor& starts, const Tensor& wz,
                    const Tensor& wy, const Tensor& wx, double floor) {
  return run_scatter(prepare_scatter(acc, windows, starts, wz, wy, wx, floor), true);
}

// Validated finalise inputs.
struct FinalizeCall {
  Tensor acc, starts[3], weights[3];
  PatchFinalizeArgs args;
};

FinalizeCall prepare_finalize(const Tensor& acc, bool in_place, const Tensor& starts_z, const Tensor& starts_y,
                              const Tensor& starts_x, const Tensor& wz, const Tensor& wy, const Tensor& wx,
                              double floor, int64_t activation, int64_t output, double threshold) {
  FinalizeCall call;
  call.acc = checked_acc(acc, in_place);
  PatchFinalizeArgs& a = call.args;
  const char* start_names[3] = {"starts_z", "starts_y", "starts_x"};
  const char* weight_names[3] = {"wz", "wy", "wx"};
  const Tensor* starts[3] = {&starts_z, &starts_y, &starts_x};
  const Tensor* vectors[3] = {&wz, &wy, &wx};
  for (int d = 0; d < 3; ++d) {
    call.starts[d] = checked_ints(start_names[d], *starts[d], acc);
    TORCH_CHECK(call.starts[d].dim() == 1, start_names[d], ": expected a 1-D tensor of window starts, got shape ",
                starts[d]->sizes());
    call.weights[d] = checked_weights(weight_names[d], *vectors[d], -1, acc);
    a.starts[d] = call.starts[d].data_ptr<int64_t>();
    a.grid[d] = call.starts[d].numel();
    a.weights[d] = call.weights[d].data_ptr();
    a.roi[d] = call.weights[d].numel();
  }
  check_floor(floor);
  TORCH_CHECK(activation >= kActNone && activation <= kActSoftmax,
              "activation: expected 0 (none), 1 (sigmoid) or 2 (softmax), got ", activation);
  TORCH_CHECK(output == kOutProbabilities || output == kOutMask, "output: expected 0 (probabilities) or 1 (mask), got ",
              output);
  TORCH_CHECK(std::isfinite(threshold), "threshold: expected a finite number, got ", threshold);
  TORCH_CHECK(output != kOutMask || activation != kActSoftmax || acc.size(1) <= 256,
              "acc: an argmax mask is uint8, so at most 256 classes, got ", acc.size(1));
  fill_volume(call.acc, a.batch, a.channels, a.size);
  a.acc = call.acc.data_ptr();
  a.acc_dtype = acc.scalar_type() == at::kDouble ? DType::Float64 : DType::Float32;
  a.floor = floor;
  a.activation = static_cast<int32_t>(activation);
  a.output = static_cast<int32_t>(output);
  a.threshold = threshold;
  return call;
}

// out = the finalised values (out may be acc): the CPU kernel, or the CUDA one on acc's stream.
void run_finalize(const FinalizeCall& call, void* out) {
  if (call.acc.is_cuda()) {
#ifdef DENSEFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(call.acc.device());
    const auto& a = call.args;
    const Tensor scratch = at::empty({a.size[0] + a.size[1] + a.size[2]}, call.acc.options().dtype(at::kLong));
    const cudaError_t err =
        cuda::launch_patch_finalize(a, out, scratch.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "densefuse: CUDA patch_finalize failed for acc ", call.acc.sizes(), ": ",
                cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "densefuse._C was built without CUDA");
#endif
  } else {
    cpu::patch_finalize(call.args, out);
  }
}

void patch_normalize(const Tensor& acc, const Tensor& starts_z, const Tensor& starts_y, const Tensor& starts_x,
                     const Tensor& wz, const Tensor& wy, const Tensor& wx, double floor, int64_t activation) {
  const FinalizeCall call = prepare_finalize(acc, true, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation,
                                             kOutProbabilities, 0.0);
  run_finalize(call, call.acc.data_ptr());
}

Tensor patch_finalize(const Tensor& acc, const Tensor& starts_z, const Tensor& starts_y, const Tensor& starts_x,
                      const Tensor& wz, const Tensor& wy, const Tensor& wx, double floor, int64_t activation,
                      int64_t output, double threshold) {
  const FinalizeCall call = prepare_finalize(acc, false, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation,
                                             output, threshold);
  Tensor out;
  if (output == kOutProbabilities) {
    out = at::empty(acc.sizes(), call.acc.options());
  } else {
    const int64_t channels = activation == kActSoftmax ? 1 : acc.size(1);
    out = at::empty({acc.size(0), channels, acc.size(2), acc.size(3), acc.size(4)}, acc.options().dtype(at::kByte));
  }
  run_finalize(call, out.data_ptr());
  return out;
}

// out [N, C, rz, ry, rx] = the windows of volume (any strides) at starts, padded by `mode` outside it.
void patch_extract(const Tensor& out, const Tensor& volume, const Tensor& starts, int64_t padding, double cval) {
  PatchExtractArgs a;
  a.dtype = float_code("volume", volume);
  TORCH_CHECK(volume.dim() == 5 && volume.numel() > 0, "volume: expected a non-empty [B, C, D, H, W] tensor, got shape ",
              volume.sizes());
  TORCH_CHECK(out.scalar_type() == volume.scalar_type(), "out: expected ", volume.scalar_type(), " like volume, got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == volume.device(), "out: expected a tensor on ", volume.device(), " like volume, got ",
              out.device());
  TORCH_CHECK(out.dim() == 5 && out.size(1) == volume.size(1) && out.is_contiguous(),
              "out: expected a contiguous [N, ", volume.size(1), ", rz, ry, rx] tensor, got shape ", out.sizes());
  const Tensor starts64 = checked_ints("starts", starts, volume);
  TORCH_CHECK(starts64.dim() == 2 && starts64.size(0) == out.size(0) && starts64.size(1) == 4, "starts: expected shape (",
              out.size(0), ", 4) = (batch, z, y, x) per window, got ", starts.sizes());
  TORCH_CHECK(padding >= kPadConstant && padding <= kPadCircular,
              "padding: expected 0 (constant), 1 (reflect), 2 (replicate) or 3 (circular), got ", padding);
  if (out.numel() == 0) return;
  // cval in the volume's dtype, converted as Tensor.fill_ converts it (Scalar::to: the same bits as
  // torch's padding, and the same error where it overflows the dtype), with no tensor made per call.
  uint64_t value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, volume.scalar_type(), "patch_extract", [&] {
    const scalar_t converted = at::Scalar(cval).to<scalar_t>();
    std::memcpy(&value, &converted, sizeof(converted));
  });
  fill_volume(volume, a.batch, a.channels, a.size);
  for (int d = 0; d < 5; ++d) a.strides[d] = volume.stride(d);
  for (int d = 0; d < 3; ++d) a.roi[d] = out.size(d + 2);
  a.volume = volume.data_ptr();
  a.count = out.size(0);
  a.out = out.data_ptr();
  a.starts = starts64.data_ptr<int64_t>();
  a.mode = static_cast<int32_t>(padding);
  a.cval = &value;  // on the host
  if (volume.is_cuda()) {
#ifdef DENSEFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(volume.device());
    const cudaError_t err = cuda::launch_patch_extract(a, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "densefuse: CUDA patch_extract failed for volume ", volume.sizes(),
                " and windows ", out.sizes(), ": ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "densefuse._C was built without CUDA");
#endif
  } else {
    cpu::patch_extract(a);
  }
}

// ----------------------------------------------------------------------------------- dense block
// t as a [B, C, V] view of x's shape on x's device, any strides and float dtype.
DenseView dense_view(const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), " like x, got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, ": expected a tensor on ", x.device(), " like x, got ", t.device());
  DenseView v;
  v.data = t.data_ptr();
  v.dtype = float_code(name, t);
  for (int d = 0; d < 3; ++d) v.strides[d] = t.stride(d);
  return v;
}

// x [B, C, V] and four [C] vectors in its accumulation dtype (contiguous, on x's device).
DenseBnArgs dense_args(const Tensor& x, const std::array<std::pair<const char*, const Tensor*>, 4>& vectors) {
  TORCH_CHECK(x.dim() == 3, "x: expected a [B, C, V] tensor, got shape ", x.sizes());
  DenseBnArgs a;
  a.x = dense_view("x", x, x);
  a.batch = x.size(0);
  a.channels = x.size(1);
  a.voxels = x.size(2);
  const at::ScalarType acc = accumulate_dtype(x);
  const void** slots[4] = {&a.mean, &a.invstd, &a.weight, &a.bias};
  for (int i = 0; i < 4; ++i) {
    const auto& [name, t] = vectors[i];
    TORCH_CHECK(t->dim() == 1 && t->size(0) == a.channels && t->scalar_type() == acc && t->is_contiguous() &&
                    t->device() == x.device(),
                name, ": expected a contiguous ", acc, " tensor of shape [", a.channels, "] on ", x.device(), ", got ",
                t->scalar_type(), " ", t->sizes());
    *slots[i] = t->data_ptr();
  }
  return a;
}

DenseBnArgs bn_args(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                    const Tensor& bias) {
  return dense_args(x, {{{"mean", &mean}, {"invstd", &invstd}, {"weight", &weight}, {"bias", &bias}}});
}

Tensor dense_bn_relu(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                     const Tensor& bias, at::ScalarType out_dtype) {
  const DenseBnArgs a = bn_args(x, mean, invstd, weight, bias);
  Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  if (out.numel() > 0) cpu::dense_bn_relu(a, dense_view("out", out, x));
  return out;
}

std::tuple<Tensor, Tensor> dense_bn_relu_backward_(const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                                                   const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                                                   const Tensor& grad_x) {
  const DenseBnArgs a = bn_args(x, mean, invstd, weight, bias);
  const DenseView gy = dense_view("grad_y", grad_y, x), gx = dense_view("grad_x", grad_x, x);
  Tensor dweight = at::zeros_like(mean), dbias = at::zeros_like(mean);
  if (x.numel() > 0) cpu::dense_bn_relu_backward(a, gy, gx, dweight.data_ptr(), dbias.data_ptr());
  return {dweight, dbias};
}

void dense_bn_correction_(const Tensor& grad_x, const Tensor& x, const Tensor& mean, const Tensor& a,
                          const Tensor& b) {
  // a and b travel in the weight and bias slots (dense_block_args.h); invstd is not read.
  const DenseBnArgs args = dense_args(x, {{{"mean", &mean}, {"mean", &mean}, {"a", &a}, {"b", &b}}});
  const DenseView gx = dense_view("grad_x", grad_x, x);
  if (x.numel() > 0) cpu::dense_bn_correction(args, gx);
}

void dense_dropout_(const Tensor& x, int64_t seed, double p) {
  TORCH_CHECK(x.is_contiguous(), "x: expected a contiguous tensor (the mask follows its element order)");
  TORCH_CHECK(p >= 0 && p <= 1, "p: expected a probability in [0, 1], got ", p);
  if (x.numel() > 0) cpu::dense_dropout(x.data_ptr(), float_code("x", x), x.numel(), seed, p);
}

// The x86 code path the CPU kernels' target_clones resolve to on this machine.
const char* cpu_isa() {
#ifdef DENSEFUSE_CPU_CLONES
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64";
#else
  return "generic";
#endif
}

// The densefuse_ext ops each TORCH_LIBRARY_IMPL block below registered, per dispatch key ("cpu",
// "cuda", "meta"), recorded as they register (at load time): build_info()["ops"].
std::map<std::string, std::vector<std::string>>& registered_ops() {
  static std::map<std::string, std::vector<std::string>> ops;
  return ops;
}

// m.impl(name, fn) that also records `name` under `key` for build_info().
class Registrar {
 public:
  Registrar(torch::Library& m, const char* key) : m_(m), names_(registered_ops()[key]) {}

  template <class Fn>
  void impl(const char* name, Fn&& fn) {
    m_.impl(name, std::forward<Fn>(fn));
    names_.emplace_back(name);
  }

 private:
  torch::Library& m_;
  std::vector<std::string>& names_;
};

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef DENSEFUSE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = DENSEFUSE_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["openmp_threads"] = at::get_num_threads();
  info["cpu_isa"] = cpu_isa();
  pybind11::dict ops;
  for (const auto& [key, names] : registered_ops()) ops[pybind11::str(key)] = names;
  info["ops"] = ops;
  return info;
}

}  // namespace
}  // namespace densefuse

TORCH_LIBRARY(densefuse_ext, m) {
  m.def("overlap_stats(Tensor logits, Tensor target, int activation, int? ignore_index) -> (Tensor, Tensor)");
  m.def(
      "overlap_stats_backward(Tensor grad_stats, Tensor logits, Tensor target, int activation, int? ignore_index)"
      " -> Tensor");
  m.def(
      "focal_stats(Tensor logits, Tensor target, int activation, float gamma, Tensor? alpha_pos, Tensor? alpha_neg,"
      " int? ignore_index) -> (Tensor, Tensor)");
  m.def(
      "focal_stats_backward(Tensor grad_stats, Tensor logits, Tensor target, int activation, float gamma,"
      " Tensor? alpha_pos, Tensor? alpha_neg, int? ignore_index) -> Tensor");
  m.def(
      "patch_scatter(Tensor(a!) acc, Tensor windows, Tensor starts, Tensor wz, Tensor wy, Tensor wx, float floor)"
      " -> Tensor");
  m.def(
      "patch_gather(Tensor(a!) acc, Tensor windows, Tensor starts, Tensor wz, Tensor wy, Tensor wx, float floor)"
      " -> Tensor");
  m.def(
      "patch_normalize(Tensor(a!) acc, Tensor starts_z, Tensor starts_y, Tensor starts_x, Tensor wz, Tensor wy,"
      " Tensor wx, float floor, int activation) -> ()");
  m.def(
      "patch_finalize(Tensor acc, Tensor starts_z, Tensor starts_y, Tensor starts_x, Tensor wz, Tensor wy, Tensor wx,"
      " float floor, int activation, int output, float threshold) -> Tensor");
  m.def("patch_extract(Tensor(a!) out, Tensor volume, Tensor starts, int padding, float cval) -> ()");
  m.def("dense_bn_relu(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "dense_bn_relu_backward_(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias,"
      " Tensor(a!) grad_x) -> (Tensor, Tensor)");
  m.def("dense_bn_correction_(Tensor(a!) grad_x, Tensor x, Tensor mean, Tensor a, Tensor b) -> ()");
  m.def("dense_dropout_(Tensor(a!) x, int seed, float p) -> ()");
}

#define DENSEFUSE_IMPL_LOSS_OPS(r, suffix)                                     \
  r.impl("overlap_stats", &densefuse::overlap_stats##suffix);                   \
  r.impl("overlap_stats_backward", &densefuse::overlap_stats_backward##suffix); \
  r.impl("focal_stats", &densefuse::focal_stats##suffix);                       \
  r.impl("focal_stats_backward", &densefuse::focal_stats_backward##suffix)

TORCH_LIBRARY_IMPL(densefuse_ext, CPU, m) {
  densefuse::Registrar r(m, "cpu");
  DENSEFUSE_IMPL_LOSS_OPS(r, );
  r.impl("patch_scatter", &densefuse::patch_scatter);
  r.impl("patch_gather", &densefuse::patch_gather);
  r.impl("patch_normalize", &densefuse::patch_normalize);
  r.impl("patch_finalize", &densefuse::patch_finalize);
  r.impl("patch_extract", &densefuse::patch_extract);
  r.impl("dense_bn_relu", &densefuse::dense_bn_relu);
  r.impl("dense_bn_relu_backward_", &densefuse::dense_bn_relu_backward_);
  r.impl("dense_bn_correction_", &densefuse::dense_bn_correction_);
  r.impl("dense_dropout_", &densefuse::dense_dropout_);
}

#ifdef DENSEFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(densefuse_ext, CUDA, m) {
  densefuse::Registrar r(m, "cuda");
  DENSEFUSE_IMPL_LOSS_OPS(r, );
  r.impl("patch_scatter", &densefuse::patch_scatter);
  r.impl("patch_gather", &densefuse::patch_gather);
  r.impl("patch_normalize", &densefuse::patch_normalize);
  r.impl("patch_finalize", &densefuse::patch_finalize);
  r.impl("patch_extract", &densefuse::patch_extract);
}
#endif

TORCH_LIBRARY_IMPL(densefuse_ext, Meta, m) {
  densefuse::Registrar r(m, "meta");
  DENSEFUSE_IMPL_LOSS_OPS(r, _meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "densefuse compiled kernels: registers the densefuse_ext:: ops";
  m.def("build_info", &densefuse::build_info,
        "What was compiled: cpu, cuda, openmp_threads, cuda_archs, cpu_isa, and ops: the densefuse_ext ops "
        "registered per dispatch key (cpu, cuda, meta)");
}
