// 2-D NHWC / HWIO float32 convolutions on the CPU through oneDNN, as XLA FFI handlers.
//
// Three handlers, one per pass of a convolution y = conv(x, w) (no dilation, no groups, no bias):
//   vcect_conv_forward         (x, w)  -> y
//   vcect_conv_backward_data   (dy, w) -> dx
//   vcect_conv_backward_weights(x, dy) -> dw
// with the attributes stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right. Activations stay in XLA's
// row-major NHWC layout (oneDNN's `nhwc`); the kernel is XLA's HWIO, reordered to and from the blocked layout
// oneDNN picks for the fastest implementation (`format_tag::any`: about 4x faster than the plain-layout GEMM path
// for the 3x3 layers of the U-Net at 256 px). Primitives are created once per shape and cached; execution uses a
// per-call scratchpad. Threads (see Run): each call splits its batch into one chunk per thread of XLA's intra-op
// pool and runs single-threaded primitives on the chunks, the calling thread taking chunks too, so convolutions
// share the cores with the rest of XLA's work (VCECT_ONEDNN_THREADS=omp: one call at a time on OpenMP threads).
// A fourth handler, vcect_channel_moments (a, b, shift) -> (sum(a), sum(a * (b - shift))), gives BatchNorm's
// per-channel sums in one vectorised pass (no oneDNN; see its section below).
// Python side: vcect_jax/cpu_kernels/__init__.py. Built by `python -m vcect_jax.cpu_kernels.build`.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

#if DNNL_VERSION_MAJOR >= 3
#error "vcect onednn_conv.cc is written against the oneDNN 2.x API (Debian 12's libdnnl-dev 2.6)"
#endif

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Shapes and attributes of one convolution; the cache key.
struct Geometry {
  int64_t n, c, h, w, o, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr;
  auto Tie() const { return std::tie(n, c, h, w, o, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr); }
  bool operator<(const Geometry& other) const { return Tie() < other.Tie(); }
};

enum class Pass { kForward, kBackwardData, kBackwardWeights };

struct Plan {
  dnnl::primitive conv;
  memory::desc weights_md;        // oneDNN's (blocked) kernel layout for this primitive
  memory::desc weights_user_md;   // the HWIO layout XLA holds
  memory::desc scratchpad_md;
  dnnl::reorder to_internal;      // HWIO -> blocked (forward, backward data)
  dnnl::reorder to_user;          // blocked -> HWIO (backward weights)
  bool reorder_weights = false;
};

memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w) {
  return memory::desc({n, c, h, w}, memory::data_type::f32, tag::nhwc);
}

std::unique_ptr<Plan> MakePlan(const Geometry& g, Pass pass) {
  dnnl::engine& engine = Engine();
  memory::desc src = Activations(g.n, g.c, g.h, g.w);
  memory::desc dst = Activations(g.n, g.o, g.oh, g.ow);
  memory::desc weights_any({g.o, g.c, g.kh, g.kw}, memory::data_type::f32, tag::any);
  memory::dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::desc forward(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                          src, weights_any, dst, strides, pad_l, pad_r);
  dnnl::convolution_forward::primitive_desc forward_pd(forward, attr, engine);
  auto plan = std::make_unique<Plan>();
  plan->weights_user_md = memory::desc({g.o, g.c, g.kh, g.kw}, memory::data_type::f32, tag::hwio);
  if (pass == Pass::kForward) {
    plan->conv = dnnl::convolution_forward(forward_pd);
    plan->weights_md = forward_pd.weights_desc();
    plan->scratchpad_md = forward_pd.scratchpad_desc();
  } else if (pass == Pass::kBackwardData) {
    dnnl::convolution_backward_data::desc desc(dnnl::algorithm::convolution_direct, src, weights_any, dst, strides,
                                               pad_l, pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(desc, attr, engine, forward_pd);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->weights_md = pd.weights_desc();
    plan->scratchpad_md = pd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::desc desc(dnnl::algorithm::convolution_direct, src, weights_any, dst,
                                                  strides, pad_l, pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(desc, attr, engine, forward_pd);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->weights_md = pd.diff_weights_desc();
    plan->scratchpad_md = pd.scratchpad_desc();
  }
  plan->reorder_weights = plan->weights_md != plan->weights_user_md;
  if (plan->reorder_weights) {
    if (pass == Pass::kBackwardWeights) {
      plan->to_user = dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->weights_md, engine,
                                                                  plan->weights_user_md));
    } else {
      plan->to_internal = dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->weights_user_md, engine,
                                                                      plan->weights_md));
    }
  }
  return plan;
}

// The primitive for a geometry, a pass and the number of OpenMP threads it runs on (made on first use; the caller
// has set this thread's OpenMP thread count to `threads`, which oneDNN reads when it makes the primitive).
const Plan& GetPlan(const Geometry& g, Pass pass, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, Geometry>, std::unique_ptr<Plan>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_tuple(static_cast<int>(pass), threads, g);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, MakePlan(g, pass)).first;
  return *it->second;
}

// The number of OpenMP threads oneDNN would use by default (read when the library is loaded, before any change).
const int kProcessThreads = omp_get_max_threads();

// How the calls use the cores, from VCECT_ONEDNN_THREADS (read per call, for A/B measurements):
//   "pool" (default): each call splits its batch into chunks run by single-threaded oneDNN primitives on XLA's own
//     intra-op thread pool (the FFI's ThreadPool context), the calling thread included, so that convolutions share
//     the cores with the rest of XLA's work instead of competing with it;
//   "omp": one oneDNN call at a time on its own OpenMP team (round 3's way); also what a call whose batch cannot be
//     split (one image, or a pool of one thread) runs.
bool PoolModeWanted() {
  const char* mode = std::getenv("VCECT_ONEDNN_THREADS");
  return !(mode && std::strcmp(mode, "omp") == 0);
}

// The largest divisor of n that is at most `target` (chunks of equal size share one primitive).
int64_t ChunkCount(int64_t n, int64_t target) {
  for (int64_t k = std::min(n, std::max<int64_t>(target, 1)); k > 1; --k)
    if (n % k == 0) return k;
  return 1;
}

// Runs work(0..k-1) on the calling thread and on up to k-1 tasks of XLA's thread pool; every thread takes the next
// unclaimed chunk, so the caller never waits for a pool thread that is busy elsewhere unless that thread has
// already claimed a chunk. A task that starts after all chunks are claimed returns at once (it holds only `state`).
void ParallelChunks(ffi::ThreadPool& pool, int64_t k, const std::function<void(int64_t)>& work) {
  if (k == 1) {
    work(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t total = 0, done = 0;
    const std::function<void(int64_t)>* work = nullptr;  // valid while chunks are unclaimed (the caller waits)
    std::mutex mutex;
    std::condition_variable finished;
    std::exception_ptr error;
  };
  auto state = std::make_shared<State>();
  state->total = k;
  state->work = &work;
  auto drain = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.total;) {
      std::exception_ptr error;
      try {
        (*s.work)(i);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(s.mutex);
      if (error && !s.error) s.error = error;
      if (++s.done == s.total) s.finished.notify_all();
    }
  };
  for (int64_t t = 1; t < k; ++t) pool.Schedule([state, drain] { drain(*state); });
  drain(*state);
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == state->total; });
  if (state->error) std::rethrow_exception(state->error);
}

// One chunk of images: executes `plan` on float offsets of the activations. `weights` is the (blocked) kernel
// for the forward and backward-data passes, or where the backward-weights pass writes its (blocked) gradient.
void Execute(const Plan& plan, const Geometry& c, Pass pass, float* a, float* b, const memory& weights, float* out) {
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  std::unique_ptr<uint8_t[]> scratch(new uint8_t[plan.scratchpad_md.get_size() + 1]);  // uninitialised
  memory scratchpad(plan.scratchpad_md, engine, scratch.get());
  const memory::desc src_md = Activations(c.n, c.c, c.h, c.w), dst_md = Activations(c.n, c.o, c.oh, c.ow);
  if (pass == Pass::kForward) {
    plan.conv.execute(stream, {{DNNL_ARG_SRC, memory(src_md, engine, a)},
                               {DNNL_ARG_WEIGHTS, weights},
                               {DNNL_ARG_DST, memory(dst_md, engine, out)},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (pass == Pass::kBackwardData) {
    plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, memory(dst_md, engine, a)},
                               {DNNL_ARG_WEIGHTS, weights},
                               {DNNL_ARG_DIFF_SRC, memory(src_md, engine, out)},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    plan.conv.execute(stream, {{DNNL_ARG_SRC, memory(src_md, engine, a)},
                               {DNNL_ARG_DIFF_DST, memory(dst_md, engine, b)},
                               {DNNL_ARG_DIFF_WEIGHTS, weights},
                               {DNNL_ARG_SCRATCHPAD, scratchpad}});
  }
  stream.wait();
}

// Runs one pass. `a` and `b` are the inputs, `out` the result, in the order of the handler's signature.
void Run(const Geometry& g, Pass pass, float* a, float* b, float* out, ffi::ThreadPool& pool) {
  // The largest number of equal chunks of the batch, at most one per thread of XLA's pool (two per thread measured
  // the same on the paper-size step); none when the pool is missing.
  const int64_t k = PoolModeWanted() ? ChunkCount(g.n, pool.num_threads()) : 1;
  const bool use_pool = k > 1;
  // "omp": one convolution at a time, on all cores. XLA CPU runs independent operations on several threads at once;
  // two oneDNN calls with a team each would oversubscribe the cores (measured in round 3: the paper-size training
  // step 4.3 s with this lock, 5.2-5.5 s without it).
  static std::mutex running;
  std::unique_lock<std::mutex> lock(running, std::defer_lock);
  const int threads = use_pool ? 1 : kProcessThreads;
  if (!use_pool) lock.lock();
  omp_set_num_threads(threads);  // this thread's OpenMP setting (primitives are made and run for it)
  Geometry c = g;
  c.n = g.n / k;
  const Plan& plan = GetPlan(c, pass, threads);
  dnnl::engine& engine = Engine();
  const int64_t src_chunk = c.n * c.h * c.w * c.c, dst_chunk = c.n * c.oh * c.ow * c.o;
  if (pass == Pass::kForward || pass == Pass::kBackwardData) {
    memory weights(plan.weights_user_md, engine, b);
    std::unique_ptr<uint8_t[]> blocked;
    if (plan.reorder_weights) {  // once, shared by the chunks
      blocked.reset(new uint8_t[plan.weights_md.get_size() + 1]);
      memory internal(plan.weights_md, engine, blocked.get());
      dnnl::stream stream(engine);
      plan.to_internal.execute(stream, weights, internal);
      stream.wait();
      weights = internal;
    }
    const int64_t in_chunk = pass == Pass::kForward ? src_chunk : dst_chunk;
    const int64_t out_chunk = pass == Pass::kForward ? dst_chunk : src_chunk;
    ParallelChunks(pool, k, [&](int64_t i) {
      omp_set_num_threads(threads);
      Execute(plan, c, pass, a + i * in_chunk, nullptr, weights, out + i * out_chunk);
    });
    return;
  }
  // Backward weights: each chunk's gradient in its own buffer (chunk 0's is the result when no reorder is needed),
  // summed, then reordered to HWIO.
  const size_t bytes = plan.weights_md.get_size();
  std::vector<std::unique_ptr<uint8_t[]>> buffers(k);
  std::vector<float*> grads(k);
  for (int64_t i = 0; i < k; ++i) {
    if (i == 0 && !plan.reorder_weights) {
      grads[i] = out;
    } else {
      buffers[i].reset(new uint8_t[bytes + 1]);
      grads[i] = reinterpret_cast<float*>(buffers[i].get());
    }
  }
  ParallelChunks(pool, k, [&](int64_t i) {
    omp_set_num_threads(threads);
    Execute(plan, c, pass, a + i * src_chunk, b + i * dst_chunk, memory(plan.weights_md, engine, grads[i]), nullptr);
  });
  const size_t count = bytes / sizeof(float);
  for (int64_t i = 1; i < k; ++i)
    for (size_t j = 0; j < count; ++j) grads[0][j] += grads[i][j];
  if (plan.reorder_weights) {
    dnnl::stream stream(engine);
    memory blocked(plan.weights_md, engine, grads[0]), user(plan.weights_user_md, engine, out);
    plan.to_user.execute(stream, blocked, user);
    stream.wait();
  }
}

struct Attrs {
  int64_t sh, sw, pt, pb, pl, pr;
};

// Checks the shapes XLA passed and fills the geometry; the Python side guarantees them, so a mismatch is a bug.
ffi::Error Describe(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                    const Attrs& at, Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4) {
    return ffi::Error::InvalidArgument("vcect oneDNN convolution: x, w and y must be 4-D (NHWC, HWIO, NHWC)");
  }
  *g = Geometry{x[0], x[3], x[1], x[2], w[3], w[0], w[1], y[1], y[2], at.sh, at.sw, at.pt, at.pb, at.pl, at.pr};
  bool ok = w[2] == x[3] && y[0] == x[0] && y[3] == w[3] && at.sh > 0 && at.sw > 0 &&
            (x[1] + at.pt + at.pb - w[0]) / at.sh + 1 == y[1] && (x[2] + at.pl + at.pr - w[1]) / at.sw + 1 == y[2];
  if (!ok) return ffi::Error::InvalidArgument("vcect oneDNN convolution: inconsistent shapes or attributes");
  return ffi::Error::Success();
}

template <typename F>
ffi::Error Guard(F&& f) {
  try {
    f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                   int64_t pr) {
  Geometry g;
  if (auto e = Describe(x.dimensions(), w.dimensions(), y->dimensions(), {sh, sw, pt, pb, pl, pr}, &g); e.failure())
    return e;
  return Guard([&] { Run(g, Pass::kForward, x.typed_data(), w.typed_data(), y->typed_data(), pool); });
}

ffi::Error BackwardData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                        int64_t pl, int64_t pr) {
  Geometry g;
  if (auto e = Describe(dx->dimensions(), w.dimensions(), dy.dimensions(), {sh, sw, pt, pb, pl, pr}, &g);
      e.failure())
    return e;
  return Guard([&] { Run(g, Pass::kBackwardData, dy.typed_data(), w.typed_data(), dx->typed_data(), pool); });
}

ffi::Error BackwardWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                           int64_t pl, int64_t pr) {
  Geometry g;
  if (auto e = Describe(x.dimensions(), dw->dimensions(), dy.dimensions(), {sh, sw, pt, pb, pl, pr}, &g);
      e.failure())
    return e;
  return Guard([&] { Run(g, Pass::kBackwardWeights, x.typed_data(), dy.typed_data(), dw->typed_data(), pool); });
}

// ------------------------------------------------------------------------------------------- channel moments
// BatchNorm's per-channel sums over every row of a row-major (rows, C) float32 array: sum(a) and sum(a * (b - s)),
// where s is a per-channel shift (the forward pass: a = b = x, s = 0; the backward pass: a = the cotangent, b = x,
// s = the batch mean). XLA CPU lowers such a reduction to a reduce-window of scalar code plus a separate pass for
// the product (~0.55 s of the paper-size step's thread time); this is one vectorised pass over the rows, split
// over XLA's pool like the convolutions. Each thread sums blocks of rows in float and the blocks in double.
void MomentsChunk(const float* a, const float* b, const float* s, int64_t rows, int64_t channels, double* sum_a,
                  double* sum_ab) {
  constexpr int64_t kBlock = 256;
  std::vector<float> block_a(channels), block_ab(channels), shift(s, s + channels);
  for (int64_t start = 0; start < rows; start += kBlock) {
    std::fill(block_a.begin(), block_a.end(), 0.0f);
    std::fill(block_ab.begin(), block_ab.end(), 0.0f);
    float* __restrict acc_a = block_a.data();
    float* __restrict acc_ab = block_ab.data();
    const float* __restrict sh = shift.data();
    const int64_t end = std::min(rows, start + kBlock);
    for (int64_t r = start; r < end; ++r) {
      const float* __restrict ra = a + r * channels;
      const float* __restrict rb = b + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        acc_a[c] += ra[c];
        acc_ab[c] += ra[c] * (rb[c] - sh[c]);
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      sum_a[c] += acc_a[c];
      sum_ab[c] += acc_ab[c];
    }
  }
}

ffi::Error Moments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> sum_a, ffi::ResultBuffer<ffi::F32> sum_ab) {
  const auto dims = a.dimensions();
  if (dims.size() == 0 || b.dimensions().size() != dims.size() || shift.element_count() != dims.back() ||
      sum_a->element_count() != dims.back() || sum_ab->element_count() != dims.back())
    return ffi::Error::InvalidArgument("vcect channel moments: a and b (..., C) of one shape, shift and sums (C,)");
  for (size_t i = 0; i < dims.size(); ++i)
    if (b.dimensions()[i] != dims[i]) return ffi::Error::InvalidArgument("vcect channel moments: a and b differ");
  const int64_t channels = dims.back(), rows = channels ? a.element_count() / channels : 0;
  // Chunks of at least 4096 rows, at most one per pool thread.
  const int64_t k = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), rows / 4096));
  std::vector<std::vector<double>> partial(k, std::vector<double>(2 * channels, 0.0));
  const int64_t per = (rows + k - 1) / k;
  return Guard([&] {
    ParallelChunks(pool, k, [&](int64_t i) {
      const int64_t start = i * per, end = std::min(rows, start + per);
      if (end > start)
        MomentsChunk(a.typed_data() + start * channels, b.typed_data() + start * channels, shift.typed_data(),
                     end - start, channels, partial[i].data(), partial[i].data() + channels);
    });
    for (int64_t c = 0; c < channels; ++c) {
      double total_a = 0.0, total_ab = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        total_a += partial[i][c];
        total_ab += partial[i][channels + c];
      }
      sum_a->typed_data()[c] = static_cast<float>(total_a);
      sum_ab->typed_data()[c] = static_cast<float>(total_ab);
    }
  });
}

}  // namespace

// The three handlers' common signature: two float32 buffers in, one out, then the six attributes.
#define VCECT_CONV_BINDING                                                                               \
  ffi::Ffi::Bind()                                                                                       \
      .Ctx<ffi::ThreadPool>()                                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                      \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                      \
      .Attr<int64_t>("stride_h")                                                                         \
      .Attr<int64_t>("stride_w")                                                                         \
      .Attr<int64_t>("pad_top")                                                                          \
      .Attr<int64_t>("pad_bottom")                                                                       \
      .Attr<int64_t>("pad_left")                                                                         \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(VcectConvForward, Forward, VCECT_CONV_BINDING);  // (x, w) -> y
XLA_FFI_DEFINE_HANDLER_SYMBOL(VcectConvBackwardData, BackwardData, VCECT_CONV_BINDING);  // (dy, w) -> dx
XLA_FFI_DEFINE_HANDLER_SYMBOL(VcectConvBackwardWeights, BackwardWeights, VCECT_CONV_BINDING);  // (x, dy) -> dw

// (a, b, shift) -> (sum(a), sum(a * (b - shift))) over all but the last axis.
XLA_FFI_DEFINE_HANDLER_SYMBOL(VcectChannelMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
