// privatekeras ring kernels: matrix products and 2-D convolutions over Z/2^64.
//
// ABY3 computes on 64-bit shares with wrap-around arithmetic. TensorFlow's int64 MatMul has no
// vectorised path, and TF Encrypted builds every convolution from ExtractImagePatches,
// transposes and that MatMul, three times per party. These ops do the same arithmetic (bit
// for bit: products and sums mod 2^64 are exact, in any order) with the CPU's vector units:
//
//   PkRingMatMul(a: N x int64, b: N x int64)      = sum_t a[t] @ b[t]           (2-D)
//   PkRingConv2D(x: N x int64, w: N x int64, ...)  = sum_t conv2d(x[t], w[t])    (NHWC/NCHW)
//   PkRingIm2Col(x: int64 NCHW, ...)               = TF Encrypted's im2col layout (pools)
//
// The sum over t is one product with the inner dimension concatenated (nothing is copied):
// ABY3's party i computes x_i*y_i + x_i*y_{i+1} + x_{i+1}*y_i as
// x_i*(y_i + y_{i+1}) + x_{i+1}*y_i, one call with N = 2.
//
// The GEMM is the usual packed, cache-blocked scheme: blocks of the left operand (MC x KC)
// and of the right one (KC x NC) are packed into contiguous strips (a convolution's patches
// are gathered straight from the image while packing: an implicit im2col), and a micro-kernel
// keeps an MR x NR tile of the result in vector registers over the KC block. Three
// micro-kernels, chosen at run time with __builtin_cpu_supports:
//   avx512:  8 lanes (vpmullq, AVX-512F + DQ), tile 6 x 16;
//   avx2:    4 lanes, the 64-bit product from three 32 x 32 -> 64-bit multiplies
//            (lo*lo + ((hi*lo + lo*hi) << 32)), tile 4 x 8;
//   generic: plain C++ (no target attribute), tile 4 x 4.
// The attribute `isa` ("auto", "avx512", "avx2", "generic") or the environment variable
// PRIVATEKERAS_RING_ISA (read when a kernel is built; the attribute wins unless "auto")
// forces one, for tests and comparisons. Work is split over output tiles with TensorFlow's
// intra-op thread pool (Shard).
//
// Built into pk_ops.so with pk_ops.cc by privatekeras.kernels.build().

#if defined(__x86_64__) || defined(__i386__)
#define PK_X86 1
#include <immintrin.h>
#else
#define PK_X86 0  // other CPUs: the portable kernel only
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pk_common.h"

using tensorflow::OpInputList;
using tensorflow::shape_inference::DimensionHandle;

namespace {

using privatekeras::u64;

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

bool CpuHas(Isa isa) {
#if PK_X86
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2");
    default:
      return true;
  }
#else
  return isa == Isa::kGeneric;
#endif
}

Isa BestIsa() {
  if (CpuHas(Isa::kAvx512)) return Isa::kAvx512;
  if (CpuHas(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kGeneric;
}

bool ParseIsa(const std::string& s, Isa* out) {
  if (s == "avx512") *out = Isa::kAvx512;
  else if (s == "avx2") *out = Isa::kAvx2;
  else if (s == "generic") *out = Isa::kGeneric;
  else return false;
  return true;
}

// The ISA a kernel uses: the attribute, else $PRIVATEKERAS_RING_ISA, else the best one.
Status ChooseIsa(OpKernelConstruction* ctx, Isa* isa) {
  std::string want;
  TF_RETURN_IF_ERROR(ctx->GetAttr("isa", &want));
  if (want == "auto") {
    const char* env = std::getenv("PRIVATEKERAS_RING_ISA");
    want = (env != nullptr && *env != '\0') ? env : "auto";
  }
  if (want == "auto") {
    *isa = BestIsa();
    return Status();
  }
  if (!ParseIsa(want, isa)) {
    return tensorflow::errors::InvalidArgument("unknown isa '", want,
                                               "' (auto, avx512, avx2, generic)");
  }
  if (!CpuHas(*isa)) {
    return tensorflow::errors::InvalidArgument("this CPU does not support isa '", want, "'");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------
// Micro-kernels. Each computes the MR x NR tile acc = sum_k a[k*MR + r] * b[k*NR + c] over
// a packed block of depth kc, and adds it to the result through `store`.

constexpr int kMrGeneric = 4, kNrGeneric = 4;
constexpr int kMrAvx2 = 4, kNrAvx2 = 8;
constexpr int kMr512 = 6, kNr512 = 16;

void TileGeneric(int64_t kc, const u64* a, const u64* b, u64* tile) {
  u64 acc[kMrGeneric][kNrGeneric] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const u64* ak = a + k * kMrGeneric;
    const u64* bk = b + k * kNrGeneric;
    for (int r = 0; r < kMrGeneric; ++r) {
      for (int c = 0; c < kNrGeneric; ++c) acc[r][c] += ak[r] * bk[c];
    }
  }
  std::memcpy(tile, acc, sizeof(acc));
}

#if PK_X86
__attribute__((target("avx2"))) void TileAvx2(int64_t kc, const u64* a, const u64* b,
                                               u64* tile) {
  // b is packed as [k][lo lanes of NR | hi lanes of NR]: 2*NR words per k (see PackB).
  __m256i acc[kMrAvx2][2];
  for (int r = 0; r < kMrAvx2; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc; ++k) {
    const u64* bk = b + k * 2 * kNrAvx2;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + 4));
    const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + 8));
    const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + 12));
    const u64* ak = a + k * kMrAvx2;
#pragma GCC unroll 4
    for (int r = 0; r < kMrAvx2; ++r) {
      const __m256i alo = _mm256_set1_epi64x(static_cast<long long>(ak[r]));
      const __m256i ahi = _mm256_set1_epi64x(static_cast<long long>(ak[r] >> 32));
      // a*b mod 2^64 = lo(a)lo(b) + ((hi(a)lo(b) + lo(a)hi(b)) << 32)
      __m256i x0 = _mm256_add_epi64(_mm256_mul_epu32(ahi, b0), _mm256_mul_epu32(alo, h0));
      __m256i x1 = _mm256_add_epi64(_mm256_mul_epu32(ahi, b1), _mm256_mul_epu32(alo, h1));
      acc[r][0] = _mm256_add_epi64(acc[r][0], _mm256_add_epi64(_mm256_mul_epu32(alo, b0),
                                                               _mm256_slli_epi64(x0, 32)));
      acc[r][1] = _mm256_add_epi64(acc[r][1], _mm256_add_epi64(_mm256_mul_epu32(alo, b1),
                                                               _mm256_slli_epi64(x1, 32)));
    }
  }
  for (int r = 0; r < kMrAvx2; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNrAvx2), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNrAvx2 + 4), acc[r][1]);
  }
}

__attribute__((target("avx512f,avx512dq"))) void Tile512(int64_t kc, const u64* a,
                                                          const u64* b, u64* tile) {
  __m512i acc[kMr512][2];
  for (int r = 0; r < kMr512; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512i b0 = _mm512_loadu_si512(b + k * kNr512);
    const __m512i b1 = _mm512_loadu_si512(b + k * kNr512 + 8);
    const u64* ak = a + k * kMr512;
#pragma GCC unroll 6
    for (int r = 0; r < kMr512; ++r) {
      const __m512i av = _mm512_set1_epi64(static_cast<long long>(ak[r]));
      acc[r][0] = _mm512_add_epi64(acc[r][0], _mm512_mullo_epi64(av, b0));
      acc[r][1] = _mm512_add_epi64(acc[r][1], _mm512_mullo_epi64(av, b1));
    }
  }
  for (int r = 0; r < kMr512; ++r) {
    _mm512_storeu_si512(tile + r * kNr512, acc[r][0]);
    _mm512_storeu_si512(tile + r * kNr512 + 8, acc[r][1]);
  }
}

#endif  // PK_X86

struct Kernel {
  int mr, nr;
  bool split_b;  // avx2: b packed with its high halves next to it
  void (*tile)(int64_t, const u64*, const u64*, u64*);
};

Kernel KernelFor(Isa isa) {
  switch (isa) {
#if PK_X86
    case Isa::kAvx512:
      return {kMr512, kNr512, false, Tile512};
    case Isa::kAvx2:
      return {kMrAvx2, kNrAvx2, true, TileAvx2};
#endif
    default:
      return {kMrGeneric, kNrGeneric, false, TileGeneric};
  }
}

// ---------------------------------------------------------------------------------------
// Operands. The left operand A (M x K) and the right one B (K x N) are read through small
// views; C (M x N) is written through row offsets and a column stride.

// A sum over t of dense row-major matrices a[t] (M x K_t), as one M x sum(K_t) matrix.
struct DenseA {
  std::vector<const u64*> parts;
  std::vector<int64_t> k_end;  // k_end[t]: the end of part t along K
  // Pack rows [i0, i0+mr) x depth [k0, k0+kc) into out[k*mr + r] (zero past M).
  void Pack(int64_t M, int64_t i0, int mr, int64_t k0, int64_t kc, u64* out) const {
    for (int64_t k = k0; k < k0 + kc;) {
      size_t t = 0;
      while (k >= k_end[t]) ++t;
      const int64_t start = t == 0 ? 0 : k_end[t - 1];
      const int64_t width = k_end[t] - start;
      const int64_t stop = std::min(k0 + kc, k_end[t]);
      for (; k < stop; ++k) {
        u64* o = out + (k - k0) * mr;
        for (int r = 0; r < mr; ++r) {
          const int64_t i = i0 + r;
          o[r] = i < M ? parts[t][i * width + (k - start)] : 0;
        }
      }
    }
  }
};

// The patches of a sum over t of images x[t] (implicit im2col): row i is an output pixel
// (n, oy, ox), column k of part t is (dy, dx, c) of w[t]'s [kh, kw, C_t, O] layout.
struct PatchA {
  struct Part {
    const u64* x;
    int64_t channels;
    int64_t k_end;
  };
  std::vector<Part> parts;
  bool nchw;
  int64_t h, w, kh, kw, sh, sw, pad_top, pad_left, out_h, out_w;

  void Pack(int64_t M, int64_t i0, int mr, int64_t k0, int64_t kc, u64* out) const {
    // Each row's image n and window corner (y0, x0), and whether the whole window lies
    // inside the image (no padding to check).
    int64_t n_[32], y0[32], x0[32], row[32];
    bool live[32], inside[32];
    const int64_t hw = h * w;
    for (int r = 0; r < mr; ++r) {
      const int64_t i = i0 + r;
      live[r] = i < M;
      if (!live[r]) continue;
      const int64_t p = i % (out_h * out_w);
      n_[r] = i / (out_h * out_w);
      y0[r] = (p / out_w) * sh - pad_top;
      x0[r] = (p % out_w) * sw - pad_left;
      inside[r] = y0[r] >= 0 && y0[r] + kh <= h && x0[r] >= 0 && x0[r] + kw <= w;
    }
    int64_t k = k0;
    size_t t = 0;
    while (k >= parts[t].k_end) ++t;
    while (k < k0 + kc) {
      const Part& part = parts[t];
      const int64_t start = t == 0 ? 0 : parts[t - 1].k_end;
      const int64_t C = part.channels;
      const int64_t stop = std::min(k0 + kc, part.k_end);
      // Row r's window corner in x, channel 0; depth k adds `off` to it.
      for (int r = 0; r < mr; ++r) {
        if (live[r]) {
          row[r] = nchw ? n_[r] * C * hw + y0[r] * w + x0[r]
                        : ((n_[r] * h + y0[r]) * w + x0[r]) * C;
        }
      }
      // Depth q = (dy * kw + dx) * C + c, walked without a division per step.
      const int64_t q = k - start;
      int64_t c = q % C, dx = (q / C) % kw, dy = q / (C * kw);
      for (; k < stop; ++k) {
        const int64_t off = nchw ? c * hw + dy * w + dx : (dy * w + dx) * C + c;
        u64* o = out + (k - k0) * mr;
        for (int r = 0; r < mr; ++r) {
          u64 v = 0;
          if (live[r] && (inside[r] || (y0[r] + dy >= 0 && y0[r] + dy < h &&
                                         x0[r] + dx >= 0 && x0[r] + dx < w))) {
            v = part.x[row[r] + off];
          }
          o[r] = v;
        }
        if (++c == C) {
          c = 0;
          if (++dx == kw) {
            dx = 0;
            ++dy;
          }
        }
      }
      ++t;
    }
  }
};

// A sum over t of dense row-major matrices b[t] (K_t x N), stacked along K.
struct DenseB {
  std::vector<const u64*> parts;
  std::vector<int64_t> k_end;
  int64_t n;
  // Pack depth [k0, k0+kc) x columns [j0, j0+nr) into out[k*nr + c] (zero past N); with
  // `split`, each k holds the nr words and then their high halves (out[k*2nr + nr + c]).
  void Pack(int64_t k0, int64_t kc, int64_t j0, int nr, bool split, u64* out) const {
    const int stride = split ? 2 * nr : nr;
    for (int64_t k = k0; k < k0 + kc;) {
      size_t t = 0;
      while (k >= k_end[t]) ++t;
      const int64_t start = t == 0 ? 0 : k_end[t - 1];
      const int64_t stop = std::min(k0 + kc, k_end[t]);
      for (; k < stop; ++k) {
        const u64* row = parts[t] + (k - start) * n;
        u64* o = out + (k - k0) * stride;
        for (int c = 0; c < nr; ++c) {
          const int64_t j = j0 + c;
          o[c] = j < n ? row[j] : 0;
        }
        if (split) {
          for (int c = 0; c < nr; ++c) o[nr + c] = o[c] >> 32;
        }
      }
    }
  }
};

// Where C(i, j) lives: out[row_offset(i) + j * col_stride].
struct Out {
  u64* data;
  int64_t col_stride;
  // Dense row-major (matmul, NHWC conv): row i at i * ld. NCHW conv: row i = (n, p) at
  // n * N * P + p, with P = out_h * out_w, column j (channel) at j * P.
  int64_t ld = 0, per_image = 0, image_stride = 0;
  int64_t RowOffset(int64_t i) const {
    if (per_image == 0) return i * ld;
    return (i / per_image) * image_stride + (i % per_image);
  }
};

constexpr int64_t kKc = 256;  // depth of a packed block
constexpr int64_t kMc = 96;   // rows of a task (a multiple of every MR)
constexpr int64_t kNc = 256;  // columns of a task (a multiple of every NR)

template <typename A>
void Gemm(OpKernelContext* ctx, Isa isa, int64_t M, int64_t N, int64_t K, const A& a,
          const DenseB& b, const Out& c) {
  const Kernel ker = KernelFor(isa);
  const int64_t row_blocks = (M + kMc - 1) / kMc, col_blocks = (N + kNc - 1) / kNc;
  // Packing buffers sized to this product (small products are common: batch 1), left
  // uninitialised (every word used is written by a Pack first).
  const int64_t kc_max = std::min(kKc, K);
  const int64_t strips_max = (std::min(kNc, N) + ker.nr - 1) / ker.nr;
  auto work = [&](int64_t begin, int64_t end) {
    const int bstride = ker.split_b ? 2 * ker.nr : ker.nr;
    std::unique_ptr<u64[]> apack(new u64[kMc * kc_max]);
    std::unique_ptr<u64[]> bpack(new u64[strips_max * bstride * kc_max]);
    u64 tile[kMr512 * kNr512];
    int64_t rows[kMc];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task / col_blocks, jb = task % col_blocks;
      const int64_t i_lo = ib * kMc, i_hi = std::min(M, i_lo + kMc);
      const int64_t j_lo = jb * kNc, j_hi = std::min(N, j_lo + kNc);
      for (int64_t i = i_lo; i < i_hi; ++i) {
        rows[i - i_lo] = c.RowOffset(i);
        for (int64_t j = j_lo; j < j_hi; ++j) c.data[rows[i - i_lo] + j * c.col_stride] = 0;
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        int64_t nstrips = 0;
        for (int64_t j = j_lo; j < j_hi; j += ker.nr, ++nstrips) {
          b.Pack(k0, kc, j, ker.nr, ker.split_b, bpack.get() + nstrips * bstride * kc);
        }
        for (int64_t i = i_lo; i < i_hi; i += ker.mr) {
          a.Pack(M, i, ker.mr, k0, kc, apack.get());
          int64_t s = 0;
          for (int64_t j = j_lo; j < j_hi; j += ker.nr, ++s) {
            ker.tile(kc, apack.get(), bpack.get() + s * bstride * kc, tile);
            const int rmax = static_cast<int>(std::min<int64_t>(ker.mr, i_hi - i));
            const int cmax = static_cast<int>(std::min<int64_t>(ker.nr, j_hi - j));
            for (int r = 0; r < rmax; ++r) {
              u64* dst = c.data + rows[i - i_lo + r] + j * c.col_stride;
              const u64* src = tile + r * ker.nr;
              if (c.col_stride == 1) {
                for (int q = 0; q < cmax; ++q) dst[q] += src[q];
              } else {
                for (int q = 0; q < cmax; ++q) dst[q * c.col_stride] += src[q];
              }
            }
          }
        }
      }
    }
  };
  const int64_t tasks = row_blocks * col_blocks;
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t cost = std::min<int64_t>(kMc, M) * std::min<int64_t>(kNc, N) * K;
  if (tasks == 1 || threads == nullptr) {
    work(0, tasks);
  } else {
    tensorflow::Shard(threads->num_threads, threads->workers, tasks, cost, work);
  }
}

// ---------------------------------------------------------------------------------------
// The ops.

Status CheckInt64List(const OpInputList& list, const char* what) {
  if (list.size() < 1) return tensorflow::errors::InvalidArgument(what, ": empty list");
  return Status();
}

class PkRingMatMulOp : public OpKernel {
 public:
  explicit PkRingMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ChooseIsa(ctx, &isa_));
  }
  void Compute(OpKernelContext* ctx) override {
    OpInputList as, bs;
    OP_REQUIRES_OK(ctx, ctx->input_list("a", &as));
    OP_REQUIRES_OK(ctx, ctx->input_list("b", &bs));
    OP_REQUIRES_OK(ctx, CheckInt64List(as, "a"));
    OP_REQUIRES(ctx, as.size() == bs.size(),
                tensorflow::errors::InvalidArgument("a and b must have the same length"));
    const int64_t M = as[0].dims() == 2 ? as[0].dim_size(0) : -1;
    const int64_t N = bs[0].dims() == 2 ? bs[0].dim_size(1) : -1;
    DenseA a;
    DenseB b;
    b.n = N;
    int64_t K = 0;
    for (int t = 0; t < as.size(); ++t) {
      OP_REQUIRES(ctx, as[t].dims() == 2 && bs[t].dims() == 2,
                  tensorflow::errors::InvalidArgument("PkRingMatMul takes matrices"));
      OP_REQUIRES(ctx, as[t].dim_size(0) == M && bs[t].dim_size(1) == N &&
                           as[t].dim_size(1) == bs[t].dim_size(0),
                  tensorflow::errors::InvalidArgument(
                      "shapes do not match: ", as[t].shape().DebugString(), " @ ",
                      bs[t].shape().DebugString()));
      K += as[t].dim_size(1);
      a.parts.push_back(reinterpret_cast<const u64*>(as[t].flat<int64_t>().data()));
      a.k_end.push_back(K);
      b.parts.push_back(reinterpret_cast<const u64*>(bs[t].flat<int64_t>().data()));
      b.k_end.push_back(K);
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, N}), &out));
    if (M == 0 || N == 0) return;
    Out c{reinterpret_cast<u64*>(out->flat<int64_t>().data()), 1};
    c.ld = N;
    if (K == 0) {
      std::memset(c.data, 0, sizeof(u64) * M * N);
      return;
    }
    Gemm(ctx, isa_, M, N, K, a, b, c);
  }

 private:
  Isa isa_;
};

// TensorFlow's padding: SAME pads (total // 2) before and the rest after.
void Padding(int64_t size, int64_t window, int64_t stride, bool same, int64_t* out,
             int64_t* before) {
  if (same) {
    *out = (size + stride - 1) / stride;
    const int64_t total = std::max<int64_t>((*out - 1) * stride + window - size, 0);
    *before = total / 2;
  } else {
    *out = size >= window ? (size - window) / stride + 1 : 0;
    *before = 0;
  }
}

class PkRingConv2DOp : public OpKernel {
 public:
  explicit PkRingConv2DOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ChooseIsa(ctx, &isa_));
    std::vector<int> strides;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES(ctx, strides.size() == 2 && strides[0] > 0 && strides[1] > 0,
                tensorflow::errors::InvalidArgument("strides: two positive ints"));
    sh_ = strides[0];
    sw_ = strides[1];
    std::string padding, format;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format));
    same_ = padding == "SAME";
    nchw_ = format == "NCHW";
  }
  void Compute(OpKernelContext* ctx) override {
    OpInputList xs, ws;
    OP_REQUIRES_OK(ctx, ctx->input_list("x", &xs));
    OP_REQUIRES_OK(ctx, ctx->input_list("w", &ws));
    OP_REQUIRES_OK(ctx, CheckInt64List(xs, "x"));
    OP_REQUIRES(ctx, xs.size() == ws.size(),
                tensorflow::errors::InvalidArgument("x and w must have the same length"));
    const Tensor& x0 = xs[0];
    const Tensor& w0 = ws[0];
    OP_REQUIRES(ctx, x0.dims() == 4 && w0.dims() == 4,
                tensorflow::errors::InvalidArgument("x and w must be 4-D"));
    const int64_t n = x0.dim_size(0);
    const int64_t h = nchw_ ? x0.dim_size(2) : x0.dim_size(1);
    const int64_t w = nchw_ ? x0.dim_size(3) : x0.dim_size(2);
    const int64_t kh = w0.dim_size(0), kw = w0.dim_size(1), o = w0.dim_size(3);
    PatchA a;
    DenseB b;
    b.n = o;
    int64_t K = 0;
    for (int t = 0; t < xs.size(); ++t) {
      const Tensor& x = xs[t];
      const Tensor& f = ws[t];
      OP_REQUIRES(ctx, x.dims() == 4 && f.dims() == 4,
                  tensorflow::errors::InvalidArgument("x and w must be 4-D"));
      const int64_t c = nchw_ ? x.dim_size(1) : x.dim_size(3);
      OP_REQUIRES(ctx, x.dim_size(0) == n && (nchw_ ? x.dim_size(2) : x.dim_size(1)) == h &&
                           (nchw_ ? x.dim_size(3) : x.dim_size(2)) == w &&
                           f.dim_size(0) == kh && f.dim_size(1) == kw &&
                           f.dim_size(2) == c && f.dim_size(3) == o,
                  tensorflow::errors::InvalidArgument(
                      "shapes do not match: x ", x.shape().DebugString(), ", w ",
                      f.shape().DebugString()));
      K += kh * kw * c;
      a.parts.push_back({reinterpret_cast<const u64*>(x.flat<int64_t>().data()), c, K});
      b.parts.push_back(reinterpret_cast<const u64*>(f.flat<int64_t>().data()));
      b.k_end.push_back(K);
    }
    int64_t oh, ow, pt, pl;
    Padding(h, kh, sh_, same_, &oh, &pt);
    Padding(w, kw, sw_, same_, &ow, &pl);
    a.nchw = nchw_;
    a.h = h;
    a.w = w;
    a.kh = kh;
    a.kw = kw;
    a.sh = sh_;
    a.sw = sw_;
    a.pad_top = pt;
    a.pad_left = pl;
    a.out_h = oh;
    a.out_w = ow;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, nchw_ ? TensorShape({n, o, oh, ow}) : TensorShape({n, oh, ow, o}),
                            &out));
    const int64_t M = n * oh * ow;
    if (M == 0 || o == 0) return;
    Out c{reinterpret_cast<u64*>(out->flat<int64_t>().data()), nchw_ ? oh * ow : 1};
    if (nchw_) {
      c.per_image = oh * ow;
      c.image_stride = o * oh * ow;
    } else {
      c.ld = o;
    }
    if (K == 0) {
      std::memset(c.data, 0, sizeof(u64) * M * o);
      return;
    }
    Gemm(ctx, isa_, M, o, K, a, b, c);
  }

 private:
  Isa isa_;
  int sh_, sw_;
  bool same_, nchw_;
};

// TF Encrypted's im2col of NCHW images (its pooling and its generic convolution): row
// (c, dy, dx), column (oy, ox, n), zero outside the image; one pass instead of
// ExtractImagePatches, three transposes and the reshapes between them.
class PkRingIm2ColOp : public OpKernel {
 public:
  explicit PkRingIm2ColOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::vector<int> window, strides;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("window", &window));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides));
    OP_REQUIRES(ctx, window.size() == 2 && strides.size() == 2 && window[0] > 0 &&
                         window[1] > 0 && strides[0] > 0 && strides[1] > 0,
                tensorflow::errors::InvalidArgument("window, strides: two positive ints"));
    kh_ = window[0];
    kw_ = window[1];
    sh_ = strides[0];
    sw_ = strides[1];
    std::string padding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("padding", &padding));
    same_ = padding == "SAME";
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES(ctx, x.dims() == 4, tensorflow::errors::InvalidArgument("x must be NCHW"));
    const int64_t n = x.dim_size(0), c = x.dim_size(1), h = x.dim_size(2), w = x.dim_size(3);
    int64_t oh, ow, pt, pl;
    Padding(h, kh_, sh_, same_, &oh, &pt);
    Padding(w, kw_, sw_, same_, &ow, &pl);
    const int64_t rows = c * kh_ * kw_, cols = oh * ow * n;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows, cols}), &out));
    const int64_t* src = x.flat<int64_t>().data();
    int64_t* dst = out->flat<int64_t>().data();
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t ch = r / (kh_ * kw_), dy = (r / kw_) % kh_, dx = r % kw_;
        int64_t* o = dst + r * cols;
        for (int64_t oy = 0; oy < oh; ++oy) {
          const int64_t yy = oy * sh_ + dy - pt;
          for (int64_t ox = 0; ox < ow; ++ox) {
            const int64_t xx = ox * sw_ + dx - pl;
            int64_t* cell = o + (oy * ow + ox) * n;
            if (yy < 0 || yy >= h || xx < 0 || xx >= w) {
              for (int64_t b = 0; b < n; ++b) cell[b] = 0;
            } else {
              const int64_t* in = src + (ch * h + yy) * w + xx;
              for (int64_t b = 0; b < n; ++b) cell[b] = in[b * c * h * w];
            }
          }
        }
      }
    };
    const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
    if (rows * cols < (1 << 16) || threads == nullptr) {
      work(0, rows);
    } else {
      tensorflow::Shard(threads->num_threads, threads->workers, rows, cols, work);
    }
  }

 private:
  int kh_, kw_, sh_, sw_;
  bool same_;
};

}  // namespace

REGISTER_OP("PkRingIm2Col")
    .Input("x: int64")
    .Output("y: int64")
    .Attr("window: list(int)")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .SetShapeFn([](InferenceContext* c) {
      std::vector<int> window, strides;
      TF_RETURN_IF_ERROR(c->GetAttr("window", &window));
      TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
      std::string padding;
      TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      if (window.size() != 2 || strides.size() != 2) {
        return tensorflow::errors::InvalidArgument("window, strides: two positive ints");
      }
      int64_t dims[4];
      for (int a = 0; a < 4; ++a) dims[a] = c->Value(c->Dim(x, a));
      if (dims[0] < 0 || dims[1] < 0 || dims[2] < 0 || dims[3] < 0) {
        c->set_output(0, c->Matrix(c->UnknownDim(), c->UnknownDim()));
        return Status();
      }
      int64_t oh, ow, before;
      Padding(dims[2], window[0], strides[0], padding == "SAME", &oh, &before);
      Padding(dims[3], window[1], strides[1], padding == "SAME", &ow, &before);
      c->set_output(0, c->Matrix(dims[1] * window[0] * window[1], oh * ow * dims[0]));
      return Status();
    });

REGISTER_OP("PkRingMatMul")
    .Input("a: N * int64")
    .Input("b: N * int64")
    .Output("c: int64")
    .Attr("N: int >= 1")
    .Attr("isa: string = 'auto'")
    .SetShapeFn([](InferenceContext* c) {
      int n;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      ShapeHandle a, b;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &a));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(n), 2, &b));
      c->set_output(0, c->Matrix(c->Dim(a, 0), c->Dim(b, 1)));
      return Status();
    });

REGISTER_OP("PkRingConv2D")
    .Input("x: N * int64")
    .Input("w: N * int64")
    .Output("y: int64")
    .Attr("N: int >= 1")
    .Attr("strides: list(int)")
    .Attr("padding: {'SAME', 'VALID'}")
    .Attr("data_format: {'NHWC', 'NCHW'} = 'NHWC'")
    .Attr("isa: string = 'auto'")
    .SetShapeFn([](InferenceContext* c) {
      int n;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      std::vector<int> strides;
      TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
      std::string padding, format;
      TF_RETURN_IF_ERROR(c->GetAttr("padding", &padding));
      TF_RETURN_IF_ERROR(c->GetAttr("data_format", &format));
      if (strides.size() != 2) {
        return tensorflow::errors::InvalidArgument("strides: two positive ints");
      }
      ShapeHandle x, w;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(n), 4, &w));
      const bool nchw = format == "NCHW";
      DimensionHandle dims[2];
      for (int a = 0; a < 2; ++a) {
        const int64_t size = c->Value(c->Dim(x, nchw ? 2 + a : 1 + a));
        const int64_t window = c->Value(c->Dim(w, a));
        if (size < 0 || window < 0) {
          dims[a] = c->UnknownDim();
          continue;
        }
        int64_t out, before;
        Padding(size, window, strides[a], padding == "SAME", &out, &before);
        dims[a] = c->MakeDim(out);
      }
      DimensionHandle batch = c->Dim(x, 0), chans = c->Dim(w, 3);
      c->set_output(0, nchw ? c->MakeShape({batch, chans, dims[0], dims[1]})
                            : c->MakeShape({batch, dims[0], dims[1], chans}));
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkRingMatMul").Device(DEVICE_CPU), PkRingMatMulOp);
REGISTER_KERNEL_BUILDER(Name("PkRingConv2D").Device(DEVICE_CPU), PkRingConv2DOp);
REGISTER_KERNEL_BUILDER(Name("PkRingIm2Col").Device(DEVICE_CPU), PkRingIm2ColOp);
