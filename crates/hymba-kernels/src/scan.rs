//! Mamba-1 selective scan with a carried state:
//! `S[c,n] ← exp(Δ[c]·A[c,n]) · S[c,n] + Δ[c] · B[n] · x[c]`, `y[c] = Σ_n S[c,n] · C[n] + D[c] · x[c]`.
//!
//! The fast path walks time inside each channel so the state row of a channel stays in
//! registers, and splits channels over threads.

use crate::isa::{isa, Isa};
#[cfg(target_arch = "x86_64")]
use crate::x86;
use rayon::prelude::*;

/// Shapes: `x`, `delta`, `y`: `[T, E]`; `a` (already `−exp(A_log)`): `[E, N]`; `b`, `c`:
/// `[T, N]`; `d`: `[E]`; `state`: `[E, N]`, updated in place.
pub struct ScanInput<'a> {
    pub x: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: &'a [f32],
}

/// Channel-steps (channels × time steps) in one parallel task, so a task outweighs its
/// scheduling cost: a decode step (t = 1) is one or a few tasks, not fifty 2 µs ones.
const WORK_PER_TASK: usize = 1 << 12;

pub fn selective_scan(inp: &ScanInput, state: &mut [f32], y: &mut [f32]) {
    selective_scan_with(isa(), inp, state, y)
}

/// [`selective_scan`] on a given instruction set.
pub fn selective_scan_with(isa: Isa, inp: &ScanInput, state: &mut [f32], y: &mut [f32]) {
    let e = inp.d.len();
    let n = inp.a.len() / e;
    let t = inp.x.len() / e;
    check(inp, state, y, e, n, t);
    struct P(*mut f32);
    unsafe impl Sync for P {}
    let yp = P(y.as_mut_ptr());
    let per_task = (WORK_PER_TASK / t.max(1)).clamp(64, e.max(64));
    state
        .par_chunks_mut(per_task * n)
        .enumerate()
        .for_each(|(task, st)| {
            let yp = &yp;
            // A long input's rows in parts, every channel of the task through a part before the
            // next: a channel's walk touches a page of x, Δ and y a row, and over thousands of
            // rows those pages overflowed the TLB (2048 rows 2.1x the time a channel-step of
            // 512). The same operations in the same order, so the same bits.
            for r0 in (0..t).step_by(SCAN_ROWS) {
                let r1 = (r0 + SCAN_ROWS).min(t);
                let part = ScanInput {
                    x: &inp.x[r0 * e..r1 * e],
                    delta: &inp.delta[r0 * e..r1 * e],
                    a: inp.a,
                    b: &inp.b[r0 * n..r1 * n],
                    c: &inp.c[r0 * n..r1 * n],
                    d: inp.d,
                };
                // SAFETY: rows r0..r1 of y, the task's channels only.
                unsafe { scan_task(isa, &part, task * per_task, st, yp.0.add(r0 * e)) };
            }
        });
}

/// Rows of an input [`selective_scan_with`] takes through all of a task's channels at a time.
const SCAN_ROWS: usize = 256;

/// The scan of the channels whose states are `st` (from channel `c0`) over all rows of `inp`,
/// into `y` (row-major `[t, e]`).
///
/// # Safety
/// `y` points to `t · e` writable floats; no other thread writes these channels' columns.
unsafe fn scan_task(isa: Isa, inp: &ScanInput, c0: usize, st: &mut [f32], y: *mut f32) {
    let e = inp.d.len();
    let n = inp.a.len() / e;
    let t = inp.x.len() / e;
    let mut ci = 0;
    let channels = st.len() / n;
    // States of 16 on AVX-512: eight channels at a time, the rest below.
    #[cfg(target_arch = "x86_64")]
    if let (16, Some(k)) = (n, crate::avx512::Avx512::for_isa(isa)) {
        while ci + 8 <= channels {
            let ch = c0 + ci;
            let (a, d, s) = (&inp.a[ch * n..], &inp.d[ch..], &mut st[ci * n..]);
            // SAFETY: as below.
            unsafe { k.scan_channels(t, e, ch, inp.x, inp.delta, a, inp.b, inp.c, d, s, y) };
            ci += 8;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && n.is_multiple_of(8) && n <= 32 {
        // Four channels at a time, then one at a time.
        while ci < channels {
            let c = if ci + 4 <= channels { 4 } else { 1 };
            let ch = c0 + ci;
            let (a, d, s) = (&inp.a[ch * n..], &inp.d[ch..], &mut st[ci * n..]);
            macro_rules! run {
                ($c:literal, $nv:literal) => {
                    // SAFETY: Avx2 was detected; shapes were checked by the caller; `a`, `d`,
                    // `s` hold these channels; their `y` columns belong to this task only.
                    unsafe {
                        x86::scan_channels::<$c, $nv>(
                            t, e, ch, inp.x, inp.delta, a, inp.b, inp.c, d, s, y,
                        )
                    }
                };
            }
            match (c, n / 8) {
                (4, 1) => run!(4, 1),
                (4, 2) => run!(4, 2),
                (4, 3) => run!(4, 3),
                (4, _) => run!(4, 4),
                (_, 1) => run!(1, 1),
                (_, 2) => run!(1, 2),
                (_, 3) => run!(1, 3),
                (_, _) => run!(1, 4),
            }
            ci += c;
        }
    }
    for (ci, s) in st.chunks_exact_mut(n).enumerate().skip(ci) {
        let ch = c0 + ci;
        let a = &inp.a[ch * n..(ch + 1) * n];
        for ti in 0..t {
            let dt = inp.delta[ti * e + ch];
            let xv = inp.x[ti * e + ch];
            let (b, c) = (&inp.b[ti * n..(ti + 1) * n], &inp.c[ti * n..(ti + 1) * n]);
            let mut acc = 0f32;
            for j in 0..n {
                s[j] = (dt * a[j]).exp() * s[j] + dt * b[j] * xv;
                acc += s[j] * c[j];
            }
            // SAFETY: channel `ch` belongs to this task only (the caller's promise).
            unsafe { *y.add(ti * e + ch) = acc + inp.d[ch] * xv };
        }
    }
}

fn check(inp: &ScanInput, state: &[f32], y: &[f32], e: usize, n: usize, t: usize) {
    assert_eq!(inp.a.len(), e * n);
    assert_eq!(inp.delta.len(), t * e);
    assert_eq!(inp.b.len(), t * n);
    assert_eq!(inp.c.len(), t * n);
    assert_eq!(state.len(), e * n);
    assert_eq!(y.len(), t * e);
}

/// Reference: time outermost, exactly the spec's recurrence one step at a time.
pub fn selective_scan_ref(inp: &ScanInput, state: &mut [f32], y: &mut [f32]) {
    let e = inp.d.len();
    let n = inp.a.len() / e;
    let t = inp.x.len() / e;
    check(inp, state, y, e, n, t);
    for ti in 0..t {
        for ch in 0..e {
            let dt = inp.delta[ti * e + ch];
            let xv = inp.x[ti * e + ch];
            let mut out = inp.d[ch] * xv;
            for j in 0..n {
                let s = &mut state[ch * n + j];
                *s = (dt * inp.a[ch * n + j]).exp() * *s + dt * inp.b[ti * n + j] * xv;
                out += *s * inp.c[ti * n + j];
            }
            y[ti * e + ch] = out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    #[test]
    fn fast_scan_matches_reference_and_chunks() {
        let mut rng = Rng::new(11);
        for (t, e, n) in [
            (9, 131, 5),
            (7, 70, 16),
            (3, 9, 32),
            (5, 37, 24),
            (2, 13, 8),
            (1, 3200, 16),
            (5, 1203, 16),
            // More rows than a part (SCAN_ROWS): every channel's state carried across parts.
            (600, 37, 16),
            (300, 21, 8),
        ] {
            let x = rng.normal_vec(t * e, 1.0);
            let delta: Vec<f32> = rng.normal_vec(t * e, 1.0).iter().map(|v| v.abs()).collect();
            let a: Vec<f32> = rng
                .normal_vec(e * n, 1.0)
                .iter()
                .map(|v| -v.exp())
                .collect();
            let b = rng.normal_vec(t * n, 1.0);
            let c = rng.normal_vec(t * n, 1.0);
            let d = rng.normal_vec(e, 1.0);
            let inp = ScanInput {
                x: &x,
                delta: &delta,
                a: &a,
                b: &b,
                c: &c,
                d: &d,
            };
            let s_init = rng.normal_vec(e * n, 1.0);
            let mut s2 = s_init.clone();
            let mut y2 = vec![0.0; t * e];
            selective_scan_ref(&inp, &mut s2, &mut y2);
            let mut y1 = vec![0.0; t * e];
            for isa in crate::isa::available() {
                let mut s1 = s_init.clone();
                selective_scan_with(isa, &inp, &mut s1, &mut y1);
                assert_close(&y1, &y2, 1e-5, &format!("scan y {isa:?} n={n}"));
                assert_close(&s1, &s2, 1e-5, &format!("scan state {isa:?} n={n}"));
            }
            // One step at a time from the same start gives the same.
            let mut s3 = s_init;
            let mut y3 = vec![0.0; t * e];
            for ti in 0..t {
                let step = ScanInput {
                    x: &x[ti * e..(ti + 1) * e],
                    delta: &delta[ti * e..(ti + 1) * e],
                    a: &a,
                    b: &b[ti * n..(ti + 1) * n],
                    c: &c[ti * n..(ti + 1) * n],
                    d: &d,
                };
                selective_scan(&step, &mut s3, &mut y3[ti * e..(ti + 1) * e]);
            }
            assert_close(&y1, &y3, 1e-5, "scan stepwise");
        }
    }
}
