//! Run-time choice of instruction set. Detected once; `HYMBA_ISA=portable` forces the portable
//! path (useful to compare, and the path every machine has), `HYMBA_ISA=avx2` caps it at AVX2,
//! `HYMBA_ISA=avx512` at AVX-512 BF16 (no AMX).

use std::sync::OnceLock;

/// An instruction set the kernels may use. A value above the portable level exists only once
/// run-time detection found it on this CPU (made by [`available`] and [`isa`] alone), so the
/// AVX2, AVX-512 and AMX kernels a function runs for it are sound to run: an `Isa` cannot be
/// made up by a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Isa(Level);

/// The levels of instruction set, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust the compiler vectorises for the baseline target.
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2's kernels, and the prefill GEMM on AVX-512 BF16 dot products (`crate::avx512`).
    Avx512Bf16,
    /// The same, the prefill GEMM on AMX-BF16 tiles (`crate::amx`).
    Amx,
}

impl Isa {
    /// The portable kernels, which every CPU runs.
    pub const PORTABLE: Isa = Isa(Level::Portable);

    pub fn level(self) -> Level {
        self.0
    }

    /// Whether the AVX2 kernels run (every x86 level above the portable one has them).
    pub fn has_avx2(self) -> bool {
        self.0 >= Level::Avx2
    }
}

/// Every instruction set this machine can run, best last.
pub fn available() -> Vec<Isa> {
    let mut v = vec![Isa::PORTABLE];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        v.push(Isa(Level::Avx2));
        if crate::avx512::Bf16Dot::detect().is_some() {
            v.push(Isa(Level::Avx512Bf16));
        }
        if crate::amx::Amx::detect().is_some() {
            v.push(Isa(Level::Amx));
        }
    }
    v
}

/// The instruction set the kernels use.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = *available().last().expect("portable is always available");
        // A cap lowers the level, never raises it: every level below a detected one is there.
        let cap = match std::env::var("HYMBA_ISA").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => Level::Avx2,
            Ok("avx512") => Level::Avx512Bf16,
            Ok(other) => {
                eprintln!(
                    "warning: HYMBA_ISA={other:?} is none of portable, avx2, avx512: ignored"
                );
                Level::Amx
            }
            Err(_) => Level::Amx,
        };
        Isa(best.0.min(cap))
    })
}
