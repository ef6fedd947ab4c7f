//! Run-time choice of instruction set. Detected once; `HYMBA_ISA=portable` forces the portable
//! path (useful to compare, and the path every machine has).

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust the compiler vectorises for the baseline target.
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
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
    }
    v
}

/// The instruction set the kernels use.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("HYMBA_ISA").is_ok_and(|v| v == "portable") {
            Isa::Portable
        } else {
            *available().last().expect("portable is always available")
        }
    })
}
