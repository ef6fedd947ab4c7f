// Kernels of the CUDA backend, compiled at run time by NVRTC (no headers: NVRTC has none of the
// toolkit's, so the bf16 conversions are written out). Activations are f32, row-major; weights
// are f32, bf16 (raw 16-bit patterns), Q8_0 or Q4_0 (int8 quants, or two 4-bit ones a byte,
// row-major, and beside them one f16 scale a block of 32), K/V f32 or bf16. Every kernel knows nothing of Hymba: the
// backend passes shapes, offsets and positions.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef signed char q8_t;
// Q4_0 quants, two a byte: in each block of 32, chunk c (elements 8c..8c + 8) is bytes 4c..4c + 4,
// byte j holding element 8c + j in its low nibble and 8c + 4 + j in its high one (the backend
// lays GGML's blocks out so), so element i's chunk starts at byte i / 2.
struct q4_t {
    unsigned char b;
};

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even, NaN kept quiet: what `half::bf16::from_f32` does.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
#if __CUDA_ARCH__ >= 800
    // The hardware's conversion: the same round-to-nearest-even, one instruction.
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return (bf16_t)h;
#endif
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((x >> 16) | 0x40);
    u32 round = 0x7fffu + ((x >> 16) & 1u);
    return (bf16_t)((x + round) >> 16);
}

template <typename T> __device__ __forceinline__ float load(const T* p, long i);
template <> __device__ __forceinline__ float load<float>(const float* p, long i) { return p[i]; }
template <> __device__ __forceinline__ float load<bf16_t>(const bf16_t* p, long i) { return bf16_to_f32(p[i]); }

// An f16 bit pattern widened (exact): a Q8_0 block's scale.
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// Weight i of a matrix row: `s` is the row's Q8_0 / Q4_0 scales (one a block of 32), unused for
// f32 and bf16 rows.
template <typename W> __device__ __forceinline__ float wload(const W* w, const unsigned short*, long i) { return load(w, i); }
__device__ __forceinline__ float wload(const q8_t* w, const unsigned short* s, long i) { return (float)w[i] * f16_to_f32(s[i / 32]); }
__device__ __forceinline__ float wload(const q4_t* w, const unsigned short* s, long i) {
    int r = i % 8;
    unsigned char b = w[(i - r) / 2 + r % 4].b;
    return (float)((r < 4 ? b & 15 : b >> 4) - 8) * f16_to_f32(s[i / 32]);
}
// Row `row` of a matrix of k columns.
template <typename W> __device__ __forceinline__ const W* row_at(const W* w, long row, int k) { return w + row * k; }
__device__ __forceinline__ const q4_t* row_at(const q4_t* w, long row, int k) { return w + row * (k / 2); }


// Eight elements from element j of a row (16-byte aligned), widened.
__device__ __forceinline__ void load8(const bf16_t* __restrict__ w, long j, float* wv) {
    uint4 raw = __ldg((const uint4*)(w + j));
    const bf16_t* hb = (const bf16_t*)&raw;
#pragma unroll
    for (int e = 0; e < 8; e++) wv[e] = bf16_to_f32(hb[e]);
}
__device__ __forceinline__ void load8(const float* __restrict__ w, long j, float* wv) {
    float4 a = __ldg((const float4*)(w + j)), b = __ldg((const float4*)(w + j + 4));
    wv[0] = a.x; wv[1] = a.y; wv[2] = a.z; wv[3] = a.w; wv[4] = b.x; wv[5] = b.y; wv[6] = b.z; wv[7] = b.w;
}
// Eight weights as loaded (bf16 kept as bf16 until used: half the registers while in flight).
template <typename W> struct Raw8 {
    float4 a, b;
};
template <> struct Raw8<bf16_t> {
    uint4 v;
};
// Q8_0: eight quants (one block's quarter) and their block's scale (chunks of sixteen need 77
// registers, fewer blocks a multiprocessor).
template <> struct Raw8<q8_t> {
    uint2 q;
    float d;
};
// Q4_0: a chunk's eight quants (a word) and their block's scale.
template <> struct Raw8<q4_t> {
    u32 q;
    float d;
};
// Eight weights from element j of a row (`s`: its Q8_0 / Q4_0 scales, see `wload`).
__device__ __forceinline__ void load_raw(const float* __restrict__ w, const unsigned short*, long j, Raw8<float>& r) {
    r.a = __ldg((const float4*)(w + j));
    r.b = __ldg((const float4*)(w + j + 4));
}
__device__ __forceinline__ void load_raw(const bf16_t* __restrict__ w, const unsigned short*, long j, Raw8<bf16_t>& r) {
    r.v = __ldg((const uint4*)(w + j));
}
__device__ __forceinline__ void load_raw(const q8_t* __restrict__ w, const unsigned short* __restrict__ s, long j, Raw8<q8_t>& r) {
    r.q = __ldg((const uint2*)(w + j));
    r.d = f16_to_f32(__ldg(s + j / 32));
}
__device__ __forceinline__ void zero_raw(Raw8<float>& r) { r.a = r.b = make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
__device__ __forceinline__ void zero_raw(Raw8<bf16_t>& r) { r.v = make_uint4(0, 0, 0, 0); }
__device__ __forceinline__ void load_raw(const q4_t* __restrict__ w, const unsigned short* __restrict__ s, long j, Raw8<q4_t>& r) {
    r.q = __ldg((const u32*)(w + j / 2));
    r.d = f16_to_f32(__ldg(s + j / 32));
}
__device__ __forceinline__ void zero_raw(Raw8<q4_t>& r) {
    r.q = 0;
    r.d = 0.0f;
}
__device__ __forceinline__ void zero_raw(Raw8<q8_t>& r) {
    r.q = make_uint2(0, 0);
    r.d = 0.0f;
}
__device__ __forceinline__ float dot8(const Raw8<float>& w, float4 a, float4 b) {
    return w.a.x * a.x + w.a.y * a.y + w.a.z * a.z + w.a.w * a.w + w.b.x * b.x + w.b.y * b.y + w.b.z * b.z + w.b.w * b.w;
}
// A word holds elements 2i (low half) and 2i + 1 (high half).
__device__ __forceinline__ float dot2(u32 w, float lo, float hi) { return __uint_as_float(w << 16) * lo + __uint_as_float(w & 0xffff0000u) * hi; }
__device__ __forceinline__ float dot8(const Raw8<bf16_t>& w, float4 a, float4 b) {
    return dot2(w.v.x, a.x, a.y) + dot2(w.v.y, a.z, a.w) + dot2(w.v.z, b.x, b.y) + dot2(w.v.w, b.z, b.w);
}
// Byte i of a word of quants as a float less OFF (Q8_0's offset by 128: `q ^ 0x80`, Q4_0's
// nibbles by 8): the byte as the low mantissa of 2^23, minus 2^23 + OFF, exact. A byte permute
// and an add, where the conversion instruction runs at a quarter of their rate.
template <int OFF> __device__ __forceinline__ float q_at(u32 w, int i) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440 + i)) - (8388608.0f + OFF);
}
template <int OFF> __device__ __forceinline__ float qdot4(u32 w, float4 a) {
    return q_at<OFF>(w, 0) * a.x + q_at<OFF>(w, 1) * a.y + q_at<OFF>(w, 2) * a.z + q_at<OFF>(w, 3) * a.w;
}
__device__ __forceinline__ float dot8(const Raw8<q8_t>& w, float4 a, float4 b) {
    return (qdot4<128>(w.q.x ^ 0x80808080u, a) + qdot4<128>(w.q.y ^ 0x80808080u, b)) * w.d;
}
__device__ __forceinline__ float dot8(const Raw8<q4_t>& w, float4 a, float4 b) {
    return (qdot4<8>(w.q & 0x0F0F0F0Fu, a) + qdot4<8>((w.q >> 4) & 0x0F0F0F0Fu, b)) * w.d;
}
// Eight quants (a word's four bytes, then the next's, less OFF) times their scale, as bf16 pairs.
template <int OFF> __device__ __forceinline__ uint4 q_bits8(u32 lo, u32 hi, float d) {
    auto pack = [&](u32 w, int i0) {
        return (u32)f32_to_bf16(q_at<OFF>(w, i0) * d) | ((u32)f32_to_bf16(q_at<OFF>(w, i0 + 1) * d) << 16);
    };
    return make_uint4(pack(lo, 0), pack(lo, 2), pack(hi, 0), pack(hi, 2));
}
// Eight weights from element kk of a row as bf16 pairs: as stored, or (Q8_0, Q4_0; `s` the row's
// scales) widened and rounded to bf16, so a product reads the quants in place and gives the sums
// of the widened matrix (`dequant_*`'s).
__device__ __forceinline__ uint4 w_bits8(const bf16_t* w, const unsigned short*, long kk) { return __ldg((const uint4*)(w + kk)); }
__device__ __forceinline__ uint4 w_bits8(const q8_t* w, const unsigned short* s, long kk) {
    uint2 q = __ldg((const uint2*)(w + kk));
    return q_bits8<128>(q.x ^ 0x80808080u, q.y ^ 0x80808080u, f16_to_f32(__ldg(s + kk / 32)));
}
__device__ __forceinline__ uint4 w_bits8(const q4_t* w, const unsigned short* s, long kk) {
    u32 q = __ldg((const u32*)(w + kk / 2));
    return q_bits8<8>(q & 0x0F0F0F0Fu, (q >> 4) & 0x0F0F0F0Fu, f16_to_f32(__ldg(s + kk / 32)));
}

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads; every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Two sums over a block at once (each as `block_sum` takes it, in one pass of barriers).
__device__ float2 block_sum2(float2 v) {
    __shared__ float2 part[32];
    __shared__ float2 total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v.x = warp_sum(v.x);
    v.y = warp_sum(v.y);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float2 s = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : make_float2(0.0f, 0.0f);
        s.x = warp_sum(s.x);
        s.y = warp_sum(s.y);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// 2^x by the hardware's approximation (2 ulp; 2^-inf = 0), for softmax weights.
__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Programmatic dependent launch (sm_90): a kernel lets the stream's next kernel start while it
// runs (its launch and first loads overlap this one's tail), and waits for the previous kernel
// to finish, its writes visible, before it touches anything that kernel may write or read.
// Every kernel starts with this; a matrix product first starts its weights' loads.
__device__ __forceinline__ void allow_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void wait_prior() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ void grid_dep() {
    allow_next();
    wait_prior();
}

#if __CUDA_ARCH__ >= 800
// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 shared_addr(const void* p) {
    u32 d;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(d) : "l"(p));
    return d;
}
// 16 bytes from global to shared memory at `dst`, not through registers (cp.async, cached in L2
// only); zeros where `bytes` is 0.
__device__ __forceinline__ void cp_async16_at(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
// Until at most N of this thread's groups of copies are in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
#endif

// out[i, :] = table[ids[i], :]
template <typename T>
__device__ void embed(float* out, const T* table, const u32* ids, int d) {
    long row = blockIdx.x;
    const T* src = table + (long)ids[row] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[row * d + j] = load(src, j);
}
extern "C" __global__ void embed_f32(float* out, const float* table, const u32* ids, int d) { grid_dep(); embed(out, table, ids, d); }
extern "C" __global__ void embed_bf16(float* out, const bf16_t* table, const u32* ids, int d) { grid_dep(); embed(out, table, ids, d); }
// Rows of a quantized table (`scales` its blocks' scales).
template <typename W>
__device__ void embed_quant(float* out, const W* table, const unsigned short* scales, const u32* ids, int d) {
    long row = blockIdx.x, id = ids[row];
    const W* src = row_at(table, id, d);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[row * d + j] = wload(src, scales + id * (d / 32), j);
}
extern "C" __global__ void embed_q8(float* out, const q8_t* table, const unsigned short* scales, const u32* ids, int d) {
    grid_dep();
    embed_quant(out, table, scales, ids, d);
}
extern "C" __global__ void embed_q4(float* out, const q4_t* table, const unsigned short* scales, const u32* ids, int d) {
    grid_dep();
    embed_quant(out, table, scales, ids, d);
}

// A quantized matrix's n weights (n % 8 == 0) widened and rounded to bf16, as a product of many
// rows takes them (cuBLAS multiplies bf16). It waits for the kernels before: the product before
// it may still read the buffer it writes.
template <typename W> __device__ void dequant(const W* q, const unsigned short* scales, long n, bf16_t* out) {
    long i = 8 * (blockIdx.x * (long)blockDim.x + threadIdx.x);
    if (i < n) *(uint4*)(out + i) = w_bits8(q, scales, i);
}
extern "C" __global__ void dequant_q8(const q8_t* q, const unsigned short* scales, long n, bf16_t* out) {
    grid_dep();
    dequant(q, scales, n, out);
}
extern "C" __global__ void dequant_q4(const q4_t* q, const unsigned short* scales, long n, bf16_t* out) {
    grid_dep();
    dequant(q, scales, n, out);
}

// An activation that a matrix product of many rows takes next: stored, and rounded to bf16 beside
// it (`out16`, when not null), so the product needs no `to_bf16` launch of its own; `out` null:
// only the bf16 copy (its one reader takes that).
__device__ __forceinline__ void put_act(float* out, bf16_t* out16, long i, float v) {
    if (out) out[i] = v;
    if (out16) out16[i] = f32_to_bf16(v);
}

// out[:d] = w ⊙ x[:d] / rms(x[:d]), by a whole block.
__device__ void rmsnorm_row(const float* xr, const float* w, int d, float eps, float* out, bf16_t* out16) {
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) put_act(out, out16, j, w[j] * (xr[j] * inv));
}

// One block per row: out[r, :d] = w ⊙ x[r, from:from+d] / rms, x rows `width` wide (and its bf16
// copy, see `put_act`).
extern "C" __global__ void rmsnorm(const float* x, int width, int from, const float* w, int d, float eps, float* out, bf16_t* out16) {
    grid_dep();
    long r = blockIdx.x;
    rmsnorm_row(x + r * width + from, w, d, eps, out ? out + r * d : nullptr, out16 ? out16 + r * d : nullptr);
}

// Rows left by a folded norm (see NormFold) scaled by their 1 / rms, for a reader that is not a
// GEMV taking them as they are: u[r, :d] *= 1 / rms, the sums of squares `sq` [rows, n].
extern "C" __global__ void norm_settle(float* u, const float* sq, int n, int d, float eps) {
    grid_dep();
    long r = blockIdx.x;
    float v = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) v += sq[r * n + j];
    float inv = 1.0f / sqrtf(block_sum(v) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) u[r * d + j] *= inv;
}

// Up to three column ranges of every row normed at once (the SSM's inner norms):
// out[i][r, :d[i]] = w[i] ⊙ x[r, from[i]:][:d[i]] / rms.
struct NormParts {
    const float* w[3];
    float* out[3];
    int from[3];
    int d[3];
};
// A warp a (row, part): the parts are short (x_proj's δr, B and C: tens of values), where a
// block a row left most of its threads idle and waited on a block barrier.
extern "C" __global__ void rmsnorm_parts(const float* x, int width, NormParts np, float eps, long rows) {
    grid_dep();
    long r = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31, i = blockIdx.y;
    if (r >= rows) return;
    // Selected, not indexed: a parameter array indexed at run time is copied to local memory.
#define PICK3(a) (i == 0 ? (a)[0] : (i == 1 ? (a)[1] : (a)[2]))
    const float* w = PICK3(np.w);
    int d = PICK3(np.d);
    const float* xr = x + r * width + PICK3(np.from);
    float* out = PICK3(np.out) + r * d;
#undef PICK3
    float ss = 0.0f;
    for (int j = lane; j < d; j += 32) ss += xr[j] * xr[j];
    float inv = 1.0f / sqrtf(warp_sum(ss) / d + eps);
    for (int j = lane; j < d; j += 32) out[j] = w[j] * (xr[j] * inv);
}

// out[r, :n] = x[r, from:from+n], for `rows` rows of `width`.
extern "C" __global__ void columns(const float* x, int width, int from, int n, long total, float* out) {
    grid_dep();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        long r = i / n, j = i % n;
        out[i] = x[r * width + from + j];
    }
}

// RoPE (rotate-half) of the pair (j, j + dk/2) of head h of a row at position `pos`.
__device__ __forceinline__ void rope_pair(const float* src, float* dst, int dk, int pair, int pos, const float* inv_freq) {
    int half = dk / 2, h = pair / half, j = pair % half;
    float s, c;
    sincosf((float)pos * inv_freq[j], &s, &c);
    float a1 = src[h * dk + j], a2 = src[h * dk + j + half];
    dst[h * dk + j] = a1 * c - a2 * s;
    dst[h * dk + j + half] = a2 * c + a1 * s;
}

__device__ __forceinline__ float round_to_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// The in_proj output cut into the attention's inputs, every row at once: q with RoPE at the
// row's position, and in a layer that computes the group's K/V, k with RoPE and v, rounded to
// bf16 when the cache holds bf16 (so this call's queries see what the cache will hold). The gate
// z stays where it is: the scan reads it from in_proj's output (`zs` its row stride there).
struct InProjParts {
    int width;
    int qw;
    int z_at;
    int e;
    int kv;
    int k_at;
    int kw;
    int vw;
    int dk;
    int round;
};
// Block (items of a row, rows): an item is a q pair, a z column, a k pair or a v column.
extern "C" __global__ void split_in_proj(const float* p, InProjParts s, const int* pos, const float* inv_freq, long rows, float* q,
                                         float* k, float* v) {
    grid_dep();
    int per_row = s.qw / 2 + (s.kv ? s.kw / 2 + s.vw : 0), j0 = blockIdx.x * blockDim.x + threadIdx.x;
    if (j0 >= per_row) return;
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        int j = j0;
        const float* pr = p + r * s.width;
        if (j < s.qw / 2) {
            rope_pair(pr, q + r * s.qw, s.dk, j, pos[r], inv_freq);
            continue;
        }
        j -= s.qw / 2;
        if (j < s.kw / 2) {
            float* kr = k + r * s.kw;
            rope_pair(pr + s.k_at, kr, s.dk, j, pos[r], inv_freq);
            if (s.round) {
                int half = s.dk / 2, at = (j / half) * s.dk + j % half;
                kr[at] = round_to_bf16(kr[at]);
                kr[at + half] = round_to_bf16(kr[at + half]);
            }
            continue;
        }
        j -= s.kw / 2;
        float x = pr[s.k_at + s.kw + j];
        v[r * s.vw + j] = s.round ? round_to_bf16(x) : x;
    }
}

// Four values rounded to bf16, packed for one 8-byte store.
__device__ __forceinline__ uint2 bf16x4(float4 v) {
    return make_uint2((u32)f32_to_bf16(v.x) | ((u32)f32_to_bf16(v.y) << 16), (u32)f32_to_bf16(v.z) | ((u32)f32_to_bf16(v.w) << 16));
}

// RMSNorm of many rows (prompts): a warp a row, held in registers (d a multiple of 4, at most
// 128 · RMS_V4), its sum of squares by shuffles: x read once and no block-wide reduction, where
// `rmsnorm` gives each row a block. out or out16 may be null (see `put_act`).
#define RMS_V4 16
extern "C" __global__ void __launch_bounds__(256) rmsnorm_rows(const float* x, const float* w, int d, float eps, long rows, float* out,
                                                              bf16_t* out16) {
    grid_dep();
    long r = (long)blockIdx.x * 8 + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float4* xr = (const float4*)(x + r * d);
    float4 v[RMS_V4];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < RMS_V4; i++) {
        int j = lane + 32 * i;
        v[i] = 4 * j < d ? xr[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
    }
    ss = warp_sum(ss);
    float inv = 1.0f / sqrtf(ss / d + eps);
#pragma unroll
    for (int i = 0; i < RMS_V4; i++) {
        int j = lane + 32 * i;
        if (4 * j >= d) break;
        float4 wv = ((const float4*)w)[j];
        float4 o = make_float4(wv.x * (v[i].x * inv), wv.y * (v[i].y * inv), wv.z * (v[i].z * inv), wv.w * (v[i].w * inv));
        if (out) ((float4*)(out + r * d))[j] = o;
        if (out16) ((uint2*)(out16 + r * d))[j] = bf16x4(o);
    }
}

// Four values a thread a load (x and out start 16- and 8-byte aligned: buffer starts).
extern "C" __global__ void to_bf16(const float* x, bf16_t* out, long n) {
    grid_dep();
    long stride = (long)gridDim.x * blockDim.x, n4 = n / 4;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 v = ((const float4*)x)[i];
        ((uint2*)out)[i] = bf16x4(v);
    }
    for (long i = 4 * n4 + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += stride) out[i] = f32_to_bf16(x[i]);
}

// Each `width`-wide row of logits' token, a block a row, as the host's `sample::draw` picks it:
// with temperature 0 (or no `draws`) the index of the largest value, the first on ties (NaN
// never beats a value, but a row whose first value is NaN gives 0); else a draw by `draws[5r..]`
// = (temperature, min-p, top-k, top-p, u): weights exp((v - max) / temperature); top-k and top-p
// keep the most probable tokens (equal weights in id order), found by bisecting on the weight
// that bounds them (counts and masses summed over the block); min-p drops those below it × the
// top weight; then the first token, in id order, whose running sum of the kept weights reaches
// u × their total. A thread sums a contiguous run of tokens, the runs' sums are scanned in token
// order, and the run where the total is reached walks its tokens as the host does (so the sums
// differ from the host's only in their order). out holds the index as a float. Rows of up to
// `cache` tokens keep their weights in shared memory (the bisections read them ~60 times).
#define PICK_THREADS 1024
struct Best {
    float v;
    long at;
};
// The larger value, the smaller index on ties.
__device__ __forceinline__ Best best_of(Best a, Best b) { return b.v > a.v || (b.v == a.v && b.at < a.at) ? b : a; }
__device__ Best block_best(Best b) {
    __shared__ Best bs[PICK_THREADS / 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) b = best_of(b, Best{__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.at, o)});
    if (lane == 0) bs[warp] = b;
    __syncthreads();
    b = bs[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) b = best_of(b, Best{__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.at, o)});
    __syncthreads();
    return b;
}
// Inclusive scan of one value a thread, in thread order, over a block of PICK_THREADS; `total`
// gets the whole sum.
__device__ float block_scan(float v, float& total) {
    __shared__ float wsum[PICK_THREADS / 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float x = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += x;
    }
    if (lane == 31) wsum[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = wsum[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float x = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += x;
        }
        wsum[lane] = w;
    }
    __syncthreads();
    float out = v + (warp > 0 ? wsum[warp - 1] : 0.0f);
    total = wsum[PICK_THREADS / 32 - 1];
    __syncthreads();
    return out;
}
__device__ __forceinline__ float bits_f(u32 b) { return __uint_as_float(b); }
// Sum over a block of PICK_THREADS with one barrier: the warps' sums go to one of two arrays in
// turn (`flip`), and every warp adds all of them in the same order.
__device__ float pick_sum(float v, int& flip) {
    __shared__ float part[2][PICK_THREADS / 32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[flip][warp] = v;
    __syncthreads();
    float s = warp_sum(part[flip][lane]);
    flip ^= 1;
    return s;
}
extern "C" __global__ void pick_rows(const float* x, long width, const float* draws, long cache, float* out) {
    grid_dep();
    const float* r = x + blockIdx.x * width;
    const float* d = draws ? draws + 5 * blockIdx.x : nullptr;
    float temp = d ? d[0] : 0.0f;
    auto get = [&](long i) {
        float v = r[i];
        return v == v ? v : NEG_INF;
    };
    // The largest value (a thread's first value starts its search, so a -inf can win).
    long at = threadIdx.x < width ? threadIdx.x : width;
    Best b{at < width ? get(at) : NEG_INF, at};
#pragma unroll 8
    for (long i = at + PICK_THREADS; i < width; i += PICK_THREADS) {
        float v = get(i);
        if (v > b.v) b = Best{v, i};
    }
    b = block_best(b);
    if (temp == 0.0f) {
        if (threadIdx.x == 0) out[blockIdx.x] = r[0] != r[0] ? 0.0f : (float)b.at;
        return;
    }
    float max = b.v, min_p = d[1], top_k = d[2], top_p = d[3], u = d[4];
    float floor = fmaxf(min_p, 0.0f) * (isfinite(max) ? 1.0f : 0.0f);
    extern __shared__ float held[];
    bool kept_here = width <= cache;
    if (kept_here) {
        for (long i = threadIdx.x; i < width; i += PICK_THREADS) held[i] = expf((r[i] - max) / temp);
        __syncthreads();
    }
    auto weight = [&](long i) { return kept_here ? held[i] : expf((r[i] - max) / temp); };
    // Tokens weighing at least t, and their weight (NaN weighs nothing and never counts).
    int flip = 0;
    auto count_ge = [&](float t) {
        float s = 0.0f;
        for (long i = threadIdx.x; i < width; i += PICK_THREADS) s += weight(i) >= t ? 1.0f : 0.0f;
        return pick_sum(s, flip);
    };
    auto mass_ge = [&](float t) {
        float s = 0.0f;
        for (long i = threadIdx.x; i < width; i += PICK_THREADS) {
            float p = weight(i);
            s += p >= t ? p : 0.0f;
        }
        return pick_sum(s, flip);
    };
    // What top-k and top-p keep, as the most probable tokens in order: those weighing more than
    // `thr` and the first `ties` (by id) of those weighing exactly `thr` (weights lie in [0, 1],
    // so bisecting on their bits orders them). Counts are exact in f32 below 2^24 tokens.
    const u32 one_up = 0x3f800001u;
    float thr = -1.0f, ties = 0.0f, total = 0.0f;
    bool cut_k = top_k > 0.0f && top_k < (float)width && count_ge(0.0f) >= top_k;
    if (cut_k) {
        u32 lo = 0, hi = one_up;  // count_ge(lo) >= k > count_ge(hi)
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2;
            if (count_ge(bits_f(mid)) >= top_k) lo = mid;
            else hi = mid;
        }
        thr = bits_f(lo);
        ties = top_k - count_ge(bits_f(lo + 1));
        total = mass_ge(bits_f(lo + 1)) + ties * thr;
    }
    if (top_p < 1.0f) {
        if (!cut_k) total = mass_ge(0.0f);
        float target = top_p * total;
        // The kept mass weighing at least t is mass_ge(t) above thr, all of it at thr.
        u32 lo = cut_k ? __float_as_uint(thr) : 0u, hi = one_up;
        if (target > 0.0f) {
            while (hi - lo > 1) {
                u32 mid = lo + (hi - lo) / 2;
                if (mass_ge(bits_f(mid)) >= target) lo = mid;
                else hi = mid;
            }
            float t = bits_f(lo), above = mass_ge(bits_f(lo + 1));
            float at_t = cut_k && t == thr ? ties : count_ge(t) - count_ge(bits_f(lo + 1));
            // The fewest tokens at t that bring the mass to the target.
            float need = t > 0.0f ? ceilf((target - above) / t) : at_t;
            thr = t;
            ties = fminf(fmaxf(need, 1.0f), at_t);
        }
    }
    long run = (width + PICK_THREADS - 1) / PICK_THREADS, lo = min(width, threadIdx.x * run), hi = min(width, lo + run);
    // Each token's rank among those weighing exactly thr, in id order: the runs' counts scanned.
    float tie0 = 0.0f;
    if (ties > 0.0f) {
        float n = 0.0f, all;
        for (long i = lo; i < hi; i++) n += weight(i) == thr ? 1.0f : 0.0f;
        tie0 = block_scan(n, all) - n;
    }
    float sum = 0.0f, rank = tie0;
    long last = -1;
    for (long i = lo; i < hi; i++) {
        float p = weight(i);
        bool tied = p == thr;
        if (p >= floor && (p > thr || (tied && rank < ties))) sum += p, last = i;
        if (tied) rank += 1.0f;
    }
    float all;
    float before = block_scan(sum, all) - sum;
    // This run's walk from what the runs before it left of u × total.
    float left = u * all - before;
    long hit = width;
    if (left <= sum) {
        rank = tie0;
        for (long i = lo; i < hi; i++) {
            float p = weight(i);
            bool tied = p == thr;
            if (p >= floor && (p > thr || (tied && rank < ties))) {
                left -= p;
                if (left <= 0.0f) {
                    hit = i;
                    break;
                }
            }
            if (tied) rank += 1.0f;
        }
    }
    // The first run whose walk reached the total; past every run, the last token kept.
    Best first = block_best(Best{hit < width ? -(float)hit : NEG_INF, hit});
    Best kept = block_best(Best{(float)last, last});
    if (threadIdx.x == 0) out[blockIdx.x] = (float)(first.at < width ? first.at : (kept.at >= 0 ? kept.at : 0));
}

// One sequence of a step: its rows row0..row0+len of the step's activations, the position of
// its first row, its effective sliding window.
struct SeqInfo {
    long row0;
    int len;
    int pos0;
    int window;
    int pad;
};

#define MAX_K 8
// Depthwise causal conv + SiLU, every (row, channel) at once (an output depends on inputs only):
// channel c of x is column from + c of p (rows `width` wide); inputs before a sequence's first
// row come from its conv state [K-1, E] (conv[seq]), oldest first. taps [K, E], bias [E]; out
// rows E wide. `conv_state` then moves the last K-1 inputs into the states.
// Block (channels, CONV_ROWS rows): a thread a channel, its taps in registers, no division by
// the row width.
#define CONV_ROWS 8
extern "C" __global__ void conv_silu(const float* p, int width, int from, const SeqInfo* seqs, const int* row_seq,
                                     float* const* conv, const float* taps, const float* bias, int e, int k, long rows,
                                     float* out, bf16_t* out16) {
    grid_dep();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= e) return;
    // Taps by lag: wl[L] weighs the input L rows back.
    float wl[MAX_K];
#pragma unroll
    for (int l = 0; l < MAX_K; l++) wl[l] = l < k ? taps[(long)(k - 1 - l) * e + c] : 0.0f;
    float b = bias[c];
    for (long r0 = (long)blockIdx.y * CONV_ROWS; r0 < rows; r0 += (long)gridDim.y * CONV_ROWS) {
        // A whole chunk inside one sequence's rows of p, with the K-1 inputs before it there too
        // (a long prompt's chunks but its first): all its inputs loaded before any is used.
        SeqInfo s0 = seqs[row_seq[r0]];
        if (r0 + CONV_ROWS <= min(rows, s0.row0 + s0.len) && r0 - s0.row0 >= k - 1) {
            // v[i]: the input of row r0 + i - (MAX_K - 1).
            float v[CONV_ROWS + MAX_K - 1];
#pragma unroll
            for (int i = 0; i < CONV_ROWS + MAX_K - 1; i++) {
                int l = i - (MAX_K - 1);
                v[i] = l >= 1 - k ? p[(r0 + l) * width + from + c] : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < CONV_ROWS; i++) {
                // Oldest first, as below.
                float acc = b;
#pragma unroll
                for (int l = MAX_K - 1; l >= 1; l--)
                    if (l < k) acc += wl[l] * v[i + MAX_K - 1 - l];
                acc += wl[0] * v[i + MAX_K - 1];
                put_act(out, out16, (r0 + i) * e + c, silu(acc));
            }
            continue;
        }
        // The last K-1 inputs before the row, newest first (h[L] = input L rows back), refilled
        // where a chunk starts or a new sequence does: then each row reads one input, not K.
        float h[MAX_K];
        bool filled = false;
        long base = 0, end = 0;
        for (long r = r0; r < min(r0 + CONV_ROWS, rows); r++) {
            if (!filled || r >= end) {
                int seq = row_seq[r];
                SeqInfo si = seqs[seq];
                int t = (int)(r - si.row0);
                filled = true;
                base = si.row0;
                end = si.row0 + si.len;
#pragma unroll
                for (int l = 1; l < MAX_K; l++) {
                    int src = t - l;
                    h[l] = l >= k ? 0.0f : (src >= 0 ? p[(base + src) * width + from + c] : conv[seq][(long)(k - 1 + src) * e + c]);
                }
            }
            // Oldest first, the order of the row-by-row sum.
            float x = p[r * width + from + c], acc = b;
#pragma unroll
            for (int l = MAX_K - 1; l >= 1; l--)
                if (l < k) acc += wl[l] * h[l];
            acc += wl[0] * x;
#pragma unroll
            for (int l = MAX_K - 1; l > 1; l--) h[l] = h[l - 1];
            h[1] = x;
            put_act(out, out16, r * e + c, silu(acc));
        }
    }
}

// The conv of short sequences (decode), thread (channel, sequence): the sequence's rows one after
// another through a window of the last K inputs, which then becomes the state (conv_silu and
// conv_state in one launch).
extern "C" __global__ void conv_silu_step(const float* p, int width, int from, const SeqInfo* seqs, float* const* conv, const float* taps,
                                          const float* bias, int e, int k, float* out, bf16_t* out16) {
    // The step's table, the weights and the state the last step left do not depend on the
    // kernels before: loaded before waiting on them.
    allow_next();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    bool live = c < e;
    SeqInfo si = seqs[blockIdx.y];
    float* state = conv[blockIdx.y];
    float win[MAX_K], tap[MAX_K];
    float b0 = live ? bias[c] : 0.0f;
#pragma unroll
    for (int j = 0; j < MAX_K; j++) {
        if (live && j < k - 1) win[j] = state[(long)j * e + c];
        tap[j] = live && j < k ? taps[(long)j * e + c] : 0.0f;
    }
    wait_prior();
    if (!live) return;
    for (int t = 0; t < si.len; t++) {
        long r = si.row0 + t;
#pragma unroll
        for (int j = 0; j < MAX_K; j++)
            if (j == k - 1) win[j] = p[r * width + from + c];
        float acc = b0;
#pragma unroll
        for (int j = 0; j < MAX_K; j++)
            if (j < k) acc += tap[j] * win[j];
        put_act(out, out16, r * e + c, silu(acc));
#pragma unroll
        for (int j = 0; j < MAX_K - 1; j++)
            if (j < k - 1) win[j] = win[j + 1];
    }
#pragma unroll
    for (int j = 0; j < MAX_K - 1; j++)
        if (j < k - 1) state[(long)j * e + c] = win[j];
}

// The conv states after a step, block (channels, sequence): the last K-1 inputs of (state ++
// the sequence's rows).
extern "C" __global__ void conv_state(const float* p, int width, int from, const SeqInfo* seqs, float* const* conv, int e, int k) {
    grid_dep();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= e) return;
    SeqInfo si = seqs[blockIdx.y];
    float* state = conv[blockIdx.y];
    float hist[MAX_K];
#pragma unroll
    for (int j = 0; j < MAX_K - 1; j++) {
        if (j < k - 1) {
            int src = si.len - (k - 1) + j;
            hist[j] = src >= 0 ? p[(si.row0 + src) * width + from + c] : state[(long)(si.len + j) * e + c];
        }
    }
#pragma unroll
    for (int j = 0; j < MAX_K - 1; j++)
        if (j < k - 1) state[(long)j * e + c] = hist[j];
}

// x = softplus(x + bias) (linear above 20, as PyTorch), rows of e: block (columns, rows).
extern "C" __global__ void softplus_bias(float* x, const float* bias, int e, long rows) {
    grid_dep();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= e) return;
    float b = bias[c];
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        float v = x[r * e + c] + b;
        x[r * e + c] = v > 20.0f ? v : log1pf(expf(v));
    }
}

// Four consecutive values as f32, from f32 or bf16 (16- or 8-byte aligned), and one.
__device__ __forceinline__ float4 load4(const float* p) { return *(const float4*)p; }
__device__ __forceinline__ float4 load4(const bf16_t* p) {
    uint2 a = *(const uint2*)p;
    return make_float4(__uint_as_float(a.x << 16), __uint_as_float(a.x & 0xffff0000u), __uint_as_float(a.y << 16),
                       __uint_as_float(a.y & 0xffff0000u));
}
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const bf16_t* p) { return bf16_to_f32(*p); }

// The gated MLP's activation: out[r, j] = silu(g[r·stride + j]) · u[r·stride + j] for j < f
// (g and u: the two products' rows, or the halves of one product's; f32, or bf16 as a bf16
// product writes them, rounded as the official bf16 model has them), and its bf16 copy (see
// `put_act`); four values a thread a load where the rows allow (buffer starts aligned).
template <typename T>
__device__ void silu_mul_rows(const T* g, const T* u, long stride, int f, long rows, float* out, bf16_t* out16) {
    long step = (long)gridDim.x * blockDim.x, first = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (f % 4 == 0 && stride % 4 == 0) {
        int f4 = f / 4;
        for (long i = first; i < rows * f4; i += step) {
            long r = i / f4, j = 4 * (i % f4);
            float4 a = load4(g + r * stride + j), b = load4(u + r * stride + j);
            float4 v = make_float4(silu(a.x) * b.x, silu(a.y) * b.y, silu(a.z) * b.z, silu(a.w) * b.w);
            if (out) *(float4*)(out + r * f + j) = v;
            if (out16) ((uint2*)out16)[i] = bf16x4(v);
        }
        return;
    }
    for (long i = first; i < rows * f; i += step) {
        long r = i / f, j = i % f;
        put_act(out, out16, i, silu(load1(g + r * stride + j)) * load1(u + r * stride + j));
    }
}
extern "C" __global__ void silu_mul(const float* g, const float* u, long stride, int f, long rows, float* out, bf16_t* out16) {
    grid_dep();
    silu_mul_rows(g, u, stride, f, rows, out, out16);
}
extern "C" __global__ void silu_mul16(const bf16_t* g, const bf16_t* u, long stride, int f, long rows, float* out, bf16_t* out16) {
    grid_dep();
    silu_mul_rows(g, u, stride, f, rows, out, out16);
}

// Selective scan (spec §3.3) in chunks of a sequence's rows, so that a long prompt runs on
// channels × chunks threads rather than channels alone: a thread holds one channel's N states
// in registers. A chunk's end state is a linear function of its start state,
//   S_end = exp(A · ΣΔ) ⊙ S_start + H,
// where H is the chunk's end state from zero. So `scan_chunk_end` finds H and ΣΔ of every chunk
// but a sequence's last, `scan_chunk_carry` walks each sequence's chunks in order to find
// their start states, and `scan_chunk_out` runs every chunk from its start state, writing
// y = (Σ_n S·C + D·x) ⊙ silu(z) and the sequence's state after its last row. A decode step
// (one chunk a sequence) needs only the last. Where Δ still needs its bias and softplus
// (`dt_bias`), `scan_chunk_end` writes it back finished, every chunk's, so the softplus is taken
// once an element. x, delta, z, y: [t, E]; b, c: [t, N]; a [E, N];
// ssm[seq] [E, N]; hend, init: [chunk][N][E]; dtsum [chunk][E].
// chunks[i] = (sequence, first row of the chunk in it, rows, CHUNK_FIRST | CHUNK_LAST).
#define CHUNK_FIRST 1
#define CHUNK_LAST 2
#define SCAN_ROWS 64
// The decay exp(Δ·A) as exp2(Δ · A·log2 e), A·log2 e kept in registers: one multiply and the
// hardware's exp2 (`ex2`) a state a row, where expf costs a range reduction more and exp2f a
// rescaling for subnormal results (the scan is bound by these instructions).
#define LOG2E 1.4426950408889634f

// Δ of row element i: as given, or softplus(Δ + bias) where the product that made it left its
// epilogue to the scan (`dt_bias`; `bc` its channel's value, as `softplus_bias` computes it).
__device__ __forceinline__ float softplus_of(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
__device__ __forceinline__ float delta_at(const float* delta, long i, const float* dt_bias, float bc) {
    float v = delta[i];
    if (!dt_bias) return v;
    return softplus_of(v + bc);
}

// A chunk's rows of B (and C) into shared memory, N_ states a row (zeros past n), so the
// recurrence reads four states' values a load.
template <int N_>
__device__ void stage_rows(const float* m, long r0, int rows, int n, float (*dst)[N_]) {
    for (int i = threadIdx.x; i < rows * N_; i += blockDim.x) {
        int t = i / N_, j = i % N_;
        dst[t][j] = j < n ? m[(r0 + t) * n + j] : 0.0f;
    }
}

template <int N_>
__device__ void scan_chunk_end(const float* x, float* delta, const float* dt_bias, const float* bm, const float* a, const SeqInfo* seqs,
                               const int4* chunks, int e, int n, float* hend, float* dtsum) {
    __shared__ __align__(16) float sb[SCAN_ROWS][N_];
    int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    int4 ch = chunks[chunk];
    long r0 = seqs[ch.x].row0 + ch.y;
    if (ch.w & CHUNK_LAST) {
        // No end state to find, but Δ to finish for `scan_chunk_out`.
        if (dt_bias && c < e) {
            float bc = dt_bias[c];
            for (int t = 0; t < ch.z; t++) delta[(r0 + t) * e + c] = delta_at(delta, (r0 + t) * e + c, dt_bias, bc);
        }
        return;
    }
    stage_rows<N_>(bm, r0, ch.z, n, sb);
    __syncthreads();
    if (c >= e) return;
    float s[N_], av[N_], sum = 0.0f, bc = dt_bias ? dt_bias[c] : 0.0f;
#pragma unroll
    for (int j = 0; j < N_; j++) {
        s[j] = 0.0f;
        av[j] = j < n ? a[(long)c * n + j] * LOG2E : 0.0f;
    }
    // The next row's Δ and x loaded a row ahead (before this row's store of Δ, which the
    // compiler may not move a load past).
    float dn = ch.z > 0 ? delta[r0 * e + c] : 0.0f, xn = ch.z > 0 ? x[r0 * e + c] : 0.0f;
    for (int t = 0; t < ch.z; t++) {
        long r = r0 + t;
        float dv = dn, xv = xn;
        if (t + 1 < ch.z) {
            dn = delta[(r + 1) * e + c];
            xn = x[(r + 1) * e + c];
        }
        float dt = dt_bias ? softplus_of(dv + bc) : dv, dx = dt * xv;
        if (dt_bias) delta[r * e + c] = dt;
        sum += dt;
#pragma unroll
        for (int q = 0; q < N_ / 4; q++) {
            float4 b4 = *(const float4*)&sb[t][4 * q];
            float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int i = 0; i < 4; i++) s[4 * q + i] = ex2(dt * av[4 * q + i]) * s[4 * q + i] + dx * bv[i];
        }
    }
#pragma unroll
    for (int j = 0; j < N_; j++)
        if (j < n) hend[((long)chunk * n + j) * e + c] = s[j];
    dtsum[(long)chunk * e + c] = sum;
}

// Thread (channel · N + state, sequence): the start state of each of the chunks of a sequence
// that has more than one, chunk by chunk (the loads of later chunks, which do not depend on the
// state, go ahead of the recurrence), the first chunk's included: `scan_chunk_out` writes the
// sequence's state from its last chunk while its first chunk, another block, may not have read
// it yet. seq_chunks[i] is sequence i's first chunk, seq_chunks[i + 1] one past its last.
// (`__restrict__`: the stores to init do not alias the loads, so the unrolled loads go first.)
extern "C" __global__ void scan_chunk_carry(const float* a, const int* seq_chunks, float* const* ssm, int e, int n,
                                            const float* __restrict__ hend, const float* __restrict__ dtsum, float* __restrict__ init) {
    grid_dep();
    int i = blockIdx.x * blockDim.x + threadIdx.x, seq = blockIdx.y;
    int c0 = seq_chunks[seq], c1 = seq_chunks[seq + 1];
    if (i >= e * n || c1 - c0 < 2) return;
    int c = i / n, j = i % n;
    float s = ssm[seq][i], av = a[i] * LOG2E;
    init[((long)c0 * n + j) * e + c] = s;
#pragma unroll 16
    for (int k = c0; k < c1 - 1; k++) {
        s = ex2(dtsum[(long)k * e + c] * av) * s + hend[((long)k * n + j) * e + c];
        init[((long)(k + 1) * n + j) * e + c] = s;
    }
}

template <int N_>
__device__ void scan_chunk_out(const float* x, const float* delta, const float* dt_bias, const float* bm, const float* cm, const float* z,
                               long zs, const float* a, const float* d, const SeqInfo* seqs, const int4* chunks, float* const* ssm, int e,
                               int n, const float* init, float* y) {
    __shared__ __align__(16) float sb[SCAN_ROWS][N_], sc[SCAN_ROWS][N_];
    int c = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;
    int4 ch = chunks[chunk];
    long r0 = seqs[ch.x].row0 + ch.y;
    stage_rows<N_>(bm, r0, ch.z, n, sb);
    stage_rows<N_>(cm, r0, ch.z, n, sc);
    __syncthreads();
    if (c >= e) return;
    float* st = ssm[ch.x];
    float s[N_], av[N_];
#pragma unroll
    for (int j = 0; j < N_; j++) {
        // A sequence's only chunk reads and writes its state in one block; others start from init.
        s[j] = j >= n ? 0.0f : (ch.w & CHUNK_FIRST) && (ch.w & CHUNK_LAST) ? st[(long)c * n + j] : init[((long)chunk * n + j) * e + c];
        av[j] = j < n ? a[(long)c * n + j] * LOG2E : 0.0f;
    }
    float dc = d[c], bc = dt_bias ? dt_bias[c] : 0.0f;
    // The next row's Δ, x and gate loaded a row ahead (before this row's store of y).
    float dn = 0.0f, xn = 0.0f, zn = 0.0f;
    if (ch.z > 0) dn = delta[r0 * e + c], xn = x[r0 * e + c], zn = z[r0 * zs + c];
    for (int t = 0; t < ch.z; t++) {
        long r = r0 + t;
        float dv = dn, xv = xn, zv = zn;
        if (t + 1 < ch.z) {
            dn = delta[(r + 1) * e + c];
            xn = x[(r + 1) * e + c];
            zn = z[(r + 1) * zs + c];
        }
        float dt = dt_bias ? softplus_of(dv + bc) : dv, dx = dt * xv, acc = 0.0f;
#pragma unroll
        for (int q = 0; q < N_ / 4; q++) {
            float4 b4 = *(const float4*)&sb[t][4 * q], c4 = *(const float4*)&sc[t][4 * q];
            float bv[4] = {b4.x, b4.y, b4.z, b4.w}, cv[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s[4 * q + i] = ex2(dt * av[4 * q + i]) * s[4 * q + i] + dx * bv[i];
                acc += s[4 * q + i] * cv[i];
            }
        }
        y[r * e + c] = (acc + dc * xv) * silu(zv);
    }
    if (ch.w & CHUNK_LAST)
#pragma unroll
        for (int j = 0; j < N_; j++)
            if (j < n) st[(long)c * n + j] = s[j];
}

// The scan's kernels for up to 16 and up to 32 states.
#define SCAN_KERNELS(N_) \
    extern "C" __global__ void scan_chunk_end_##N_(const float* x, float* delta, const float* dt_bias, const float* bm, const float* a, \
                                                   const SeqInfo* seqs, const int4* chunks, int e, int n, float* hend, float* dtsum) { \
        grid_dep(); \
        scan_chunk_end<N_>(x, delta, dt_bias, bm, a, seqs, chunks, e, n, hend, dtsum); \
    } \
    extern "C" __global__ void scan_chunk_out_##N_(const float* x, const float* delta, const float* dt_bias, const float* bm, const float* cm, \
                                                   const float* z, long zs, const float* a, const float* d, const SeqInfo* seqs, \
                                                   const int4* chunks, float* const* ssm, int e, int n, const float* init, float* y) { \
        grid_dep(); \
        scan_chunk_out<N_>(x, delta, dt_bias, bm, cm, z, zs, a, d, seqs, chunks, ssm, e, n, init, y); \
    }
SCAN_KERNELS(16)
SCAN_KERNELS(32)

// Short prompts' selective scan in one pass over their rows (up to SEQ_SCAN_UP_TO rows a step;
// more take the chunked scan above): a block walks one sequence's rows in order for 128 / N_
// channels, a lane a state, so each state takes one exp a row where the chunked scan takes two
// (its end pass and its out pass) and three launches. It has channels × N_ lanes a sequence
// whatever its length (51,200 at the 1.5B shapes), each a chain of rows: on an H100 the 1.5B
// shapes' 128-row prefill ran 10% faster with it, 1024 rows 4%, 2048 rows 4% slower.
// Rows come in tiles of SEQ_SCAN_ROWS, loaded into registers while the tile before is scanned,
// then staged in shared memory by channel and by state (Δ finished there, once an element), so
// a lane reads four rows' B, four rows' C and two rows' (Δ, x) a load. A lane keeps its state's
// share S·C of N_ rows, and the N_ lanes of a channel then sum them by halves through shuffles,
// leaving row j's Σ S·C with lane j. Rows past the sequence's end are zeros: Δ = 0 leaves the
// state as it is, so a tile's rounds of N_ rows need no tail.
#define SEQ_SCAN_ROWS 64
template <int N_>
__device__ void scan_seq(const float* x, const float* delta, const float* dt_bias, const float* bm, const float* cm, const float* z, long zs,
                         const float* a, const float* d, const SeqInfo* seqs, float* const* ssm, int e, int n, float* y) {
    constexpr int CH = 128 / N_, T = SEQ_SCAN_ROWS, TP = T + 4, CE = T * CH / 128, BE = T * N_ / 128;
    constexpr int HALVINGS = N_ == 32 ? 5 : N_ == 16 ? 4 : -1;
    static_assert(HALVINGS > 0 && T % N_ == 0, "16 or 32 states, rounds of N_ rows");
    __shared__ __align__(16) float s_dx[CH][2 * TP];  // (Δ finished, x) of each row
    __shared__ __align__(16) float s_b[N_][TP], s_c[N_][TP];
    __shared__ __align__(16) float s_z[CH][TP], s_y[CH][TP];
    int tid = threadIdx.x, ch = tid / N_, j = tid % N_;
    int c0 = blockIdx.x * CH, c = c0 + ch, seq = blockIdx.y;
    long r0 = seqs[seq].row0;
    int len = seqs[seq].len;
    bool live = c < e && j < n;
    float* st = ssm[seq];
    float h = live ? st[(long)c * n + j] : 0.0f, av = live ? a[(long)c * n + j] * LOG2E : 0.0f;
    float dc = c < e ? d[c] : 0.0f;
    // This thread's staging slots: column jc of rows tid / CH + k · (128 / CH) of the channel
    // tiles, and state j of rows tid / N_ + k · (128 / N_) of B and C.
    int jc = tid % CH, cc = c0 + jc;
    float bc = dt_bias && cc < e ? dt_bias[cc] : 0.0f;
    float rd[CE], rx[CE], rz[CE], rb[BE], rc[BE];
    auto load = [&](int t0) {
#pragma unroll
        for (int k = 0; k < CE; k++) {
            int t = tid / CH + k * (128 / CH);
            bool ok = t0 + t < len && cc < e;
            long i = (r0 + t0 + t) * e + cc;
            rd[k] = ok ? delta[i] : 0.0f;
            rx[k] = ok ? x[i] : 0.0f;
            rz[k] = ok ? z[(r0 + t0 + t) * zs + cc] : 0.0f;
            if (dt_bias && ok) rd[k] += bc;
        }
#pragma unroll
        for (int k = 0; k < BE; k++) {
            int t = tid / N_ + k * (128 / N_);
            bool ok = t0 + t < len && j < n;
            rb[k] = ok ? bm[(r0 + t0 + t) * n + j] : 0.0f;
            rc[k] = ok ? cm[(r0 + t0 + t) * n + j] : 0.0f;
        }
    };
    if (len > 0) load(0);
    for (int t0 = 0; t0 < len; t0 += T) {
        __syncthreads();  // the tile before is read and written out
#pragma unroll
        for (int k = 0; k < CE; k++) {
            int t = tid / CH + k * (128 / CH);
            bool ok = t0 + t < len && cc < e;
            *(float2*)&s_dx[jc][2 * t] = make_float2(dt_bias && ok ? softplus_of(rd[k]) : rd[k], rx[k]);
            s_z[jc][t] = rz[k];
        }
#pragma unroll
        for (int k = 0; k < BE; k++) {
            int t = tid / N_ + k * (128 / N_);
            s_b[j][t] = rb[k];
            s_c[j][t] = rc[k];
        }
        __syncthreads();
        if (t0 + T < len) load(t0 + T);
        int rows = min(T, len - t0);
        for (int k0 = 0; k0 < rows; k0 += N_) {
            float p[N_];
#pragma unroll
            for (int q = 0; q < N_ / 4; q++) {
                float4 b4 = *(const float4*)&s_b[j][k0 + 4 * q], c4 = *(const float4*)&s_c[j][k0 + 4 * q];
                float4 v0 = *(const float4*)&s_dx[ch][2 * (k0 + 4 * q)], v1 = *(const float4*)&s_dx[ch][2 * (k0 + 4 * q) + 4];
                float dt[4] = {v0.x, v0.z, v1.x, v1.z}, xv[4] = {v0.y, v0.w, v1.y, v1.w};
                float bv[4] = {b4.x, b4.y, b4.z, b4.w}, cv[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float dx = dt[i] * xv[i];
                    h = ex2(dt[i] * av) * h + dx * bv[i];
                    p[4 * q + i] = h * cv[i];
                }
            }
            // Halves: the lane with bit o keeps rows o..2o of its pairs, its partner rows 0..o.
#pragma unroll
            for (int stage = 0; stage < HALVINGS; stage++) {
                const int o = N_ / 2 >> stage;
                bool up = j & o;
#pragma unroll
                for (int i = 0; i < N_ / 2; i++) {
                    if (i >= o) break;
                    float send = up ? p[i] : p[i + o], keep = up ? p[i + o] : p[i];
                    p[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
                }
            }
            int t = k0 + j;
            s_y[ch][t] = (p[0] + dc * s_dx[ch][2 * t + 1]) * silu(s_z[ch][t]);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < CE; k++) {
            int t = tid / CH + k * (128 / CH);
            if (t < rows && cc < e) y[(r0 + t0 + t) * e + cc] = s_y[jc][t];
        }
    }
    if (live) st[(long)c * n + j] = h;
}
#define SEQ_SCAN_KERNEL(N_) \
    extern "C" __global__ void __launch_bounds__(128) scan_seq_##N_(const float* x, const float* delta, const float* dt_bias, const float* bm, \
                                                                   const float* cm, const float* z, long zs, const float* a, const float* d, \
                                                                   const SeqInfo* seqs, float* const* ssm, int e, int n, float* y) { \
        grid_dep(); \
        scan_seq<N_>(x, delta, dt_bias, bm, cm, z, zs, a, d, seqs, ssm, e, n, y); \
    }
SEQ_SCAN_KERNEL(16)
SEQ_SCAN_KERNEL(32)

// Sum over the N_ lanes (a power of two, up to 32) of a group within a warp.
template <int N_> __device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = N_ / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Elements i..i+3 of p[0..n) (zeros past n): one 16-byte (f32) or 8-byte (bf16) load where
// `vec` says p + i is so aligned and i + 4 <= n whenever i < n.
__device__ __forceinline__ float4 get4(const float* p, int i, int n, bool vec) {
    if (vec) return i < n ? *(const float4*)(p + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    return make_float4(i < n ? p[i] : 0.0f, i + 1 < n ? p[i + 1] : 0.0f, i + 2 < n ? p[i + 2] : 0.0f, i + 3 < n ? p[i + 3] : 0.0f);
}
__device__ __forceinline__ float4 get4(const bf16_t* p, int i, int n, bool vec) {
    if (vec) {
        if (i >= n) return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        uint2 r = *(const uint2*)(p + i);
        return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u), __uint_as_float(r.y << 16),
                           __uint_as_float(r.y & 0xffff0000u));
    }
    auto at = [&](int j) { return j < n ? bf16_to_f32(p[j]) : 0.0f; };
    return make_float4(at(i), at(i + 1), at(i + 2), at(i + 3));
}
__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// A decode step of the SSM branch (every sequence one row: chunk i is row i's sequence), with
// the scan's input-dependent parameters made here rather than by three launches before: from
// x_proj's output row [δr (R) | B (n) | C (n)], each part RMS-normed when `wd` is given (scales
// wd, wb, wc), Δ = softplus(dt_w · δr + dt_b) (dt_w [E, R]), then one step of the recurrence
// from the sequence's state and y = (Σ_n S·C + D·x) ⊙ silu(z). Block (channels, row), N_ / 4
// lanes a channel (a lane four consecutive states; they split δr for Δ, four consecutive
// elements at a time): few threads a channel, since a large batch's blocks come in waves, each
// as long as one block's chain of memory round trips. Loads are 4 elements wide where rows
// allow: the L1 traffic of many narrow loads is what bounded this kernel at 64 rows. The step's
// tables, A, D, the bias and the state the last step left do not depend on the kernels before
// it: they are asked for before waiting on them, and x and z with x_proj's row right after, so
// the chain after the wait is shorter (dt_w's rows loaded before the wait too, 640 KB a layer
// at the 1.5B shapes, made steps at context 8192 slower: they compete with the attention's
// reads).
// Dynamic shared memory: the three parts, each from a multiple of 4 floats.
#define SSM_LANE_STATES 4
__device__ __forceinline__ int round4(int v) { return (v + 3) & ~3; }
template <int N_, typename W>
__device__ void ssm_step(const float* proj, int rk, int n, const float* wd, const float* wb, const float* wc, float eps, const W* dt_w,
                         const float* dt_b, const float* x, const float* z, long zs, const float* a, const float* d, const SeqInfo* seqs,
                         const int4* chunks, float* const* ssm, int e, float* y) {
    constexpr int L = N_ / SSM_LANE_STATES;
    extern __shared__ __align__(16) float sp[];
    __shared__ float inv[3];
    allow_next();
    int4 ch = chunks[blockIdx.y];
    long row = seqs[ch.x].row0 + ch.y;
    // Past the last channel a group computes channel e - 1 again (the shuffles need every lane
    // of the warp) and writes nothing.
    int c0 = blockIdx.x * (blockDim.x / L) + threadIdx.x / L, j = threadIdx.x % L;
    bool live = c0 < e;
    int c = live ? c0 : e - 1;
    bool wvec = rk % 4 == 0, svec = n % 4 == 0;
    int i = j * SSM_LANE_STATES;
    float* st = ssm[ch.x] + (long)c * n;
    float4 av = get4(a + (long)c * n, i, n, svec), sv = get4(st, i, n, svec);
    float bias = dt_b[c], dc = d[c];
    wait_prior();
    long rc = row * e + c;
    float xv = x[rc], zv = z[row * zs + c];
    int pw = rk + 2 * n, ob = round4(rk), oc = ob + round4(n);
    // Element i of the row goes to its part's place in `sp`.
    auto place = [&](int i) { return i < rk ? i : (i < rk + n ? ob + i - rk : oc + i - rk - n); };
    for (int i = threadIdx.x; i < pw; i += blockDim.x) sp[place(i)] = proj[row * pw + i];
    __syncthreads();
    if (wd) {
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (warp < 3) {
            int from = warp == 0 ? 0 : (warp == 1 ? ob : oc), len = warp == 0 ? rk : n;
            float ss = 0.0f;
            for (int j = lane; j < len; j += 32) ss += sp[from + j] * sp[from + j];
            ss = warp_sum(ss);
            if (lane == 0) inv[warp] = 1.0f / sqrtf(ss / len + eps);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < pw; i += blockDim.x) {
            int part = i < rk ? 0 : (i < rk + n ? 1 : 2);
            float w = part == 0 ? wd[i] : (part == 1 ? wb[i - rk] : wc[i - rk - n]);
            float* v = sp + place(i);
            *v = w * (*v * inv[part]);
        }
        __syncthreads();
    }
    float dot = 0.0f;
    for (int k = 4 * j; k < rk; k += 4 * L) dot += dot4(get4(dt_w + (long)c * rk, k, rk, wvec), get4(sp, k, rk, wvec));
    float dt = group_sum<L>(dot) + bias;
    dt = dt > 20.0f ? dt : log1pf(expf(dt));
    float4 bv = get4(sp + ob, i, n, svec), cv = get4(sp + oc, i, n, svec);
    float dx = dt * xv;
    auto next = [&](float av, float sv, float bv) { return ex2(dt * (av * LOG2E)) * sv + dx * bv; };
    float4 s = make_float4(next(av.x, sv.x, bv.x), next(av.y, sv.y, bv.y), next(av.z, sv.z, bv.z), next(av.w, sv.w, bv.w));
    if (live && i < n) {
        if (svec) *(float4*)(st + i) = s;
        else {
            const float sa[4] = {s.x, s.y, s.z, s.w};
            for (int u = 0; u < 4 && i + u < n; u++) st[i + u] = sa[u];
        }
    }
    float out = group_sum<L>(i < n ? dot4(s, cv) : 0.0f);
    if (live && j == 0) y[rc] = (out + dc * xv) * silu(zv);
}

#define SSM_STEP(N_, NAME, W) \
    extern "C" __global__ void ssm_step_##N_##_##NAME(const float* proj, int rk, int n, const float* wd, const float* wb, const float* wc, \
                                                      float eps, const W* dt_w, const float* dt_b, const float* x, const float* z, \
                                                      long zs, const float* a, const float* d, const SeqInfo* seqs, const int4* chunks, \
                                                      float* const* ssm, int e, float* y) { \
        ssm_step<N_, W>(proj, rk, n, wd, wb, wc, eps, dt_w, dt_b, x, z, zs, a, d, seqs, chunks, ssm, e, y); \
    }
SSM_STEP(16, f32, float)
SSM_STEP(16, bf16, bf16_t)
SSM_STEP(32, f32, float)
SSM_STEP(32, bf16, bf16_t)

// Keys and values of one source of rows (the meta prefix, a cache store, this call's rows): row
// i of K/V head h at k[i * k_stride + h * dk], in f32 or bf16, at absolute position pos[i] (or
// pos0 + i when pos is null).
struct KvSrc {
    const void* k;
    const void* v;
    const int* pos;
    int rows;
    int pos0;
    int k_stride;
    int v_stride;
    int bf16;
    int pad;
};

__device__ __forceinline__ float kv_at(const void* p, int bf16, long i) {
    return bf16 ? bf16_to_f32(((const bf16_t*)p)[i]) : ((const float*)p)[i];
}

// This call's rows of a sequence as a K/V source (f32, or bf16 copies of them; at its positions
// pos0..).
template <typename T>
__device__ __forceinline__ KvSrc own_rows(const T* new_k, const T* new_v, SeqInfo sq, int kw, int vw) {
    KvSrc s;
    s.k = new_k + sq.row0 * kw;
    s.v = new_v + sq.row0 * vw;
    s.pos = 0;
    s.rows = sq.len;
    s.pos0 = sq.pos0;
    s.k_stride = kw;
    s.v_stride = vw;
    s.bf16 = sizeof(T) == 2;
    return s;
}

#define ATTN_KEYS 2
#define DEC_G 8
#define MAX_SPLITS 128

// Split-K decode attention: every block of a (row, heads h0..h0+nh) calls this once its split's
// partials ([max, sum, values...], dv + 2 floats, at part[((t·heads + h)·splits + z)]) are
// written; the last of the `used` splits to arrive (`count`, zero between launches) merges them
// into out and sets the count back to zero. One launch rather than a merging kernel after.
__device__ void merge_splits_if_last(const float* part, int* count, int t, int heads, int h0, int nh, int splits, int used, int dv,
                                     float* out) {
    __shared__ int last;
    __shared__ float coef[DEC_G][MAX_SPLITS];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count, 1) == used - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int g0 = 0; g0 < nh; g0 += DEC_G) {
        int gc = min(DEC_G, nh - g0);
        // A warp a head: each split's share of the softmax's denominator.
        for (int g = warp; g < gc; g += warps) {
            const float* pp = part + ((long)t * heads + h0 + g0 + g) * splits * (dv + 2);
            float mz = NEG_INF;
            for (int z = lane; z < used; z += 32) mz = fmaxf(mz, __ldcg(pp + z * (dv + 2)));
            float mm = warp_max(mz), den = 0.0f;
            for (int z = lane; z < used; z += 32) {
                float m = __ldcg(pp + z * (dv + 2)), ez = mm == NEG_INF || m == NEG_INF ? 0.0f : expf(m - mm);
                den += ez * __ldcg(pp + z * (dv + 2) + 1);
                coef[g][z] = ez;
            }
            den = warp_sum(den);
            for (int z = lane; z < used; z += 32) coef[g][z] = den > 0.0f ? coef[g][z] / den : 0.0f;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < gc * dv; i += blockDim.x) {
            int g = i / dv, col = i % dv;
            long rh = (long)t * heads + h0 + g0 + g;
            const float* pp = part + rh * splits * (dv + 2) + 2 + col;
            float v = 0.0f;
#pragma unroll 8
            for (int z = 0; z < used; z++) v += coef[g][z] * __ldcg(pp + z * (dv + 2));
            out[rh * dv + col] = v;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) *count = 0;
}
// Attention of one sequence's query rows: block (row, head, split), 4 warps splitting the split's
// keys, an online softmax per warp, merged at the end. The keys of all sources, in order, are
// cut into up to `splits` ranges (split-K, for decode, where rows × heads alone would leave
// most of the GPU idle); with one split the block writes the output, otherwise its partial
// maximum, sum and weighted values, merged by the split that ends last (`count[t·heads + h]`). A query at t sees key s when s <= t and, in a
// window layer, t - s <= window or s < meta. Block x is a row of the step: its sequence gives
// the positions and the sources (meta prefix, store: `past[2 seq..]`; this call's rows).
// A lane scores dimension pairs 2·lane, 2·lane + 64, … and sums value columns in fours,
// 4·lane, 4·lane + 128, …: DVL columns a lane (a multiple of 4; dk, dv <= 32 · DVL, so that every
// loop over a lane's share unrolls), each load of a staged bf16 key or value one shared-memory
// word or double word.
// Stages of a warp's keys in flight (`attention_rows` over bf16 sources): each ATTN_KEYS keys
// with their values and positions.
#define ATTN_STAGES 4
static_assert(ATTN_KEYS == 2, "warp_sum2 reduces two keys' scores at once");
// The warp sums of a and b in seven shuffles rather than ten: after the first exchange the low
// half of the warp holds a's pairs and the high half b's, then each half reduces its own. Every
// sum is the one warp_sum makes (the same pairs added, commuted), so the results are equal.
__device__ __forceinline__ void warp_sum2(float& a, float& b) {
    bool high = threadIdx.x & 16;
    float keep = high ? b : a;
    keep += __shfl_xor_sync(0xffffffffu, high ? a : b, 16);
    for (int o = 8; o > 0; o >>= 1) keep += __shfl_xor_sync(0xffffffffu, keep, o);
    a = __shfl_sync(0xffffffffu, keep, 0);
    b = __shfl_sync(0xffffffffu, keep, 16);
}
template <int DVL>
__device__ void attention_rows(const float* q, int heads, int kv_heads, int dk, int dv, const SeqInfo* seqs, const int* row_seq,
                               const KvSrc* past, const float* new_k, const float* new_v, int global_, int meta, float scale,
                               int splits, float* out, float* part, int* count, int staged) {
    __shared__ __align__(16) float qs[256];
    __shared__ float wm[4], wl[4];
    __shared__ float wacc[4][256];
    extern __shared__ __align__(16) unsigned char att_smem[];
    int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int seq = row_seq[t];
    SeqInfo sq = seqs[seq];
    long qrow = t;
    int tq = sq.pos0 + (int)(t - sq.row0);
    int window = sq.window;
    int kh = h / (heads / kv_heads);
    int kw = kv_heads * dk, vw = kv_heads * dv;
    // The sequence's sources: the meta prefix, its store, this call's rows.
    KvSrc s0 = past[2 * seq], s1 = past[2 * seq + 1], s2 = own_rows(new_k, new_v, sq, kw, vw);
    int keys = s0.rows + s1.rows + s2.rows;
    int per_split = max(1, (keys + splits - 1) / splits), used = max(1, (keys + per_split - 1) / per_split);
    if (z >= used) return;
    float qscale = scale * LOG2E;
    for (int j = threadIdx.x; j < dk; j += blockDim.x) qs[j] = q[qrow * heads * dk + h * dk + j] * qscale;
    __syncthreads();
    // Scores in log2 units (the queries scaled by log2 e), so that a weight is one ex2.
    float m = NEG_INF, l = 0.0f, acc[DVL];
    for (int j = 0; j < DVL; j++) acc[j] = 0.0f;
    // The online softmax over ATTN_KEYS keys i0, i0 + 4, … (< b) with positions sp, partial
    // scores sc (this lane's dimensions) and values vv (this lane's columns).
    auto consume = [&](int i0, int b, const int* sp, float* sc, float (*vv)[DVL]) {
        warp_sum2(sc[0], sc[1]);
        float mn = m;
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; u++) {
            bool seen = i0 + 4 * u < b && sp[u] >= 0 && sp[u] <= tq && (global_ || tq - sp[u] <= window || sp[u] < meta);
            sc[u] = seen ? sc[u] : NEG_INF;
            mn = fmaxf(mn, sc[u]);
        }
        if (mn == NEG_INF) return;
        float corr = ex2(m - mn);
        l *= corr;
#pragma unroll
        for (int j = 0; j < DVL; j++) acc[j] *= corr;
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; u++) {
            if (sc[u] == NEG_INF) continue;  // the same in every lane
            float pw = ex2(sc[u] - mn);
            l += pw;
#pragma unroll
            for (int j = 0; j < DVL; j++) acc[j] += pw * vv[u][j];
        }
        m = mn;
    };
    // A staged key: dk then dv bf16 values, in 16-byte chunks.
    int kc = dk / 8, per_key = kc + dv / 8, stage_len = ATTN_KEYS * per_key * 8;
    bf16_t* wst = (bf16_t*)att_smem + warp * ATTN_STAGES * stage_len;
    int* wpos = (int*)(att_smem + 8 * ATTN_STAGES * stage_len) + warp * ATTN_STAGES * ATTN_KEYS;
    int lo = z * per_split, hi = lo + per_split, base = 0;
    for (int si = 0; si < 3; si++) {
        KvSrc s = si == 0 ? s0 : (si == 1 ? s1 : s2);
        int a = max(lo - base, 0), b = min(hi - base, s.rows);
        base += s.rows;
#if __CUDA_ARCH__ >= 800
        // A bf16 source with 16-byte rows: the warp's keys come through shared memory by
        // cp.async, ATTN_STAGES batches in flight, so a batch waits for its loads only when the
        // ones before it have been used (the sums below run as in the loop after).
        if (staged && s.bf16 && s.k_stride % 8 == 0 && s.v_stride % 8 == 0 && (((unsigned long)s.k | (unsigned long)s.v) & 15) == 0) {
            int n_it = b - a > warp ? (b - a - warp + 4 * ATTN_KEYS - 1) / (4 * ATTN_KEYS) : 0;
            u32 wst_at = shared_addr(wst), wpos_at = shared_addr(wpos);
            // The lane's 16-byte chunks of a key (its K or V part), at the warp's first key and
            // the bytes from one key to the next: a batch's addresses are one multiply-add each.
            const char* src[DVL / 4];
            int src_stride[DVL / 4];
#pragma unroll
            for (int c = 0; c < DVL / 4; c++) {
                int r = lane + 32 * c;
                bool is_k = r < kc;
                src[c] = (const char*)(is_k ? (const bf16_t*)s.k + (long)(a + warp) * s.k_stride + (long)kh * dk + 8 * r
                                            : (const bf16_t*)s.v + (long)(a + warp) * s.v_stride + (long)kh * dv + 8 * (r - kc));
                src_stride[c] = 2 * (is_k ? s.k_stride : s.v_stride);
            }
            auto issue = [&](int it) {
                if (it < n_it) {
                    int i0 = a + warp + it * 4 * ATTN_KEYS, st = it % ATTN_STAGES;
#pragma unroll
                    for (int u = 0; u < ATTN_KEYS; u++) {
                        // Past the last key: nothing read (zeros), the key unseen below.
                        int rel = it * 4 * ATTN_KEYS + 4 * u, in = i0 + 4 * u < b;
                        u32 dst = wst_at + 2 * (st * stage_len + u * per_key * 8);
#pragma unroll
                        for (int c = 0; c < DVL / 4; c++) {
                            int r = lane + 32 * c;
                            if (r < per_key) cp_async16_at(dst + 16 * r, src[c] + (in ? (long)rel * src_stride[c] : 0), in ? 16 : 0);
                        }
                    }
                    if (lane < ATTN_KEYS) {
                        int i = min(i0 + 4 * lane, b - 1);
                        int w = st * ATTN_KEYS + lane;
                        if (s.pos) asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(wpos_at + 4 * w), "l"(s.pos + i) : "memory");
                        else wpos[w] = s.pos0 + i;
                    }
                }
                cp_async_commit();
            };
            for (int it = 0; it < ATTN_STAGES - 1; it++) issue(it);
            for (int it = 0; it < n_it; it++) {
                issue(it + ATTN_STAGES - 1);
                cp_async_wait<ATTN_STAGES - 1>();
                __syncwarp();
                int i0 = a + warp + it * 4 * ATTN_KEYS, st = it % ATTN_STAGES;
                const bf16_t* cur = wst + st * stage_len;
                int sp[ATTN_KEYS];
                float sc[ATTN_KEYS], vv[ATTN_KEYS][DVL];
#pragma unroll
                for (int u = 0; u < ATTN_KEYS; u++) {
                    const bf16_t* kr = cur + u * per_key * 8;
                    sp[u] = wpos[st * ATTN_KEYS + u];
                    sc[u] = 0.0f;
#pragma unroll
                    for (int g = 0; g < DVL / 4; g++) {
                        int col = 4 * (lane + 32 * g);
                        uint2 w = col < dv ? *(const uint2*)(kr + dk + col) : make_uint2(0, 0);
                        vv[u][4 * g] = __uint_as_float(w.x << 16);
                        vv[u][4 * g + 1] = __uint_as_float(w.x & 0xffff0000u);
                        vv[u][4 * g + 2] = __uint_as_float(w.y << 16);
                        vv[u][4 * g + 3] = __uint_as_float(w.y & 0xffff0000u);
                    }
                }
#pragma unroll
                for (int p = 0; p < DVL / 2; p++) {
                    int d = 2 * (lane + 32 * p);
                    if (d >= dk) break;
                    float2 qd = *(const float2*)(qs + d);
#pragma unroll
                    for (int u = 0; u < ATTN_KEYS; u++) {
                        u32 w = *(const u32*)(cur + u * per_key * 8 + d);
                        sc[u] += qd.x * __uint_as_float(w << 16);
                        sc[u] += qd.y * __uint_as_float(w & 0xffff0000u);
                    }
                }
                __syncwarp();  // the stage is free for the batch ATTN_STAGES on
                consume(i0, b, sp, sc, vv);
            }
            continue;
        }
#endif
        // ATTN_KEYS of this warp's keys at a time: their positions, keys and values are all
        // asked for before any is used (a memory round trip a batch rather than two a key).
        for (int i0 = a + warp; i0 < b; i0 += 4 * ATTN_KEYS) {
            int sp[ATTN_KEYS];
            float sc[ATTN_KEYS], vv[ATTN_KEYS][DVL];
#pragma unroll
            for (int u = 0; u < ATTN_KEYS; u++) {
                int i = min(i0 + 4 * u, b - 1);  // past the end: the last key again, unseen below
                sp[u] = s.pos ? s.pos[i] : s.pos0 + i;
                sc[u] = 0.0f;
                long vo = (long)i * s.v_stride + (long)kh * dv;
#pragma unroll
                for (int j = 0; j < DVL; j++) {
                    int col = 4 * (lane + 32 * (j / 4)) + j % 4;
                    vv[u][j] = col < dv ? kv_at(s.v, s.bf16, vo + col) : 0.0f;
                }
            }
#pragma unroll
            for (int p = 0; p < DVL / 2; p++) {
                int d = 2 * (lane + 32 * p);
                if (d >= dk) break;
                float q0 = qs[d], q1 = d + 1 < dk ? qs[d + 1] : 0.0f;
#pragma unroll
                for (int u = 0; u < ATTN_KEYS; u++) {
                    long ko = min(i0 + 4 * u, b - 1) * (long)s.k_stride + (long)kh * dk + d;
                    sc[u] += q0 * kv_at(s.k, s.bf16, ko);
                    sc[u] += q1 * (d + 1 < dk ? kv_at(s.k, s.bf16, ko + 1) : 0.0f);
                }
            }
            consume(i0, b, sp, sc, vv);
        }
    }
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
    for (int j = 0; j < DVL; j++) {
        int col = 4 * (lane + 32 * (j / 4)) + j % 4;
        if (col < dv) wacc[warp][col] = acc[j];
    }
    __syncthreads();
    float mm = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
    // Partial of (row, head, split): [max, sum, values...], dv + 2 floats.
    float* pp = part + (((long)t * heads + h) * splits + z) * (dv + 2);
    float den = 0.0f;
    if (mm != NEG_INF)
        for (int w = 0; w < 4; w++)
            if (wm[w] != NEG_INF) den += ex2(wm[w] - mm) * wl[w];
    for (int col = threadIdx.x; col < dv; col += blockDim.x) {
        float num = 0.0f;
        if (mm != NEG_INF)
            for (int w = 0; w < 4; w++)
                if (wm[w] != NEG_INF) num += ex2(wm[w] - mm) * wacc[w][col];
        if (splits == 1) out[qrow * heads * dv + h * dv + col] = den > 0.0f ? num / den : 0.0f;
        else pp[2 + col] = num;
    }
    if (splits > 1) {
        if (threadIdx.x == 0) { pp[0] = mm / LOG2E; pp[1] = den; }  // the merge takes natural units
        merge_splits_if_last(part, count + (long)t * heads + h, t, heads, h, 1, splits, used, dv, out);
    }
}
// Five blocks a multiprocessor (96 registers, no spills): left to itself the compiler takes 161
// for the staged loop, and a one-row step's 550 blocks (25 heads × 22 splits) would need a
// second wave.
extern "C" __global__ void __launch_bounds__(128, 5) attention_4(const float* q, int heads, int kv_heads, int dk, int dv, const SeqInfo* seqs, const int* row_seq,
                                       const KvSrc* past, const float* new_k, const float* new_v, int global_, int meta, float scale,
                                       int splits, float* out, float* part, int* count, int staged) {
    grid_dep();
    attention_rows<4>(q, heads, kv_heads, dk, dv, seqs, row_seq, past, new_k, new_v, global_, meta, scale, splits, out, part, count, staged);
}
extern "C" __global__ void attention_8(const float* q, int heads, int kv_heads, int dk, int dv, const SeqInfo* seqs, const int* row_seq,
                                       const KvSrc* past, const float* new_k, const float* new_v, int global_, int meta, float scale,
                                       int splits, float* out, float* part, int* count, int staged) {
    grid_dep();
    attention_rows<8>(q, heads, kv_heads, dk, dv, seqs, row_seq, past, new_k, new_v, global_, meta, scale, splits, out, part, count, staged);
}

// Attention of many sequences' decode rows (a large batch): block (row, K/V head, split), the q
// heads that share the K/V head together, so that each key and value is read once (with many
// rows the grid is full without many splits, and re-reading K/V per q head is what costs). Keys
// come DEC_T at a time through shared memory (key rows padded to dk + 4, 16-byte aligned); then a thread a (head, key) scores them, a
// warp a head updates its online softmax, and a thread a (head, four columns) sums the values,
// each shared-memory load four values (dk, dv multiples of 4: the host checks). The keys of all sources, in order, are cut into up to `splits`
// ranges of at least `min_keys` (the grid is fixed, so a captured decode step stays right
// as the keys grow; the splits a row does not need return at once). Outputs, mask, sources and
// the merge of splits as `attention`'s (the count of (row, K/V head) at count[t·heads + h0]). Dynamic shared memory (floats): gc · dk + T · (dk + 4) + T · dv +
// gc · T + 3 · gc + T, gc = min(DEC_G, heads / kv_heads), T = dec_tile(dk, dv).
#define DEC_ITEMS 16
__device__ __forceinline__ int dec_tile(int dk, int dv) { return dk + dv <= 256 ? 32 : 16; }
extern "C" __global__ void __launch_bounds__(128) attention_gqa(const float* q, int heads, int kv_heads, int dk, int dv, const SeqInfo* seqs,
                                     const int* row_seq, const KvSrc* past, const float* new_k, const float* new_v, int global_,
                                     int meta, float scale, int splits, float* out, float* part, int* count, int min_keys) {
    grid_dep();
    extern __shared__ float sm[];
    int t = blockIdx.x, kh = blockIdx.y, z = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = heads / kv_heads, gmax = min(DEC_G, group), T = dec_tile(dk, dv);
    float* qs = sm;                   // [g][dk], scaled
    float* ks = qs + gmax * dk;       // [T][dk + 4]
    float* vs = ks + T * (dk + 4);    // [T][dv]
    float* ps = vs + T * dv;          // [g][T]: scores, then weights
    float* mst = ps + gmax * T;       // [g]: running maximum
    float* lst = mst + gmax;          // [g]: running sum
    float* cst = lst + gmax;          // [g]: this tile's correction
    int* vis = (int*)(cst + gmax);    // [T]
    int seq = row_seq[t];
    SeqInfo sq = seqs[seq];
    int tq = sq.pos0 + (int)(t - sq.row0);
    int window = sq.window;
    KvSrc s0 = past[2 * seq], s1 = past[2 * seq + 1], s2 = own_rows(new_k, new_v, sq, kv_heads * dk, kv_heads * dv);
    int r0 = s0.rows, r01 = s0.rows + s1.rows, keys = r01 + s2.rows;
    int used = min(splits, max(1, (keys + min_keys - 1) / min_keys));
    if (z >= used) return;
    int per_split = (keys + used - 1) / used;
    int lo = z * per_split, hi = min(keys, lo + per_split);
    bool vec = dk % 8 == 0 && dv % 8 == 0 && s0.k_stride % 8 == 0 && s1.k_stride % 8 == 0 && s2.k_stride % 8 == 0 &&
               s0.v_stride % 8 == 0 && s1.v_stride % 8 == 0 && s2.v_stride % 8 == 0;
    for (int g0 = 0; g0 < group; g0 += DEC_G) {
        int gc = min(DEC_G, group - g0), h0 = kh * group + g0;
        __syncthreads();
        for (int i = threadIdx.x; i < gc * dk; i += blockDim.x) qs[i] = q[(long)t * heads * dk + (long)h0 * dk + i] * scale;
        for (int g = threadIdx.x; g < gc; g += blockDim.x) { mst[g] = NEG_INF; lst[g] = 0.0f; }
        __syncthreads();
        float4 acc[DEC_ITEMS / 4];
#pragma unroll
        for (int u = 0; u < DEC_ITEMS / 4; u++) acc[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int k0 = lo; k0 < hi; k0 += T) {
            int nk = min(T, hi - k0);
            // The tile's visibility, then its keys and values (zeros where unseen or past the end).
            for (int j = threadIdx.x; j < T; j += blockDim.x) {
                int key = k0 + j, seen = 0;
                if (j < nk) {
                    KvSrc s = key < r0 ? s0 : (key < r01 ? s1 : s2);
                    int i = key < r0 ? key : (key < r01 ? key - r0 : key - r01);
                    int sp = s.pos ? s.pos[i] : s.pos0 + i;
                    seen = sp >= 0 && sp <= tq && (global_ || tq - sp <= window || sp < meta);
                }
                vis[j] = seen;
            }
            __syncthreads();
            int step = vec ? 8 : 1, kc = dk / step, vc = dv / step;
            for (int idx = threadIdx.x; idx < T * (kc + vc); idx += blockDim.x) {
                bool is_k = idx < T * kc;
                int r = is_k ? idx : idx - T * kc, per = is_k ? kc : vc;
                int j = r / per, c = (r % per) * step, key = k0 + j;
                float* dst = is_k ? ks + j * (dk + 4) + c : vs + j * dv + c;
                if (vis[j]) {
                    KvSrc s = key < r0 ? s0 : (key < r01 ? s1 : s2);
                    int i = key < r0 ? key : (key < r01 ? key - r0 : key - r01);
                    const void* base = is_k ? s.k : s.v;
                    long off = (long)i * (is_k ? s.k_stride : s.v_stride) + (long)kh * (is_k ? dk : dv) + c;
                    if (vec) {
                        float x[8];
                        if (s.bf16) load8((const bf16_t*)base, off, x);
                        else load8((const float*)base, off, x);
#pragma unroll
                        for (int e = 0; e < 8; e++) dst[e] = x[e];
                    } else {
                        dst[0] = kv_at(base, s.bf16, off);
                    }
                } else {
                    for (int e = 0; e < step; e++) dst[e] = 0.0f;
                }
            }
            __syncthreads();
            // Scores of (head, key), four dimensions a shared-memory load.
            for (int idx = threadIdx.x; idx < gc * T; idx += blockDim.x) {
                int g = idx / T, j = idx % T;
                float sc = NEG_INF;
                if (vis[j]) {
                    sc = 0.0f;
                    const float4* qg = (const float4*)(qs + g * dk);
                    const float4* kj = (const float4*)(ks + j * (dk + 4));
                    for (int c = 0; c < dk / 4; c++) {
                        float4 a = qg[c], b = kj[c];
                        sc += a.x * b.x;
                        sc += a.y * b.y;
                        sc += a.z * b.z;
                        sc += a.w * b.w;
                    }
                }
                ps[g * T + j] = sc;
            }
            __syncthreads();
            // The online softmax of each head over the tile: a warp a head, a lane a key.
            for (int g = warp; g < gc; g += 4) {
                float sc = lane < T ? ps[g * T + lane] : NEG_INF;
                float mo = mst[g], mn = fmaxf(mo, warp_max(sc));
                float corr = mo == NEG_INF ? 0.0f : expf(mo - mn);
                float pw = sc == NEG_INF ? 0.0f : expf(sc - mn);
                if (lane < T) ps[g * T + lane] = pw;
                float sum = warp_sum(pw);
                if (lane == 0) {
                    lst[g] = lst[g] * corr + sum;
                    mst[g] = mn;
                    cst[g] = corr;
                }
            }
            __syncthreads();
            // Weighted values into (head, four columns).
#pragma unroll
            for (int u = 0; u < DEC_ITEMS / 4; u++) {
                int idx = threadIdx.x + u * 128;
                if (idx < gc * dv / 4) {
                    int g = idx / (dv / 4), col = 4 * (idx % (dv / 4));
                    float c = cst[g];
                    float4 a = make_float4(acc[u].x * c, acc[u].y * c, acc[u].z * c, acc[u].w * c);
                    const float* pg = ps + g * T;
                    for (int j = 0; j < nk; j++) {
                        float p = pg[j];
                        float4 v = *(const float4*)(vs + j * dv + col);
                        a.x += p * v.x;
                        a.y += p * v.y;
                        a.z += p * v.z;
                        a.w += p * v.w;
                    }
                    acc[u] = a;
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int u = 0; u < DEC_ITEMS / 4; u++) {
            int idx = threadIdx.x + u * 128;
            if (idx < gc * dv / 4) {
                int g = idx / (dv / 4), col = 4 * (idx % (dv / 4)), h = h0 + g;
                float den = lst[g];
                float a[4] = {acc[u].x, acc[u].y, acc[u].z, acc[u].w};
                float* pp = part + (((long)t * heads + h) * splits + z) * (dv + 2);
                for (int e = 0; e < 4; e++) {
                    if (splits == 1) out[(long)t * heads * dv + (long)h * dv + col + e] = den > 0.0f ? a[e] / den : 0.0f;
                    else pp[2 + col + e] = a[e];
                }
                if (splits > 1 && col == 0) { pp[0] = mst[g]; pp[1] = den; }
            }
        }
    }
    if (splits > 1) merge_splits_if_last(part, count + (long)t * heads + kh * group, t, heads, kh * group, group, splits, used, dv, out);
}

// Attention of a tile of up to BQ consecutive query rows of one sequence (prefill), block
// (tile, head): keys come BK at a time through shared memory, with one online softmax per row
// (flash attention). 128 threads as 8 groups of 4 rows × 16 lanes: a lane scores its rows
// against 2 keys of the chunk, then sums values into its rows' columns lane, lane + 16, … (each
// loaded value used for 4 rows, each weight for its columns). Chunks no row of the tile can see
// (past the last query, or outside every row's window and not meta tokens) are skipped.
// `tiles[i]` = (sequence, first row of the tile in it).
#define BQ 32
#define BK 32
#define TR 4
#define MAX_COLS 16
extern "C" __global__ void attention_tiles(const float* q, int heads, int kv_heads, int dk, int dv, const SeqInfo* seqs,
                                           const int2* tiles, const KvSrc* past, const float* new_k, const float* new_v,
                                           int global_, int meta, float scale, float* out) {
    grid_dep();
    extern __shared__ float sm[];
    int qst = dk + 1, pst = BK + 1;
    float* qs = sm;               // BQ × (dk + 1)
    float* ks = qs + BQ * qst;    // BK × (dk + 1)
    float* vs = ks + BK * qst;    // BK × dv
    float* ps = vs + BK * dv;     // BQ × (BK + 1)
    __shared__ int kpos[BK];
    int2 tile = tiles[blockIdx.x];
    int h = blockIdx.y;
    SeqInfo sq = seqs[tile.x];
    int kh = h / (heads / kv_heads);
    int kw = kv_heads * dk, vw = kv_heads * dv;
    int nrows = min(BQ, sq.len - tile.y);
    int tid = threadIdx.x, rg = tid >> 4, lane = tid & 15;
    long row0 = sq.row0 + tile.y;
    for (int i = tid; i < BQ * dk; i += blockDim.x) {
        int r = i / dk, j = i % dk;
        qs[r * qst + j] = r < nrows ? q[(row0 + r) * heads * dk + h * dk + j] * scale : 0.0f;
    }
    int tq_lo = sq.pos0 + tile.y, tq_hi = tq_lo + nrows - 1;
    int window = sq.window;
    float m[TR], l[TR], acc[TR][MAX_COLS];
#pragma unroll
    for (int r = 0; r < TR; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_COLS; i++) acc[r][i] = 0.0f;
    }
    KvSrc s0 = past[2 * tile.x], s1 = past[2 * tile.x + 1], s2 = own_rows(new_k, new_v, sq, kw, vw);
    for (int si = 0; si < 3; si++) {
        KvSrc s = si == 0 ? s0 : (si == 1 ? s1 : s2);
        for (int k0 = 0; k0 < s.rows; k0 += BK) {
            int nk = min(BK, s.rows - k0);
            if (!s.pos) {
                int plo = s.pos0 + k0, phi = plo + nk - 1;
                if (plo > tq_hi) break;
                if (!global_ && plo >= meta && tq_lo - phi > window) continue;
            }
            __syncthreads();
            for (int i = tid; i < BK * dk; i += blockDim.x) {
                int r = i / dk, j = i % dk;
                ks[r * qst + j] = r < nk ? kv_at(s.k, s.bf16, (long)(k0 + r) * s.k_stride + (long)kh * dk + j) : 0.0f;
            }
            for (int i = tid; i < BK * dv; i += blockDim.x) {
                int r = i / dv, j = i % dv;
                vs[r * dv + j] = r < nk ? kv_at(s.v, s.bf16, (long)(k0 + r) * s.v_stride + (long)kh * dv + j) : 0.0f;
            }
            if (tid < BK) kpos[tid] = tid < nk ? (s.pos ? s.pos[k0 + tid] : s.pos0 + k0 + tid) : -1;
            __syncthreads();
            // Scores of rows rg*TR.. against keys 2*lane, 2*lane + 1.
            float sc[TR][2];
#pragma unroll
            for (int r = 0; r < TR; r++) sc[r][0] = sc[r][1] = 0.0f;
            const float* q0 = qs + rg * TR * qst;
            const float* k0p = ks + 2 * lane * qst;
            for (int j = 0; j < dk; j++) {
                float ka = k0p[j], kb = k0p[qst + j];
#pragma unroll
                for (int r = 0; r < TR; r++) {
                    float qv = q0[r * qst + j];
                    sc[r][0] += qv * ka;
                    sc[r][1] += qv * kb;
                }
            }
            float corr[TR];
#pragma unroll
            for (int r = 0; r < TR; r++) {
                int row = rg * TR + r, tq = tq_lo + row;
                float cmax = NEG_INF;
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    int sp = kpos[2 * lane + c];
                    bool vis = row < nrows && sp >= 0 && sp <= tq && (global_ || tq - sp <= window || sp < meta);
                    if (!vis) sc[r][c] = NEG_INF;
                    cmax = fmaxf(cmax, sc[r][c]);
                }
                for (int o = 8; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
                float mn = fmaxf(m[r], cmax);
                corr[r] = m[r] == NEG_INF ? 0.0f : expf(m[r] - mn);
                float rs = 0.0f;
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    float p = sc[r][c] == NEG_INF ? 0.0f : expf(sc[r][c] - mn);
                    ps[row * pst + 2 * lane + c] = p;
                    rs += p;
                }
                for (int o = 8; o > 0; o >>= 1) rs += __shfl_xor_sync(0xffffffffu, rs, o);
                l[r] = l[r] * corr[r] + rs;
                m[r] = mn;
            }
            __syncthreads();
#pragma unroll
            for (int r = 0; r < TR; r++)
#pragma unroll
                for (int i = 0; i < MAX_COLS; i++) acc[r][i] *= corr[r];
            const float* p0 = ps + rg * TR * pst;
            for (int kk = 0; kk < nk; kk++) {
                float p[TR];
#pragma unroll
                for (int r = 0; r < TR; r++) p[r] = p0[r * pst + kk];
#pragma unroll
                for (int i = 0; i < MAX_COLS; i++) {
                    int col = lane + 16 * i;
                    if (col < dv) {
                        float v = vs[kk * dv + col];
#pragma unroll
                        for (int r = 0; r < TR; r++) acc[r][i] += p[r] * v;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < TR; r++) {
        int row = rg * TR + r;
        if (row < nrows) {
#pragma unroll
            for (int i = 0; i < MAX_COLS; i++) {
                int col = lane + 16 * i;
                if (col < dv) out[(row0 + row) * heads * dv + h * dv + col] = l[r] > 0.0f ? acc[r][i] / l[r] : 0.0f;
            }
        }
    }
}

// Attention of prefill on the tensor cores (sm_80 and later), for K/V held in bf16: a block
// takes FA_BQ consecutive query rows of one sequence and one head, 16 rows a warp; keys come
// FA_BK at a time through shared memory in two stages (the next block copied by cp.async while
// this one is scored: bf16 all the way, this call's rows given as bf16 copies), scored with
// mma.sync m16n8k16 and summed into the output the same way, V's fragments read transposed by
// ldmatrix (flash attention 2: the scores stay in registers, one online softmax per row).
// TERMS = 2: queries and probabilities are f32, each split into two bf16 terms, hi + lo (16
// significant bits) and multiplied by both, so the result is the f32 attention over bf16 keys and
// values that the other kernels compute. TERMS = 1: both rounded to bf16, as the official bf16
// model's flash attention rounds them (half the tensor-core work), for models whose matrices are
// all bf16. Same sources, mask and skipping of invisible key blocks as `attention_tiles`.
#define FA_BQ 64
#define FA_BK 64
#define FA_PAD 8
#if __CUDA_ARCH__ >= 800
// a and b packed as bf16 (a in the low half), and what rounding left of them, packed too.
__device__ __forceinline__ u32 bf16x2(float a, float b) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
__device__ __forceinline__ void split2(float a, float b, u32& hi, u32& lo) {
    hi = bf16x2(a, b);
    lo = bf16x2(a - __uint_as_float(hi << 16), b - __uint_as_float(hi & 0xffff0000u));
}
// c += a · b: a 16×16 (row-major fragment), b 16×8 (column-major), bf16 in, f32 accumulated.
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif
// Elements i..i+7 of a K/V source as bf16 bits (an f32 source holds values already rounded to
// bf16); i a multiple of 8.
__device__ __forceinline__ uint4 kv_bits8(const void* p, int bf16, long i) {
    if (bf16) return *(const uint4*)((const bf16_t*)p + i);
    const float4* f = (const float4*)((const float*)p + i);
    float4 a = f[0], b = f[1];
    uint4 r;
    r.x = (u32)f32_to_bf16(a.x) | ((u32)f32_to_bf16(a.y) << 16);
    r.y = (u32)f32_to_bf16(a.z) | ((u32)f32_to_bf16(a.w) << 16);
    r.z = (u32)f32_to_bf16(b.x) | ((u32)f32_to_bf16(b.y) << 16);
    r.w = (u32)f32_to_bf16(b.z) | ((u32)f32_to_bf16(b.w) << 16);
    return r;
}
#if __CUDA_ARCH__ >= 800
// A fragments' worth of 8×8 tiles of a row-major bf16 matrix in shared memory, as they are
// (ldmatrix): lanes 8i..8i+7 point at the rows of tile i; thread t gets of tile i the elements of
// row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1. Addresses are shared-window offsets (a base
// plus a constant, so the offset folds into the instruction: no 64-bit address arithmetic).
__device__ __forceinline__ void ldmatrix_4(u32 at, u32* b) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(at));
}
__device__ __forceinline__ void ldmatrix_2(u32 at, u32* b) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(b[0]), "=r"(b[1]) : "r"(at));
}
// B fragments of two adjacent 8-column tiles of a 16-row slice of a row-major bf16 matrix in
// shared memory, transposed on the way (ldmatrix .trans): `at` addresses the slice's row
// lane % 16, column 8 · (lane / 16) of the pair.
__device__ __forceinline__ void ldmatrix_t4(u32 at, u32* b) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(at));
}
#endif


// One block of keys of `attention_mma` in shared memory (bf16), with their positions.
template <int DK, int DV>
struct FaStage {
    bf16_t k[FA_BK][DK + FA_PAD];
    bf16_t v[FA_BK][DV + FA_PAD];
    int pos[FA_BK];
};

#if __CUDA_ARCH__ >= 800
// A warp's scores of NT 8-key tiles, keys kb.. of the stage, for its 16 query rows (q in TERMS
// bf16 terms, qh + ql): K's fragments of two 16-column steps by one ldmatrix (one step where
// DK / 16 is odd).
template <int DK, int DV, int NT, int TERMS>
__device__ __forceinline__ void fa_scores(const FaStage<DK, DV>& st, int kb, const u32 (*qh)[4], const u32 (*ql)[4], float (*sc)[4],
                                          int lane) {
    u32 k_at = shared_addr(&st.k[kb + (lane & 7)][(lane >> 3) * 8]);
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk += 2) {
            u32 b[4];
            u32 at = k_at + 2 * (nt * 8 * (DK + FA_PAD) + kk * 16);
            if (kk + 1 < DK / 16) ldmatrix_4(at, b);
            else ldmatrix_2(at, b);
#pragma unroll
            for (int h = 0; h < 2 && kk + h < DK / 16; h++) {
                mma16816(sc[nt], qh[kk + h], b[2 * h], b[2 * h + 1]);
                if (TERMS == 2) mma16816(sc[nt], ql[kk + h], b[2 * h], b[2 * h + 1]);
            }
        }
    }
}

// One online-softmax step over a warp's NT tiles of (masked) scores in log2 units: each fragment
// row's running maximum m and sum l move on, and the scores become weights 2^(s - max); the
// outputs so far are to be rescaled by corr (`fa_rescale`).
template <int NT>
__device__ __forceinline__ void fa_weights(float (*sc)[4], float* m, float* l, float* corr) {
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float mx = fmaxf(sc[0][2 * rr], sc[0][2 * rr + 1]);
#pragma unroll
        for (int nt = 1; nt < NT; nt++) mx = fmaxf(mx, fmaxf(sc[nt][2 * rr], sc[nt][2 * rr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float mn = fmaxf(m[rr], mx);
        // A row that sees no key yet keeps weights of 0 (2^-inf), not NaN.
        float base = mn == NEG_INF ? 0.0f : mn;
        corr[rr] = ex2(m[rr] - base);
        float rs = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int cc = 0; cc < 2; cc++) {
                float& v = sc[nt][2 * rr + cc];
                v = ex2(v - base);
                rs += v;
            }
        l[rr] = l[rr] * corr[rr] + rs;
        m[rr] = mn;
    }
}
template <int DV> __device__ __forceinline__ void fa_rescale(float (*o)[4], const float* corr) {
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++) {
        o[nt][0] *= corr[0];
        o[nt][1] *= corr[0];
        o[nt][2] *= corr[1];
        o[nt][3] *= corr[1];
    }
}
template <int NT, int DV>
__device__ __forceinline__ void fa_softmax(float (*sc)[4], float* m, float* l, float (*o)[4]) {
    float corr[2];
    fa_weights<NT>(sc, m, l, corr);
    fa_rescale<DV>(o, corr);
}

// o += p · v over the weights of NT 8-key tiles (NT / 2 slices of 16 keys, keys kb.. of the
// stage), the weights in TERMS bf16 terms.
template <int DK, int DV, int NT, int TERMS>
__device__ __forceinline__ void fa_pv(const FaStage<DK, DV>& st, int kb, float (*sc)[4], float (*o)[4], int lane) {
    u32 v_at = shared_addr(&st.v[kb + (lane & 15)][(lane >> 4) * 8]);
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
        u32 ph[4], pl[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float* p = &sc[2 * kk + (i >> 1)][2 * (i & 1)];
            if (TERMS == 2) split2(p[0], p[1], ph[i], pl[i]);
            else ph[i] = bf16x2(p[0], p[1]);
        }
#pragma unroll
        for (int nt = 0; nt < DV / 8; nt += 2) {
            u32 b[4];
            ldmatrix_t4(v_at + 2 * (kk * 16 * (DV + FA_PAD) + nt * 8), b);
            mma16816(o[nt], ph, b[0], b[1]);
            if (TERMS == 2) mma16816(o[nt], pl, b[0], b[1]);
            mma16816(o[nt + 1], ph, b[2], b[3]);
            if (TERMS == 2) mma16816(o[nt + 1], pl, b[2], b[3]);
        }
    }
}
#endif

// The next key block, from source si's row k0 on, that some row of a tile of queries at
// positions tq_lo..tq_hi can see (a ring's blocks are all taken: the mask sorts them out); false
// when none is left.
__device__ bool fa_next(const KvSrc* src, int& si, int& k0, int tq_lo, int tq_hi, int global_, int meta, int window) {
    for (; si < 3; si++, k0 = 0) {
        const KvSrc& s = src[si];
        // Past the blocks wholly before every row's window in one step (a long prompt's own
        // rows): full blocks end at pos0 + k0 + FA_BK - 1, which must reach tq_lo - window.
        if (!global_ && !s.pos && s.pos0 + k0 >= meta) {
            int first = tq_lo - window - s.pos0 - FA_BK + 1;
            if (first > k0) k0 = (first + FA_BK - 1) / FA_BK * FA_BK;
        }
        for (; k0 < s.rows; k0 += FA_BK) {
            if (s.pos) return true;
            int plo = s.pos0 + k0, phi = plo + min(FA_BK, s.rows - k0) - 1;
            if (plo > tq_hi) break;
            if (!global_ && plo >= meta && tq_lo - phi > window) continue;
            return true;
        }
    }
    return false;
}

// Whether every key of block (s, k0) is visible to every row of a full tile of queries at
// positions tq_lo..tq_hi: then no mask is applied.
__device__ __forceinline__ bool fa_whole(const KvSrc& s, int k0, int nrows, int tq_lo, int tq_hi, int global_, int meta, int window) {
    if (s.pos) return false;
    int nk = min(FA_BK, s.rows - k0), plo = s.pos0 + k0, phi = plo + nk - 1;
    return nk == FA_BK && nrows == FA_BQ && phi <= tq_lo && (global_ || tq_hi - plo <= window || phi < meta);
}

// Scores of a warp's NT 8-key tiles set to -inf where the key (its position in `pos`, -1 past a
// source's end) is unseen by the fragment row (position tq[rr], a row of the prompt where ok[rr]).
template <int NT>
__device__ __forceinline__ void fa_mask(float (*sc)[4], const int* pos, const int* tq, const bool* ok, int c2, int global_, int meta,
                                        int window) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int cc = 0; cc < 2; cc++) {
            int sp = pos[nt * 8 + c2 + cc];
#pragma unroll
            for (int rr = 0; rr < 2; rr++) {
                int t = tq[rr];
                bool vis = ok[rr] && sp >= 0 && sp <= t && (global_ || t - sp <= window || sp < meta);
                if (!vis) sc[nt][2 * rr + cc] = NEG_INF;
            }
        }
}

// A warp's outputs of head h, divided by their rows' sums over the quad's lanes: fragment rows
// r0 and r0 + 8 of the tile at prompt row row0 (those below nrows).
template <int DV>
__device__ __forceinline__ void fa_store(float (*o)[4], const float* l, float* out, long row0, int heads, int h, int r0, int c2,
                                         int nrows) {
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float tot = l[rr];
        tot += __shfl_xor_sync(0xffffffffu, tot, 1);
        tot += __shfl_xor_sync(0xffffffffu, tot, 2);
        int row = r0 + 8 * rr;
        if (row >= nrows) continue;
        float* op = out + (row0 + row) * heads * DV + h * DV;
#pragma unroll
        for (int nt = 0; nt < DV / 8; nt++) {
            op[nt * 8 + c2] = tot > 0.0f ? o[nt][2 * rr] / tot : 0.0f;
            op[nt * 8 + c2 + 1] = tot > 0.0f ? o[nt][2 * rr + 1] / tot : 0.0f;
        }
    }
}

// Starts loading key block (s, k0) of K/V head kh into `st`: bf16 sources by cp.async (waited
// for by the caller), f32 ones rounded here; zeros past the source's end.
template <int DK, int DV>
__device__ void fa_load(FaStage<DK, DV>& st, const KvSrc& src, int k0, int kh, int tid) {
#if __CUDA_ARCH__ >= 800
    // The source in registers: each copy below clobbers memory, so fields read from shared memory
    // would be read again after every one.
    const KvSrc s = src;
    int nk = min(FA_BK, s.rows - k0);
    // A row of K is KPR 16-byte chunks: thread tid takes chunk tid % KPR of rows tid / KPR + c·KRS
    // (likewise V), so every offset but the row's is known at compile time.
    constexpr int KPR = DK / 8, KRS = 128 / KPR, VPR = DV / 8, VRS = 128 / VPR;
    static_assert(128 % KPR == 0 && 128 % VPR == 0 && FA_BK % KRS == 0 && FA_BK % VRS == 0, "whole rounds of 128 chunks");
    int kr = tid / KPR, kj = tid % KPR * 8, vr = tid / VPR, vj = tid % VPR * 8;
    long kp = (long)(k0 + kr) * s.k_stride + kh * DK + kj, vp = (long)(k0 + vr) * s.v_stride + kh * DV + vj;
    if (s.bf16) {
        u32 sk = shared_addr(&st.k[kr][kj]), sv = shared_addr(&st.v[vr][vj]);
        const bf16_t *kb = (const bf16_t*)s.k, *vb = (const bf16_t*)s.v;
#pragma unroll
        for (int c = 0; c < FA_BK / KRS; c++) {
            bool in = kr + c * KRS < nk;
            cp_async16_at(sk + c * KRS * (DK + FA_PAD) * 2, in ? kb + kp + (long)c * KRS * s.k_stride : kb, in ? 16 : 0);
        }
#pragma unroll
        for (int c = 0; c < FA_BK / VRS; c++) {
            bool in = vr + c * VRS < nk;
            cp_async16_at(sv + c * VRS * (DV + FA_PAD) * 2, in ? vb + vp + (long)c * VRS * s.v_stride : vb, in ? 16 : 0);
        }
    } else {
#pragma unroll
        for (int c = 0; c < FA_BK / KRS; c++) {
            bool in = kr + c * KRS < nk;
            *(uint4*)&st.k[kr + c * KRS][kj] = in ? kv_bits8(s.k, 0, kp + (long)c * KRS * s.k_stride) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int c = 0; c < FA_BK / VRS; c++) {
            bool in = vr + c * VRS < nk;
            *(uint4*)&st.v[vr + c * VRS][vj] = in ? kv_bits8(s.v, 0, vp + (long)c * VRS * s.v_stride) : make_uint4(0, 0, 0, 0);
        }
    }
    if (tid < FA_BK) st.pos[tid] = tid < nk ? (s.pos ? s.pos[k0 + tid] : s.pos0 + k0 + tid) : -1;
#endif
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Hopper's warpgroup MMA (wgmma, sm_90a): the four warps of a block multiply as one, 64 rows by
// N columns by 16, A (queries, weights) from registers in mma.sync's fragments, B (keys, values)
// read by the tensor cores straight from shared memory, the f32 products in mma.sync's
// accumulator layout (warp w rows 16w..16w+15). Operands in shared memory are 64 bf16 (128 bytes)
// a row, 16-byte chunk c of row r stored at chunk c ^ (r % 8) (the 128-byte swizzle: ldmatrix-free
// reads without bank conflicts), atoms of 8 rows 1024 bytes apart from 1024-aligned bases.
template <int TRANS>
__device__ __forceinline__ void wgmma_64x64(float (*d)[4], const u32* a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS));
}
template <int TRANS>
__device__ __forceinline__ void wgmma_64x128(float (*d)[4], const u32* a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS));
}
template <int N, int TRANS>
__device__ __forceinline__ void wgmma_64(float (*d)[4], const u32* a, unsigned long long b, int accumulate) {
    static_assert(N == 64 || N == 128, "64 or 128 columns");
    if constexpr (N == 64) wgmma_64x64<TRANS>(d, a, b, accumulate);
    else wgmma_64x128<TRANS>(d, a, b, accumulate);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Registers the tensor cores write or read in the background: the compiler must neither read
// nor reuse them before the wait (an empty asm that "changes" them, after it).
template <int R> __device__ __forceinline__ void wgmma_hold(float (*d)[4]) {
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])::"memory");
}
template <int R> __device__ __forceinline__ void wgmma_hold(u32 (*a)[4]) {
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}
// The descriptor of a 128-byte-swizzled operand at shared address `at`: `lbo` bytes between
// 64-column blocks along N (for a transposed B; unused for K-major), `sbo` between 8-row atoms.
__device__ __forceinline__ unsigned long long wgmma_desc(u32 at, u32 lbo, u32 sbo) {
    return (unsigned long long)((at & 0x3ffff) >> 4) | (unsigned long long)(lbo >> 4) << 16 | (unsigned long long)(sbo >> 4) << 32 |
           1ull << 62;
}
#endif

// One block of keys of `attention_wg`: K and V in 64-column slices of swizzled 128-byte rows.
template <int DK, int DV>
struct __align__(1024) WgStage {
    bf16_t k[DK / 64][FA_BK][64];
    bf16_t v[DV / 64][FA_BK][64];
    int pos[FA_BK];
};
// (Its kernel's dynamic shared memory: two stages and the slack to align them to 1024 bytes,
// `mma_smem` in mod.rs.)

// Starts loading key block (s, k0) of K/V head kh into `st`, as `fa_load` does, into the swizzled
// rows.
template <int DK, int DV>
__device__ void wg_load(WgStage<DK, DV>& st, const KvSrc& src, int k0, int kh, int tid) {
#if __CUDA_ARCH__ >= 800
    const KvSrc s = src;
    int nk = min(FA_BK, s.rows - k0);
    constexpr int KPR = DK / 8, KRS = 128 / KPR, VPR = DV / 8, VRS = 128 / VPR;
    static_assert(128 % KPR == 0 && 128 % VPR == 0 && FA_BK % KRS == 0 && FA_BK % VRS == 0 && KRS % 8 == 0 && VRS % 8 == 0,
                  "whole rounds of 128 chunks, whole swizzle atoms");
    // A thread's rows step by KRS (a multiple of 8): its chunk's swizzled place is the same in each.
    int kr = tid / KPR, kc = tid % KPR, vr = tid / VPR, vc = tid % VPR;
    long kp = (long)(k0 + kr) * s.k_stride + kh * DK + kc * 8, vp = (long)(k0 + vr) * s.v_stride + kh * DV + vc * 8;
    bf16_t* kd = &st.k[kc / 8][kr][((kc % 8) ^ (kr % 8)) * 8];
    bf16_t* vd = &st.v[vc / 8][vr][((vc % 8) ^ (vr % 8)) * 8];
    if (s.bf16) {
        u32 sk = shared_addr(kd), sv = shared_addr(vd);
        const bf16_t *kb = (const bf16_t*)s.k, *vb = (const bf16_t*)s.v;
#pragma unroll
        for (int c = 0; c < FA_BK / KRS; c++) {
            bool in = kr + c * KRS < nk;
            cp_async16_at(sk + c * KRS * 128, in ? kb + kp + (long)c * KRS * s.k_stride : kb, in ? 16 : 0);
        }
#pragma unroll
        for (int c = 0; c < FA_BK / VRS; c++) {
            bool in = vr + c * VRS < nk;
            cp_async16_at(sv + c * VRS * 128, in ? vb + vp + (long)c * VRS * s.v_stride : vb, in ? 16 : 0);
        }
    } else {
#pragma unroll
        for (int c = 0; c < FA_BK / KRS; c++) {
            bool in = kr + c * KRS < nk;
            *(uint4*)(kd + c * KRS * 64) = in ? kv_bits8(s.k, 0, kp + (long)c * KRS * s.k_stride) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int c = 0; c < FA_BK / VRS; c++) {
            bool in = vr + c * VRS < nk;
            *(uint4*)(vd + c * VRS * 64) = in ? kv_bits8(s.v, 0, vp + (long)c * VRS * s.v_stride) : make_uint4(0, 0, 0, 0);
        }
    }
    if (tid < FA_BK) st.pos[tid] = tid < nk ? (s.pos ? s.pos[k0 + tid] : s.pos0 + k0 + tid) : -1;
#endif
}

// `attention_mma` with queries and weights rounded to bf16 (TERMS = 1) on Hopper's warpgroup MMA:
// the same tiles, key blocks, stages, mask and online softmax, a block's 64 rows × 64 keys of
// scores made by DK / 16 wgmma and its weights · values by FA_BK / 16. Key block j + 1's scores
// and block j's weights · values are issued together; the scores are waited for first, and
// their softmax runs while the values' products do (all but rescaling the outputs, which waits
// for them): the tensor cores and the exponentials overlap within a block, not only across
// blocks. Only where compiled for sm_90a.
template <int DK, int DV>
__device__ void attention_wg(const float* q, int heads, int kv_heads, const SeqInfo* seqs, const int2* tiles, const KvSrc* past,
                             const bf16_t* new_k, const bf16_t* new_v, int global_, int meta, float scale, float* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(FA_BQ == 64 && FA_BK == 64 && DK % 64 == 0 && DV % 64 == 0 && DV <= 128, "a warpgroup's 64 rows, 64-column slices");
    extern __shared__ __align__(16) unsigned char fa_smem[];
    WgStage<DK, DV>* st = (WgStage<DK, DV>*)(fa_smem + ((1024 - shared_addr(fa_smem) % 1024) % 1024));
    __shared__ KvSrc src[3];
    int t_ = gridDim.y - 1 - blockIdx.y;
    int2 tile = tiles[t_];
    int h = blockIdx.x;
    SeqInfo sq = seqs[tile.x];
    int kh = h / (heads / kv_heads);
    int kw = kv_heads * DK, vw = kv_heads * DV;
    int nrows = min(FA_BQ, sq.len - tile.y);
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, c2 = (lane & 3) * 2;
    long row0 = sq.row0 + tile.y;
    int wr = warp * 16;
    int window = sq.window;
    int tq[2] = {sq.pos0 + tile.y + wr + g, sq.pos0 + tile.y + wr + g + 8};
    bool ok[2] = {wr + g < nrows, wr + g + 8 < nrows};
    if (tid == 0) {
        src[0] = past[2 * tile.x];
        src[1] = past[2 * tile.x + 1];
        src[2] = own_rows(new_k, new_v, sq, kw, vw);
    }
    float qscale = scale * LOG2E;
    u32 qh[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int rr = i & 1, col = kk * 16 + c2 + (i >> 1) * 8;
            const float* qp = q + (row0 + wr + g + 8 * rr) * heads * DK + h * DK + col;
            qh[kk][i] = bf16x2(ok[rr] ? qp[0] * qscale : 0.0f, ok[rr] ? qp[1] * qscale : 0.0f);
        }
    float o[DV / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f}, sc[FA_BK / 8][4], corr[2];
    u32 p[FA_BK / 16][4];
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    int tq_lo = sq.pos0 + tile.y, tq_hi = tq_lo + nrows - 1;
    // The products of a stage's keys (into sc) and values (from p, into o), issued, not waited for.
    auto scores = [&](const WgStage<DK, DV>& s) {
        u32 at = shared_addr(&s.k[0][0][0]);
#pragma unroll
        for (int kk = 0; kk < DK / 16; kk++)
            wgmma_64<FA_BK, 0>(sc, qh[kk], wgmma_desc(at + (kk / 4) * FA_BK * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
        wgmma_commit();
    };
    auto values = [&](const WgStage<DK, DV>& s) {
        u32 at = shared_addr(&s.v[0][0][0]);
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; kk++) wgmma_64<DV, 1>(o, p[kk], wgmma_desc(at + kk * 16 * 128, FA_BK * 128, 1024), 1);
        wgmma_commit();
    };
    // The weights of the block in sc, as bf16 fragments.
    auto weights = [&]() {
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; kk++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float* w = &sc[2 * kk + (i >> 1)][2 * (i & 1)];
                p[kk][i] = bf16x2(w[0], w[1]);
            }
    };
    // What cp.async and the stores wrote, seen by every thread and by the tensor cores (the async
    // proxy).
    auto landed = [&]() {
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
    };
    __syncthreads();
    int si = 0, k0 = 0;
    if (fa_next(src, si, k0, tq_lo, tq_hi, global_, meta, window)) {
        // Block 0 scored alone, block 1 loading meanwhile.
        bool whole = fa_whole(src[si], k0, nrows, tq_lo, tq_hi, global_, meta, window);
        wg_load(st[0], src[si], k0, kh, tid);
        cp_async_commit();
        k0 += FA_BK;
        bool more = fa_next(src, si, k0, tq_lo, tq_hi, global_, meta, window);
        bool next_whole = more && fa_whole(src[si], k0, nrows, tq_lo, tq_hi, global_, meta, window);
        if (more) wg_load(st[1], src[si], k0, kh, tid);
        cp_async_commit();
        cp_async_wait_one();
        landed();
        wgmma_hold<FA_BK / 8>(sc);
        wgmma_fence();
        scores(st[0]);
        wgmma_wait_all();
        wgmma_hold<FA_BK / 8>(sc);
        if (!whole) fa_mask<FA_BK / 8>(sc, st[0].pos, tq, ok, c2, global_, meta, window);
        fa_weights<FA_BK / 8>(sc, m, l, corr);
        // Block j in stage `stage`, its weights in sc; block j + 1 (where `more`) loading into the other.
        int stage = 0;
        for (; more; stage ^= 1) {
            weights();
            cp_async_wait<0>();
            landed();
            wgmma_hold<FA_BK / 8>(sc);
            wgmma_hold<DV / 8>(o);
            wgmma_fence();
            scores(st[stage ^ 1]);
            values(st[stage]);
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
            wgmma_hold<FA_BK / 8>(sc);
            if (!next_whole) fa_mask<FA_BK / 8>(sc, st[stage ^ 1].pos, tq, ok, c2, global_, meta, window);
            fa_weights<FA_BK / 8>(sc, m, l, corr);
            wgmma_wait_all();
            wgmma_hold<DV / 8>(o);
            wgmma_hold<FA_BK / 16>(p);
            fa_rescale<DV>(o, corr);
            __syncthreads();  // every warp is done with block j's values: block j + 2 may load there
            k0 += FA_BK;
            more = fa_next(src, si, k0, tq_lo, tq_hi, global_, meta, window);
            next_whole = more && fa_whole(src[si], k0, nrows, tq_lo, tq_hi, global_, meta, window);
            if (more) wg_load(st[stage], src[si], k0, kh, tid);
            cp_async_commit();
        }
        weights();
        wgmma_hold<DV / 8>(o);
        wgmma_fence();
        values(st[stage]);
        wgmma_wait_all();
        wgmma_hold<DV / 8>(o);
        wgmma_hold<FA_BK / 16>(p);
    }
    fa_store<DV>(o, l, out, row0, heads, h, wr + g, c2, nrows);
#endif
}
// Dynamic shared memory: two FaStage<DK, DV> (the block being scored and the next, loading).
template <int DK, int DV, int TERMS>
__device__ void attention_mma(const float* q, int heads, int kv_heads, const SeqInfo* seqs, const int2* tiles, const KvSrc* past,
                              const bf16_t* new_k, const bf16_t* new_v, int global_, int meta, float scale, float* out) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) unsigned char fa_smem[];
    FaStage<DK, DV>* st = (FaStage<DK, DV>*)fa_smem;
    __shared__ KvSrc src[3];
    // Blocks start in the order of their index, heads first: a sequence's later tiles, which
    // see more keys (global layers), go first, so that the grid does not end on them.
    int t_ = gridDim.y - 1 - blockIdx.y;
    int2 tile = tiles[t_];
    int h = blockIdx.x;
    SeqInfo sq = seqs[tile.x];
    int kh = h / (heads / kv_heads);
    int kw = kv_heads * DK, vw = kv_heads * DV;
    int nrows = min(FA_BQ, sq.len - tile.y);
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, c2 = (lane & 3) * 2;  // the thread's fragment row (and row + 8) and column pair
    long row0 = sq.row0 + tile.y;
    int wr = warp * 16;
    int window = sq.window;
    int tq[2] = {sq.pos0 + tile.y + wr + g, sq.pos0 + tile.y + wr + g + 8};
    bool ok[2] = {wr + g < nrows, wr + g + 8 < nrows};
    if (tid == 0) {
        src[0] = past[2 * tile.x];
        src[1] = past[2 * tile.x + 1];
        src[2] = own_rows(new_k, new_v, sq, kw, vw);
    }
    // Scores in log2 units: the weights are 2^(s - max), the hardware's exp2.
    float qscale = scale * LOG2E;
    u32 qh[DK / 16][4], ql[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int rr = i & 1, col = kk * 16 + c2 + (i >> 1) * 8;
            const float* qp = q + (row0 + wr + g + 8 * rr) * heads * DK + h * DK + col;
            float a = ok[rr] ? qp[0] * qscale : 0.0f, b = ok[rr] ? qp[1] * qscale : 0.0f;
            if (TERMS == 2) split2(a, b, qh[kk][i], ql[kk][i]);
            else qh[kk][i] = bf16x2(a, b);
        }
    float o[DV / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    int tq_lo = sq.pos0 + tile.y, tq_hi = tq_lo + nrows - 1;
    __syncthreads();
    // Two stages: block i + 1 loads while block i is scored.
    int si = 0, k0 = 0;
    bool have = fa_next(src, si, k0, tq_lo, tq_hi, global_, meta, window);
    if (have) fa_load(st[0], src[si], k0, kh, tid);
    cp_async_commit();
    for (int stage = 0; have; stage ^= 1) {
        bool all = fa_whole(src[si], k0, nrows, tq_lo, tq_hi, global_, meta, window);
        k0 += FA_BK;
        have = fa_next(src, si, k0, tq_lo, tq_hi, global_, meta, window);
        if (have) fa_load(st[stage ^ 1], src[si], k0, kh, tid);
        cp_async_commit();
        cp_async_wait_one();
        __syncthreads();
        const FaStage<DK, DV>& cur = st[stage];
        float sc[FA_BK / 8][4];
        fa_scores<DK, DV, FA_BK / 8, TERMS>(cur, 0, qh, ql, sc, lane);
        if (!all) fa_mask<FA_BK / 8>(sc, cur.pos, tq, ok, c2, global_, meta, window);
        fa_softmax<FA_BK / 8, DV>(sc, m, l, o);
        fa_pv<DK, DV, FA_BK / 8, TERMS>(cur, 0, sc, o, lane);
        __syncthreads();
    }
    fa_store<DV>(o, l, out, row0, heads, h, wr + g, c2, nrows);
#endif
}
// Compiled for sm_90a, the bf16 kernels of 64-column slices run on the warpgroup MMA.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_ATTENTION 1
#else
#define WG_ATTENTION 0
#endif
// Three blocks a multiprocessor where their registers (168) hold a thread's values: up to DK +
// DV = 192 with queries and weights of one term; else two, with room for them all (at three,
// the two-term dk 64 / dv 128 spilled).
#define ATTENTION_MMA(DK, DV, TERMS, NAME) \
    extern "C" __global__ void __launch_bounds__(128, (DK + DV < 192 || (TERMS == 1 && DK + DV == 192) ? 3 : 2)) NAME##_##DK##_##DV( \
        const float* q, int heads, int kv_heads, const SeqInfo* seqs, const int2* tiles, const KvSrc* past, const bf16_t* new_k, \
        const bf16_t* new_v, int global_, int meta, float scale, float* out) { \
        grid_dep(); \
        if constexpr (WG_ATTENTION && TERMS == 1 && DK % 64 == 0 && DV % 64 == 0 && DV <= 128) \
            attention_wg<DK, DV>(q, heads, kv_heads, seqs, tiles, past, new_k, new_v, global_, meta, scale, out); \
        else \
            attention_mma<DK, DV, TERMS>(q, heads, kv_heads, seqs, tiles, past, new_k, new_v, global_, meta, scale, out); \
    }
#define ATTENTION_MMA_BOTH(DK, DV) ATTENTION_MMA(DK, DV, 2, attention_mma) ATTENTION_MMA(DK, DV, 1, attention_mma16)
ATTENTION_MMA_BOTH(16, 32)
ATTENTION_MMA_BOTH(64, 64)
ATTENTION_MMA_BOTH(64, 128)
ATTENTION_MMA_BOTH(128, 128)

// The n-th key block from (si, k0) on that rows at tq_lo..tq_hi can see (n = 0: the next one), as
// `fa_next` finds them; false when there are fewer.
__device__ bool fa_nth(const KvSrc* src, int& si, int& k0, int n, int tq_lo, int tq_hi, int global_, int meta, int window) {
    for (;; k0 += FA_BK) {
        if (!fa_next(src, si, k0, tq_lo, tq_hi, global_, meta, window)) return false;
        if (n-- == 0) return true;
    }
}

// Decode attention of many rows on the tensor cores (bf16 K/V): block (row, K/V head, split) of
// 4 warps. The q heads of the K/V head are the rows of one 16-row mma tile (zeros past the
// group), so each key and value is read once for all of them. The row's key blocks, enumerated
// and loaded as `attention_mma` does (two stages in flight), go to the splits in turn; warp w
// scores keys 16w..16w+15 of each block with an online softmax of its own (scores in log2 units,
// queries and weights split into two bf16 terms), the four warps are merged through shared memory
// at the end, and the splits by the last to finish, as `attention_gqa`'s (their maxima stored in
// natural units). Dynamic shared memory: as `attention_mma`'s.
template <int DK, int DV>
__device__ void attention_gqa_mma(const float* q, int heads, int kv_heads, const SeqInfo* seqs, const int* row_seq, const KvSrc* past,
                                  const float* new_k, const float* new_v, int global_, int meta, float scale, int splits, float* out,
                                  float* part, int* count) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ __align__(16) unsigned char fa_smem[];
    FaStage<DK, DV>* st = (FaStage<DK, DV>*)fa_smem;
    __shared__ KvSrc src[3];
    int t = blockIdx.x, kh = blockIdx.y, z = blockIdx.z;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, c2 = (lane & 3) * 2;
    int group = heads / kv_heads, h0 = kh * group;
    int seq = row_seq[t];
    SeqInfo sq = seqs[seq];
    int tq = sq.pos0 + (int)(t - sq.row0), window = sq.window;
    if (tid == 0) {
        src[0] = past[2 * seq];
        src[1] = past[2 * seq + 1];
        src[2] = own_rows(new_k, new_v, sq, kv_heads * DK, kv_heads * DV);
    }
    __syncthreads();
    // This split's blocks: z, z + used, z + 2 used, … of the row's.
    int blocks = 0;
    for (int si = 0, k0 = 0; fa_next(src, si, k0, tq, tq, global_, meta, window); k0 += FA_BK) blocks++;
    int used = min(splits, blocks);
    if (z >= used) return;
    float qscale = scale * LOG2E;
    u32 qh[DK / 16][4], ql[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; kk++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int hr = g + 8 * (i & 1), col = kk * 16 + c2 + (i >> 1) * 8;
            const float* qp = q + ((long)t * heads + h0 + hr) * DK + col;
            float a = hr < group ? qp[0] * qscale : 0.0f, b = hr < group ? qp[1] * qscale : 0.0f;
            split2(a, b, qh[kk][i], ql[kk][i]);
        }
    float o[DV / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < DV / 8; nt++) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    int si = 0, k0 = 0;
    bool have = fa_nth(src, si, k0, z, tq, tq, global_, meta, window);
    if (have) fa_load(st[0], src[si], k0, kh, tid);
    cp_async_commit();
    int kw = warp * 16;
    for (int stage = 0; have; stage ^= 1) {
        k0 += FA_BK;
        have = fa_nth(src, si, k0, used - 1, tq, tq, global_, meta, window);
        if (have) fa_load(st[stage ^ 1], src[si], k0, kh, tid);
        cp_async_commit();
        cp_async_wait_one();
        __syncthreads();
        const FaStage<DK, DV>& cur = st[stage];
        float sc[2][4];
        fa_scores<DK, DV, 2, 2>(cur, kw, qh, ql, sc, lane);
        // Every head sees the same keys: the row's.
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int cc = 0; cc < 2; cc++) {
                int sp = cur.pos[kw + nt * 8 + c2 + cc];
                bool vis = sp >= 0 && sp <= tq && (global_ || tq - sp <= window || sp < meta);
                if (!vis) sc[nt][cc] = sc[nt][2 + cc] = NEG_INF;
            }
        fa_softmax<2, DV>(sc, m, l, o);
        fa_pv<DK, DV, 2, 2>(cur, kw, sc, o, lane);
        __syncthreads();
    }
    // The four warps' maxima, sums and outputs, per head (the stages are free now).
    float* ms = (float*)fa_smem;  // [warp][16]
    float* ls = ms + 64;          // [warp][16]
    float* os = ls + 64;          // [warp][16][DV]
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        float tot = l[rr];
        tot += __shfl_xor_sync(0xffffffffu, tot, 1);
        tot += __shfl_xor_sync(0xffffffffu, tot, 2);
        int r = warp * 16 + g + 8 * rr;
        if ((lane & 3) == 0) {
            ms[r] = m[rr];
            ls[r] = tot;
        }
#pragma unroll
        for (int nt = 0; nt < DV / 8; nt++) {
            os[r * DV + nt * 8 + c2] = o[nt][2 * rr];
            os[r * DV + nt * 8 + c2 + 1] = o[nt][2 * rr + 1];
        }
    }
    __syncthreads();
    for (int i = tid; i < group * DV; i += blockDim.x) {
        int r = i / DV, col = i % DV, h = h0 + r;
        float mm = fmaxf(fmaxf(ms[r], ms[16 + r]), fmaxf(ms[32 + r], ms[48 + r])), den = 0.0f, num = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            float mw = ms[w * 16 + r], e = mw == NEG_INF ? 0.0f : ex2(mw - mm);
            den += e * ls[w * 16 + r];
            num += e * os[(w * 16 + r) * DV + col];
        }
        if (splits == 1) {
            out[((long)t * heads + h) * DV + col] = den > 0.0f ? num / den : 0.0f;
        } else {
            float* pp = part + (((long)t * heads + h) * splits + z) * (DV + 2);
            pp[2 + col] = num;
            if (col == 0) {
                pp[0] = mm == NEG_INF ? NEG_INF : mm / LOG2E;
                pp[1] = den;
            }
        }
    }
    if (splits > 1) merge_splits_if_last(part, count + (long)t * heads + h0, t, heads, h0, group, splits, used, DV, out);
#endif
}
#define ATTENTION_GQA_MMA(DK, DV) \
    extern "C" __global__ void __launch_bounds__(128) attention_gqa_mma_##DK##_##DV( \
        const float* q, int heads, int kv_heads, const SeqInfo* seqs, const int* row_seq, const KvSrc* past, const float* new_k, \
        const float* new_v, int global_, int meta, float scale, int splits, float* out, float* part, int* count) { \
        grid_dep(); \
        attention_gqa_mma<DK, DV>(q, heads, kv_heads, seqs, row_seq, past, new_k, new_v, global_, meta, scale, splits, out, part, count); \
    }
ATTENTION_GQA_MMA(16, 32)
ATTENTION_GQA_MMA(64, 64)
ATTENTION_GQA_MMA(64, 128)
ATTENTION_GQA_MMA(128, 128)

// Matrix products of decode and small batches (t <= ROWS input rows): y[r, j] = x[r, :] · w[j, :],
// the weights streamed once at the memory's pace, no input rounded (bf16 weights widened to f32).
// Work comes in pairs of weight rows (rows 2p, 2p + 1 of w0; for the gated MLP row p of w0 and of
// w1), `split` warps (2, 4 or 8: the host picks enough to fill the card) splitting a pair's k, so
// that every warp has several 16-byte loads of each row in flight before it uses any; the pair's
// sums meet in shared memory. The epilogue writes y, adds to it (a residual), applies
// softplus(y + bias) (the SSM's Δ) or silu(gate) · up. ROWS is the most input rows a kernel
// takes: decode steps of one or two sequences have their own kernels (ROWS 1 and 2), whose
// registers (56-63 against 80 at one row) leave room for more of each lane's weight loads in
// flight (UNROLL of them a row, kept as loaded until used; 64 bytes a row whatever the weights'
// type) and more blocks a multiprocessor: ncu put in_proj, the gated MLP and down at 2.2-2.7
// TB/s so, 1.4-2.0 with the 8-row kernels.
#define GEMV_ROWS 8
#define GEMV_UNROLL 2
#define GEMV1_UNROLL 4
#define EPI_STORE 0
#define EPI_ADD 1
#define EPI_SOFTPLUS 2
#define EPI_GLU 3
// The RMSNorm between a residual add and the next product, folded into both GEMVs (decode rows):
// the add's GEMV (out_proj, down) also writes u = h ⊙ w and each row pair's sum of squares of h
// (`sq`, [t, pairs]), with no reduction over the row; the next GEMV (in_proj, gate·up) sums
// those (`sq_in`, `sq_n` of them a row) and scales its dot products by 1 / rms, which is the
// product of the normed rows. A norm kernel fewer on the step's critical path each time.
struct NormFold {
    const float* w;  // producer: the norm's weights; null: no fold
    float* u;
    float* sq;
    const float* sq_in;  // consumer: null: the input is as it is
    int sq_n;
    float eps;
};
template <typename W, int EPI, int ROWS, int UNROLL>
__device__ void gemv(const float* __restrict__ x, const W* __restrict__ w0, const W* __restrict__ w1, const unsigned short* s0,
                     const unsigned short* s1, const float* __restrict__ bias, float* __restrict__ y, int t, int n, int k, int split,
                     NormFold f) {
    __shared__ float red[8][2][ROWS];
    __shared__ float red_sq[8][ROWS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int grp = warp / split, part = warp % split;
    int pair = blockIdx.x * (8 / split) + grp;
    bool live = pair < (EPI == EPI_GLU ? n : (n + 1) / 2);
    const W* ra = EPI == EPI_GLU ? row_at(w0, pair, k) : row_at(w0, 2 * pair, k);
    const W* rb = EPI == EPI_GLU ? row_at(w1, pair, k) : row_at(w0, 2 * pair + 1, k);
    bool has_b = live && (EPI == EPI_GLU || 2 * pair + 1 < n);
    // Quantized rows' scales (null for f32 and bf16 weights).
    long blocks = k / 32;
    const unsigned short* sa = s0 ? (EPI == EPI_GLU ? s0 + pair * blocks : s0 + 2 * pair * blocks) : s0;
    const unsigned short* sb = s0 ? (EPI == EPI_GLU ? s1 + pair * blocks : sa + blocks) : s0;
    float acc[2][ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) acc[0][r] = acc[1][r] = 0.0f;
    // A folded norm's weight of the column this lane writes (a weight: no wait for it).
    float wn = EPI == EPI_ADD && f.w && part == 0 && lane < 2 * ROWS && live ? f.w[min(2 * pair + lane / ROWS, n - 1)] : 0.0f;
    // The input's sums of squares (folded norm): up to four a thread a row for 1024 partial sums,
    // in the same order in every block. With one or two rows they are loaded as soon as the
    // previous kernel is done, while the first weights are in flight; with more, after the loop
    // (their registers held through it would cost the kernel occupancy).
    constexpr bool early = ROWS <= 2;
    float sqv[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) sqv[r] = 0.0f;
    auto load_sq = [&]() {
        if (!f.sq_in) return;
        for (int j0 = threadIdx.x; j0 < f.sq_n; j0 += 4 * 256) {
#pragma unroll
            for (int r = 0; r < ROWS; r++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    int j = j0 + q * 256;
                    if (r < t && j < f.sq_n) sqv[r] += f.sq_in[(long)r * f.sq_n + j];
                }
        }
    };
    // The weights do not depend on the previous kernel: their first loads go out before waiting.
    allow_next();
    bool waited = false;
    if (live && k % 8 == 0) {
        int chunks = k / 8, per = (chunks + split - 1) / split;
        int lo = part * per, hi = min(chunks, lo + per);
        for (int c0 = lo + lane; c0 < hi; c0 += 32 * UNROLL) {
            Raw8<W> wa[UNROLL], wb[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                long c = c0 + 32 * u;
                if (c < hi) load_raw(ra, sa, 8 * c, wa[u]);
                if (c < hi && has_b) load_raw(rb, sb, 8 * c, wb[u]);
                else zero_raw(wb[u]);
            }
            if (!waited) {
                wait_prior();
                waited = true;
                if (early) load_sq();
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                long c = c0 + 32 * u;
                if (c >= hi) break;
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    if (r < t) {
                        const float4* xr = (const float4*)(x + (long)r * k + 8 * c);
                        float4 a = xr[0], b = xr[1];
                        acc[0][r] += dot8(wa[u], a, b);
                        acc[1][r] += dot8(wb[u], a, b);
                    }
                }
            }
        }
    }
    if (!waited) {
        wait_prior();
        if (early) load_sq();
    }
    if (!early) load_sq();
    if (live && k % 8 != 0) {
        // Rows not 16-byte aligned: one element a lane at a time.
        int per = (k + split - 1) / split, lo = part * per, hi = min(k, lo + per);
        for (int j = lo + lane; j < hi; j += 32) {
            float a = wload(ra, sa, j), b = has_b ? wload(rb, sb, j) : 0.0f;
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (r < t) {
                    float xv = x[(long)r * k + j];
                    acc[0][r] += a * xv;
                    acc[1][r] += b * xv;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int r = 0; r < ROWS; r++)
            if (r < t) {
                float v = warp_sum(acc[i][r]);
                if (lane == 0) red[warp][i][r] = v;
            }
    if (f.sq_in) {
#pragma unroll
        for (int r = 0; r < ROWS; r++)
            if (r < t) {
                float s = warp_sum(sqv[r]);
                if (lane == 0) red_sq[warp][r] = s;
            }
    }
    __syncthreads();
    if (!live || part != 0 || lane >= 2 * ROWS) return;
    int i = lane / ROWS, r = lane % ROWS;
    float s = 0.0f;
    for (int q = 0; q < split; q++) s += red[grp * split + q][i][r];  // unset when r >= t: not used
    if (f.sq_in) {
        float ss = 0.0f;
        for (int q = 0; q < 8; q++) ss += red_sq[q][r];
        s *= 1.0f / sqrtf(ss / k + f.eps);
    }
    if (EPI == EPI_ADD && f.w) {
        int col = 2 * pair + i;
        float h = 0.0f;
        if (r < t && col < n) {
            h = y[(long)r * n + col] + s;
            y[(long)r * n + col] = h;
            f.u[(long)r * n + col] = h * wn;
        }
        float q = h * h;
        q += __shfl_down_sync((1u << (2 * ROWS)) - 1, q, ROWS, 2 * ROWS);
        if (i == 0 && r < t) f.sq[(long)r * ((n + 1) / 2) + pair] = q;
        return;
    }
    if (EPI == EPI_GLU) {
        float u = __shfl_down_sync((1u << (2 * ROWS)) - 1, s, ROWS, 2 * ROWS);
        if (i == 0 && r < t) y[(long)r * n + pair] = silu(s) * u;
        return;
    }
    if (r >= t) return;
    int col = 2 * pair + i;
    if (col >= n) return;
    float* out = y + (long)r * n + col;
    if (EPI == EPI_STORE) *out = s;
    if (EPI == EPI_ADD) *out += s;
    if (EPI == EPI_SOFTPLUS) {
        float v = s + bias[col];
        *out = v > 20.0f ? v : log1pf(expf(v));
    }
}
// Chunks of eight weights a lane keeps in flight in the one- and two-row GEMVs: GEMV1_UNROLL of
// bf16 (16 bytes each), half as many of f32, as many of Q8_0 (8 bytes: twice as many took 128
// registers), as many of Q4_0 (4 bytes; twice as many took 112 registers at two rows).
template <typename W> struct Unroll1 {
    static constexpr int N = GEMV1_UNROLL * 2 / sizeof(W);
};
template <> struct Unroll1<q8_t> {
    static constexpr int N = GEMV1_UNROLL;
};
template <> struct Unroll1<q4_t> {
    static constexpr int N = GEMV1_UNROLL;
};
#define GEMV(name, W, EPI) \
    extern "C" __global__ void __launch_bounds__(256) name(const float* x, const W* w0, const W* w1, const unsigned short* s0, \
                                                           const unsigned short* s1, const float* bias, float* y, int t, int n, int k, \
                                                           int split, NormFold f) { \
        gemv<W, EPI, GEMV_ROWS, GEMV_UNROLL>(x, w0, w1, s0, s1, bias, y, t, n, k, split, f); \
    } \
    extern "C" __global__ void __launch_bounds__(256) name##_1(const float* x, const W* w0, const W* w1, const unsigned short* s0, \
                                                              const unsigned short* s1, const float* bias, float* y, int t, int n, \
                                                              int k, int split, NormFold f) { \
        gemv<W, EPI, 1, Unroll1<W>::N>(x, w0, w1, s0, s1, bias, y, t, n, k, split, f); \
    } \
    extern "C" __global__ void __launch_bounds__(256) name##_2(const float* x, const W* w0, const W* w1, const unsigned short* s0, \
                                                              const unsigned short* s1, const float* bias, float* y, int t, int n, \
                                                              int k, int split, NormFold f) { \
        gemv<W, EPI, 2, Unroll1<W>::N>(x, w0, w1, s0, s1, bias, y, t, n, k, split, f); \
    }
GEMV(gemv_f32, float, EPI_STORE)
GEMV(gemv_add_f32, float, EPI_ADD)
GEMV(gemv_softplus_f32, float, EPI_SOFTPLUS)
GEMV(gemv_glu_f32, float, EPI_GLU)
GEMV(gemv_bf16, bf16_t, EPI_STORE)
GEMV(gemv_add_bf16, bf16_t, EPI_ADD)
GEMV(gemv_softplus_bf16, bf16_t, EPI_SOFTPLUS)
GEMV(gemv_glu_bf16, bf16_t, EPI_GLU)
GEMV(gemv_q8, q8_t, EPI_STORE)
GEMV(gemv_add_q8, q8_t, EPI_ADD)
GEMV(gemv_softplus_q8, q8_t, EPI_SOFTPLUS)
GEMV(gemv_glu_q8, q8_t, EPI_GLU)
GEMV(gemv_q4, q4_t, EPI_STORE)
GEMV(gemv_add_q4, q4_t, EPI_ADD)
GEMV(gemv_softplus_q4, q4_t, EPI_SOFTPLUS)
GEMV(gemv_glu_q4, q4_t, EPI_GLU)

// Eight inputs from element i (16-byte aligned) as bf16 pairs: rounded here from f32 (as
// `to_bf16` rounds), or as stored.
__device__ __forceinline__ uint4 x_bits8(const float* x, long i) {
    float4 a = *(const float4*)(x + i), b = *(const float4*)(x + i + 4);
    auto pack = [](float lo, float hi) { return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); };
    return make_uint4(pack(a.x, a.y), pack(a.z, a.w), pack(b.x, b.y), pack(b.z, b.w));
}
__device__ __forceinline__ uint4 x_bits8(const bf16_t* x, long i) { return *(const uint4*)(x + i); }

// Products of decode batches (4 to 32 input rows, bf16 weights, or quantized ones widened to bf16
// as they are read: the products of `dequant_*`'s matrix) on the tensor cores: y[r, j] =
// x[r, :] · w[j, :], x rounded to bf16 (as the cuBLAS path and the official bf16 model take it),
// f32 accumulated by mma.sync m16n8k16 with the weights as its B operand (a tile of 8 weight rows)
// and the input rows as A (16 a tile, MT tiles). A lane loads 8 consecutive k of a weight row
// (16 bytes) and the same 8 k of its two input rows of each tile; the two mma of a
// 32-wide k step take those k in an order of their own (k is summed over, so any order A and B
// share gives the product), so every load is a whole 16 bytes and nothing is shuffled. The
// input comes as bf16 (rounded by `to_bf16`: fewer bytes to read, which pays with many rows)
// or as f32, rounded here (no launch before, which pays with few). Work
// comes in groups of two weight tiles (16 rows; for the gated MLP 8 rows of gate and the same 8
// of up), `split` warps of a block splitting a group's k, their sums meeting in shared memory;
// epilogues as the GEMV's. k % 8 == 0 (the host checks).
template <int MT, int EPI, typename X, typename W>
__device__ void gemm_rows(const X* __restrict__ x, const W* __restrict__ w0, const W* __restrict__ w1, const unsigned short* s0,
                          const unsigned short* s1, const float* __restrict__ bias, float* __restrict__ y, int t, int n, int k,
                          int split) {
#if __CUDA_ARCH__ >= 800
    __shared__ float red[8][2][MT][4][32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int grp = warp / split, part = warp % split;
    int group = blockIdx.x * (8 / split) + grp;
    bool live = group < (EPI == EPI_GLU ? (n + 7) / 8 : (n + 15) / 16);
    int row_a = EPI == EPI_GLU ? group * 8 + g : group * 16 + g, row_b = EPI == EPI_GLU ? row_a : row_a + 8;
    bool has_a = live && row_a < n, has_b = live && row_b < n;
    const W* wa = row_at(w0, row_a, k);
    const W* wb = row_at(EPI == EPI_GLU ? w1 : w0, row_b, k);
    // Quantized rows' scales (null for bf16 weights; then unused).
    const unsigned short* sa = s0 ? s0 + (long)row_a * (k / 32) : s0;
    const unsigned short* sb = s0 ? (EPI == EPI_GLU ? s1 : s0) + (long)row_b * (k / 32) : s0;
    float acc[2][MT][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][m][e] = 0.0f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    int chunks = (k + 31) / 32, per = (chunks + split - 1) / split, lo = part * per, hi = min(chunks, lo + per);
    // The weights do not depend on the previous kernel: their first chunks are fetched into L2
    // before waiting for it.
    allow_next();
#pragma unroll
    for (int c = lo; c < min(hi, lo + 4); c++) {
        int kk = 32 * c + 8 * q;
        if (kk < k && has_a) prefetch_l2(wa + kk);
        if (kk < k && has_b) prefetch_l2(wb + kk);
    }
    wait_prior();
    // U chunks at a time, all their loads asked for before any is used.
    // (Q8_0 weights: two, the widening's registers on top: four took 106.)
    constexpr int U = MT == 1 && sizeof(X) == 2 && sizeof(W) == 2 ? 4 : 2;
    for (int c0 = lo; c0 < hi; c0 += U) {
        uint4 wv[U][2], xv[U][MT][2];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int kk = 32 * (c0 + u) + 8 * q;
            bool in = c0 + u < hi && kk < k;
            wv[u][0] = in && has_a ? w_bits8(wa, sa, kk) : zero;
            wv[u][1] = in && has_b ? w_bits8(wb, sb, kk) : zero;
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    int r = 16 * m + g + 8 * h;
                    xv[u][m][h] = in && r < t ? x_bits8(x, (long)r * k + kk) : zero;
                }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    u32 a0[4] = {xv[u][m][0].x, xv[u][m][1].x, xv[u][m][0].y, xv[u][m][1].y};
                    mma16816(acc[i][m], a0, wv[u][i].x, wv[u][i].y);
                    u32 a1[4] = {xv[u][m][0].z, xv[u][m][1].z, xv[u][m][0].w, xv[u][m][1].w};
                    mma16816(acc[i][m], a1, wv[u][i].z, wv[u][i].w);
                }
    }
    if (split > 1) {
        if (part != 0)
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int e = 0; e < 4; e++) red[warp][i][m][e][lane] = acc[i][m][e];
        __syncthreads();
        if (part != 0) return;
        for (int o = 1; o < split; o++)
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[i][m][e] += red[warp + o][i][m][e][lane];
    }
    if (!live) return;
    // acc[i][m][2h + c] is input row 16m + g + 8h, column 2q + c of weight tile i.
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = 16 * m + g + 8 * h;
            if (r >= t) continue;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                if (EPI == EPI_GLU) {
                    int col = group * 8 + 2 * q + c;
                    if (col < n) y[(long)r * n + col] = silu(acc[0][m][2 * h + c]) * acc[1][m][2 * h + c];
                    continue;
                }
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    int col = group * 16 + 8 * i + 2 * q + c;
                    if (col >= n) continue;
                    float s = acc[i][m][2 * h + c];
                    float* out = y + (long)r * n + col;
                    if (EPI == EPI_STORE) *out = s;
                    if (EPI == EPI_ADD) *out += s;
                    if (EPI == EPI_SOFTPLUS) {
                        float v = s + bias[col];
                        *out = v > 20.0f ? v : log1pf(expf(v));
                    }
                }
            }
        }
#endif
}
// Named gemm_rows_{input}_{MT}_{epilogue}, with a _q8 or _q4 suffix over Q8_0 or Q4_0 weights.
#define GEMM_ROWS(XN, X, MT, NAME, EPI, W, WN) \
    extern "C" __global__ void __launch_bounds__(256) gemm_rows_##XN##_##MT##_##NAME##WN( \
        const X* x, const W* w0, const W* w1, const unsigned short* s0, const unsigned short* s1, const float* bias, float* y, int t, \
        int n, int k, int split) { \
        gemm_rows<MT, EPI, X, W>(x, w0, w1, s0, s1, bias, y, t, n, k, split); \
    }
#define GEMM_ROWS_ALL(XN, X, MT, W, WN) \
    GEMM_ROWS(XN, X, MT, store, EPI_STORE, W, WN) \
    GEMM_ROWS(XN, X, MT, add, EPI_ADD, W, WN) \
    GEMM_ROWS(XN, X, MT, softplus, EPI_SOFTPLUS, W, WN) \
    GEMM_ROWS(XN, X, MT, glu, EPI_GLU, W, WN)
GEMM_ROWS_ALL(f32, float, 1, bf16_t, )
GEMM_ROWS_ALL(bf16, bf16_t, 1, bf16_t, )
GEMM_ROWS_ALL(bf16, bf16_t, 2, bf16_t, )
GEMM_ROWS_ALL(f32, float, 1, q8_t, _q8)
GEMM_ROWS_ALL(bf16, bf16_t, 1, q8_t, _q8)
GEMM_ROWS_ALL(bf16, bf16_t, 2, q8_t, _q8)
GEMM_ROWS_ALL(f32, float, 1, q4_t, _q4)
GEMM_ROWS_ALL(bf16, bf16_t, 1, q4_t, _q4)
GEMM_ROWS_ALL(bf16, bf16_t, 2, q4_t, _q4)

// Fusion, one block per row: out = (w1 ⊙ a / rms(a) + w2 ⊙ y / rms(y)) / 2 (and its bf16 copy,
// see `put_act`).
// A thread's first FUSE_HELD elements, with their weights, are loaded together and kept (a
// decode step's row: no second round trip for the weights after the sums); a wider row's rest is
// read again.
#define FUSE_HELD 4
__device__ void fuse_row(const float* ar, const float* yr, const float* w1, const float* w2, int e, float eps, float* out, bf16_t* out16) {
    float av[FUSE_HELD], yv[FUSE_HELD], u[FUSE_HELD], v[FUSE_HELD];
    float2 sq = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < FUSE_HELD; i++) {
        int j = threadIdx.x + i * blockDim.x;
        bool in = j < e;
        av[i] = in ? ar[j] : 0.0f;
        yv[i] = in ? yr[j] : 0.0f;
        u[i] = in ? w1[j] : 0.0f;
        v[i] = in ? w2[j] : 0.0f;
        sq.x += av[i] * av[i];
        sq.y += yv[i] * yv[i];
    }
    for (int j = threadIdx.x + FUSE_HELD * blockDim.x; j < e; j += blockDim.x) {
        sq.x += ar[j] * ar[j];
        sq.y += yr[j] * yr[j];
    }
    sq = block_sum2(sq);
    float ia = 1.0f / sqrtf(sq.x / e + eps), iy = 1.0f / sqrtf(sq.y / e + eps);
#pragma unroll
    for (int i = 0; i < FUSE_HELD; i++) {
        int j = threadIdx.x + i * blockDim.x;
        if (j < e) put_act(out, out16, j, (u[i] * (av[i] * ia) + v[i] * (yv[i] * iy)) * 0.5f);
    }
    for (int j = threadIdx.x + FUSE_HELD * blockDim.x; j < e; j += blockDim.x)
        put_act(out, out16, j, (w1[j] * (ar[j] * ia) + w2[j] * (yr[j] * iy)) * 0.5f);
}

extern "C" __global__ void fuse(const float* a, const float* y, const float* w1, const float* w2, int e, float eps, float* out, bf16_t* out16) {
    grid_dep();
    long r = blockIdx.x;
    fuse_row(a + r * e, y + r * e, w1, w2, e, eps, out ? out + r * e : nullptr, out16 ? out16 + r * e : nullptr);
}

// The fusion of many rows (prompts): four warps a row, its values held in registers (e a multiple
// of 4, at most 512 · FUSE_V4), so a and y are read once and both sums reduced together.
#define FUSE_V4 8
extern "C" __global__ void __launch_bounds__(128) fuse_rows(const float* a, const float* y, const float* w1, const float* w2, int e,
                                                           float eps, float* out, bf16_t* out16) {
    grid_dep();
    __shared__ float part[2][4];
    long r = blockIdx.x;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float4 *ar = (const float4*)(a + r * e), *yr = (const float4*)(y + r * e);
    float4 va[FUSE_V4], vy[FUSE_V4];
    float sa = 0.0f, sy = 0.0f;
#pragma unroll
    for (int i = 0; i < FUSE_V4; i++) {
        int j = threadIdx.x + 128 * i;
        bool in = 4 * j < e;
        va[i] = in ? ar[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        vy[i] = in ? yr[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        sa += va[i].x * va[i].x + va[i].y * va[i].y + va[i].z * va[i].z + va[i].w * va[i].w;
        sy += vy[i].x * vy[i].x + vy[i].y * vy[i].y + vy[i].z * vy[i].z + vy[i].w * vy[i].w;
    }
    sa = warp_sum(sa);
    sy = warp_sum(sy);
    if (lane == 0) {
        part[0][warp] = sa;
        part[1][warp] = sy;
    }
    __syncthreads();
    sa = part[0][0] + part[0][1] + part[0][2] + part[0][3];
    sy = part[1][0] + part[1][1] + part[1][2] + part[1][3];
    float ia = 1.0f / sqrtf(sa / e + eps), iy = 1.0f / sqrtf(sy / e + eps);
#pragma unroll
    for (int i = 0; i < FUSE_V4; i++) {
        int j = threadIdx.x + 128 * i;
        if (4 * j >= e) break;
        float4 u = ((const float4*)w1)[j], v = ((const float4*)w2)[j];
        float4 o = make_float4((u.x * (va[i].x * ia) + v.x * (vy[i].x * iy)) * 0.5f, (u.y * (va[i].y * ia) + v.y * (vy[i].y * iy)) * 0.5f,
                               (u.z * (va[i].z * ia) + v.z * (vy[i].z * iy)) * 0.5f, (u.w * (va[i].w * ia) + v.w * (vy[i].w * iy)) * 0.5f);
        if (out) ((float4*)(out + r * e))[j] = o;
        if (out16) ((uint2*)(out16 + r * e))[j] = bf16x4(o);
    }
}

// New K/V rows into the stores, block row (op): rows of keys `k` [rows, kw] and values `v`
// [rows, vw] (f32) into slots slot.. of a row-major store of f32 or bf16, their positions
// first_pos.. beside them. All of a step's writes in one launch.
struct PutOp {
    const float* k;
    const float* v;
    void* dk;
    void* dv;
    int* dpos;
    long slot;
    int rows;
    int first_pos;
    int kw;
    int vw;
    int bf16;
    int pad;
};

__device__ __forceinline__ void put_elem(void* dst, int bf16, long i, float x) {
    if (bf16) ((bf16_t*)dst)[i] = f32_to_bf16(x);
    else ((float*)dst)[i] = x;
}

extern "C" __global__ void kv_put(const PutOp* ops) {
    grid_dep();
    PutOp op = ops[blockIdx.y];
    long stride = (long)gridDim.x * blockDim.x, first = blockIdx.x * (long)blockDim.x + threadIdx.x;
    for (long i = first; i < (long)op.rows * op.kw; i += stride) put_elem(op.dk, op.bf16, op.slot * op.kw + i, op.k[i]);
    for (long i = first; i < (long)op.rows * op.vw; i += stride) put_elem(op.dv, op.bf16, op.slot * op.vw + i, op.v[i]);
    for (long i = first; i < op.rows; i += stride) op.dpos[op.slot + i] = op.first_pos + (int)i;
}
