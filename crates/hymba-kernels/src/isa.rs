//! Run-time choice of instruction set. Detected once; `HYMBA_ISA=portable` forces the portable
//! path (useful to compare, and the path every machine has), `HYMBA_ISA=avx2` caps it at AVX2,
//! `HYMBA_ISA=avx512` at AVX-512 BF16 (no AMX).

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
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
    /// Whether the AVX2 kernels run (every x86 level above the portable one has them).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512Bf16 | Isa::Amx)
    }
}

/// Every instruction set this machine can run, best last.
pub fn available() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        v.push(Isa::Avx2);
        if crate::avx512::Bf16Dot::detect().is_some() {
            v.push(Isa::Avx512Bf16);
        }
        if crate::amx::Amx::detect().is_some() {
            v.push(Isa::Amx);
        }
    }
    v
}

/// The instruction set the kernels use.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = *available().last().expect("portable is always available");
        match std::env::var("HYMBA_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") if best.has_avx2() => Isa::Avx2,
            Ok("avx512") if best == Isa::Amx => Isa::Avx512Bf16,
            _ => best,
        }
    })
}
