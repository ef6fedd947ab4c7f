//! Block-quantized weights in GGML's Q8_0 and Q4_0 layouts: blocks of 32 values along the input
//! dimension, each with an f16 scale. Activations are quantized to Q8_0 on the fly for integer
//! dot products, as GGML does.

use crate::isa::{isa, Isa};
use half::f16;

/// Values per block.
pub const QK: usize = 32;

/// GGML `block_q8_0`: value = d · qs[i].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8_0 {
    /// f16 scale, little-endian bytes (byte arrays keep the block unaligned-safe)
    pub d: [u8; 2],
    pub qs: [i8; QK],
}

/// GGML `block_q4_0`: value i < 16 is d · (low nibble of qs[i] − 8), value 16 + i is
/// d · (high nibble of qs[i] − 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; QK / 2],
}

impl BlockQ8_0 {
    #[inline]
    pub fn scale(&self) -> f32 {
        f16::from_le_bytes(self.d).to_f32()
    }
}

impl BlockQ4_0 {
    #[inline]
    pub fn scale(&self) -> f32 {
        f16::from_le_bytes(self.d).to_f32()
    }
}

/// Quantizes `x` (a multiple of 32 long) to Q8_0: exactly [`quantize_q8_0_ref`], vectorised
/// where the CPU allows (every quantized matrix product quantizes its input rows with it).
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    quantize_q8_0_with(isa(), x, out)
}

pub fn quantize_q8_0_with(isa: Isa, x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection; lengths checked.
        i if i.has_avx2() => unsafe { crate::x86::quantize_q8_0(x, out) },
        _ => quantize_q8_0_ref(x, out),
    }
}

/// Reference: GGML's `quantize_row_q8_0_ref` (scale amax/127, round half away from zero).
pub fn quantize_q8_0_ref(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d).to_le_bytes();
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Quantizes `x` to Q4_0, like GGML's `quantize_row_q4_0_ref`: the value of largest magnitude
/// maps to −8.
pub fn quantize_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    quantize_q4_0_with(isa(), x, out)
}

pub fn quantize_q4_0_with(isa: Isa, x: &[f32], out: &mut [BlockQ4_0]) {
    assert_eq!(x.len(), out.len() * QK);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection; lengths checked.
        i if i.has_avx2() => unsafe { crate::x86::quantize_q4_0(x, out) },
        _ => quantize_q4_0_ref(x, out),
    }
}

/// Reference: GGML's `quantize_row_q4_0_ref` (the first value of largest magnitude sets the
/// scale, max / −8; q = min(15, trunc(x / d + 8.5)), two per byte).
pub fn quantize_q4_0_ref(x: &[f32], out: &mut [BlockQ4_0]) {
    assert_eq!(x.len(), out.len() * QK);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d).to_le_bytes();
        for j in 0..QK / 2 {
            let q0 = ((xs[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xs[QK / 2 + j] * id + 8.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

pub fn dequantize_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.scale();
        for (v, q) in o.iter_mut().zip(&b.qs) {
            *v = d * *q as f32;
        }
    }
}

pub fn dequantize_q4_0(blocks: &[BlockQ4_0], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.scale();
        for j in 0..QK / 2 {
            o[j] = d * ((b.qs[j] & 0x0F) as i32 - 8) as f32;
            o[QK / 2 + j] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
        }
    }
}

/// Σ over blocks of d_w · d_x · Σ qw·qx: the portable reference.
pub fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(a, b)| {
            let s: i32 =
                a.qs.iter()
                    .zip(&b.qs)
                    .map(|(&p, &q)| p as i32 * q as i32)
                    .sum();
            a.scale() * b.scale() * s as f32
        })
        .sum()
}

pub fn dot_q4_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(a, b)| {
            let mut s = 0i32;
            for j in 0..QK / 2 {
                s += ((a.qs[j] & 0x0F) as i32 - 8) * b.qs[j] as i32;
                s += ((a.qs[j] >> 4) as i32 - 8) * b.qs[QK / 2 + j] as i32;
            }
            a.scale() * b.scale() * s as f32
        })
        .sum()
}

/// Views raw bytes as blocks (blocks have alignment 1, so any byte slice of the right length
/// works).
pub fn q8_0_blocks(bytes: &[u8]) -> &[BlockQ8_0] {
    assert_eq!(bytes.len() % std::mem::size_of::<BlockQ8_0>(), 0);
    // SAFETY: BlockQ8_0 is repr(C), align 1, 34 bytes, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const BlockQ8_0, bytes.len() / 34) }
}

pub fn q4_0_blocks(bytes: &[u8]) -> &[BlockQ4_0] {
    assert_eq!(bytes.len() % std::mem::size_of::<BlockQ4_0>(), 0);
    // SAFETY: BlockQ4_0 is repr(C), align 1, 18 bytes, and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const BlockQ4_0, bytes.len() / 18) }
}

/// The raw bytes of blocks, for saving.
pub fn block_bytes<T: Copy>(blocks: &[T]) -> &[u8] {
    // SAFETY: plain-old-data blocks without padding (asserted by the layout tests).
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn block_layouts_match_ggml() {
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
        assert_eq!(std::mem::align_of::<BlockQ8_0>(), 1);
    }

    /// The vector quantizer gives the reference's bytes, ties (x.5, which round away from zero)
    /// and values just below them included.
    #[test]
    fn fast_q8_0_quantization_equals_the_reference() {
        let mut rng = Rng::new(4);
        let mut x = rng.normal_vec(QK * 37, 3.0);
        // A block whose scale is exactly 1: its values are the rounding inputs themselves.
        let mut ties: Vec<f32> = (0..QK).map(|i| (i as f32 - 16.0) + 0.5).collect();
        ties[0] = 127.0;
        ties[1] = 1.499_999_9;
        ties[2] = -1.499_999_9;
        ties[3] = -0.0;
        x.extend(ties);
        x.extend([0.0; QK]);
        let n = x.len() / QK;
        let mut want = vec![BlockQ8_0::default(); n];
        quantize_q8_0_ref(&x, &mut want);
        assert_eq!(want[37].qs[16], 1, "0.5 rounds away from zero");
        for isa in crate::isa::available() {
            let mut got = vec![BlockQ8_0::default(); n];
            quantize_q8_0_with(isa, &x, &mut got);
            assert_eq!(got, want, "{isa:?}");
        }
    }

    /// The vector Q4_0 quantizer gives the reference's bytes: ties of magnitude (the first one
    /// sets the sign of the scale), values that land on the clamp, zero, subnormal and huge
    /// blocks, and blocks the vector path hands back to the reference (NaN, infinities).
    #[test]
    fn fast_q4_0_quantization_equals_the_reference() {
        let mut rng = Rng::new(5);
        let mut x = rng.normal_vec(QK * 41, 2.0);
        let block = |f: &dyn Fn(usize) -> f32| (0..QK).map(f).collect::<Vec<f32>>();
        // Magnitude ties, the negative first and the positive first.
        x.extend(block(&|i| match i {
            0 => -3.0,
            9 => 3.0,
            _ => 0.1 * i as f32 / QK as f32,
        }));
        x.extend(block(&|i| match i {
            2 => 3.0,
            20 => -3.0,
            _ => 0.0,
        }));
        // Every value of one magnitude: q is 0 or 16 → 15.
        x.extend(block(&|i| if i % 3 == 0 { 1.25 } else { -1.25 }));
        x.extend(block(&|_| 0.0));
        x.extend(block(&|i| 1e-41 * i as f32));
        x.extend(block(&|i| 3e38 * ((i as f32) / QK as f32 - 0.5)));
        x.extend(block(&|i| if i == 7 { f32::NAN } else { i as f32 }));
        x.extend(block(&|i| if i == 3 { f32::INFINITY } else { i as f32 }));
        x.extend(block(&|i| {
            if i == 30 {
                f32::NEG_INFINITY
            } else {
                -(i as f32)
            }
        }));
        let n = x.len() / QK;
        let mut want = vec![BlockQ4_0::default(); n];
        quantize_q4_0_ref(&x, &mut want);
        for isa in crate::isa::available() {
            let mut got = vec![BlockQ4_0::default(); n];
            quantize_q4_0_with(isa, &x, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!((g.d, g.qs), (w.d, w.qs), "{isa:?} block {i}");
            }
        }
    }

    #[test]
    fn round_trip_error_is_bounded_by_the_step() {
        let mut rng = Rng::new(1);
        let x = rng.normal_vec(QK * 9, 2.0);
        let mut q8 = vec![BlockQ8_0::default(); 9];
        let mut q4 = vec![BlockQ4_0::default(); 9];
        quantize_q8_0(&x, &mut q8);
        quantize_q4_0(&x, &mut q4);
        let (mut y8, mut y4) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        dequantize_q8_0(&q8, &mut y8);
        dequantize_q4_0(&q4, &mut y4);
        for (bi, xs) in x.chunks(QK).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for j in 0..QK {
                let i = bi * QK + j;
                // Half a step of rounding, plus the f16 rounding of the scale.
                assert!(
                    (y8[i] - x[i]).abs() <= amax / 127.0 * 0.5 + amax * 1e-3,
                    "q8 {i}"
                );
                assert!(
                    (y4[i] - x[i]).abs() <= amax / 8.0 * 0.5 + amax * 2e-3 + 1e-6,
                    "q4 {i}: {} vs {}",
                    y4[i],
                    x[i]
                );
            }
        }
        // Integer dots equal the float dot of the dequantized values.
        let mut xq = vec![BlockQ8_0::default(); 9];
        quantize_q8_0(&rng.normal_vec(QK * 9, 1.0), &mut xq);
        let mut xd = vec![0.0; QK * 9];
        dequantize_q8_0(&xq, &mut xd);
        let f8: f32 = y8.iter().zip(&xd).map(|(a, b)| a * b).sum();
        let f4: f32 = y4.iter().zip(&xd).map(|(a, b)| a * b).sum();
        assert!((dot_q8_0(&q8, &xq) - f8).abs() < 1e-3 * f8.abs().max(1.0));
        assert!((dot_q4_0(&q4, &xq) - f4).abs() < 1e-3 * f4.abs().max(1.0));
    }
}
