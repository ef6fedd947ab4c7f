//! The CPU backend: `hymba-kernels` on rayon's pool. Matrices keep their stored precision (bf16
//! rearranged into panels where the matrix kernels read those faster); activations are `Vec<f32>`.
//! Work that is per sequence (RoPE at its positions, the conv and the scan from its state,
//! attention over its cache) runs one sequence per task, so a batched decode step of many short
//! sequences fills the cores; within a sequence the kernels split their own work.

use super::{
    AttnInput, Backend, Fuse, Heads, InProjParts, KeyPositions, MatrixInfo, ScanInput, Seq,
    VectorInfo,
};
use crate::cache::{Kv, KvDtype, KvView, LayerState};
use crate::error::Result;
use crate::sample::{draw, Draw};
use crate::tensor::{Dtype, Tensor};
use half::bf16;
use hymba_kernels::attention::{attention, AttnShape, KeyPos, KvBlock, KvElem};
use hymba_kernels::conv::{advance_state, causal_conv_rows, ConvInput};
use hymba_kernels::matmul::{Mat, PANEL};
use hymba_kernels::{act, matmul, norm, rope, scan};
use rayon::prelude::*;
use std::ops::Range;

/// The CPU backend. Holds nothing: the thread pool is rayon's global one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Columns `from..from + n` of every row of a `[t, width]` matrix, into `out`.
fn columns_into(m: &[f32], width: usize, from: usize, n: usize, out: &mut Vec<f32>) {
    let t = m.len() / width;
    let out = shape(out, t * n);
    rows_in_parts(out, n, |r0, part| {
        for (o, r) in part
            .chunks_exact_mut(n)
            .zip(m[r0 * width..].chunks_exact(width))
        {
            o.copy_from_slice(&r[from..from + n]);
        }
    });
}

/// Rows of a long prompt a task of the elementwise passes takes (`rows_in_parts`).
const ROWS_A_TASK: usize = 64;

/// `f(first row, rows)` over `buf`'s rows of `width` in parts of ROWS_A_TASK rows, on the pool
/// where there is more than one part: a prompt's elementwise passes would otherwise run on one
/// thread while the others wait.
fn rows_in_parts(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let part = ROWS_A_TASK * width.max(1);
    if buf.len() <= part {
        f(0, buf);
    } else {
        buf.par_chunks_mut(part)
            .enumerate()
            .for_each(|(i, p)| f(i * ROWS_A_TASK, p));
    }
}

/// `out` resized to `n` elements; what it held is overwritten by the caller.
fn shape(out: &mut Vec<f32>, n: usize) -> &mut [f32] {
    out.resize(n, 0.0);
    &mut out[..]
}

/// Buffers of the calling thread for intermediate results, kept between calls: a step allocates
/// (and the kernel zeroes fresh pages) once per shape, not once per layer. A call made while the
/// thread's buffers are out (rayon running another task here) takes new ones, returned after.
/// Buffers past POOL_KEEP floats (256 MB: a 2048-token prompt's gate·up output, 90 MB, is kept;
/// a longer prompt's is freed) are not kept: the pool stays small. Freed buffers that large go
/// back to the system, and the next layer's take fresh pages the kernel zeroes. A buffer is lent
/// at the length it was ever written to, so that `shape` (`resize`) to a size it held before
/// zeroes nothing: the pool hands a call's buffers to the next call in another order, and
/// refilling them with zeros had cost a 1024-token prefill ~2% of its samples in `memset`.
fn with_buffers<const N: usize, R>(f: impl FnOnce(&mut [Vec<f32>; N]) -> R) -> R {
    const POOL_KEEP: usize = 64 << 20;
    /// A pooled buffer and how many of its elements were written (every one below the
    /// greatest length it had in its allocation).
    struct Pooled {
        buf: Vec<f32>,
        written: usize,
    }
    thread_local!(static POOL: std::cell::RefCell<Vec<Pooled>> = const { std::cell::RefCell::new(Vec::new()) });
    let mut bufs: [Vec<f32>; N] = std::array::from_fn(|_| {
        POOL.with(|p| p.borrow_mut().pop())
            .map(|mut p| {
                // SAFETY: the first `written` elements of this allocation were written (f32
                // has no invalid values) and `written <= capacity`.
                unsafe { p.buf.set_len(p.written) };
                p.buf
            })
            .unwrap_or_default()
    });
    let lent: [(*const f32, usize); N] = std::array::from_fn(|i| (bufs[i].as_ptr(), bufs[i].len()));
    let r = f(&mut bufs);
    POOL.with(|p| {
        let kept = bufs
            .into_iter()
            .zip(lent)
            .filter(|(b, _)| b.capacity() <= POOL_KEEP)
            .map(|(buf, (at, len))| {
                // A buffer that moved holds only its length written; one that stayed, also what
                // it had when lent.
                let written = if buf.as_ptr() == at {
                    len.max(buf.len())
                } else {
                    buf.len()
                };
                Pooled { buf, written }
            });
        p.borrow_mut().extend(kept)
    });
    r
}

/// RoPE (rotate-half) on every head of every row, at each sequence's positions.
fn rope_rows(x: &mut [f32], inv_freq: &[f32], seqs: &[Seq<Cpu>]) {
    let t: usize = seqs.iter().map(|s| s.rows.len()).sum();
    let width = x.len() / t.max(1);
    let mut rest = x;
    let mut parts = Vec::with_capacity(seqs.len());
    for s in seqs {
        let (mine, r) = std::mem::take(&mut rest).split_at_mut(s.rows.len() * width);
        rest = r;
        parts.push((s.pos0, mine));
    }
    parts.into_par_iter().for_each(|(pos0, rows)| {
        rows_in_parts(rows, width, |r0, part| {
            for (row, p) in part.chunks_exact_mut(width).zip(pos0 + r0..) {
                rope::apply(row, p, inv_freq);
            }
        })
    });
}

/// Splits `buf` into consecutive pieces of `len(seq) · width` elements, one per sequence.
fn per_seq<'b, 's, 'a>(
    buf: &'b mut [f32],
    width: usize,
    seqs: &'s mut [Seq<'a, Cpu>],
) -> Vec<(&'s mut Seq<'a, Cpu>, &'b mut [f32])> {
    let mut rest = buf;
    seqs.iter_mut()
        .map(|s| {
            let (mine, r) = std::mem::take(&mut rest).split_at_mut(s.rows.len() * width);
            rest = r;
            (s, mine)
        })
        .collect()
}

/// A sequence's cached K/V blocks (each taken as `T` by `as_t`) followed by this call's rows
/// (`k`, `v`, from position `pos0`).
fn with_new_rows<'a, T: KvElem>(
    past: &[KvView<'a>],
    as_t: fn(&KvView<'a>) -> Option<KvBlock<'a, T>>,
    k: &'a [T],
    v: &'a [T],
    kw: usize,
    pos0: usize,
) -> Vec<KvBlock<'a, T>> {
    let mut blocks: Vec<KvBlock<T>> = past
        .iter()
        .map(|b| as_t(b).expect("caches were checked to hold the model's K/V type"))
        .collect();
    blocks.push(KvBlock::row_major(k, v, kw, KeyPos::Contiguous(pos0)));
    blocks
}

impl MatrixInfo for Tensor {
    fn numel(&self) -> usize {
        Tensor::numel(self)
    }
    fn nbytes(&self) -> usize {
        Tensor::nbytes(self)
    }
    fn row_bytes(&self) -> usize {
        self.dtype.nbytes(self.shape.last().copied().unwrap_or(0))
    }
}

impl VectorInfo for Vec<f32> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// The selective scan's input-dependent parameters (spec §3.3) of every row, from x_proj's
/// output, into `b`, `c` and `delta`: B and C (RMS-normed where the layer has inner norms), and
/// Δ = softplus(δr · dt_projᵀ + bias) from δr (normed likewise; `dr` is scratch for it).
fn scan_params(s: &ScanInput<Cpu>, n: usize, [b, c, delta, dr]: [&mut Vec<f32>; 4]) {
    let r = s.dt_rank;
    let pw = r + 2 * n;
    let part = |from: usize, len: usize, w: Option<&Vec<f32>>, out: &mut Vec<f32>| {
        columns_into(s.proj, pw, from, len, out);
        if let Some(w) = w {
            norm::rmsnorm_inplace(out, w, s.eps);
        }
    };
    let norm_of = |i: usize| s.norms.map(|w| &w[i]);
    part(0, r, norm_of(0), dr);
    let m = s.dt_proj.mat();
    // Every element written by the product (and below by the scan and attention): no zeroing.
    matmul(dr, m, shape(delta, dr.len() / r.max(1) * m.rows));
    delta
        .par_chunks_mut(s.dt_bias.len())
        .for_each(|row| act::softplus_bias(row, s.dt_bias));
    part(r, n, norm_of(1), b);
    part(r + n, n, norm_of(2), c);
}

impl Backend for Cpu {
    type Matrix = Tensor;
    type Vector = Vec<f32>;
    type Rows = Vec<f32>;
    type State = LayerState;
    type Kv = Kv;
    type KvView<'a> = KvView<'a>;

    /// A part's activations stay in the caches between the passes over them (in_proj's output
    /// alone is 40 KB a row): a 4096-token prompt in parts of 256 ran 262-268 tok/s against
    /// 238-241 whole, and 2048 tokens 282-285 against 264-269 (2-core Xeon, AMX).
    fn prompt_part(&self) -> Option<usize> {
        Some(256)
    }

    /// On the pool with its other threads kept looking for the loops' work
    /// (`hymba_kernels::on_busy_pool`; Xeon, 2 threads: q4_0 decode 27.6 tok/s against 24.7
    /// with threads that sleep between loops).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        hymba_kernels::on_busy_pool(f)
    }

    fn kv(&self, heads: Heads, max: usize, dtype: KvDtype) -> Kv {
        Kv::new(heads.kv, heads.dk, heads.dv, max, dtype)
    }

    fn kv_write(
        &self,
        kv: &mut Kv,
        slot: usize,
        _first_pos: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        rows: Range<usize>,
    ) {
        let (kw, vw) = (kv.k.width(), kv.v.width());
        for (i, r) in rows.enumerate() {
            kv.k.set(slot + i, &k[r * kw..(r + 1) * kw]);
            kv.v.set(slot + i, &v[r * vw..(r + 1) * vw]);
        }
    }

    fn kv_view<'a>(&self, kv: &'a Kv, pos: KeyPositions<'a>) -> KvView<'a> {
        kv.block(match pos {
            KeyPositions::Contiguous(start) => KeyPos::Contiguous(start),
            KeyPositions::Ring { slots } => KeyPos::Slots(slots),
        })
    }

    fn state(&self, e: usize, n: usize, k: usize) -> LayerState {
        LayerState::zeros(e, n, k)
    }

    fn matrix(&self, t: Tensor) -> Result<Tensor> {
        Ok(
            if !t.is_panels()
                && t.shape.len() == 2
                && match t.dtype {
                    Dtype::BF16 => hymba_kernels::matmul::panels_pay(),
                    Dtype::Q8_0 | Dtype::Q4_0 => hymba_kernels::matmul::quant_panels_pay(),
                    _ => false,
                }
            {
                t.into_panels()
            } else {
                t
            },
        )
    }

    fn vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn rows(&self) -> Vec<f32> {
        Vec::new()
    }

    fn upload(&self, host: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(host);
    }

    fn read<R>(&self, rows: &Vec<f32>, f: impl FnOnce(&[f32]) -> R) -> R {
        f(rows)
    }

    fn embed(&self, table: &Tensor, ids: &[u32], d: usize, out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + ids.len() * d, 0.0);
        let m = table.mat();
        for (row, &id) in out[start..].chunks_exact_mut(d).zip(ids) {
            m.row_f32(id as usize, row);
        }
    }

    fn matmul(&self, x: &Vec<f32>, w: &Tensor, y: &mut Vec<f32>) {
        let m = w.mat();
        let t = x.len() / m.cols.max(1);
        matmul(x, m, shape(y, t * m.rows));
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) {
        norm::rmsnorm(x, w, eps, shape(out, x.len()));
    }

    fn gather(&self, x: &Vec<f32>, width: usize, rows: &[Range<usize>], out: &mut Vec<f32>) {
        out.clear();
        for r in rows {
            out.extend_from_slice(&x[r.start * width..r.end * width]);
        }
    }

    fn pick(&self, x: &Vec<f32>, width: usize, draws: &[Draw], out: &mut Vec<f32>) {
        assert_eq!(draws.len() * width, x.len(), "a draw a row");
        out.clear();
        out.extend(
            x.chunks_exact(width)
                .zip(draws)
                .map(|(r, d)| draw(r, d) as f32),
        );
    }

    fn matmul_add(&self, x: &Vec<f32>, w: &Tensor, h: &mut Vec<f32>) {
        with_buffers(|[y]| {
            self.matmul(x, w, y);
            assert_eq!(h.len(), y.len());
            let width = w.mat().rows;
            rows_in_parts(h, width, |r0, part| {
                for (a, b) in part.iter_mut().zip(&y[r0 * width..]) {
                    *a += b;
                }
            });
        })
    }

    fn glu_matrices(&self, gate: Tensor, up: Tensor) -> Result<(Tensor, Tensor)> {
        // Where products run on bf16 pairs, gate and up as one matrix of alternating panels:
        // one product over them, its tasks applying silu(gate) ⊙ up to their own sums.
        let packs = match gate.dtype {
            Dtype::BF16 => true,
            Dtype::Q8_0 | Dtype::Q4_0 => matmul::quant_panels_pay(),
            _ => false,
        };
        if packs
            && gate.dtype == up.dtype
            && gate.shape == up.shape
            && gate.shape.len() == 2
            && !gate.is_panels()
            && !up.is_panels()
            && matmul::pairs_pay()
        {
            let k = gate.shape[1];
            let both = Tensor::glu_panels(&gate, &up);
            return Ok((both, Tensor::from_bytes(Dtype::BF16, vec![0, k], &[])));
        }
        Ok((self.matrix(gate)?, self.matrix(up)?))
    }

    fn glu(&self, x: &Vec<f32>, gate: &Tensor, up: &Tensor, out: &mut Vec<f32>) {
        if up.numel() == 0 {
            // `gate` holds both (`glu_matrices`).
            let (f, k) = (gate.shape[0] / 2, gate.shape[1]);
            let w = Mat::new(gate.data(), 2 * f.next_multiple_of(PANEL), k);
            let t = x.len() / k.max(1);
            let out = shape(out, t * f);
            return with_buffers(|[both]| matmul::matmul_glu(x, w, f, out, both));
        }
        self.matmul(x, gate, out);
        with_buffers(|[u]| {
            self.matmul(x, up, u);
            let width = gate.mat().rows;
            out.par_chunks_mut(width)
                .zip(u.par_chunks(width))
                .for_each(|(g, u)| act::silu_mul(g, u));
        })
    }

    fn split_in_proj(
        &self,
        p: &Vec<f32>,
        parts: InProjParts,
        inv_freq: &Vec<f32>,
        seqs: &[Seq<Cpu>],
        q: &mut Vec<f32>,
        kv: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    ) {
        columns_into(p, parts.width, 0, parts.q, q);
        rope_rows(q, inv_freq, seqs);
        if let (Some(split), Some((k, v))) = (parts.kv, kv) {
            columns_into(p, parts.width, split.k_at, split.kw, k);
            columns_into(p, parts.width, split.k_at + split.kw, split.vw, v);
            rope_rows(k, inv_freq, seqs);
            if split.dtype == KvDtype::BF16 {
                // What the cache will hold, so this call's queries see it too.
                for (m, w) in [(k, split.kw), (v, split.vw)] {
                    rows_in_parts(m, w, |_, part| {
                        for x in part {
                            *x = bf16::from_f32(*x).to_f32();
                        }
                    });
                }
            }
        }
    }

    fn conv_silu(
        &self,
        p: &Vec<f32>,
        width: usize,
        from: usize,
        layer: usize,
        taps: &Vec<f32>,
        bias: &Vec<f32>,
        seqs: &mut [Seq<Cpu>],
        out: &mut Vec<f32>,
    ) {
        let e = bias.len();
        let t: usize = seqs.iter().map(|s| s.rows.len()).sum();
        let out = shape(out, t * e);
        per_seq(out, e, seqs).into_par_iter().for_each(|(s, o)| {
            // The input read in place from in_proj's rows; a prompt's rows in parts over the pool.
            let inp = ConvInput {
                x: &p[s.rows.start * width..s.rows.end * width],
                width,
                from,
                t: s.rows.len(),
            };
            let state = &mut s.states[layer].conv;
            rows_in_parts(o, e, |r0, part| {
                causal_conv_rows(&inp, state, taps, bias, r0..r0 + part.len() / e, part);
                act::silu_inplace(part);
            });
            advance_state(&inp, e, state);
        });
    }

    fn hybrid_heads(
        &self,
        at: &AttnInput<Cpu>,
        ssm: &ScanInput<Cpu>,
        fuse: &Fuse<Cpu>,
        seqs: &mut [Seq<Cpu>],
        out: &mut Vec<f32>,
    ) {
        let e = fuse.attn_norm.len();
        let n = ssm.a.len() / e;
        let t: usize = seqs.iter().map(|s| s.rows.len()).sum();
        with_buffers(|[b, c, delta, dr, y, attn]| {
            scan_params(ssm, n, [b, c, delta, dr]);
            let (b, c, delta) = (&*b, &*c, &*delta);
            let (qw, kw) = (at.heads.q * at.heads.dk, at.heads.kv * at.heads.dk);
            let vw = at.heads.kv * at.heads.dv;
            let shape_ = AttnShape {
                heads: at.heads.q,
                kv_heads: at.heads.kv,
                dk: at.heads.dk,
                dv: at.heads.dv,
            };
            let scale = 1.0 / (at.heads.dk as f32).sqrt();
            let (y, attn) = (shape(y, t * e), shape(attn, t * e));
            let out = shape(out, t * e);
            let mut parts = Vec::with_capacity(seqs.len());
            let (mut a_rest, mut y_rest, mut f_rest) = (attn, y, &mut out[..]);
            for s in seqs.iter_mut() {
                let len = s.rows.len() * e;
                let (a, ar) = std::mem::take(&mut a_rest).split_at_mut(len);
                let (ys, yr) = std::mem::take(&mut y_rest).split_at_mut(len);
                let (f, fr) = std::mem::take(&mut f_rest).split_at_mut(len);
                (a_rest, y_rest, f_rest) = (ar, yr, fr);
                parts.push((s, a, ys, f));
            }
            parts.into_par_iter().for_each(|(s, a, ys, fs)| {
                let rows = s.rows.clone();
                let qs = &at.q[rows.start * qw..rows.end * qw];
                let (k, v) = (
                    &at.k[rows.start * kw..rows.end * kw],
                    &at.v[rows.start * vw..rows.end * vw],
                );
                let pos: Vec<usize> = (s.pos0..s.pos0 + rows.len()).collect();
                let visible = at.mask(s).visibility();
                let past = &s.past[at.group];
                let state = &mut s.states[ssm.layer].ssm;
                let inp = scan::ScanInput {
                    x: &ssm.x[rows.start * e..rows.end * e],
                    delta: &delta[rows.start * e..rows.end * e],
                    a: ssm.a,
                    b: &b[rows.start * n..rows.end * n],
                    c: &c[rows.start * n..rows.end * n],
                    d: ssm.d,
                };
                // The two heads side by side: a core that finishes its share of one takes work from
                // the other.
                rayon::join(
                    || match at.kv_dtype {
                        KvDtype::F32 => {
                            let blocks = with_new_rows(past, KvView::f32, k, v, kw, s.pos0);
                            attention(qs, &pos, &blocks, shape_, scale, visible, a)
                        }
                        KvDtype::BF16 => {
                            let narrow = |r: &[f32]| -> Vec<bf16> {
                                r.iter().map(|&x| bf16::from_f32(x)).collect()
                            };
                            let (k, v) = (narrow(k), narrow(v));
                            let blocks = with_new_rows(past, KvView::bf16, &k, &v, kw, s.pos0);
                            attention(qs, &pos, &blocks, shape_, scale, visible, a)
                        }
                    },
                    || {
                        scan::selective_scan(&inp, state, ys);
                        // y ⊙ silu(z), z read from in_proj's rows.
                        rows_in_parts(ys, e, |r0, part| {
                            let mut gate = [0f32; 256];
                            for (i, y) in part.chunks_exact_mut(e).enumerate() {
                                let at = (rows.start + r0 + i) * ssm.z_width + ssm.z_at;
                                for (y, z) in y.chunks_mut(256).zip(ssm.z[at..at + e].chunks(256)) {
                                    let g = &mut gate[..z.len()];
                                    g.copy_from_slice(z);
                                    act::silu_inplace(g);
                                    for (v, g) in y.iter_mut().zip(g.iter()) {
                                        *v *= g;
                                    }
                                }
                            }
                        });
                    },
                );
                norm::rmsnorm(a, fuse.attn_norm, fuse.eps, fs);
                norm::rmsnorm_inplace(ys, fuse.ssm_norm, fuse.eps);
                rows_in_parts(fs, e, |r0, part| {
                    for (f, y) in part.iter_mut().zip(&ys[r0 * e..]) {
                        *f = (*f + y) * 0.5;
                    }
                });
            });
        })
    }
}
