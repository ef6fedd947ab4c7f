//! AMX-BF16 kernels (Intel Sapphire Rapids and later): the prefill GEMM on tile registers, each
//! `tdpbf16ps` a 16 × 16 block of f32 sums over 32 bf16 products. Rust's AMX intrinsics are not
//! stable, so the few tile instructions are written as inline assembly; the layout and the
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
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
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
        asm!("tilerelease", options(nomem, nostack));
    }
}
