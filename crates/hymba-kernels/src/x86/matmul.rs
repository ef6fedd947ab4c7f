//! AVX2 + FMA (+ F16C) kernels: Matrix products: dot products, the f32 GEMM micro-kernel and its packing, the bf16
//! panel kernel and its packing, the few-row tiles.

use super::*;

macro_rules! dot_impl {
    ($name:ident, $t:ty, $feat:literal, $load:expr, $scalar:expr) => {
        /// Σ w[i]·x[i], four independent 8-wide accumulators.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: &[$t], x: &[f32]) -> f32 {
            debug_assert_eq!(w.len(), x.len());
            let n = w.len();
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for j in 0..4 {
                    acc[j] = _mm256_fmadd_ps(
                        $load(wp.add(i + 8 * j)),
                        _mm256_loadu_ps(xp.add(i + 8 * j)),
                        acc[j],
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                s += $scalar(w[i]) * x[i];
                i += 1;
            }
            s
        }
    };
}

dot_impl!(
    dot_f32,
    f32,
    "avx2,fma",
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);
dot_impl!(dot_bf16, bf16, "avx2,fma", |p| load_bf16(p), |v: bf16| v
    .to_f32());
dot_impl!(dot_f16, f16, "avx2,fma,f16c", |p| load_f16(p), |v: f16| v
    .to_f32());

/// One f32 row `w` against four rows of `x` at once, so each weight load feeds four FMAs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_x4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let n = w.len();
    let wp = w.as_ptr();
    let xp = x.map(|r| r.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 16 <= n {
        let w0 = _mm256_loadu_ps(wp.add(i));
        let w1 = _mm256_loadu_ps(wp.add(i + 8));
        for r in 0..4 {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[r].add(i)), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[r].add(i + 8)), acc[r][1]);
        }
        i += 16;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for j in i..n {
            out[r] += w[j] * x[r][j];
        }
    }
    out
}

/// Rows of the input handled by one call of the register-blocked kernel.
pub const MR: usize = 6;
/// Weight rows (outputs) in one packed panel: two 8-wide vectors.
pub const NR: usize = 16;

/// Requests the cache line at `p`. Only a hint: any address is fine.
#[inline]
pub fn prefetch(p: *const f32) {
    // SAFETY: SSE is part of x86-64; a prefetch never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// `c[i][j] += Σ_k x[i][k] · panel[k][j]` for i < MR, j < NR, the panel packed k-major
/// (`[kc][NR]`). Twelve accumulators stay in registers; each k costs two panel loads and six
/// broadcasts for twelve FMAs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel_6x16(
    kc: usize,
    x: [*const f32; MR],
    panel: *const f32,
    c: &mut [[f32; NR]; MR],
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for i in 0..MR {
        acc[i][0] = _mm256_loadu_ps(c[i].as_ptr());
        acc[i][1] = _mm256_loadu_ps(c[i].as_ptr().add(8));
    }
    for k in 0..kc {
        let p0 = _mm256_loadu_ps(panel.add(k * NR));
        let p1 = _mm256_loadu_ps(panel.add(k * NR + 8));
        for i in 0..MR {
            let xv = _mm256_broadcast_ss(&*x[i].add(k));
            acc[i][0] = _mm256_fmadd_ps(xv, p0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xv, p1, acc[i][1]);
        }
    }
    for i in 0..MR {
        _mm256_storeu_ps(c[i].as_mut_ptr(), acc[i][0]);
        _mm256_storeu_ps(c[i].as_mut_ptr().add(8), acc[i][1]);
    }
}

/// How far ahead of itself the first pass over a panel prefetches it, in columns of 32 bytes.
pub const PF_COLUMNS: usize = 64;

/// `M` input rows against one panel of 16 bf16 weight rows (see
/// [`crate::matmul::WeightData::BF16Panels`]): `c[i][j] = Σ_k x[i][k]·w[j][k]` over `k`
/// columns, an M×16 tile of accumulators in registers. Each column's 16 weights are one 32-byte
/// load, widened by a shift (rows 0..8, stored in the low halves) and a mask (rows 8..16, the
/// high halves); each input element is broadcast once and feeds both. M ≤ 6 keeps the 2·M
/// accumulators, the two weight vectors and the broadcast in the 16 ymm registers. Every two
/// columns it prefetches the line at `pf + kk·pf_step` (its own panel ahead, or the next one).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel_panel_bf16<const M: usize>(
    k: usize,
    x: &[*const f32; M],
    panel: *const bf16,
    c: &mut [[f32; NR]; M],
    pf: *const bf16,
    pf_step: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut column = |kk: usize| {
        let v = _mm256_loadu_si256(panel.add(kk * NR) as *const __m256i);
        let w1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        let w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        for i in 0..M {
            let xv = _mm256_broadcast_ss(&*x[i].add(kk));
            acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
        }
    };
    let mut kk = 0;
    while kk + 2 <= k {
        // Only a hint: an address past the matrix does not fault.
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * pf_step) as *const i8);
        column(kk);
        column(kk + 1);
        kk += 2;
    }
    if kk < k {
        column(kk);
    }
    for i in 0..M {
        _mm256_storeu_ps(c[i].as_mut_ptr(), acc[i][0]);
        _mm256_storeu_ps(c[i].as_mut_ptr().add(8), acc[i][1]);
    }
}

macro_rules! pack_impl {
    ($name:ident, $t:ty, $load:expr, $scalar:expr) => {
        /// Packs `kc` columns of `nrows` rows (at most NR; row `r` starts at `rows[r·stride]`)
        /// k-major into `panel` (`[kc][NR]`), widening to f32 and zero padding missing rows,
        /// with 8×8 register transposes.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn $name(
            rows: &[$t],
            stride: usize,
            kc: usize,
            nrows: usize,
            panel: &mut [f32],
        ) {
            assert!(
                panel.len() >= kc * NR
                    && nrows <= NR
                    && (nrows == 0 || rows.len() >= (nrows - 1) * stride + kc)
            );
            for half in 0..2 {
                let mut kk = 0;
                while kk + 8 <= kc {
                    let v: [__m256; 8] = std::array::from_fn(|j| {
                        let r = half * 8 + j;
                        if r < nrows {
                            $load(rows.as_ptr().add(r * stride + kk))
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    for (i, ti) in transpose8(v).iter().enumerate() {
                        _mm256_storeu_ps(panel.as_mut_ptr().add((kk + i) * NR + half * 8), *ti);
                    }
                    kk += 8;
                }
                for kk in kk..kc {
                    for j in 0..8 {
                        let r = half * 8 + j;
                        panel[kk * NR + r] = if r < nrows {
                            $scalar(rows[r * stride + kk])
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    };
}

pack_impl!(
    pack_panel,
    f32,
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);
pack_impl!(pack_panel_bf16, bf16, |p| load_bf16(p), |v: bf16| v
    .to_f32());

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// The first `cols / 8 · 8` columns of 16 bf16 rows (row `j` at `w[j·cols..]`) written in panel
/// order (see [`crate::matmul::WeightData::BF16Panels`]) to `out`; returns the columns done.
/// Eight columns at a time: rows `j` and `8 + j` interleaved into 32-bit pairs, then an 8×8
/// transpose of the pairs gives each column's 16 values in their slots.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn pack_panel_pairs(w: &[bf16], cols: usize, out: &mut [bf16]) -> usize {
    assert!(w.len() >= 16 * cols && out.len() >= 16 * cols);
    let done = cols / 8 * 8;
    for c in (0..done).step_by(8) {
        let pairs: [__m256; 8] = std::array::from_fn(|j| {
            let a = _mm_loadu_si128(w.as_ptr().add(j * cols + c) as *const __m128i);
            let b = _mm_loadu_si128(w.as_ptr().add((8 + j) * cols + c) as *const __m128i);
            _mm256_castsi256_ps(_mm256_set_m128i(
                _mm_unpackhi_epi16(a, b),
                _mm_unpacklo_epi16(a, b),
            ))
        });
        for (i, col) in transpose8(pairs).iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add((c + i) * NR) as *mut f32, *col);
        }
    }
    done
}

macro_rules! dot_tile_impl {
    ($name:ident, $t:ty, $feat:literal, $load:expr, $scalar:expr) => {
        /// `R` weight rows against `M` input rows (each as long as the weight rows): an R×M
        /// tile of dot products in registers. Each weight vector, widened once, feeds `M` FMAs
        /// and each input vector `R`, so with R = 2 an input load (from L2 when the rows are
        /// long) serves two FMAs. R·M ≤ 12 keeps the tile in the 16 ymm registers.
        /// With `prefetch`, the R rows that follow in memory are requested while these are
        /// used: short rows in a row-by-row walk are too brief for the hardware prefetcher, and
        /// the loop otherwise waits on memory.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name<const R: usize, const M: usize>(
            w: [&[$t]; R],
            xs: &[*const f32; M],
            out: &mut [[f32; M]; R],
            prefetch: bool,
        ) {
            let k = w[0].len();
            let mut acc = [[_mm256_setzero_ps(); M]; R];
            let mut i = 0;
            while i + 8 <= k {
                if prefetch {
                    for j in 0..R {
                        // Only a hint: an address past the matrix does not fault.
                        _mm_prefetch::<_MM_HINT_T0>(
                            w[j].as_ptr().wrapping_add(i + R * k) as *const i8
                        );
                    }
                }
                let wv: [__m256; R] = std::array::from_fn(|j| $load(w[j].as_ptr().add(i)));
                for r in 0..M {
                    let xv = _mm256_loadu_ps(xs[r].add(i));
                    for j in 0..R {
                        acc[j][r] = _mm256_fmadd_ps(wv[j], xv, acc[j][r]);
                    }
                }
                i += 8;
            }
            for j in 0..R {
                for r in 0..M {
                    let mut s = hsum(acc[j][r]);
                    for l in i..k {
                        s += $scalar(w[j][l]) * *xs[r].add(l);
                    }
                    out[j][r] = s;
                }
            }
        }
    };
}

dot_tile_impl!(
    dot_tile_f32,
    f32,
    "avx2,fma",
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);
dot_tile_impl!(
    dot_tile_bf16,
    bf16,
    "avx2,fma",
    |p| load_bf16(p),
    |v: bf16| v.to_f32()
);
dot_tile_impl!(
    dot_tile_f16,
    f16,
    "avx2,fma,f16c",
    |p| load_f16(p),
    |v: f16| v.to_f32()
);
