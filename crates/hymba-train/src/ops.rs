//! The model's building blocks with their backward passes, in f32. Each `*_backward` takes the
//! forward's inputs (or what the forward saved) and the gradient of the output, and returns or
//! accumulates the gradients of the inputs and parameters. Tests check every one against
//! finite differences.

use hymba::kernels::act;
use hymba::kernels::matmul::{matmul, Mat, WeightData};
use hymba::kernels::rope;
use rayon::prelude::*;

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; a.len()];
    // Blocks of 32 output rows per task, read in 32-wide tiles so both sides stay in cache.
    const B: usize = 32;
    if rows == 0 || cols == 0 {
        return t;
    }
    t.par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(blk, out)| {
            let c0 = blk * B;
            let nc = out.len() / rows;
            for r0 in (0..rows).step_by(B) {
                for r in r0..(r0 + B).min(rows) {
                    for c in 0..nc {
                        out[c * rows + r] = a[r * cols + c0 + c];
                    }
                }
            }
        });
    t
}

fn mat(w: &[f32], rows: usize) -> Mat<'_> {
    Mat::new(WeightData::F32(w), rows, w.len() / rows)
}

/// `y = x · wᵀ` for `x [t, in]`, `w [out, in]`.
pub fn linear(x: &[f32], w: &[f32], out: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len() / (w.len() / out) * out];
    matmul(x, mat(w, out), &mut y);
    y
}

/// Backward of [`linear`]: adds `dyᵀ · x` to `dw` and returns `dx = dy · w`.
pub fn linear_backward(x: &[f32], w: &[f32], dy: &[f32], out: usize, dw: &mut [f32]) -> Vec<f32> {
    let inp = w.len() / out;
    let t = x.len() / inp;
    let wt = transpose(w, out, inp);
    let mut dx = vec![0.0; t * inp];
    matmul(dy, mat(&wt, inp), &mut dx);
    add_weight_grad(x, dy, inp, out, dw);
    dx
}

/// `dw += dyᵀ · x` (`[out, in]`).
pub fn add_weight_grad(x: &[f32], dy: &[f32], inp: usize, out: usize, dw: &mut [f32]) {
    let t = x.len() / inp;
    let dyt = transpose(dy, t, out);
    let xt = transpose(x, t, inp);
    let mut g = vec![0.0; out * inp];
    matmul(&dyt, mat(&xt, inp), &mut g);
    add(dw, &g);
}

pub fn add(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// RMSNorm of each row; returns the output and each row's `1 / rms`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut y = vec![0.0; x.len()];
    let mut rstd = vec![0.0; x.len() / d];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), rs)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
                *o = g * (v * r);
            }
            *rs = r;
        });
    (y, rstd)
}

/// Backward of [`rmsnorm`]: adds to `dw`, returns `dx`.
pub fn rmsnorm_backward(
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Vec<f32> {
    let d = w.len();
    let mut dx = vec![0.0; x.len()];
    for ((xr, dyr), (dxr, &r)) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d).zip(rstd))
    {
        // y = w ⊙ x · r, r = (mean(x²) + eps)^(-1/2): dx = r·g − x · r³ · mean(g ⊙ x), g = w ⊙ dy.
        let mut gx = 0.0;
        for j in 0..d {
            gx += w[j] * dyr[j] * xr[j];
            dw[j] += dyr[j] * xr[j] * r;
        }
        let k = r * r * r * gx / d as f32;
        for j in 0..d {
            dxr[j] = r * w[j] * dyr[j] - xr[j] * k;
        }
    }
    dx
}

pub fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + (-x).exp());
    s * (1.0 + x * (1.0 - s))
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// RoPE on every row of `[t, width]` (heads of `2 · inv_freq.len()`), row `i` at position `i`.
pub fn rope_rows(a: &mut [f32], width: usize, inv_freq: &[f32], inverse: bool) {
    for (i, row) in a.chunks_exact_mut(width).enumerate() {
        if inverse {
            rope::apply_inverse(row, i, inv_freq)
        } else {
            rope::apply(row, i, inv_freq)
        }
    }
}

/// Depthwise causal conv from a blank state (spec §3.3): `x`, result `[t, c]`, `w [c, k]`.
pub fn conv(x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let c = bias.len();
    let k = w.len() / c;
    let t = x.len() / c;
    let mut y = vec![0.0; x.len()];
    for ti in 0..t {
        let o = &mut y[ti * c..(ti + 1) * c];
        o.copy_from_slice(bias);
        for kk in 0..k {
            // Input row ti − (k − 1) + kk; before the start it is zero.
            let Some(src) = (ti + kk).checked_sub(k - 1) else {
                continue;
            };
            let xr = &x[src * c..(src + 1) * c];
            for ch in 0..c {
                o[ch] += w[ch * k + kk] * xr[ch];
            }
        }
    }
    y
}

/// Backward of [`conv`]: adds to `dw`, `db`; returns `dx`.
pub fn conv_backward(x: &[f32], w: &[f32], dy: &[f32], dw: &mut [f32], db: &mut [f32]) -> Vec<f32> {
    let c = db.len();
    let k = w.len() / c;
    let t = x.len() / c;
    let mut dx = vec![0.0; x.len()];
    for ti in 0..t {
        let g = &dy[ti * c..(ti + 1) * c];
        add(db, g);
        for kk in 0..k {
            let Some(src) = (ti + kk).checked_sub(k - 1) else {
                continue;
            };
            for ch in 0..c {
                dw[ch * k + kk] += g[ch] * x[src * c + ch];
                dx[src * c + ch] += g[ch] * w[ch * k + kk];
            }
        }
    }
    dx
}

/// Inputs of the selective scan of one sequence (spec §3.3): the engine's own type.
pub use hymba::kernels::scan::ScanInput as Scan;

/// Gradients of [`Scan`]'s inputs.
pub struct ScanGrads {
    pub x: Vec<f32>,
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Vec<f32>,
}

/// The selective scan from a zero state: `y [t, e]` (the engine's kernel).
pub fn scan(s: &Scan) -> Vec<f32> {
    let mut state = vec![0.0; s.a.len()];
    let mut y = vec![0.0; s.x.len()];
    hymba::kernels::scan::selective_scan(s, &mut state, &mut y);
    y
}

/// Backward of [`scan`]. The states are recomputed channel by channel (`t · n` floats at a
/// time) instead of being kept from the forward, which would need `t · e · n`; the decays
/// `exp(Δ·a)` are computed once per channel, vectorised.
pub fn scan_backward(s: &Scan, dy: &[f32]) -> ScanGrads {
    let (e, n) = (s.d.len(), s.a.len() / s.d.len());
    let t = s.x.len() / e;
    let mut g = ScanGrads {
        x: vec![0.0; t * e],
        delta: vec![0.0; t * e],
        a: vec![0.0; e * n],
        b: vec![0.0; t * n],
        c: vec![0.0; t * n],
        d: vec![0.0; e],
    };
    // states[ti + 1] is the state after row ti; states[0] is zero. decay[ti] = exp(Δ_ti · a).
    let mut states = vec![0.0f32; (t + 1) * n];
    let mut decay = vec![0.0f32; t * n];
    let mut ds = vec![0.0f32; n];
    for ch in 0..e {
        let a = &s.a[ch * n..(ch + 1) * n];
        for ti in 0..t {
            let dl = s.delta[ti * e + ch];
            for (o, av) in decay[ti * n..(ti + 1) * n].iter_mut().zip(a) {
                *o = dl * av;
            }
        }
        act::exp_inplace(&mut decay);
        for ti in 0..t {
            let (dl, xv) = (s.delta[ti * e + ch], s.x[ti * e + ch]);
            let b = &s.b[ti * n..(ti + 1) * n];
            let da = &decay[ti * n..(ti + 1) * n];
            let (prev, next) = states.split_at_mut((ti + 1) * n);
            let (prev, next) = (&prev[ti * n..], &mut next[..n]);
            for j in 0..n {
                next[j] = da[j] * prev[j] + dl * b[j] * xv;
            }
        }
        ds.fill(0.0);
        for ti in (0..t).rev() {
            let i = ti * e + ch;
            let (dl, xv, gy) = (s.delta[i], s.x[i], dy[i]);
            let (b, c) = (&s.b[ti * n..(ti + 1) * n], &s.c[ti * n..(ti + 1) * n]);
            let da = &decay[ti * n..(ti + 1) * n];
            let (prev, cur) = (
                &states[ti * n..(ti + 1) * n],
                &states[(ti + 1) * n..(ti + 2) * n],
            );
            let (gb, gc) = (
                &mut g.b[ti * n..(ti + 1) * n],
                &mut g.c[ti * n..(ti + 1) * n],
            );
            g.d[ch] += gy * xv;
            let mut gx = gy * s.d[ch];
            let mut gdl = 0.0;
            for j in 0..n {
                gc[j] += gy * cur[j];
                let sj = ds[j] + gy * c[j];
                // cur = decay · prev + Δ b x
                gdl += sj * (a[j] * da[j] * prev[j] + b[j] * xv);
                g.a[ch * n + j] += sj * dl * da[j] * prev[j];
                gb[j] += sj * dl * xv;
                gx += sj * dl * b[j];
                ds[j] = sj * da[j];
            }
            g.x[i] += gx;
            g.delta[i] += gdl;
        }
    }
    g
}

/// Attention of one sequence (rows at positions `0..t`), GQA, with a visibility rule.
pub struct Attn<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub heads: usize,
    pub kv_heads: usize,
    pub dk: usize,
    pub dv: usize,
    /// `[t, t]`: whether query row i sees key row j.
    pub mask: &'a [bool],
}

/// The `[t, t]` visibility matrix of a rule.
pub fn mask(t: usize, visible: impl Fn(usize, usize) -> bool) -> Vec<bool> {
    (0..t * t).map(|ij| visible(ij / t, ij % t)).collect()
}

/// Returns the output `[t, heads · dv]` and the attention probabilities `[heads, t, t]`.
/// Scores and outputs are matrix products per head (the GEMM kernel), then masked softmax.
pub fn attention(a: &Attn) -> (Vec<f32>, Vec<f32>) {
    let (h, dk, dv) = (a.heads, a.dk, a.dv);
    let t = a.q.len() / (h * dk);
    let group = h / a.kv_heads;
    let scale = 1.0 / (dk as f32).sqrt();
    let mut out = vec![0.0; t * h * dv];
    let mut probs = vec![0.0; h * t * t];
    for kh in 0..a.kv_heads {
        let k = cols(a.k, a.kv_heads * dk, kh * dk, dk);
        let vt = transpose(&cols(a.v, a.kv_heads * dv, kh * dv, dv), t, dv);
        for hh in kh * group..(kh + 1) * group {
            let p = &mut probs[hh * t * t..(hh + 1) * t * t];
            matmul(&cols(a.q, h * dk, hh * dk, dk), mat(&k, t), p);
            for (row, vis) in p.chunks_exact_mut(t).zip(a.mask.chunks_exact(t)) {
                let mut mx = f32::NEG_INFINITY;
                for (v, &seen) in row.iter_mut().zip(vis) {
                    if seen {
                        *v *= scale;
                        mx = mx.max(*v);
                    } else {
                        *v = f32::NEG_INFINITY;
                    }
                }
                for v in row.iter_mut() {
                    *v -= mx;
                }
                act::exp_inplace(row);
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= sum);
            }
            let mut o = vec![0.0; t * dv];
            matmul(p, mat(&vt, dv), &mut o);
            put_cols(&mut out, h * dv, hh * dv, &o, dv);
        }
    }
    (out, probs)
}

/// Backward of [`attention`]: returns `(dq, dk, dv)`.
pub fn attention_backward(a: &Attn, probs: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (h, dk, dv) = (a.heads, a.dk, a.dv);
    let t = a.q.len() / (h * dk);
    let group = h / a.kv_heads;
    let scale = 1.0 / (dk as f32).sqrt();
    let (mut gq, mut gk, mut gv) = (
        vec![0.0; a.q.len()],
        vec![0.0; a.k.len()],
        vec![0.0; a.v.len()],
    );
    for kh in 0..a.kv_heads {
        let k = cols(a.k, a.kv_heads * dk, kh * dk, dk);
        let kt = transpose(&k, t, dk);
        let v = cols(a.v, a.kv_heads * dv, kh * dv, dv);
        let (mut gkh, mut gvh) = (vec![0.0; t * dk], vec![0.0; t * dv]);
        let mut tmp_k = vec![0.0; t * dk];
        let mut tmp_v = vec![0.0; t * dv];
        for hh in kh * group..(kh + 1) * group {
            let p = &probs[hh * t * t..(hh + 1) * t * t];
            let go = cols(dout, h * dv, hh * dv, dv);
            // dP = dO · Vᵀ; dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale
            let mut ds = vec![0.0; t * t];
            matmul(&go, mat(&v, t), &mut ds);
            for (prow, drow) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)) {
                let pdp: f32 = prow.iter().zip(drow.iter()).map(|(p, d)| p * d).sum();
                for (d, p) in drow.iter_mut().zip(prow) {
                    *d = p * (*d - pdp) * scale;
                }
            }
            // dQ = dS · K; dK += dSᵀ · Q; dV += Pᵀ · dO
            let mut gqh = vec![0.0; t * dk];
            matmul(&ds, mat(&kt, dk), &mut gqh);
            put_cols(&mut gq, h * dk, hh * dk, &gqh, dk);
            let qt = transpose(&cols(a.q, h * dk, hh * dk, dk), t, dk);
            matmul(&transpose(&ds, t, t), mat(&qt, dk), &mut tmp_k);
            add(&mut gkh, &tmp_k);
            matmul(
                &transpose(p, t, t),
                mat(&transpose(&go, t, dv), dv),
                &mut tmp_v,
            );
            add(&mut gvh, &tmp_v);
        }
        put_cols(&mut gk, a.kv_heads * dk, kh * dk, &gkh, dk);
        put_cols(&mut gv, a.kv_heads * dv, kh * dv, &gvh, dv);
    }
    (gq, gk, gv)
}

/// Columns `a..a + w` of every row of a `[rows, width]` matrix.
pub fn cols(m: &[f32], width: usize, a: usize, w: usize) -> Vec<f32> {
    m.chunks_exact(width)
        .flat_map(|r| r[a..a + w].iter().copied())
        .collect()
}

/// Writes `src [rows, w]` into columns `a..a + w` of `dst [rows, width]`.
pub fn put_cols(dst: &mut [f32], width: usize, a: usize, src: &[f32], w: usize) {
    for (d, s) in dst.chunks_exact_mut(width).zip(src.chunks_exact(w)) {
        d[a..a + w].copy_from_slice(s);
    }
}

/// Mean cross-entropy of `logits [t, v]` against `targets`; returns the loss and, when asked,
/// the gradient of the logits (already divided by `t`).
pub fn cross_entropy(logits: &[f32], targets: &[u32], grad: bool) -> (f32, Option<Vec<f32>>) {
    let v = logits.len() / targets.len();
    let n = targets.len() as f32;
    let mut g = if grad {
        vec![0.0; logits.len()]
    } else {
        Vec::new()
    };
    let row_loss = |row: &[f32], tg: u32, gr: Option<&mut [f32]>| -> f64 {
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f32 = row.iter().map(|x| (x - mx).exp()).sum();
        let lse = mx + sum.ln();
        if let Some(gr) = gr {
            for (o, x) in gr.iter_mut().zip(row) {
                *o = (x - lse).exp() / n;
            }
            gr[tg as usize] -= 1.0 / n;
        }
        (lse - row[tg as usize]) as f64
    };
    // Per-row losses in order, then summed in order: the same total whatever the threads.
    let losses: Vec<f64> = if grad {
        g.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(targets.par_iter())
            .map(|((gr, row), &tg)| row_loss(row, tg, Some(gr)))
            .collect()
    } else {
        logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &tg)| row_loss(row, tg, None))
            .collect()
    };
    let loss = losses.iter().sum::<f64>() / n as f64;
    (loss as f32, grad.then_some(g))
}

/// Softplus and its derivative, as the engine computes it.
pub fn softplus(x: f32) -> f32 {
    act::softplus(x)
}

#[cfg(test)]
mod tests {
    //! Finite-difference checks: each backward against the change of a random scalar
    //! projection of the forward's output, `L = Σ r ⊙ f(inputs)`, for a few input elements.
    use super::*;
    use hymba::kernels::matmul::dot;
    use hymba::kernels::testing::Rng;

    /// Checks `grad` (∂L/∂p) at a few indices of `p` against central differences of `loss`.
    /// f64 accumulation is not available through f32 kernels, so steps are moderate and the
    /// tolerance relative.
    fn check(name: &str, p: &mut [f32], grad: &[f32], loss: &dyn Fn(&[f32]) -> f64) {
        let mut rng = Rng::new(99);
        let h = 1e-2f32;
        for _ in 0..12.min(p.len()) {
            let i = rng.below(p.len());
            let orig = p[i];
            p[i] = orig + h;
            let up = loss(p);
            p[i] = orig - h;
            let down = loss(p);
            p[i] = orig;
            let fd = (up - down) / (2.0 * h as f64);
            let an = grad[i] as f64;
            let tol = 2e-2 * fd.abs().max(an.abs()) + 2e-3;
            assert!(
                (fd - an).abs() <= tol,
                "{name}[{i}]: analytic {an}, finite difference {fd}"
            );
        }
    }

    fn proj(out: &[f32], r: &[f32]) -> f64 {
        out.iter()
            .zip(r)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    }

    #[test]
    fn transpose_moves_every_element() {
        for (r, c) in [(1, 1), (37, 70), (64, 33), (5, 100)] {
            let a: Vec<f32> = (0..r * c).map(|i| i as f32).collect();
            let t = transpose(&a, r, c);
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], a[i * c + j], "[{r}x{c}] ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn linear_grads() {
        let mut rng = Rng::new(1);
        let (t, i, o) = (7, 13, 11);
        let mut x = rng.normal_vec(t * i, 1.0);
        let mut w = rng.normal_vec(o * i, 0.3);
        let r = rng.normal_vec(t * o, 1.0);
        let mut dw = vec![0.0; w.len()];
        let dx = linear_backward(&x, &w, &r, o, &mut dw);
        let w0 = w.clone();
        check("linear x", &mut x, &dx, &|x| proj(&linear(x, &w0, o), &r));
        let x0 = x.clone();
        check("linear w", &mut w, &dw, &|w| proj(&linear(&x0, w, o), &r));
    }

    #[test]
    fn rmsnorm_grads() {
        let mut rng = Rng::new(2);
        let (t, d) = (5, 9);
        let mut x = rng.normal_vec(t * d, 1.0);
        let mut w = rng.normal_vec(d, 1.0);
        let r = rng.normal_vec(t * d, 1.0);
        let (_, rstd) = rmsnorm(&x, &w, 1e-6);
        let mut dw = vec![0.0; d];
        let dx = rmsnorm_backward(&x, &w, &rstd, &r, &mut dw);
        let w0 = w.clone();
        check("rmsnorm x", &mut x, &dx, &|x| {
            proj(&rmsnorm(x, &w0, 1e-6).0, &r)
        });
        let x0 = x.clone();
        check("rmsnorm w", &mut w, &dw, &|w| {
            proj(&rmsnorm(&x0, w, 1e-6).0, &r)
        });
    }

    #[test]
    fn rope_backward_is_inverse_rotation() {
        let mut rng = Rng::new(3);
        let f = rope::inv_freq(10000.0, 8);
        let (t, wd) = (6, 16);
        let mut x = rng.normal_vec(t * wd, 1.0);
        let r = rng.normal_vec(t * wd, 1.0);
        let mut g = r.clone();
        rope_rows(&mut g, wd, &f, true);
        check("rope", &mut x, &g, &|x| {
            let mut y = x.to_vec();
            rope_rows(&mut y, wd, &f, false);
            proj(&y, &r)
        });
    }

    #[test]
    fn conv_grads() {
        let mut rng = Rng::new(4);
        let (t, c, k) = (9, 5, 4);
        let mut x = rng.normal_vec(t * c, 1.0);
        let mut w = rng.normal_vec(c * k, 1.0);
        let mut b = rng.normal_vec(c, 1.0);
        let r = rng.normal_vec(t * c, 1.0);
        let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; c]);
        let dx = conv_backward(&x, &w, &r, &mut dw, &mut db);
        let (w0, b0, x0) = (w.clone(), b.clone(), x.clone());
        check("conv x", &mut x, &dx, &|x| proj(&conv(x, &w0, &b0), &r));
        check("conv w", &mut w, &dw, &|w| proj(&conv(&x0, w, &b0), &r));
        check("conv b", &mut b, &db, &|b| proj(&conv(&x0, &w0, b), &r));
        // The blank-state conv is the engine's kernel from a zero state.
        let mut state = vec![0.0; (k - 1) * c];
        let mut y = vec![0.0; t * c];
        hymba::kernels::conv::causal_conv(
            &x0,
            &mut state,
            &hymba::kernels::conv::taps(&w0, c),
            &b0,
            &mut y,
        );
        hymba::kernels::testing::assert_close(&y, &conv(&x0, &w0, &b0), 1e-5, "conv vs engine");
    }

    #[test]
    fn scan_grads() {
        let mut rng = Rng::new(5);
        let (t, e, n) = (7, 5, 3);
        let x = rng.normal_vec(t * e, 1.0);
        let delta: Vec<f32> = (0..t * e)
            .map(|_| 0.05 + rng.uniform() as f32 * 0.5)
            .collect();
        let a: Vec<f32> = (0..e * n)
            .map(|_| -(0.2 + rng.uniform() as f32 * 2.0))
            .collect();
        let b = rng.normal_vec(t * n, 1.0);
        let c = rng.normal_vec(t * n, 1.0);
        let d = rng.normal_vec(e, 1.0);
        let r = rng.normal_vec(t * e, 1.0);
        let ins = [x, delta, a, b, c, d];
        let run = |v: &[Vec<f32>; 6]| {
            scan(&Scan {
                x: &v[0],
                delta: &v[1],
                a: &v[2],
                b: &v[3],
                c: &v[4],
                d: &v[5],
            })
        };
        let g = scan_backward(
            &Scan {
                x: &ins[0],
                delta: &ins[1],
                a: &ins[2],
                b: &ins[3],
                c: &ins[4],
                d: &ins[5],
            },
            &r,
        );
        let grads = [g.x, g.delta, g.a, g.b, g.c, g.d];
        for (k, name) in ["x", "delta", "a", "b", "c", "d"].iter().enumerate() {
            let mut p = ins[k].clone();
            check(&format!("scan {name}"), &mut p, &grads[k], &|p| {
                let mut v = ins.clone();
                v[k] = p.to_vec();
                proj(&run(&v), &r)
            });
        }
    }

    // The straightforward loops the matrix-product versions are checked against.
    /// Returns the output `[t, heads · dv]` and the attention probabilities `[heads, t, t]`.
    fn attention_ref(a: &Attn) -> (Vec<f32>, Vec<f32>) {
        let (h, dk, dv) = (a.heads, a.dk, a.dv);
        let t = a.q.len() / (h * dk);
        let (kw, vw) = (a.kv_heads * dk, a.kv_heads * dv);
        let group = h / a.kv_heads;
        let scale = 1.0 / (dk as f32).sqrt();
        let mut out = vec![0.0; t * h * dv];
        let mut probs = vec![0.0; h * t * t];
        for hh in 0..h {
            let kh = hh / group;
            for i in 0..t {
                let q = &a.q[i * h * dk + hh * dk..][..dk];
                // Causal: row i sees keys 0..=i, those of them the mask allows.
                let p = &mut probs[(hh * t + i) * t..][..=i];
                let seen = &a.mask[i * t..][..=i];
                let mut mx = f32::NEG_INFINITY;
                for (j, (pj, &s)) in p.iter_mut().zip(seen).enumerate() {
                    if s {
                        *pj = dot(q, &a.k[j * kw + kh * dk..][..dk]) * scale;
                        mx = mx.max(*pj);
                    }
                }
                let mut sum = 0.0;
                for (pj, &s) in p.iter_mut().zip(seen) {
                    *pj = if s { (*pj - mx).exp() } else { 0.0 };
                    sum += *pj;
                }
                let o = &mut out[i * h * dv + hh * dv..][..dv];
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj /= sum;
                    if *pj != 0.0 {
                        let v = &a.v[j * vw + kh * dv..][..dv];
                        for (oo, vv) in o.iter_mut().zip(v) {
                            *oo += *pj * vv;
                        }
                    }
                }
            }
        }
        (out, probs)
    }

    /// Backward of the reference: returns `(dq, dk, dv)`.
    fn attention_backward_ref(
        a: &Attn,
        probs: &[f32],
        dout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (h, dk, dv) = (a.heads, a.dk, a.dv);
        let t = a.q.len() / (h * dk);
        let (kw, vw) = (a.kv_heads * dk, a.kv_heads * dv);
        let group = h / a.kv_heads;
        let scale = 1.0 / (dk as f32).sqrt();
        let (mut gq, mut gk, mut gv) = (
            vec![0.0; a.q.len()],
            vec![0.0; a.k.len()],
            vec![0.0; a.v.len()],
        );
        let mut dp = vec![0.0; t];
        for hh in 0..h {
            let kh = hh / group;
            for i in 0..t {
                let p = &probs[(hh * t + i) * t..][..t];
                let go = &dout[i * h * dv + hh * dv..][..dv];
                // dP = dO · vᵀ; dS = P ⊙ (dP − Σ P dP)
                let mut pdp = 0.0;
                for j in 0..=i {
                    if p[j] != 0.0 {
                        dp[j] = dot(go, &a.v[j * vw + kh * dv..][..dv]);
                        pdp += p[j] * dp[j];
                        let gvj = &mut gv[j * vw + kh * dv..][..dv];
                        for (g, o) in gvj.iter_mut().zip(go) {
                            *g += p[j] * o;
                        }
                    }
                }
                let q = &a.q[i * h * dk + hh * dk..][..dk];
                let gqi = &mut gq[i * h * dk + hh * dk..][..dk];
                for j in 0..=i {
                    if p[j] != 0.0 {
                        let ds = p[j] * (dp[j] - pdp) * scale;
                        let k = &a.k[j * kw + kh * dk..][..dk];
                        for (g, kk) in gqi.iter_mut().zip(k) {
                            *g += ds * kk;
                        }
                        let gkj = &mut gk[j * kw + kh * dk..][..dk];
                        for (g, qq) in gkj.iter_mut().zip(q) {
                            *g += ds * qq;
                        }
                    }
                }
            }
        }
        (gq, gk, gv)
    }

    #[test]
    fn attention_matches_reference_loops() {
        let mut rng = Rng::new(8);
        let (t, h, hk, dk, dv) = (13, 6, 2, 5, 7);
        let q = rng.normal_vec(t * h * dk, 1.0);
        let k = rng.normal_vec(t * hk * dk, 1.0);
        let v = rng.normal_vec(t * hk * dv, 1.0);
        let g = rng.normal_vec(t * h * dv, 1.0);
        let vis = |i: usize, j: usize| j <= i && (i - j <= 4 || j < 3);
        let m = mask(t, vis);
        let a = Attn {
            q: &q,
            k: &k,
            v: &v,
            heads: h,
            kv_heads: hk,
            dk,
            dv,
            mask: &m,
        };
        let (o, p) = attention(&a);
        let (o2, p2) = attention_ref(&a);
        hymba::kernels::testing::assert_close(&o, &o2, 1e-5, "attention out");
        hymba::kernels::testing::assert_close(&p, &p2, 1e-5, "attention probs");
        let (gq, gk, gv) = attention_backward(&a, &p, &g);
        let (gq2, gk2, gv2) = attention_backward_ref(&a, &p2, &g);
        hymba::kernels::testing::assert_close(&gq, &gq2, 1e-4, "dq");
        hymba::kernels::testing::assert_close(&gk, &gk2, 1e-4, "dk");
        hymba::kernels::testing::assert_close(&gv, &gv2, 1e-4, "dv");
    }

    #[test]
    fn attention_grads() {
        let mut rng = Rng::new(6);
        let (t, h, hk, dk, dv) = (9, 4, 2, 6, 5);
        let mut q = rng.normal_vec(t * h * dk, 1.0);
        let mut k = rng.normal_vec(t * hk * dk, 1.0);
        let mut v = rng.normal_vec(t * hk * dv, 1.0);
        let r = rng.normal_vec(t * h * dv, 1.0);
        // A window of 3 with 2 always-visible leading rows, like a sliding-window layer.
        let vis = |i: usize, j: usize| j <= i && (i - j <= 3 || j < 2);
        let m = mask(t, vis);
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let a = Attn {
                q,
                k,
                v,
                heads: h,
                kv_heads: hk,
                dk,
                dv,
                mask: &m,
            };
            attention(&a)
        };
        let (_, probs) = run(&q, &k, &v);
        let a = Attn {
            q: &q,
            k: &k,
            v: &v,
            heads: h,
            kv_heads: hk,
            dk,
            dv,
            mask: &m,
        };
        let (gq, gk, gv) = attention_backward(&a, &probs, &r);
        let (q0, k0, v0) = (q.clone(), k.clone(), v.clone());
        check("attn q", &mut q, &gq, &|p| proj(&run(p, &k0, &v0).0, &r));
        check("attn k", &mut k, &gk, &|p| proj(&run(&q0, p, &v0).0, &r));
        check("attn v", &mut v, &gv, &|p| proj(&run(&q0, &k0, p).0, &r));
    }

    #[test]
    fn cross_entropy_grads() {
        let mut rng = Rng::new(7);
        let (t, v) = (4, 10);
        let mut l = rng.normal_vec(t * v, 2.0);
        let tg: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
        let (_, g) = cross_entropy(&l, &tg, true);
        check("ce", &mut l, &g.unwrap(), &|l| {
            cross_entropy(l, &tg, false).0 as f64
        });
    }

    #[test]
    fn pointwise_grads() {
        for x in [-3.0f32, -0.5, 0.0, 0.7, 4.0] {
            let h = 1e-3;
            let fd = (act::silu(x + h) - act::silu(x - h)) / (2.0 * h);
            assert!((fd - silu_grad(x)).abs() < 1e-3, "silu' at {x}");
            let fd = (softplus(x + h) - softplus(x - h)) / (2.0 * h);
            assert!((fd - sigmoid(x)).abs() < 1e-3, "softplus' at {x}");
        }
    }
}
