//! AVX2 + FMA (+ F16C) kernels: Q8_0/Q4_0: integer dot products (AVX2, or VNNI on 256-bit registers) and quantization.

use super::*;

/// The f16 scale of a block, by the F16C instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale(d: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(d) as i32),
    ))
}

/// `Σ_i dw_i · xd_i · (Σ lanes of dot(i) − corr_i)` over `n` block pairs, where `dot(i)` is
/// the integer product of weight block i with input block i in eight lanes, `dw(i)` the f16
/// bits of the weight block's scale and `xd` the input blocks' scales, widened. Four blocks go
/// together: their lane sums are folded by horizontal adds into one vector (block j's halves
/// in lanes j and j + 4), which takes the corrections (`corr4(i)`: those of blocks i..i + 4,
/// `corr1(i)`: one block's), the conversion to float and the four scales (widened together) in
/// one instruction each, where a block at a time paid for each. Two accumulators, so
/// consecutive groups do not wait on each other's FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold_blocks(
    n: usize,
    dot: impl Fn(usize) -> __m256i,
    dw: impl Fn(usize) -> u16,
    xd: &[f32],
    corr4: impl Fn(usize) -> __m128i,
    corr1: impl Fn(usize) -> i32,
) -> f32 {
    let n = n.min(xd.len());
    let four = |i: usize, acc: __m256| {
        let d = [dot(i), dot(i + 1), dot(i + 2), dot(i + 3)];
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
        let dots = _mm256_cvtepi32_ps(_mm256_sub_epi32(h, _mm256_zextsi128_si256(corr4(i))));
        let bits = |j: usize| dw(i + j) as i16;
        let sc = _mm_mul_ps(
            _mm_cvtph_ps(_mm_set_epi16(
                0,
                0,
                0,
                0,
                bits(3),
                bits(2),
                bits(1),
                bits(0),
            )),
            _mm_loadu_ps(xd.as_ptr().add(i)),
        );
        _mm256_fmadd_ps(_mm256_set_m128(sc, sc), dots, acc)
    };
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 8 <= n {
        acc[0] = four(i, acc[0]);
        acc[1] = four(i + 4, acc[1]);
        i += 8;
    }
    if i + 4 <= n {
        acc[0] = four(i, acc[0]);
        i += 4;
    }
    let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
    for i in i..n {
        let dot = hsum(_mm256_cvtepi32_ps(dot(i))) - corr1(i) as f32;
        s += scale(dw(i).to_le_bytes()) * *xd.get_unchecked(i) * dot;
    }
    s
}

/// Proof that this CPU has AVX-512 VNNI on 256-bit registers (AVX512-VNNI and -VL) beside AVX2,
/// FMA and F16C: made only by [`Vnni::detect`], so the `_vnni` kernels that need it run nowhere
/// else.
#[derive(Clone, Copy, Debug)]
pub struct Vnni(());

impl Vnni {
    pub fn detect() -> Option<Vnni> {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl");
        ok.then_some(Vnni(()))
    }
}

/// Σ of four products of unsigned by signed bytes in each of eight i32 lanes: maddubs (pairs to
/// i16) then madd with ones on AVX2. The quantized operands here never saturate the pairs
/// (|w|, |x| ≤ 127, or a nibble ≤ 15 by |x| ≤ 127), so this equals [`mul_u8i8_vnni`] exactly.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul_u8i8(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// [`mul_u8i8`] in one VNNI instruction (`vpdpbusd`).
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn mul_u8i8_vnni(a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
}

macro_rules! quant_dots_impl {
    ($q8:ident, $q4:ident, $feat:literal, $mul:ident) => {
        /// Q8_0 weights · Q8_0 activations whose block scales come widened (`xd`). The byte
        /// products want an unsigned operand, so the sign of the weights moves onto the
        /// activations (GGML's `mul_sum_i8_pairs`); see [`fold_blocks`] for the rest.
        #[target_feature(enable = $feat)]
        pub unsafe fn $q8(
            w: &[crate::quant::BlockQ8_0],
            x: &[crate::quant::BlockQ8_0],
            xd: &[f32],
        ) -> f32 {
            let dot = |i: usize| {
                let a = unpack_q8_0(w.get_unchecked(i));
                let b = unpack_q8_0(x.get_unchecked(i));
                $mul(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
            };
            let n = w.len().min(x.len());
            fold_blocks(
                n,
                dot,
                |i| u16::from_le_bytes(w.get_unchecked(i).d),
                xd,
                |_| _mm_setzero_si128(),
                |_| 0,
            )
        }

        /// Q4_0 weights · Q8_0 activations whose block scales come widened (`xd`) and whose
        /// block sums come precomputed (`xs`). The nibbles (0..15) multiply the activations
        /// directly, unsigned by signed, and 8·Σx per block is taken off after: Σ(q − 8)·x =
        /// Σq·x − 8·Σx, exactly, in integers; see [`fold_blocks`] for the rest.
        #[target_feature(enable = $feat)]
        pub unsafe fn $q4(
            w: &[crate::quant::BlockQ4_0],
            x: &[crate::quant::BlockQ8_0],
            xd: &[f32],
            xs: &[i32],
        ) -> f32 {
            let low = _mm256_set1_epi8(0x0F);
            let dot = |i: usize| {
                let t = _mm_loadu_si128(w.get_unchecked(i).qs.as_ptr() as *const __m128i);
                let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low);
                let y = _mm256_loadu_si256(x.get_unchecked(i).qs.as_ptr() as *const __m256i);
                $mul(q, y)
            };
            let n = w.len().min(x.len()).min(xs.len());
            // 8·Σx per block, in the lanes of the folded sums.
            let corr4 =
                |i: usize| _mm_slli_epi32(_mm_loadu_si128(xs.as_ptr().add(i) as *const __m128i), 3);
            fold_blocks(
                n,
                dot,
                |i| u16::from_le_bytes(w.get_unchecked(i).d),
                xd,
                corr4,
                |i| 8 * *xs.get_unchecked(i),
            )
        }
    };
}

quant_dots_impl!(dot_q8_0, dot_q4_0, "avx2,fma,f16c", mul_u8i8);
quant_dots_impl!(
    dot_q8_0_vnni,
    dot_q4_0_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    mul_u8i8_vnni
);

/// A Q8_0 block's 32 values as signed bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack_q8_0(b: &crate::quant::BlockQ8_0) -> __m256i {
    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
}

/// A Q4_0 block's 32 values as signed bytes (−8..7), in order: low nibbles are values 0..16,
/// high nibbles 16..32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack_q4_0(b: &crate::quant::BlockQ4_0) -> __m256i {
    let t = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
    let q = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
        _mm256_set1_epi8(0x0F),
    );
    _mm256_sub_epi8(q, _mm256_set1_epi8(8))
}

macro_rules! quant_tile_impl {
    ($name:ident, $blk:ty, $unpack:ident, $feat:literal, $mul:ident) => {
        /// `R` quantized weight rows against `M` Q8_0 input rows, whose block scales are given
        /// widened in `xd`: an R×M tile of dot products in registers. Each weight block is
        /// unpacked and its scale widened once for the M inputs, each input block loaded once
        /// for the R rows.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name<const R: usize, const M: usize>(
            w: [&[$blk]; R],
            x: [&[crate::quant::BlockQ8_0]; M],
            xd: [&[f32]; M],
            out: &mut [[f32; M]; R],
        ) {
            let mut acc = [[_mm256_setzero_ps(); M]; R];
            for b in 0..w[0].len() {
                let wq: [__m256i; R] = std::array::from_fn(|j| $unpack(w[j].get_unchecked(b)));
                // maddubs needs an unsigned operand: |w|, with w's signs moved onto x.
                let wa: [__m256i; R] = std::array::from_fn(|j| _mm256_sign_epi8(wq[j], wq[j]));
                let wd: [f32; R] = std::array::from_fn(|j| scale(w[j].get_unchecked(b).d));
                for m in 0..M {
                    let y = _mm256_loadu_si256(x[m].get_unchecked(b).qs.as_ptr() as *const __m256i);
                    let dx = *xd[m].get_unchecked(b);
                    for j in 0..R {
                        let dot = $mul(wa[j], _mm256_sign_epi8(y, wq[j]));
                        acc[j][m] = _mm256_fmadd_ps(
                            _mm256_set1_ps(wd[j] * dx),
                            _mm256_cvtepi32_ps(dot),
                            acc[j][m],
                        );
                    }
                }
            }
            for j in 0..R {
                for m in 0..M {
                    out[j][m] = hsum(acc[j][m]);
                }
            }
        }
    };
}

quant_tile_impl!(
    dot_tile_q8_0,
    crate::quant::BlockQ8_0,
    unpack_q8_0,
    "avx2,fma,f16c",
    mul_u8i8
);
quant_tile_impl!(
    dot_tile_q4_0,
    crate::quant::BlockQ4_0,
    unpack_q4_0,
    "avx2,fma,f16c",
    mul_u8i8
);
quant_tile_impl!(
    dot_tile_q8_0_vnni,
    crate::quant::BlockQ8_0,
    unpack_q8_0,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    mul_u8i8_vnni
);
quant_tile_impl!(
    dot_tile_q4_0_vnni,
    crate::quant::BlockQ4_0,
    unpack_q4_0,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    mul_u8i8_vnni
);

/// [`crate::quant::quantize_q8_0_ref`] eight lanes at a time: the same scale, and round half
/// away from zero done exactly (truncate, then step away from zero when the dropped fraction,
/// exact in f32, is at least one half).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(x: &[f32], out: &mut [crate::quant::BlockQ8_0]) {
    let sign = _mm256_set1_ps(-0.0);
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xs.as_ptr().add(8 * j)));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(m, _mm256_andnot_ps(sign, v))
        });
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        b.d = f16::from_f32(d).to_le_bytes();
        let q: [__m256i; 4] = std::array::from_fn(|j| {
            let y = _mm256_mul_ps(v[j], id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(y, t)), half);
            let step = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(y, sign), one));
            _mm256_cvtps_epi32(_mm256_add_ps(t, step))
        });
        // Saturating packs interleave 128-bit lanes; the permutation restores the order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, p);
    }
}

/// [`crate::quant::quantize_q4_0_ref`] eight lanes at a time, byte for byte: the same scale (from
/// the first value of the largest magnitude), `x · id` then `+ 8.5` rounded separately as the
/// reference does (no FMA), truncated and clamped. A block holding a NaN, or whose scale's
/// inverse overflows, takes the reference.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q4_0(x: &[f32], out: &mut [crate::quant::BlockQ4_0]) {
    let sign = _mm256_set1_ps(-0.0);
    let (off, zero, fifteen) = (
        _mm256_set1_ps(8.5),
        _mm256_setzero_si256(),
        _mm256_set1_epi32(15),
    );
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xs.as_ptr().add(8 * j)));
        let nan = v.iter().fold(0, |m, &v| {
            m | _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v))
        });
        if nan != 0 {
            crate::quant::quantize_q4_0_ref(xs, std::slice::from_mut(b));
            continue;
        }
        let abs: [__m256; 4] = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = abs
            .iter()
            .fold(_mm256_setzero_ps(), |m, &a| _mm256_max_ps(m, a));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        // The reference keeps the first value of that magnitude (a strict `<`).
        let at = (0..4)
            .find_map(|j| {
                let hit =
                    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs[j], _mm256_set1_ps(amax)));
                (hit != 0).then(|| 8 * j + hit.trailing_zeros() as usize)
            })
            .unwrap_or(0);
        let d = xs[at] / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            crate::quant::quantize_q4_0_ref(xs, std::slice::from_mut(b));
            continue;
        }
        b.d = f16::from_f32(d).to_le_bytes();
        let idv = _mm256_set1_ps(id);
        let q: [__m256i; 4] = v.map(|v| {
            let t = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, idv), off));
            // An infinite value times a zero scale is NaN, which the reference casts to 0.
            _mm256_min_epi32(_mm256_max_epi32(t, zero), fifteen)
        });
        // Byte j holds values j (low nibble) and j + 16 (high).
        let t = [
            _mm256_or_si256(q[0], _mm256_slli_epi32(q[2], 4)),
            _mm256_or_si256(q[1], _mm256_slli_epi32(q[3], 4)),
        ];
        let half = |t: __m256i| {
            _mm_packs_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t))
        };
        _mm_storeu_si128(
            b.qs.as_mut_ptr() as *mut __m128i,
            _mm_packus_epi16(half(t[0]), half(t[1])),
        );
    }
}
