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
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/loss_stats.h"
#include "loss_stats_args.h"

#ifdef DENSEFUSE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/loss_stats.h"
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
    TORCH_CHECK(!ignore_index.has_value(), "ignore_index: needs an integer label map target, got a float target");
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
}

#define DENSEFUSE_IMPL_OPS(m, suffix)                                                \
  m.impl("overlap_stats", &densefuse::overlap_stats##suffix);                        \
  m.impl("overlap_stats_backward", &densefuse::overlap_stats_backward##suffix);      \
  m.impl("focal_stats", &densefuse::focal_stats##suffix);                            \
  m.impl("focal_stats_backward", &densefuse::focal_stats_backward##suffix)

TORCH_LIBRARY_IMPL(densefuse_ext, CPU, m) { DENSEFUSE_IMPL_OPS(m, ); }

#ifdef DENSEFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(densefuse_ext, CUDA, m) { DENSEFUSE_IMPL_OPS(m, ); }
#endif

TORCH_LIBRARY_IMPL(densefuse_ext, Meta, m) { DENSEFUSE_IMPL_OPS(m, _meta); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "densefuse compiled kernels: registers the densefuse_ext:: ops";
  m.def("build_info", &densefuse::build_info, "What was compiled: cpu, cuda, openmp_threads, cuda_archs, cpu_isa");
}
