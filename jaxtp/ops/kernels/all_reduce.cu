// One-shot all-reduce over NVLink for small tensors (decode activations), as an XLA FFI call.
//
// Why: XLA's NCCL all-reduce costs tens of microseconds per call even for 8 KB, and a
// tensor-parallel decode step makes two per layer (docs/performance.md). Here every GPU of a group *pushes* its input straight into a
// receive buffer on each peer (peer-to-peer stores over NVLink), raises a flag there, waits for
// the peers' flags, and sums the slots in rank order: one kernel, one NVLink round trip. Every
// rank adds the same values in the same order, so all ranks get bitwise-identical results (the
// replicated activations after a row-parallel layer must be identical on every device).
//
// State (allocated once by jaxtp_ar_init, per device): two receive buffers (used alternately, so
// a peer one call ahead never overwrites a slot still being read), per-block flags written by
// peers, and a per-block call counter. The counter lives in device memory, so a launch captured
// in a CUDA graph (XLA command buffers) stays correct when replayed.
//
// Single-process only: peers' buffers are reached through cudaDeviceEnablePeerAccess.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxDevices = 16;   // CUDA ordinals this process may register
constexpr int kMaxRanks = 8;      // GPUs in one all-reduce group
constexpr int kBlocks = 24;       // fixed grid: flags and counters are per block
constexpr int kThreads = 512;

struct Params {
  char* recv[kMaxRanks];          // each rank's receive area: [2 parities][ranks][max_bytes]
  uint32_t* flags[kMaxRanks];     // each rank's flags: [kBlocks][kMaxRanks]
  uint32_t* counter;              // this rank's [kBlocks] call counters
  int64_t max_bytes;
  int rank, ranks;
};

Params g_params[kMaxDevices];
bool g_ready[kMaxDevices] = {};
int g_group[kMaxDevices][kMaxRanks];  // the CUDA ordinals of each registered device's group
std::mutex g_mutex;
char g_error[512] = "";

__device__ __forceinline__ void store_release(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
template <> __device__ __forceinline__ float from_float(float x) { return x; }

// A 16-byte vector of T (8 bf16/f16 or 4 f32), accumulated in float.
template <typename T>
struct Vec {
  static constexpr int n = 16 / sizeof(T);
  static __device__ __forceinline__ void add(float* acc, uint4 v) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < n; ++i) acc[i] += to_float(e[i]);
  }
  static __device__ __forceinline__ void round(float* acc) {  // to T and back
#pragma unroll
    for (int i = 0; i < n; ++i) acc[i] = to_float(from_float<T>(acc[i]));
  }
  static __device__ __forceinline__ uint4 pack(const float* acc) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < n; ++i) e[i] = from_float<T>(acc[i]);
    return v;
  }
};

// A call's steps 1-3, shared by both kernels. The offset of this call's half of the receive
// buffers: calls alternate halves (see `signal_and_wait`).
__device__ __forceinline__ int64_t half_offset(const Params& p, uint32_t epoch) {
  return (epoch & 1) * p.ranks * p.max_bytes;
}

// 1. Vectors [lo, hi) of `in` into slot `rank` of every rank's receive buffer (mine included).
__device__ __forceinline__ void push(const Params& p, const uint4* in, int64_t lo, int64_t hi, int64_t half) {
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const uint4 v = in[i];
    for (int r = 0; r < p.ranks; ++r)
      reinterpret_cast<uint4*>(p.recv[r] + half + p.rank * p.max_bytes)[i] = v;
  }
}

// 2. After this block's pushes, raise its flag on every rank; 3. wait for every rank's flag for
// this block. A peer may already be one call ahead (epoch + 1), never two: it waits for our next
// flag, and our next call starts only after this one's blocks have all finished (stream order).
__device__ __forceinline__ void signal_and_wait(const Params& p, uint32_t epoch) {
  __syncthreads();
  if (threadIdx.x < p.ranks) {
    __threadfence_system();
    store_release(p.flags[threadIdx.x] + blockIdx.x * kMaxRanks + p.rank, epoch);
    const uint32_t* mine = p.flags[p.rank] + blockIdx.x * kMaxRanks + threadIdx.x;
    while (static_cast<int32_t>(load_acquire(mine) - epoch) < 0) {
    }
  }
  __syncthreads();
}

__device__ __forceinline__ uint32_t next_epoch(const Params& p) {
  __shared__ uint32_t epoch_shared;
  if (threadIdx.x == 0) epoch_shared = p.counter[blockIdx.x] + 1;
  __syncthreads();
  return epoch_shared;
}

// The sum over ranks, in rank order, of vector i of the slots (identical on every rank).
template <typename T>
__device__ __forceinline__ void sum_slots(const Params& p, const char* base, int64_t i, float* acc) {
  for (int r = 0; r < p.ranks; ++r)
    Vec<T>::add(acc, __ldcg(reinterpret_cast<const uint4*>(base + r * p.max_bytes) + i));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot(Params p, const uint4* in, uint4* out, int64_t vecs) {
  const uint32_t epoch = next_epoch(p);
  // This block's contiguous share of the vectors (the same split on every rank).
  const int64_t per = (vecs + gridDim.x - 1) / gridDim.x;
  const int64_t lo = blockIdx.x * per;
  const int64_t hi = lo + per < vecs ? lo + per : vecs;
  const int64_t half = half_offset(p, epoch);
  push(p, in, lo, hi, half);
  signal_and_wait(p, epoch);
  const char* base = p.recv[p.rank] + half;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {  // 4. sum my share
    float acc[Vec<T>::n] = {};
    sum_slots<T>(p, base, i, acc);
    out[i] = Vec<T>::pack(acc);
  }
  if (threadIdx.x == 0) p.counter[blockIdx.x] = epoch;
}

// The all-reduce fused with what follows it in a decoder layer (TensorRT-LLM and vLLM fuse the
// same): new_residual = residual + sum, normed = weight * rmsnorm(new_residual), for rows of
// `row_vecs` vectors. The input is exchanged by rows: block b pushes and then normalizes rows b,
// b + kBlocks, ..., so it needs only its own flags (a row is whole once its block's flags are
// up). Blocks without rows still count the call, keeping every block's epoch (and so the
// receive buffer half) the same as in one_shot. The roundings are the unfused model's: the sum
// to T, the residual add to T, the normalized row to T before the weight.
template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot_add_norm(Params p, const uint4* in,
    const uint4* residual, const uint4* weight, uint4* new_residual, uint4* normed, int64_t rows,
    int64_t row_vecs, float eps) {
  constexpr int n = Vec<T>::n;
  const uint32_t epoch = next_epoch(p);
  if (blockIdx.x >= rows) {
    if (threadIdx.x == 0) p.counter[blockIdx.x] = epoch;
    return;
  }
  const int64_t half = half_offset(p, epoch);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x)  // my rows, whole
    push(p, in, row * row_vecs, (row + 1) * row_vecs, half);
  signal_and_wait(p, epoch);
  const char* base = p.recv[p.rank] + half;
  __shared__ float partial[kThreads / 32];
  __shared__ float scale;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // 4. sum, add, normalize
    float sumsq = 0.f;
    for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) {
      const int64_t i = row * row_vecs + j;
      float acc[n] = {}, res[n] = {};
      sum_slots<T>(p, base, i, acc);
      Vec<T>::round(acc);
      Vec<T>::add(res, residual[i]);
#pragma unroll
      for (int e = 0; e < n; ++e) acc[e] += res[e];
      const uint4 x = Vec<T>::pack(acc);
      new_residual[i] = x;
      float xs[n] = {};
      Vec<T>::add(xs, x);
#pragma unroll
      for (int e = 0; e < n; ++e) sumsq += xs[e] * xs[e];
    }
    for (int o = 16; o > 0; o >>= 1) sumsq += __shfl_xor_sync(0xffffffff, sumsq, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sumsq;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
      scale = rsqrtf(total / static_cast<float>(row_vecs * n) + eps);
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) {
      const int64_t i = row * row_vecs + j;
      float xs[n] = {}, w[n] = {};
      Vec<T>::add(xs, new_residual[i]);  // this thread's own write: visible to it
      Vec<T>::add(w, weight[j]);
#pragma unroll
      for (int e = 0; e < n; ++e) xs[e] *= scale;
      Vec<T>::round(xs);
#pragma unroll
      for (int e = 0; e < n; ++e) xs[e] *= w[e];
      normed[i] = Vec<T>::pack(xs);
    }
    __syncthreads();  // `partial` and `scale` are reused by the next row
  }
  if (threadIdx.x == 0) p.counter[blockIdx.x] = epoch;
}

#define CHECK_CUDA(call)                                                                  \
  do {                                                                                    \
    cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      snprintf(g_error, sizeof(g_error), "%s failed: %s", #call, cudaGetErrorString(e_)); \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

}  // namespace

extern "C" {

// Message of the last failed jaxtp_ar_init.
const char* jaxtp_ar_error() { return g_error; }

// Register one all-reduce group: ordinals[r] is the CUDA ordinal of rank r of `ranks` GPUs.
// Allocates the buffers for inputs of up to max_bytes and enables peer access inside the group.
// Returns 0, or 1 with jaxtp_ar_error() saying why. A group registered before is reused; a
// device registered in a different group is refused (its buffers and counters belong to that
// group's programs).
int jaxtp_ar_init(const int* dev, int ranks, int64_t max_bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (ranks < 2 || ranks > kMaxRanks || max_bytes <= 0 || max_bytes % 16) {
    snprintf(g_error, sizeof(g_error), "bad arguments: ranks=%d (2..%d), max_bytes=%lld", ranks,
             kMaxRanks, static_cast<long long>(max_bytes));
    return 1;
  }
  int registered = 0;
  for (int r = 0; r < ranks; ++r) {
    if (dev[r] < 0 || dev[r] >= kMaxDevices) {
      snprintf(g_error, sizeof(g_error), "CUDA ordinal %d out of range", dev[r]);
      return 1;
    }
    if (!g_ready[dev[r]]) continue;
    // Already registered: only as this very group (same GPUs, same ranks) may it be reused.
    bool same = g_params[dev[r]].ranks == ranks && g_params[dev[r]].max_bytes == max_bytes &&
                g_params[dev[r]].rank == r;
    for (int q = 0; same && q < ranks; ++q) same = g_group[dev[r]][q] == dev[q];
    if (!same) {
      snprintf(g_error, sizeof(g_error), "GPU %d is already in another all-reduce group (a model "
               "loaded earlier in this process with another tp or device order)", dev[r]);
      return 1;
    }
    ++registered;
  }
  if (registered == ranks) return 0;
  for (int r = 0; r < ranks; ++r) {
    for (int q = 0; q < ranks; ++q) {
      if (q == r) continue;
      int can = 0;
      CHECK_CUDA(cudaDeviceCanAccessPeer(&can, dev[r], dev[q]));
      if (!can) {
        snprintf(g_error, sizeof(g_error), "GPU %d cannot access GPU %d (no peer-to-peer path)",
                 dev[r], dev[q]);
        return 1;
      }
    }
  }
  int previous = 0;
  CHECK_CUDA(cudaGetDevice(&previous));
  Params p = {};
  p.ranks = ranks;
  p.max_bytes = max_bytes;
  uint32_t* counters[kMaxRanks];
  for (int r = 0; r < ranks; ++r) {
    CHECK_CUDA(cudaSetDevice(dev[r]));
    for (int q = 0; q < ranks; ++q) {
      if (q == r) continue;
      cudaError_t e = cudaDeviceEnablePeerAccess(dev[q], 0);
      if (e == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // clear it
      } else {
        CHECK_CUDA(e);
      }
    }
    CHECK_CUDA(cudaMalloc(&p.recv[r], 2 * ranks * max_bytes));
    CHECK_CUDA(cudaMalloc(&p.flags[r], kBlocks * kMaxRanks * sizeof(uint32_t)));
    CHECK_CUDA(cudaMemset(p.flags[r], 0, kBlocks * kMaxRanks * sizeof(uint32_t)));
    CHECK_CUDA(cudaMalloc(&counters[r], kBlocks * sizeof(uint32_t)));
    CHECK_CUDA(cudaMemset(counters[r], 0, kBlocks * sizeof(uint32_t)));
    CHECK_CUDA(cudaDeviceSynchronize());
  }
  for (int r = 0; r < ranks; ++r) {
    g_params[dev[r]] = p;
    g_params[dev[r]].rank = r;
    g_params[dev[r]].counter = counters[r];
    for (int q = 0; q < ranks; ++q) g_group[dev[r]][q] = dev[q];
    g_ready[dev[r]] = true;
  }
  CHECK_CUDA(cudaSetDevice(previous));
  return 0;
}

}  // extern "C"

// The registered state of the GPU that holds `x`, or null.
static const Params* params_of(const void* x) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, x) != cudaSuccess || attr.device < 0 || attr.device >= kMaxDevices ||
      !g_ready[attr.device]) {
    cudaGetLastError();  // clear it
    return nullptr;
  }
  return &g_params[attr.device];
}

static ffi::Error unregistered() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "jaxtp all-reduce: this GPU was not registered (jaxtp.allreduce.setup)");
}

// Calls launch(T{}) for the element type T of `type`, then reports any launch error.
template <typename Launch>
static ffi::Error dispatch(ffi::DataType type, Launch launch) {
  switch (type) {
    case ffi::DataType::BF16: launch(__nv_bfloat16{}); break;
    case ffi::DataType::F16: launch(__half{}); break;
    case ffi::DataType::F32: launch(float{}); break;
    default:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "jaxtp all-reduce: dtype must be bfloat16, float16 or float32");
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return ffi::Error(ffi::ErrorCode::kInternal, cudaGetErrorString(e));
  return ffi::Error::Success();
}

static ffi::Error AllReduce(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  const Params* p = params_of(x.untyped_data());
  if (!p) return unregistered();
  const int64_t bytes = static_cast<int64_t>(x.size_bytes());
  if (bytes > p->max_bytes || bytes % 16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxtp all-reduce: input must be a multiple of 16 bytes and at most the "
                      "registered max_bytes");
  }
  auto in = static_cast<const uint4*>(x.untyped_data());
  auto out = static_cast<uint4*>(y->untyped_data());
  return dispatch(x.element_type(), [&](auto t) {
    one_shot<decltype(t)><<<kBlocks, kThreads, 0, stream>>>(*p, in, out, bytes / 16);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtpAllReduce, AllReduce,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

static ffi::Error AllReduceAddNorm(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                                   ffi::AnyBuffer weight, float eps, ffi::Result<ffi::AnyBuffer> new_residual,
                                   ffi::Result<ffi::AnyBuffer> normed) {
  const Params* p = params_of(x.untyped_data());
  if (!p) return unregistered();
  const int64_t bytes = static_cast<int64_t>(x.size_bytes());
  const int64_t row_bytes = static_cast<int64_t>(weight.size_bytes());
  if (bytes > p->max_bytes || row_bytes % 16 || bytes % row_bytes || residual.size_bytes() != x.size_bytes() ||
      residual.element_type() != x.element_type() || weight.element_type() != x.element_type()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxtp all-reduce + norm: input, residual [rows, d] and weight [d] must share "
                      "a dtype, d must fill whole 16-byte vectors, the input at most max_bytes");
  }
  auto in = static_cast<const uint4*>(x.untyped_data());
  auto res = static_cast<const uint4*>(residual.untyped_data());
  auto w = static_cast<const uint4*>(weight.untyped_data());
  auto out_res = static_cast<uint4*>(new_residual->untyped_data());
  auto out = static_cast<uint4*>(normed->untyped_data());
  return dispatch(x.element_type(), [&](auto t) {
    one_shot_add_norm<decltype(t)><<<kBlocks, kThreads, 0, stream>>>(
        *p, in, res, w, out_res, out, bytes / row_bytes, row_bytes / 16, eps);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtpAllReduceAddNorm, AllReduceAddNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
