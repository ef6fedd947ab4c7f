//! AMX-BF16 kernels (Intel Sapphire Rapids and later): the prefill GEMM on tile registers, each
//! `tdpbf16ps` a 16 × 16 block of f32 sums over 32 bf16 products, and a prefill tile's attention
//! scores and values over bf16 K/V, whose f32 operands (queries, softmax weights) go in as
//! several bf16 terms so the sums stay those of f32 attention. Rust's AMX intrinsics are not
//! stable, so the few tile instructions are written as inline assembly; the GEMM's layout and
//! driver are [`crate::avx512`]'s (every AMX CPU has AVX-512 BF16).

use crate::avx512::{gemm_pairs, Bf16Dot, Epilogue, PairTile};
use crate::matmul::Mat;
use std::arch::asm;
use std::arch::x86_64::__cpuid_count;
use std::sync::OnceLock;

/// Proof that this CPU has AMX-TILE and AMX-BF16, the OS saves the tile state, and this process
/// may use it: made only by [`Amx::detect`].
#[derive(Clone, Copy, Debug)]
pub struct Amx(Bf16Dot);

impl Amx {
    pub fn detect() -> Option<Self> {
        static OK: OnceLock<bool> = OnceLock::new();
        let dot = Bf16Dot::detect()?;
        // SAFETY: cpuid and xgetbv (after OSXSAVE is seen) are defined on every x86-64 CPU;
        // arch_prctl with an unknown request only fails.
        let ok = *OK.get_or_init(|| unsafe {
            let leaf7 = __cpuid_count(7, 0);
            let (tile, bf16) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 22 & 1 == 1);
            let osxsave = __cpuid_count(1, 0).ecx >> 27 & 1 == 1;
            tile && bf16 && osxsave && xcr0() >> 17 & 3 == 3 && request_tile_data()
        });
        ok.then_some(Amx(dot))
    }

    /// `y[t, n] = x[t, k] · wᵀ` (see [`gemm_pairs`]), 32 input rows by 32 outputs a tile, or 16
    /// rows for up to 16 (decode: one weight tile's load a product, not two). An output's sums
    /// are the same in either: a row's products do not depend on the tile's other rows.
    pub fn gemm(self, x: &[f32], t: usize, w: Mat, y: &mut [f32], epi: Epilogue) {
        if t <= 16 {
            gemm_pairs(self.0, Tiles::<16>(self), x, t, w, y, epi)
        } else {
            gemm_pairs(self.0, Tiles::<32>(self), x, t, w, y, epi)
        }
    }
}

impl Amx {
    /// `iters` rounds of 12 `tdpbf16ps` into four accumulator tiles from zeroed operand tiles,
    /// no memory: the tile unit's peak ([`crate::probe::amx_peak`]).
    pub(crate) fn peak_loop(self, iters: usize) -> usize {
        // SAFETY: `Amx` proves the features and the tile state; the configuration is valid.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
            asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nomem, nostack)
            );
            for _ in 0..iters {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nomem, nostack),
                );
            }
            asm!("tilerelease", options(nomem, nostack));
        }
        iters
    }
}

unsafe fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    (hi as u64) << 32 | lo as u64
}

/// Linux hands out the tile data state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
/// XFEATURE_XTILEDATA), once per process.
#[cfg(target_os = "linux")]
unsafe fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
         in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
    ret == 0
}

#[cfg(not(target_os = "linux"))]
unsafe fn request_tile_data() -> bool {
    false
}

/// Palette 1, eight tiles of 16 rows of 64 bytes: C in tmm0..3 (16 × 16 f32), inputs in
/// tmm4..5 (16 rows × 32 bf16), weights in tmm6..7 (16 pair-rows × 16 outputs).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// The tiles of `R` (16 or 32) input rows by 32 outputs.
#[derive(Clone, Copy)]
struct Tiles<const R: usize>(Amx);

impl<const R: usize> PairTile for Tiles<R> {
    const ROWS: usize = R;
    const K_ALIGN: usize = 16;
    const WHOLE_TILES: bool = true;

    unsafe fn tile(
        self,
        kp: usize,
        x: *const u32,
        m: usize,
        w: *const u32,
        c: &mut [[f32; 32]; 32],
    ) {
        // Bytes between input rows; a tile of one row reads it 16 times (the other rows' sums
        // are not used), from L1, rather than 15 rows of zeros from L2.
        let xs = if m == 1 { 0 } else { 4 * kp };
        let w1 = w.add(16 * kp);
        asm!("tilezero tmm0", "tilezero tmm1", options(nomem, nostack));
        if R == 32 {
            asm!("tilezero tmm2", "tilezero tmm3", options(nomem, nostack));
        }
        // Rows 0..16 into tmm0/tmm1, and for 32-row tiles rows 16..32 into tmm2/tmm3, from the
        // same weight tiles (tile registers keep their values between the asm blocks).
        let x1 = x.wrapping_add(16 * kp);
        for q in (0..kp).step_by(16) {
            asm!(
                "tileloadd tmm4, [{x0} + {xs}*1]",
                "tileloadd tmm6, [{w0} + {ws}*1]",
                "tileloadd tmm7, [{w1} + {ws}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                x0 = in(reg) x.add(q),
                w0 = in(reg) w.add(16 * q),
                w1 = in(reg) w1.add(16 * q),
                xs = in(reg) xs,
                ws = in(reg) 64usize,
                options(nostack, readonly),
            );
            if R == 32 {
                asm!(
                    "tileloadd tmm5, [{x1} + {xs}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    x1 = in(reg) x1.add(q),
                    xs = in(reg) xs,
                    options(nostack, readonly),
                );
            }
        }
        let c0 = c.as_mut_ptr() as *mut f32;
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            c0 = in(reg) c0,
            c1 = in(reg) c0.add(16),
            cs = in(reg) 128usize,
            options(nostack),
        );
        if R == 32 {
            asm!(
                "tilestored [{c2} + {cs}*1], tmm2",
                "tilestored [{c3} + {cs}*1], tmm3",
                c2 = in(reg) c0.add(16 * 32),
                c3 = in(reg) c0.add(16 * 32 + 16),
                cs = in(reg) 128usize,
                options(nostack),
            );
        }
    }

    fn session(self, f: impl FnOnce()) {
        // SAFETY: `Amx` proves the features and the tile state; the configuration is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack)) };
        f();
        // SAFETY: as above.
        unsafe { asm!("tilerelease", options(nomem, nostack)) };
    }
}

/// Scratch of [`Amx::attn_values`] and [`Amx::attn_scores`], kept by each thread: the f32
/// operand's bf16 terms, and the values as pairs of keys (the keys as pairs of dimensions).
/// Each starts a cache line, and its tile rows are whole lines: a row across two lines cost the
/// tile loads about half their rate.
struct ValueTiles {
    hi: Lines,
    lo: Lines,
    lo2: Lines,
    pairs: Lines,
}

impl ValueTiles {
    /// Room for `terms` values of each term and `pairs` words, keeping what is there (the
    /// kernels write what they read, so nothing is zeroed a call).
    fn fit(&mut self, terms: usize, pairs: usize) {
        for v in [&mut self.hi, &mut self.lo, &mut self.lo2] {
            v.fit(2 * terms);
        }
        self.pairs.fit(4 * pairs);
    }
}

/// A buffer of 64-byte lines, read as bf16 bit patterns or as words.
struct Lines(Vec<Line>);

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Lines {
    fn fit(&mut self, bytes: usize) {
        let n = bytes.div_ceil(64);
        if self.0.len() < n {
            self.0.resize(n, Line([0; 64]));
        }
    }

    fn halves(&mut self) -> &mut [u16] {
        // SAFETY: the lines are plain bytes with no padding, aligned beyond a u16's needs.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), 32 * self.0.len()) }
    }

    fn words(&mut self) -> &mut [u32] {
        // SAFETY: as above, for u32.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), 16 * self.0.len()) }
    }
}

thread_local! {
    static VALUE_TILES: std::cell::RefCell<ValueTiles> = const {
        std::cell::RefCell::new(ValueTiles {
            hi: Lines(Vec::new()),
            lo: Lines(Vec::new()),
            lo2: Lines(Vec::new()),
            pairs: Lines(Vec::new()),
        })
    };
}

impl Amx {
    /// `out[g, :] = Σ_j p[g, j] · v_j` over bf16 value rows (`vals[j]`, `dv` a multiple of 16),
    /// for `group` weight rows of `vals.len()` weights each (what
    /// `crate::avx512::Avx512::attn_values` computes), on tiles: each weight as two bf16 terms
    /// (`hi` its rounding, `lo` the rounding of what is left), so the products are those of the
    /// f32 weight to about 2^-16 of it, and the values as pairs of keys, 32 keys a k step.
    ///
    /// # Safety
    /// Each `vals[j]` must point to `dv` readable bf16 values; `p` holds `group · vals.len()`,
    /// `out` `group · dv` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn attn_values(
        self,
        p: &[f32],
        group: usize,
        dv: usize,
        vals: &[*const u16],
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let nk = vals.len();
        debug_assert!(dv.is_multiple_of(16) && p.len() >= group * nk && out.len() >= group * dv);
        let (kp, mp) = (nk.next_multiple_of(32), group.next_multiple_of(16));
        VALUE_TILES.with_borrow_mut(|s| {
            let dvp = dv.next_multiple_of(32);
            s.fit(mp * kp, kp / 2 * dvp);
            // The weights: rows of kp bf16 (zeros past nk). Rows past the group's and columns
            // past dv are left as they are: a tile's output row (column) takes only its input
            // row (column), and those outputs are not kept.
            for g in 0..group {
                split_terms(
                    p.as_ptr().add(g * nk),
                    nk,
                    [
                        s.hi.halves().as_mut_ptr().add(g * kp),
                        s.lo.halves().as_mut_ptr().add(g * kp),
                    ],
                );
            }
            // The values: word (q, c) holds column c of keys 2q (low half) and 2q + 1.
            for q in 0..nk.div_ceil(2) {
                let (a, b) = (vals[2 * q], vals.get(2 * q + 1).copied());
                let dst = s.pairs.words().as_mut_ptr().add(q * dvp);
                let mut c = 0;
                while c < dv {
                    let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(a.add(c) as *const _));
                    let hi = match b {
                        Some(b) => _mm512_cvtepu16_epi32(_mm256_loadu_si256(b.add(c) as *const _)),
                        None => _mm512_setzero_si512(),
                    };
                    _mm512_storeu_si512(
                        dst.add(c) as *mut _,
                        _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)),
                    );
                    c += 16;
                }
            }
            // Pairs past the last key: zeros (their weights are, but 0 · NaN is not).
            s.pairs.words()[nk.div_ceil(2) * dvp..kp / 2 * dvp].fill(0);
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
            for m0 in (0..group).step_by(32) {
                let two = m0 + 16 < group;
                for c0 in (0..dv).step_by(32) {
                    let c = pass(
                        [s.hi.halves().as_ptr(), s.lo.halves().as_ptr()].map(|t| t.add(m0 * kp)),
                        kp,
                        s.pairs.words().as_ptr().add(c0),
                        16,
                        dvp,
                        kp / 32,
                        two,
                    );
                    let w = 32.min(dv - c0);
                    for (r, row) in c.iter().enumerate().take(group - m0) {
                        out[(m0 + r) * dv + c0..][..w].copy_from_slice(&row[..w]);
                    }
                }
            }
            asm!("tilerelease", options(nomem, nostack));
        });
    }
}

impl Amx {
    /// `out[g·nk + j] = scale · q_g · k_j` for `group` query rows of `dk` (a multiple of 32)
    /// against bf16 keys (what `crate::avx512::Avx512::attn_scores` computes), on tiles: each
    /// query element as three bf16 terms (two left scores off by ~2^-16 of them, which the
    /// softmax carries into the output), the keys 16 at a time as pairs of dimensions, a
    /// tile's column a key.
    ///
    /// # Safety
    /// Each `keys[j]` must point to `dk` readable bf16 values; `q` holds `group · dk`, `out`
    /// `group · keys.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn attn_scores(
        self,
        q: &[f32],
        group: usize,
        dk: usize,
        keys: &[*const u16],
        scale: f32,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let nk = keys.len();
        debug_assert!(dk.is_multiple_of(32) && q.len() >= group * dk && out.len() >= group * nk);
        let (np, mp, kw) = (nk.next_multiple_of(32), group.next_multiple_of(16), dk / 2);
        VALUE_TILES.with_borrow_mut(|s| {
            // Every word the tiles read is written below (keys past the last are zeros), but
            // the query rows past the group's (see `attn_values`).
            s.fit(mp * dk, np * kw);
            for g in 0..group {
                let at =
                    [&mut s.hi, &mut s.lo, &mut s.lo2].map(|v| v.halves().as_mut_ptr().add(g * dk));
                split_terms(q.as_ptr().add(g * dk), dk, at);
            }
            // The keys: block b of 16, word (w, i) = key 16b + i's dimensions 2w, 2w + 1 (a key
            // row's w-th word as it is stored); zeros past the last key.
            for b in 0..np / 16 {
                for w0 in (0..kw).step_by(16) {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, ri) in r.iter_mut().enumerate() {
                        if let Some(&k) = keys.get(16 * b + i) {
                            *ri = _mm512_loadu_ps(k.add(2 * w0) as *const f32);
                        }
                    }
                    crate::avx512::attention::transpose16(&mut r);
                    for (w, ri) in r.iter().enumerate() {
                        _mm512_storeu_ps(
                            s.pairs.words().as_mut_ptr().add((b * kw + w0 + w) * 16) as *mut f32,
                            *ri,
                        );
                    }
                }
            }
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
            let scl = _mm512_set1_ps(scale);
            for m0 in (0..group).step_by(32) {
                let two = m0 + 16 < group;
                for j0 in (0..nk).step_by(32) {
                    let c = pass(
                        [&mut s.hi, &mut s.lo, &mut s.lo2]
                            .map(|t| t.halves().as_ptr().add(m0 * dk)),
                        dk,
                        s.pairs.words().as_ptr().add(j0 / 16 * kw * 16),
                        16 * kw,
                        16,
                        dk / 32,
                        two,
                    );
                    let kb = 32.min(nk - j0);
                    for (r, row) in c.iter().enumerate().take(group - m0) {
                        let o = out.as_mut_ptr().add((m0 + r) * nk + j0);
                        for h in 0..kb.div_ceil(16) {
                            let v = _mm512_loadu_ps(row.as_ptr().add(16 * h));
                            _mm512_mask_storeu_ps(
                                o.add(16 * h),
                                mask(kb - 16 * h),
                                _mm512_mul_ps(v, scl),
                            );
                        }
                    }
                }
            }
            asm!("tilerelease", options(nomem, nostack));
        });
    }
}

/// One pass of the attention tiles: rows `m0..m0 + 32` (`two` row tiles; else 16) by 32 columns
/// of `Σ_t A_t · B` over `steps` k steps of 32, `A_t` the f32 operand's bf16 terms (`a[t]`, rows
/// `ka` apart, its row tile's first row), `B` bf16 pairs (16 words a row, rows `bw` words apart,
/// the second column tile `b1` words on, 16 rows a k step). Sums in tmm0..3: with two row tiles
/// every term of a tile feeds its two sums; with one, the terms take turns at tmm0/1 and tmm2/3
/// (no two products in a row into the same sums), added at the end. Rows `16..` of the result
/// are set only with two row tiles. The caller has loaded [`CONFIG`].
unsafe fn pass<const N: usize>(
    a: [*const u16; N],
    ka: usize,
    b: *const u32,
    b1: usize,
    bw: usize,
    steps: usize,
    two: bool,
) -> [[f32; 32]; 32] {
    let (ws, bs) = (2 * ka, 4 * bw);
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nomem, nostack)
    );
    for k in 0..steps {
        let b0 = b.add(16 * k * bw);
        asm!(
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            b0 = in(reg) b0,
            b1 = in(reg) b0.add(b1),
            bs = in(reg) bs,
            options(nostack, readonly),
        );
        for (t, &at) in a.iter().enumerate() {
            let a0 = at.add(32 * k);
            if two {
                asm!(
                    "tileloadd tmm4, [{a0} + {ws}*1]",
                    "tileloadd tmm5, [{a1} + {ws}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a0.add(16 * ka),
                    ws = in(reg) ws,
                    options(nostack, readonly),
                );
            } else if t % 2 == 0 {
                asm!(
                    "tileloadd tmm4, [{a0} + {ws}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0,
                    ws = in(reg) ws,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "tileloadd tmm5, [{a0} + {ws}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    ws = in(reg) ws,
                    options(nostack, readonly),
                );
            }
        }
    }
    let mut c = [[0f32; 32]; 32];
    let c0 = c.as_mut_ptr() as *mut f32;
    asm!(
        "tilestored [{c0} + {cs}*1], tmm0",
        "tilestored [{c1} + {cs}*1], tmm1",
        "tilestored [{c2} + {cs}*1], tmm2",
        "tilestored [{c3} + {cs}*1], tmm3",
        c0 = in(reg) c0,
        c1 = in(reg) c0.add(16),
        c2 = in(reg) c0.add(16 * 32),
        c3 = in(reg) c0.add(16 * 32 + 16),
        cs = in(reg) 128usize,
        options(nostack),
    );
    if !two {
        let (lo, hi) = c.split_at_mut(16);
        for (r, h) in lo.iter_mut().zip(hi.iter()) {
            for (x, y) in r.iter_mut().zip(h) {
                *x += y;
            }
        }
    }
    c
}

/// `n` f32 values as `N` bf16 terms each: term 0 the rounding of a value, each next one the
/// rounding of what the terms before leave (zeros from n to the next multiple of 32, which
/// every `out[t]` must hold). Two terms carry a value to about 2^-16 of itself, three to f32's
/// precision.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn split_terms<const N: usize>(src: *const f32, n: usize, out: [*mut u16; N]) {
    use std::arch::x86_64::*;
    let mut j = 0;
    while j < n {
        let (m0, m1) = (mask(n - j), mask((n - j).saturating_sub(16)));
        let mut a = _mm512_maskz_loadu_ps(m0, src.add(j));
        let mut b = _mm512_maskz_loadu_ps(m1, src.wrapping_add(j + 16));
        for o in out {
            let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            _mm512_storeu_si512(o.add(j) as *mut _, h);
            // The term's f32 values (a bf16 is the high half of an f32) off what is left.
            let ha = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm512_castsi512_si256(h),
            )));
            let hb = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm512_extracti64x4_epi64::<1>(h),
            )));
            a = _mm512_sub_ps(a, ha);
            b = _mm512_sub_ps(b, hb);
        }
        j += 32;
    }
}

/// The first `n` (up to 16) of 16 lanes.
fn mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};
    use half::bf16;

    /// The attention tiles against plain sums in f64, on odd sizes (a lone last row tile, a
    /// short last key block, half a pair of column tiles), with the scratch poisoned with NaNs
    /// first: what the tiles read must be what this call wrote.
    #[test]
    fn attention_tiles_match_plain_sums() {
        let Some(amx) = Amx::detect() else {
            eprintln!("SKIPPED attention_tiles_match_plain_sums: no AMX here");
            return;
        };
        let mut rng = Rng::new(11);
        for &(group, nk, dk, dv) in &[(21, 45, 64, 48), (80, 1, 32, 16), (33, 70, 96, 128)] {
            VALUE_TILES.with_borrow_mut(|s| {
                s.fit(1 << 16, 1 << 16);
                for v in [&mut s.hi, &mut s.lo, &mut s.lo2] {
                    v.halves().fill(0x7fc0);
                }
                s.pairs.words().fill(0x7fc0_7fc0);
            });
            let kv = |n: usize, rng: &mut Rng| -> Vec<u16> {
                rng.normal_vec(n, 1.0)
                    .into_iter()
                    .map(|x| bf16::from_f32(x).to_bits())
                    .collect()
            };
            let (k, v) = (kv(nk * dk, &mut rng), kv(nk * dv, &mut rng));
            let (q, p) = (
                rng.normal_vec(group * dk, 1.0),
                rng.normal_vec(group * nk, 1.0),
            );
            let w = |x: u16| bf16::from_bits(x).to_f32() as f64;
            let keys: Vec<*const u16> = (0..nk).map(|j| k[j * dk..].as_ptr()).collect();
            let vals: Vec<*const u16> = (0..nk).map(|j| v[j * dv..].as_ptr()).collect();
            let (mut s, mut o) = (vec![f32::NAN; group * nk], vec![f32::NAN; group * dv]);
            // SAFETY: the pointers address rows of dk and dv values; the slices are as long as
            // the kernels take.
            unsafe {
                amx.attn_scores(&q, group, dk, &keys, 0.3, &mut s);
                amx.attn_values(&p, group, dv, &vals, &mut o);
            }
            let s_ref: Vec<f32> = (0..group * nk)
                .map(|i| {
                    let (g, j) = (i / nk, i % nk);
                    (0..dk)
                        .map(|d| q[g * dk + d] as f64 * w(k[j * dk + d]))
                        .sum::<f64>() as f32
                        * 0.3
                })
                .collect();
            let o_ref: Vec<f32> = (0..group * dv)
                .map(|i| {
                    let (g, c) = (i / dv, i % dv);
                    (0..nk)
                        .map(|j| p[g * nk + j] as f64 * w(v[j * dv + c]))
                        .sum::<f64>() as f32
                })
                .collect();
            // Scores: three terms, f32's precision. Values: two terms leave each weight off by
            // up to 2^-16 of itself, so an output by 2^-16 · Σ_j |p_j · v_j|.
            let bound = (0..group * dv)
                .map(|i| {
                    let (g, c) = (i / dv, i % dv);
                    (0..nk)
                        .map(|j| (p[g * nk + j] as f64 * w(v[j * dv + c])).abs())
                        .sum::<f64>()
                })
                .fold(0.0, f64::max) as f32
                / 65536.0;
            let what = format!("{group} rows, {nk} keys, dk {dk}, dv {dv}");
            assert_close(&s, &s_ref, 1e-5, &format!("scores, {what}"));
            assert_close(&o, &o_ref, bound, &format!("values, {what}"));
        }
    }
}
