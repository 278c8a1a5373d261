// One-shot all-reduce over NVLink for small tensors (decode activations), as an XLA FFI call.
//
// Why: XLA's NCCL all-reduce costs 20-30 us per call even for 8 KB, and a tensor-parallel
// decode step makes two per layer. Here every GPU of a group *pushes* its input straight into a
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
  static __device__ __forceinline__ uint4 pack(const float* acc) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < n; ++i) e[i] = from_float<T>(acc[i]);
    return v;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot(Params p, const uint4* in, uint4* out, int64_t vecs) {
  __shared__ uint32_t epoch_shared;
  const int block = blockIdx.x;
  if (threadIdx.x == 0) epoch_shared = p.counter[block] + 1;
  __syncthreads();
  const uint32_t epoch = epoch_shared;
  const int64_t parity_offset = (epoch & 1) * p.ranks * p.max_bytes;

  // This block's contiguous share of the vectors (the same split on every rank).
  const int64_t per = (vecs + gridDim.x - 1) / gridDim.x;
  const int64_t lo = block * per;
  const int64_t hi = lo + per < vecs ? lo + per : vecs;

  // 1. Push my share into slot `rank` of every rank's receive buffer (mine included).
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const uint4 v = in[i];
    for (int r = 0; r < p.ranks; ++r) {
      uint4* slot = reinterpret_cast<uint4*>(p.recv[r] + parity_offset + p.rank * p.max_bytes);
      slot[i] = v;
    }
  }
  __syncthreads();

  // 2. Tell every rank this block's share has landed; 3. wait until every rank has said so.
  // A peer may already be one call ahead (epoch + 1), never two: it waits for our next flag.
  if (threadIdx.x < p.ranks) {
    __threadfence_system();
    store_release(p.flags[threadIdx.x] + block * kMaxRanks + p.rank, epoch);
    const uint32_t* mine = p.flags[p.rank] + block * kMaxRanks + threadIdx.x;
    while (static_cast<int32_t>(load_acquire(mine) - epoch) < 0) {
    }
  }
  __syncthreads();

  // 4. Sum the slots in rank order (identical on every rank).
  const char* base = p.recv[p.rank] + parity_offset;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    float acc[Vec<T>::n] = {};
    for (int r = 0; r < p.ranks; ++r)
      Vec<T>::add(acc, __ldcg(reinterpret_cast<const uint4*>(base + r * p.max_bytes) + i));
    out[i] = Vec<T>::pack(acc);
  }
  if (threadIdx.x == 0) p.counter[block] = epoch;
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

static ffi::Error AllReduce(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, x.untyped_data()) != cudaSuccess || attr.device < 0 ||
      attr.device >= kMaxDevices || !g_ready[attr.device]) {
    cudaGetLastError();
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jaxtp all-reduce: this GPU was not registered (jaxtp.allreduce.setup)");
  }
  const Params& p = g_params[attr.device];
  const int64_t bytes = static_cast<int64_t>(x.size_bytes());
  if (bytes > p.max_bytes || bytes % 16) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "jaxtp all-reduce: input must be a multiple of 16 bytes and at most the "
                      "registered max_bytes");
  }
  const int64_t vecs = bytes / 16;
  const uint4* in = static_cast<const uint4*>(x.untyped_data());
  uint4* out = static_cast<uint4*>(y->untyped_data());
  switch (x.element_type()) {
    case ffi::DataType::BF16:
      one_shot<__nv_bfloat16><<<kBlocks, kThreads, 0, stream>>>(p, in, out, vecs);
      break;
    case ffi::DataType::F16:
      one_shot<__half><<<kBlocks, kThreads, 0, stream>>>(p, in, out, vecs);
      break;
    case ffi::DataType::F32:
      one_shot<float><<<kBlocks, kThreads, 0, stream>>>(p, in, out, vecs);
      break;
    default:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "jaxtp all-reduce: dtype must be bfloat16, float16 or float32");
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return ffi::Error(ffi::ErrorCode::kInternal, cudaGetErrorString(e));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtpAllReduce, AllReduce,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
