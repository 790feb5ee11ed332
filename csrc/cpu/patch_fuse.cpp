// CPU patch-fusion kernels (semantics: densefuse/reference.py; layout: patch_fuse_args.h).
//
// Scatter and gather. Work item = one band of rows y of one (batch, z) plane of acc (a plane is one
// band unless there are too few planes to keep every thread busy). A CSR index lists, per plane, the
// placed windows that cross it, in window order. The thread that owns an item adds, for each of those
// windows, each channel and each of the window's rows inside the band, one x run:
//     out[x] += max((wz[i] * wy[j]) * wx[k], floor) * v[n, c, i, j, k]        (one SIMD loop)
// marking in an OR of bits whether a product is not finite; an item so marked counts its non-finite v. No
// two threads write the same voxel and each voxel gets its windows in index order (the order of
// reference.patch_scatter), so the result does not depend on the thread count and needs no atomics:
// the scatter is deterministic too, and as fast as the gather or faster. The gather adds the
// windows of an item into a zeroed scratch box (their union) and then adds the box into acc, as
// reference.patch_gather. An item's part of acc (H * W values per channel for a plane) stays in L2
// while its windows stream through it once.
//
// Finalise. Work item = a run of (z, y) rows. Per row the normaliser N[x] is computed once and reused
// for every (batch, channel): floor == 0: N = (Sz[z] * Sy[y]) * Sx[x] from three 1-D sums (never a
// volume-sized map); floor > 0: the clamped weights of the covering grid windows summed in grid order
// (a, b, c) from per-axis lists of covering starts, exactly as reference.fusion_normalizer. Then
// v = acc / N (0 where N < the smallest normal T), the activation, and the output row.
//
// Extract. Work item = one row (c, i, j) of every window of the call, window after window, so that
// overlapping windows read a volume row while it is in L1. Per window and axis the source index of
// every window position is computed once (-1: constant padding); a row then copies its inside run
// with one vector loop (x stride 1) or a strided loop, and fills or gathers the few padded values on
// either side. Values are only moved, never computed: the kernel works on the
// element size alone, and out is bit-exact whatever the dtype.
//
// The entry points of both (scatter_item, finalize_rows) are compiled once per x86-64 level and picked
// at load time, as the loss kernels; everything they call in their loops is inlined (DF_INLINE).
#include "cpu/patch_fuse.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu/cpu_dispatch.h"  // DF_CLONES, DF_INLINE
#include "patch_math.h"

namespace densefuse::cpu {
namespace {

using patch::AxisClip;

constexpr int64_t kItemsPerThread = 4;      // scatter: split planes into row bands below this many items
constexpr int64_t kScatterGrain = 16384;    // scatter, gather: values moved per thread at least (PlaneIndex)
constexpr int64_t kExtractGrain = 32768;    // extract: values copied per chunk at least
constexpr int64_t kRowGrain = 16384;        // finalise: voxels (rows x batch x channels) per chunk at least

// --------------------------------------------------------------------------------- dispatch helpers
template <class T>
struct Tag {
  using type = T;
};

template <class F>
void visit_acc(DType dtype, F&& f) {
  if (dtype == DType::Float64) {
    f(Tag<double>{});
  } else {
    f(Tag<float>{});
  }
}

template <class F>
void visit_window(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16: return f(Tag<c10::Half>{});
    case DType::BFloat16: return f(Tag<c10::BFloat16>{});
    case DType::Float32: return f(Tag<float>{});
    case DType::Float64: return f(Tag<double>{});
    default: TORCH_CHECK(false, "windows: expected a float16/bfloat16/float32/float64 tensor");
  }
}

// The type a window value is tested for NaN/Inf in, before any rounding to acc's dtype.
template <class S>
using Wide = std::conditional_t<std::is_same_v<S, double>, double, float>;

// fn(item, scratch) for every item in [0, splits.back()), worker w taking the contiguous run
// [splits[w], splits[w + 1]) with its own Scratch. A worker (an OpenMP thread, which the OS tends to
// keep on one core) takes the same run from call to call: a shared counter of next items moved acc
// planes between the threads from batch to batch, several times slower on a VM whose cores share no
// cache. The price: a preempted thread now delays the call. One worker runs in the calling thread
// (waking a pool thread costs more than a small call).
template <class Scratch, class Fn>
void parallel_runs(const std::vector<int64_t>& splits, Fn&& fn) {
  const int64_t workers = static_cast<int64_t>(splits.size()) - 1;
  if (workers <= 1) {
    Scratch scratch;
    for (int64_t item = 0; item < splits.back(); ++item) fn(item, scratch);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    Scratch scratch;
    for (int64_t item = splits[w0]; item < splits[w1]; ++item) fn(item, scratch);
  });
}

// ----------------------------------------------------------------------------------------- scatter
template <class S>
DF_INLINE int64_t count_nonfinite(const S* v, int64_t n) {
  int64_t bad = 0;
  for (int64_t k = 0; k < n; ++k) bad += math::nonfinite(static_cast<Wide<S>>(v[k]));
  return bad;
}

// The bits of a T: (bits & exponent) + low has its top bit set exactly when the exponent field is
// all ones, i.e. when the value is NaN or +-Inf.
template <class T>
struct FloatBits {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static constexpr Bits exponent = sizeof(T) == 8 ? Bits(0x7ff0000000000000ULL) : Bits(0x7f800000u);
  static constexpr Bits low = sizeof(T) == 8 ? Bits(0x0010000000000000ULL) : Bits(0x00800000u);
  static constexpr Bits top = Bits(1) << (8 * sizeof(T) - 1);
};

// out[k] += w_k * v[k] for k < n, w_k = max(pzy * wx[k], floor) (no clamp unless CLAMP), the product
// rounded before the add as in reference.patch_scatter (setup.py turns off contraction into
// multiply-adds). `seen` gets its top bit set where a product is not finite, which any non-finite
// v[k] makes it: the loop's only reduction is an OR, and the caller tests `seen` once per work item.
template <bool CLAMP, class T, class S>
DF_INLINE void add_row(T* out, const S* v, const T* wx, T pzy, T floor, int64_t n, typename FloatBits<T>::Bits& seen) {
  using F = FloatBits<T>;
  typename F::Bits marks = 0;
#pragma omp simd reduction(| : marks)
  for (int64_t k = 0; k < n; ++k) {
    const T product = patch::weight<CLAMP>(pzy, wx[k], floor) * static_cast<T>(v[k]);
    out[k] += product;
    marks |= (bit_cast<typename F::Bits>(product) & F::exponent) + F::low;
  }
  seen |= marks;
}

struct Placed {
  int64_t n;  // window index
  patch::Placement at;
};

// The placed windows of a call and, per (batch, z) plane of acc, the ones that cross it (CSR, in
// window order); the work items are (busy plane, band of rows), split into contiguous runs of about
// equal work (window values added) for `threads` threads (at most one per kScatterGrain values moved:
// the window values added and, for the gather, its scratch boxes, counted as whole planes).
struct PlaneIndex {
  std::vector<Placed> windows;
  std::vector<int64_t> begin;    // [B * D + 1]: members[begin[p] .. begin[p + 1]) cross plane p
  std::vector<int64_t> members;  // indices into windows
  std::vector<int64_t> busy;     // planes with at least one window
  int64_t skipped = 0;
  int64_t threads = 1, bands = 1, band_rows = 0;

  PlaneIndex(const PatchScatterArgs& a, bool gather) : begin(a.batch * a.size[0] + 1, 0) {
    const int64_t depth = a.size[0];
    for (int64_t n = 0; n < a.count; ++n) {
      const patch::Placement at = patch::place_window(a.starts + 4 * n, a.roi, a.batch, a.size);
      if (at.placed) {
        windows.push_back({n, at});
      } else {
        ++skipped;
      }
    }
    for (const Placed& w : windows) {
      for (int64_t z = w.at.axis[0].lo; z < w.at.axis[0].hi; ++z) ++begin[w.at.batch * depth + z + 1];
    }
    std::partial_sum(begin.begin(), begin.end(), begin.begin());
    members.resize(begin.back());
    std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);
    for (int64_t k = 0; k < static_cast<int64_t>(windows.size()); ++k) {
      const patch::Placement& at = windows[k].at;
      for (int64_t z = at.axis[0].lo; z < at.axis[0].hi; ++z) members[cursor[at.batch * depth + z]++] = k;
    }
    for (int64_t p = 0; p + 1 < static_cast<int64_t>(begin.size()); ++p) {
      if (begin[p + 1] > begin[p]) busy.push_back(p);
    }
    int64_t values = 0;  // window values inside acc, all windows and channels
    for (const Placed& w : windows) {
      int64_t inside = a.channels;
      for (const AxisClip& clip : w.at.axis) inside *= clip.hi - clip.lo;
      values += inside;
    }
    if (gather) values += static_cast<int64_t>(busy.size()) * a.channels * a.size[1] * a.size[2];
    threads = std::clamp<int64_t>(values / kScatterGrain, 1, at::get_num_threads());
    const int64_t height = a.size[1];
    const int64_t wanted = threads > 1 ? kItemsPerThread * threads : 1;
    const int64_t planes = std::max<int64_t>(static_cast<int64_t>(busy.size()), 1);
    bands = std::min<int64_t>(height, (wanted + planes - 1) / planes);
    band_rows = (height + bands - 1) / bands;
    bands = (height + band_rows - 1) / band_rows;
    split_work(a.channels);
  }

  int64_t items() const { return static_cast<int64_t>(busy.size()) * bands; }

  std::vector<int64_t> splits;  // [workers + 1]: worker w takes items [splits[w], splits[w + 1])

 private:
  // splits at about equal shares of the window values each item adds (its windows' rows in the band
  // times their columns inside acc), so that a batch whose planes differ in window count is balanced.
  void split_work(int64_t channels) {
    const int64_t workers = std::min<int64_t>(threads, items());
    if (workers <= 1) {
      splits = {0, items()};
      return;
    }
    std::vector<int64_t> done(items() + 1, 0);  // done[i]: values added by items [0, i)
    for (int64_t item = 0; item < items(); ++item) {
      const int64_t plane = busy[item / bands];
      const int64_t lo = (item % bands) * band_rows, hi = lo + band_rows;
      int64_t values = 0;
      for (int64_t m = begin[plane]; m < begin[plane + 1]; ++m) {
        const AxisClip* axis = windows[members[m]].at.axis;
        const int64_t rows = std::min(axis[1].hi, hi) - std::max(axis[1].lo, lo);
        values += std::max<int64_t>(rows, 0) * (axis[2].hi - axis[2].lo) * channels;
      }
      done[item + 1] = done[item] + values;
    }
    splits.assign(1, 0);
    for (int64_t w = 1; w < workers; ++w) {  // the item boundary nearest to w / workers of the work
      const int64_t share = done.back() / workers * w + done.back() % workers * w / workers;
      int64_t at = std::lower_bound(done.begin() + splits.back(), done.end(), share) - done.begin();
      if (at > splits.back() && share - done[at - 1] < done[at] - share) --at;
      splits.push_back(at);
    }
    splits.push_back(items());
  }
};

// A box of acc rows [y0, y1) x columns [x0, x1) inside one (batch, z) plane, for every channel.
struct Box {
  int64_t y0, y1, x0, x1;
};

template <class T, class S>
class Scatter {
 public:
  Scatter(const PatchScatterArgs& a, const PlaneIndex& index)
      : a_(a),
        index_(index),
        wz_(static_cast<const T*>(a.weights[0])),
        wy_(static_cast<const T*>(a.weights[1])),
        wx_(static_cast<const T*>(a.weights[2])),
        floor_(static_cast<T>(a.floor)),
        acc_(static_cast<T*>(a.acc)),
        windows_(static_cast<const S*>(a.windows)),
        volume_(a.size[0] * a.size[1] * a.size[2]) {}

  // Adds the windows of `item` straight into acc (scatter) or through a zeroed scratch box (gather);
  // returns the number of non-finite window values added.
  DF_INLINE int64_t run(int64_t item, bool gather, std::vector<T>& scratch) const {
    const int64_t plane = index_.busy[item / index_.bands];
    const int64_t band_lo = (item % index_.bands) * index_.band_rows;
    const int64_t band_hi = std::min(band_lo + index_.band_rows, a_.size[1]);
    const int64_t b = plane / a_.size[0], z = plane % a_.size[0];
    const int64_t height = a_.size[1], width = a_.size[2];
    T* acc_plane = acc_ + (b * a_.channels * a_.size[0] + z) * height * width;  // channel stride volume_
    Box box{band_hi, band_lo, width, 0};  // the union of the windows' parts in the band
    for (int64_t m = index_.begin[plane]; m < index_.begin[plane + 1]; ++m) {
      const patch::Placement& at = index_.windows[index_.members[m]].at;
      if (at.axis[1].hi <= band_lo || at.axis[1].lo >= band_hi) continue;  // not in this band
      box = {std::min(box.y0, std::max(at.axis[1].lo, band_lo)), std::max(box.y1, std::min(at.axis[1].hi, band_hi)),
             std::min(box.x0, at.axis[2].lo), std::max(box.x1, at.axis[2].hi)};
    }
    if (box.y0 >= box.y1) return 0;  // no window reaches this band
    if (!gather) return add_windows(plane, z, band_lo, band_hi, acc_plane, volume_, width, Box{0, 0, 0, 0});
    const int64_t rows = box.y1 - box.y0, cols = box.x1 - box.x0;
    scratch.assign(a_.channels * rows * cols, T(0));
    const int64_t bad = add_windows(plane, z, band_lo, band_hi, scratch.data(), rows * cols, cols, box);
    for (int64_t c = 0; c < a_.channels; ++c) {
      for (int64_t y = 0; y < rows; ++y) {
        T* out = acc_plane + c * volume_ + (box.y0 + y) * width + box.x0;
        const T* in = scratch.data() + (c * rows + y) * cols;
#pragma omp simd
        for (int64_t x = 0; x < cols; ++x) out[x] += in[x];
      }
    }
    return bad;
  }

 private:
  // dst[c * ld_c + (y - origin.y0) * ld_y + (x - origin.x0)] += w * v for each window crossing
  // `plane` (in window order), each channel and each of its rows y in [band_lo, band_hi); returns the
  // number of non-finite window values, counted again only where a product was not finite.
  DF_INLINE int64_t add_windows(int64_t plane, int64_t z, int64_t band_lo, int64_t band_hi, T* dst, int64_t ld_c,
                                int64_t ld_y, Box origin) const {
    const bool clamp = a_.floor > 0;
    typename FloatBits<T>::Bits seen = 0;
    for_each_row(plane, z, band_lo, band_hi,
                 [&](int64_t c, int64_t y, int64_t x_lo, const S* v, const T* wx, T pzy, int64_t nx)
                     DF_ALWAYS_INLINE {
                       T* row = dst + c * ld_c + (y - origin.y0) * ld_y + (x_lo - origin.x0);
                       if (clamp) {
                         add_row<true>(row, v, wx, pzy, floor_, nx, seen);
                       } else {
                         add_row<false>(row, v, wx, pzy, floor_, nx, seen);
                       }
                     });
    if (!(seen & FloatBits<T>::top)) return 0;
    int64_t bad = 0;
    for_each_row(plane, z, band_lo, band_hi,
                 [&](int64_t, int64_t, int64_t, const S* v, const T*, T, int64_t nx)
                     DF_ALWAYS_INLINE { bad += count_nonfinite(v, nx); });
    return bad;
  }

  // row(c, y, x_lo, v, wx, pzy, nx) for each window crossing `plane` (in window order), each channel
  // and each of the window's rows y in [band_lo, band_hi): its values v[0, nx) land on acc columns
  // [x_lo, x_lo + nx) with the x weights wx[0, nx) and pzy = wz[i] * wy[j].
  template <class Row>
  DF_INLINE void for_each_row(int64_t plane, int64_t z, int64_t band_lo, int64_t band_hi, Row&& row) const {
    const int64_t rz = a_.roi[0], ry = a_.roi[1], rx = a_.roi[2];
    for (int64_t m = index_.begin[plane]; m < index_.begin[plane + 1]; ++m) {
      const Placed& w = index_.windows[index_.members[m]];
      const AxisClip& ys = w.at.axis[1];
      const AxisClip& xs = w.at.axis[2];
      const int64_t y_lo = std::max(ys.lo, band_lo), y_hi = std::min(ys.hi, band_hi);
      const int64_t i = z - w.at.axis[0].start, nx = xs.hi - xs.lo;
      const T* wx = wx_ + xs.offset();
      for (int64_t c = 0; c < a_.channels; ++c) {
        const S* src = windows_ + ((w.n * a_.channels + c) * rz + i) * ry * rx + xs.offset();
        for (int64_t y = y_lo; y < y_hi; ++y) {
          const int64_t j = y - ys.start;
          row(c, y, xs.lo, src + j * rx, wx, wz_[i] * wy_[j], nx);
        }
      }
    }
  }

  const PatchScatterArgs& a_;
  const PlaneIndex& index_;
  const T *wz_, *wy_, *wx_;
  const T floor_;
  T* acc_;
  const S* windows_;
  const int64_t volume_;  // D * H * W: the channel stride of acc
};

template <class T, class S>
DF_CLONES int64_t scatter_item(const Scatter<T, S>& kernel, int64_t item, bool gather, std::vector<T>* scratch) {
  return kernel.run(item, gather, *scratch);
}

void scatter(const PatchScatterArgs& a, bool gather, int64_t* flags) {
  const PlaneIndex index(a, gather);
  std::atomic<int64_t> bad{0};
  visit_acc(a.acc_dtype, [&](auto acc_tag) {
    using T = typename decltype(acc_tag)::type;
    visit_window(a.windows_dtype, [&](auto window_tag) {
      const Scatter<T, typename decltype(window_tag)::type> kernel(a, index);
      parallel_runs<std::vector<T>>(index.splits, [&](int64_t item, std::vector<T>& scratch) {
        const int64_t found = scatter_item(kernel, item, gather, &scratch);
        if (found) bad += found;
      });
    });
  });
  flags[0] = bad;
  flags[1] = index.skipped;
}

// -------------------------------------------------------------------------------------- normaliser
// Per coordinate of one axis, the window indices (coordinate - start) of the starts whose window
// covers it, in the order of the starts (CSR over the coordinates).
struct AxisCover {
  std::vector<int64_t> begin, index;

  AxisCover() = default;
  AxisCover(const int64_t* starts, int64_t count, int64_t length, int64_t size) : begin(size + 1, 0) {
    for (int64_t s = 0; s < count; ++s) {
      const AxisClip clip = patch::clip_axis(starts[s], length, size);
      for (int64_t v = clip.lo; v < clip.hi; ++v) ++begin[v + 1];
    }
    std::partial_sum(begin.begin(), begin.end(), begin.begin());
    index.resize(begin.back());
    std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);
    for (int64_t s = 0; s < count; ++s) {
      const AxisClip clip = patch::clip_axis(starts[s], length, size);
      for (int64_t v = clip.lo; v < clip.hi; ++v) index[cursor[v]++] = v - starts[s];
    }
  }
};

// N(z, y, x) of reference.fusion_normalizer, one row (z, y) at a time. floor == 0: from the three
// axis sums; floor > 0: from the covering starts per axis (z and y lists, x clips).
template <class T>
class Normalizer {
 public:
  explicit Normalizer(const PatchFinalizeArgs& a)
      : a_(a),
        floor_(static_cast<T>(a.floor)),
        w_{static_cast<const T*>(a.weights[0]), static_cast<const T*>(a.weights[1]),
           static_cast<const T*>(a.weights[2])} {
    if (a.floor <= 0) {
      for (int d = 0; d < 3; ++d) sums_[d] = axis_sum(d);
      return;
    }
    cover_z_ = AxisCover(a.starts[0], a.grid[0], a.roi[0], a.size[0]);
    cover_y_ = AxisCover(a.starts[1], a.grid[1], a.roi[1], a.size[1]);
    for (int64_t s = 0; s < a.grid[2]; ++s) {
      const AxisClip clip = patch::clip_axis(a.starts[2][s], a.roi[2], a.size[2]);
      if (!clip.empty()) x_clips_.push_back(clip);
    }
  }

  // n[x] = N(z, y, x) for x in [0, W).
  DF_INLINE void row(int64_t z, int64_t y, T* n) const {
    const int64_t width = a_.size[2];
    if (a_.floor <= 0) {
      const T zy = sums_[0][z] * sums_[1][y];
      const T* sx = sums_[2].data();
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) n[x] = zy * sx[x];
      return;
    }
    std::fill(n, n + width, T(0));
    for (int64_t p = cover_z_.begin[z]; p < cover_z_.begin[z + 1]; ++p) {
      const T wz = w_[0][cover_z_.index[p]];
      for (int64_t q = cover_y_.begin[y]; q < cover_y_.begin[y + 1]; ++q) {
        const T pzy = wz * w_[1][cover_y_.index[q]];
        for (const AxisClip& clip : x_clips_) {
          const T* wx = w_[2] + clip.offset();
          T* out = n + clip.lo;
          const int64_t len = clip.hi - clip.lo;
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) out[k] += patch::weight<true>(pzy, wx[k], floor_);
        }
      }
    }
  }

 private:
  // reference.axis_normalizer: S[v] = sum over the starts s (in order) covering v of w[v - s].
  std::vector<T> axis_sum(int d) const {
    std::vector<T> sum(a_.size[d], T(0));
    for (int64_t s = 0; s < a_.grid[d]; ++s) {
      const AxisClip clip = patch::clip_axis(a_.starts[d][s], a_.roi[d], a_.size[d]);
      for (int64_t v = clip.lo; v < clip.hi; ++v) sum[v] += w_[d][v - clip.start];
    }
    return sum;
  }

  const PatchFinalizeArgs& a_;
  const T floor_;
  const T* w_[3];
  AxisCover cover_z_, cover_y_;    // floor > 0 only
  std::vector<AxisClip> x_clips_;  // floor > 0 only
  std::vector<T> sums_[3];         // floor == 0 only
};

// ------------------------------------------------------------------------------------------ finalise
template <class T>
DF_INLINE T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// Finalises rows (z, y) of every (batch, channel): the activation and output of PatchFinalizeArgs.
// "Covered" is n[x] >= the smallest normal T; every output is 0 elsewhere.
template <class T>
class Finalizer {
 public:
  Finalizer(const PatchFinalizeArgs& a, const Normalizer<T>& norm, void* out)
      : a_(a), norm_(norm), acc_(static_cast<const T*>(a.acc)), out_(out), volume_(a.size[0] * a.size[1] * a.size[2]) {}

  // Probabilities are divided straight into out (which may be acc) and activated there; masks go
  // through a [C, W] buffer of values.
  DF_INLINE void rows(int64_t r0, int64_t r1) const {
    const int64_t channels = a_.channels, height = a_.size[1], width = a_.size[2];
    const bool mask = a_.output == kOutMask;
    std::vector<T> n(width), values(mask ? channels * width : 0);
    for (int64_t r = r0; r < r1; ++r) {
      norm_.row(r / height, r % height, n.data());
      for (int64_t b = 0; b < a_.batch; ++b) {
        const int64_t offset = b * channels * volume_ + r * width;  // (b, 0, z, y, 0)
        T* probs = mask ? nullptr : static_cast<T*>(out_) + offset;
        for (int64_t c = 0; c < channels; ++c) {
          divide(acc_ + offset + c * volume_, n.data(), mask ? values.data() + c * width : probs + c * volume_);
        }
        if (!mask) {
          activate(probs, n.data());
        } else if (a_.activation == kActSoftmax) {
          argmax(values.data(), n.data(), static_cast<uint8_t*>(out_) + b * volume_ + r * width);
        } else {
          threshold(values.data(), n.data(), static_cast<uint8_t*>(out_) + offset);
        }
      }
    }
  }

 private:
  static DF_INLINE bool covered(T n) { return n >= std::numeric_limits<T>::min(); }

  // v[x] = acc[x] / n[x] where covered, else 0.
  DF_INLINE void divide(const T* acc, const T* n, T* v) const {
    const int64_t width = a_.size[2];
#pragma omp simd
    for (int64_t x = 0; x < width; ++x) {
      const T q = acc[x] / n[x];
      v[x] = covered(n[x]) ? q : T(0);
    }
  }

  // p (channel stride volume_) = act(p) in place where covered (sigmoid, or softmax over C).
  DF_INLINE void activate(T* p, const T* n) const {
    const int64_t channels = a_.channels, width = a_.size[2];
    if (a_.activation == kActSigmoid) {
      for (int64_t c = 0; c < channels; ++c) {
        T* pc = p + c * volume_;
        for (int64_t x = 0; x < width; ++x) pc[x] = covered(n[x]) ? sigmoid(pc[x]) : T(0);
      }
    } else if (a_.activation == kActSoftmax) {
      for (int64_t x = 0; x < width; ++x) {
        if (!covered(n[x])) continue;  // every channel is 0 already
        T max = p[x];
        for (int64_t c = 1; c < channels; ++c) max = p[c * volume_ + x] > max ? p[c * volume_ + x] : max;
        T sum = 0;
        for (int64_t c = 0; c < channels; ++c) {
          T& value = p[c * volume_ + x];
          value = std::exp(value - max);
          sum += value;
        }
        for (int64_t c = 0; c < channels; ++c) p[c * volume_ + x] /= sum;
      }
    }
  }

  // out[x] = the first class with the largest v (NaN counts as the largest, as in torch.argmax).
  DF_INLINE void argmax(const T* v, const T* n, uint8_t* out) const {
    const int64_t width = a_.size[2];
    for (int64_t x = 0; x < width; ++x) {
      T best = v[x];
      int64_t arg = 0;
      for (int64_t c = 1; c < a_.channels && best == best; ++c) {
        const T value = v[c * width + x];
        if (value > best || value != value) {
          best = value;
          arg = c;
        }
      }
      out[x] = covered(n[x]) ? static_cast<uint8_t>(arg) : uint8_t(0);
    }
  }

  // out (channel stride volume_) = [act(v) >= threshold], the threshold rounded to T as torch does.
  DF_INLINE void threshold(const T* v, const T* n, uint8_t* out) const {
    const int64_t width = a_.size[2];
    const T level = static_cast<T>(a_.threshold);
    const bool sig = a_.activation == kActSigmoid;
    for (int64_t c = 0; c < a_.channels; ++c) {
      const T* vc = v + c * width;
      uint8_t* oc = out + c * volume_;
      for (int64_t x = 0; x < width; ++x) oc[x] = covered(n[x]) && (sig ? sigmoid(vc[x]) : vc[x]) >= level;
    }
  }

  const PatchFinalizeArgs& a_;
  const Normalizer<T>& norm_;
  const T* acc_;
  void* out_;
  const int64_t volume_;
};

template <class T>
DF_CLONES void finalize_rows(const Finalizer<T>& finalizer, int64_t r0, int64_t r1) {
  finalizer.rows(r0, r1);
}

// ----------------------------------------------------------------------------------------- extract
// Per window n and axis d: map[d][n * roi[d] + i] = the source index of window position i along d
// (-1 for constant padding, and for every position of a window whose batch index is outside [0, B));
// along x also the inside run [lo, hi) whose positions read start + i, contiguous in the volume.
struct ExtractPlan {
  std::vector<int64_t> map[3];
  std::vector<AxisClip> runs;

  explicit ExtractPlan(const PatchExtractArgs& a) : runs(a.count) {
    for (int d = 0; d < 3; ++d) map[d].resize(a.count * a.roi[d]);
    for (int64_t n = 0; n < a.count; ++n) {
      const int64_t* s = a.starts + 4 * n;
      const bool in_batch = s[0] >= 0 && s[0] < a.batch;
      for (int d = 0; d < 3; ++d) {
        for (int64_t i = 0; i < a.roi[d]; ++i) {
          map[d][n * a.roi[d] + i] = in_batch ? patch::pad_index(s[d + 1], i, a.size[d], a.mode) : -1;
        }
      }
      runs[n] = in_batch ? patch::clip_axis(s[3], a.roi[2], a.size[2]) : AxisClip{s[3], 0, 0};
    }
  }
};

template <class E>  // E: an unsigned integer of the element size (values are only moved)
void extract(const PatchExtractArgs& a, const ExtractPlan& plan) {
  const int64_t rz = a.roi[0], ry = a.roi[1], rx = a.roi[2];
  const E* volume = static_cast<const E*>(a.volume);
  E* out = static_cast<E*>(a.out);
  const E cval = *static_cast<const E*>(a.cval);
  const int64_t* st = a.strides;
  // row j of plane i of channel c of window n
  const auto row = [&](int64_t n, int64_t c, int64_t i, int64_t j) DF_ALWAYS_INLINE {
    E* dst = out + (((n * a.channels + c) * rz + i) * ry + j) * rx;
    const int64_t zs = plan.map[0][n * rz + i], ys = plan.map[1][n * ry + j];
    if (zs < 0 || ys < 0) {  // constant padding (or a batch index outside [0, B))
      std::fill(dst, dst + rx, cval);
      return;
    }
    const int64_t* xs = plan.map[2].data() + n * rx;
    const AxisClip run = plan.runs[n];
    const E* src = volume + a.starts[4 * n] * st[0] + c * st[1] + zs * st[2] + ys * st[3];
    const int64_t lo = run.empty() ? rx : run.offset(), hi = run.empty() ? rx : run.hi - run.start;
    for (int64_t k = 0; k < lo; ++k) dst[k] = xs[k] < 0 ? cval : src[xs[k] * st[4]];
    if (st[4] == 1) {
      const E* from = src + run.lo;
      E* to = dst + lo;
#pragma omp simd
      for (int64_t k = 0; k < hi - lo; ++k) to[k] = from[k];
    } else {
      for (int64_t k = lo; k < hi; ++k) dst[k] = src[(run.start + k) * st[4]];
    }
    for (int64_t k = hi; k < rx; ++k) dst[k] = xs[k] < 0 ? cval : src[xs[k] * st[4]];
  };
  // Row by row, each row for every window in turn: windows of one batch that overlap (neighbours on
  // the grid) read the same volume row while it is in L1, instead of each fetching it again after a
  // whole window of other traffic. Contiguous runs of rows (c, i, j) per thread.
  const int64_t per_row = a.count * rx;
  at::parallel_for(0, a.channels * rz * ry, (kExtractGrain + per_row - 1) / per_row, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j = r % ry, i = (r / ry) % rz, c = r / (ry * rz);
      for (int64_t n = 0; n < a.count; ++n) row(n, c, i, j);
    }
  });
}

}  // namespace

void patch_extract(const PatchExtractArgs& args) {
  const ExtractPlan plan(args);
  switch (args.dtype) {
    case DType::Float16:
    case DType::BFloat16: return extract<uint16_t>(args, plan);
    case DType::Float32: return extract<uint32_t>(args, plan);
    case DType::Float64: return extract<uint64_t>(args, plan);
    default: TORCH_CHECK(false, "volume: expected a float16/bfloat16/float32/float64 tensor");
  }
}

void patch_scatter(const PatchScatterArgs& args, int64_t* flags) { scatter(args, false, flags); }

void patch_gather(const PatchScatterArgs& args, int64_t* flags) { scatter(args, true, flags); }

void patch_finalize(const PatchFinalizeArgs& args, void* out) {
  visit_acc(args.acc_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Normalizer<T> norm(args);
    const Finalizer<T> finalizer(args, norm, out);
    const int64_t rows = args.size[0] * args.size[1];
    const int64_t per_row = args.batch * args.channels * args.size[2];
    at::parallel_for(0, rows, std::max<int64_t>(1, kRowGrain / per_row),
                     [&](int64_t r0, int64_t r1) { finalize_rows(finalizer, r0, r1); });
  });
}

}  // namespace densefuse::cpu
