// The CUDA fusion kernels of csrc/cuda/patch_fuse.cu, run on the CPU one emulated thread after another
// (tests/test_cuda_emulated.py builds this with torch.utils.cpp_extension): a machine without a GPU
// checks the work of every thread (indexing, window placement and ownership, padding, the
// finaliser's arithmetic) against densefuse.reference, and every launch configuration against CUDA's
// limits. Not checked here: concurrency (an atomic is a plain add, one thread at a time), the sm_90
// vector atomics (a host build takes the scalar path), the warp reduction of the flags, the fp32
// atomics' flush of subnormals, speed.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <cstring>
#include <stdexcept>
#include <string>

// The CUDA built-ins the kernels use, for one thread at a time.
static dim3 blockIdx, threadIdx, gridDim;

template <class T>
T max(T a, T b) {
  return a < b ? b : a;
}
template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// kernel(args...) for every thread of every block of the grid, in order. A configuration that CUDA
// would refuse (grid.x in [1, 2^31 - 1], grid.y and grid.z in [1, 65535], 1 to 1024 threads) throws.
template <class Kernel>
auto emulated_launch(dim3 grid, unsigned threads, Kernel kernel) {
  return [=](auto... args) {
    if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535u || grid.z < 1 || grid.z > 65535u ||
        threads < 1 || threads > 1024) {
      throw std::invalid_argument("emulated launch: invalid configuration grid (" + std::to_string(grid.x) + ", " +
                                  std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), " +
                                  std::to_string(threads) + " threads");
    }
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          for (unsigned t = 0; t < threads; ++t) {
            threadIdx = dim3(t);
            kernel(args...);
          }
        }
      }
    }
  };
}

#define __launch_bounds__(...)
#define cudaMemsetAsync(ptr, value, bytes, stream) (std::memset(ptr, value, bytes), cudaSuccess)
#define cudaGetLastError() cudaSuccess
#define DENSEFUSE_CUDA_EMULATION 1
#define DF_LAUNCH(grid, threads, stream, ...) emulated_launch(grid, threads, __VA_ARGS__)

#include "cuda/patch_fuse.cu"

namespace {

using densefuse::DType;
using torch::Tensor;

DType code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "emulated launch failed"); }

// The arguments for acc [B, C, D, H, W] (contiguous CPU tensors; the tests pass valid ones).
template <class Args>
void fill_volume(Args& a, const Tensor& acc) {
  a.batch = acc.size(0);
  a.channels = acc.size(1);
  for (int d = 0; d < 3; ++d) a.size[d] = acc.size(d + 2);
}

// flags [2] after acc += windows (the scatter, or the gather), as densefuse_ext.patch_scatter.
Tensor scatter(Tensor acc, Tensor windows, Tensor starts, Tensor wz, Tensor wy, Tensor wx, double floor, bool gather) {
  densefuse::PatchScatterArgs a;
  fill_volume(a, acc);
  a.acc = acc.data_ptr();
  a.acc_dtype = code(acc);
  a.count = windows.size(0);
  a.windows = windows.data_ptr();
  a.windows_dtype = code(windows);
  a.starts = starts.data_ptr<int64_t>();
  const Tensor* vectors[3] = {&wz, &wy, &wx};
  for (int d = 0; d < 3; ++d) {
    a.roi[d] = windows.size(d + 2);
    a.weights[d] = vectors[d]->data_ptr();
  }
  a.floor = floor;
  Tensor flags = at::empty({2}, at::kLong);
  const auto launch = gather ? densefuse::cuda::launch_patch_gather : densefuse::cuda::launch_patch_scatter;
  check(launch(a, flags.data_ptr<int64_t>(), nullptr));
  return flags;
}

// out = act(acc / N) or a mask, as densefuse_ext.patch_finalize (out allocated by the caller; may be acc).
void finalize(Tensor acc, Tensor out, Tensor starts_z, Tensor starts_y, Tensor starts_x, Tensor wz, Tensor wy,
              Tensor wx, double floor, int64_t activation, int64_t output, double threshold) {
  densefuse::PatchFinalizeArgs a;
  fill_volume(a, acc);
  a.acc = acc.data_ptr();
  a.acc_dtype = code(acc);
  const Tensor* starts[3] = {&starts_z, &starts_y, &starts_x};
  const Tensor* vectors[3] = {&wz, &wy, &wx};
  for (int d = 0; d < 3; ++d) {
    a.starts[d] = starts[d]->data_ptr<int64_t>();
    a.grid[d] = starts[d]->numel();
    a.weights[d] = vectors[d]->data_ptr();
    a.roi[d] = vectors[d]->numel();
  }
  a.floor = floor;
  a.activation = static_cast<int32_t>(activation);
  a.output = static_cast<int32_t>(output);
  a.threshold = threshold;
  const Tensor scratch = at::empty({a.size[0] + a.size[1] + a.size[2]}, at::kLong);
  check(densefuse::cuda::launch_patch_finalize(a, out.data_ptr(), scratch.data_ptr<int64_t>(), nullptr));
}

// out = the windows of volume (any strides) at starts, as densefuse_ext.patch_extract.
void extract(Tensor out, Tensor volume, Tensor starts, int64_t padding, double cval) {
  densefuse::PatchExtractArgs a;
  fill_volume(a, volume);
  for (int d = 0; d < 5; ++d) a.strides[d] = volume.stride(d);
  for (int d = 0; d < 3; ++d) a.roi[d] = out.size(d + 2);
  a.volume = volume.data_ptr();
  a.dtype = code(volume);
  a.count = out.size(0);
  a.out = out.data_ptr();
  a.starts = starts.data_ptr<int64_t>();
  a.mode = static_cast<int32_t>(padding);
  const Tensor value = at::scalar_tensor(cval, volume.options());
  a.cval = value.data_ptr();
  check(densefuse::cuda::launch_patch_extract(a, nullptr));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scatter", &scatter);
  m.def("finalize", &finalize);
  m.def("extract", &extract);
}
