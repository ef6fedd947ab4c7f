//! The training forward (spec §3 over whole sequences from a blank state, meta tokens
//! prepended) and its hand-written backward pass.
//!
//! A batch is `b` sequences of `t` input tokens; each runs as `s = M + t` rows. Row-wise work
//! (projections, norms, MLP) runs over all `b · s` rows at once; attention, the conv and the
//! scan run per sequence, sequences in parallel. The forward keeps what the backward needs in a
//! [`Tape`], layer by layer; the backward walks the layers in reverse.

use crate::ops::{self, add, linear, linear_backward, rmsnorm, rmsnorm_backward, Attn, Scan};
use crate::params::Params;
use hymba::config::{Config, KvGroup, LayerPlan};
use hymba::kernels::{act, rope};
use hymba::mask::sees;
use rayon::prelude::*;
use std::ops::Range;

/// Parameter indices of one layer (into [`Params::info`]).
struct LayerIdx {
    input_norm: usize,
    in_proj: usize,
    conv_w: usize,
    conv_b: Option<usize>,
    x_proj: usize,
    dt_w: usize,
    dt_b: usize,
    a_log: usize,
    d: usize,
    inner: Option<[usize; 3]>,
    norm1: usize,
    norm2: usize,
    out_proj: usize,
    mlp_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

pub struct TrainModel {
    pub config: Config,
    plan: Vec<LayerPlan>,
    groups: Vec<KvGroup>,
    inv_freq: Vec<f32>,
    embed: usize,
    /// The output projection: `lm_head` when untied, else the embedding.
    head: usize,
    memory: Option<usize>,
    final_norm: usize,
    layers: Vec<LayerIdx>,
}

/// Token windows: `b` rows of `t + 1` ids; inputs are the first `t`, targets the last `t`.
pub struct Batch {
    pub ids: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

/// What one layer's forward keeps for its backward.
struct LayerTape {
    h_in: Vec<f32>,
    r_in: Vec<f32>,
    u: Vec<f32>,
    /// q after RoPE
    q: Vec<f32>,
    x: Vec<f32>,
    z: Vec<f32>,
    attn: Vec<f32>,
    probs: Vec<Vec<f32>>,
    xc_pre: Vec<f32>,
    xc: Vec<f32>,
    /// raw δr, B, C and, with inner norms, their 1/rms
    raw: [Vec<f32>; 3],
    inner_r: [Vec<f32>; 3],
    /// δr, B, C after their norms
    dbc: [Vec<f32>; 3],
    dt_pre: Vec<f32>,
    delta: Vec<f32>,
    ys: Vec<f32>,
    y: Vec<f32>,
    r1: Vec<f32>,
    r2: Vec<f32>,
    f: Vec<f32>,
    h_mid: Vec<f32>,
    r_mlp: Vec<f32>,
    u2: Vec<f32>,
    g: Vec<f32>,
    upv: Vec<f32>,
    act: Vec<f32>,
}

/// The forward's record: per layer, per K/V group, and the head.
pub struct Tape {
    layers: Vec<LayerTape>,
    /// Per group: K (after RoPE) and V of all rows, from the group's first layer.
    kv: Vec<(Vec<f32>, Vec<f32>)>,
    h_final: Vec<f32>,
    r_final: Vec<f32>,
    hn: Vec<f32>,
    /// Logits of every input token `[b · t, V]`.
    pub logits: Vec<f32>,
}

/// Runs `f` for each sequence in parallel, collecting results in order.
fn per_seq<T: Send>(b: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    (0..b).into_par_iter().map(f).collect()
}

impl TrainModel {
    pub fn new(config: Config, params: &Params) -> TrainModel {
        let (plan, groups) = config.plan();
        let idx = |name: String| {
            params
                .index(&name)
                .unwrap_or_else(|| panic!("parameter {name} missing from the layout"))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("model.layers.{i}.{s}");
                LayerIdx {
                    input_norm: idx(p("input_layernorm.weight")),
                    in_proj: idx(p("mamba.in_proj.weight")),
                    conv_w: idx(p("mamba.conv1d.weight")),
                    conv_b: params.index(&p("mamba.conv1d.bias")),
                    x_proj: idx(p("mamba.x_proj.0.weight")),
                    dt_w: idx(p("mamba.dt_proj.0.weight")),
                    dt_b: idx(p("mamba.dt_proj.0.bias")),
                    a_log: idx(p("mamba.A_log.0")),
                    d: idx(p("mamba.D.0")),
                    inner: config.mamba_inner_layernorms.then(|| {
                        [
                            idx(p("mamba.dt_layernorm.weight")),
                            idx(p("mamba.B_layernorm.weight")),
                            idx(p("mamba.C_layernorm.weight")),
                        ]
                    }),
                    norm1: idx(p("mamba.pre_avg_layernorm1.weight")),
                    norm2: idx(p("mamba.pre_avg_layernorm2.weight")),
                    out_proj: idx(p("mamba.out_proj.weight")),
                    mlp_norm: idx(p("pre_moe_layernorm.weight")),
                    gate: idx(p("moe.experts.0.gate_proj.weight")),
                    up: idx(p("moe.experts.0.up_proj.weight")),
                    down: idx(p("moe.experts.0.down_proj.weight")),
                }
            })
            .collect();
        let inv_freq = rope::inv_freq(config.rope_base(), config.qk_head_dim);
        TrainModel {
            embed: idx("model.embed_tokens.weight".into()),
            head: params
                .index("lm_head.weight")
                .unwrap_or_else(|| idx("model.embed_tokens.weight".into())),
            memory: params.index("model.memory_tokens"),
            final_norm: idx("model.final_layernorm.weight".into()),
            plan,
            groups,
            inv_freq,
            layers,
            config,
        }
    }

    fn rows_per_seq(&self, t: usize) -> usize {
        self.config.num_memory_tokens + t
    }

    /// Which rows see which in a layer of plan `lp`, for sequences of `s` rows (spec §4).
    fn mask(&self, lp: &LayerPlan, s: usize) -> Vec<bool> {
        let c = &self.config;
        let window = c.sliding_window.unwrap_or(usize::MAX);
        let (kind, m) = (lp.attn, c.num_memory_tokens);
        ops::mask(s, |tq, sk| sees(kind, window, m, tq, sk))
    }

    /// Sequence `sq`'s attention inputs: its rows of q (all rows `[b·s, q_width]`) and of the
    /// group's K/V.
    fn seq_attn<'a>(
        &self,
        q: &'a [f32],
        kv: &'a (Vec<f32>, Vec<f32>),
        mask: &'a [bool],
        sq: usize,
        s: usize,
    ) -> Attn<'a> {
        let c = &self.config;
        let (qw, kw, vw) = (c.q_width(), c.k_width(), c.v_width());
        Attn {
            q: &q[sq * s * qw..(sq + 1) * s * qw],
            k: &kv.0[sq * s * kw..(sq + 1) * s * kw],
            v: &kv.1[sq * s * vw..(sq + 1) * s * vw],
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            dk: c.qk_head_dim,
            dv: c.v_head_dim,
            mask,
        }
    }

    /// Forward over a batch: the mean next-token loss and the tape for [`Self::backward`].
    pub fn forward(&self, params: &Params, batch: &Batch) -> (f32, Tape) {
        let c = &self.config;
        let (b, t, d, m) = (batch.b, batch.t, c.hidden_size, c.num_memory_tokens);
        let s = self.rows_per_seq(t);
        let w = |i: usize| &params.data[params.info[i].range.clone()];
        // 1. Embeddings, meta tokens first in every sequence.
        let mut h = Vec::with_capacity(b * s * d);
        let emb = w(self.embed);
        for seq in 0..b {
            if let Some(mi) = self.memory {
                h.extend_from_slice(w(mi));
            }
            for &id in &batch.ids[seq * (t + 1)..seq * (t + 1) + t] {
                h.extend_from_slice(&emb[id as usize * d..(id as usize + 1) * d]);
            }
        }
        let mut kv: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.groups.len()];
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let tape = self.layer_forward(i, params, &mut h, &mut kv, b, s);
            layers.push(tape);
        }
        // 4. Final norm on the real rows, tied output projection, loss.
        let real: Vec<f32> = (0..b)
            .flat_map(|seq| h[(seq * s + m) * d..(seq + 1) * s * d].to_vec())
            .collect();
        let (hn, r_final) = rmsnorm(&real, w(self.final_norm), c.rms_norm_eps);
        let logits = linear(&hn, w(self.head), c.vocab_size);
        let targets = targets(batch);
        let (loss, _) = ops::cross_entropy(&logits, &targets, false);
        (
            loss,
            Tape {
                layers,
                kv,
                h_final: real,
                r_final,
                hn,
                logits,
            },
        )
    }

    fn layer_forward(
        &self,
        i: usize,
        params: &Params,
        h: &mut [f32],
        kv: &mut [(Vec<f32>, Vec<f32>)],
        b: usize,
        s: usize,
    ) -> LayerTape {
        let c = &self.config;
        let (lp, li) = (&self.plan[i], &self.layers[i]);
        let w = |i: usize| &params.data[params.info[i].range.clone()];
        let (d, e, n, r, f) = (
            c.hidden_size,
            c.ssm_width,
            c.mamba_d_state,
            c.mamba_dt_rank,
            c.intermediate_size,
        );
        let (qw, kw, vw) = (c.q_width(), c.k_width(), c.v_width());
        let eps = c.rms_norm_eps;
        let h_in = h.to_vec();
        let (u, r_in) = rmsnorm(h, w(li.input_norm), eps);
        // 1. in_proj, split q [, k, v], x, z; RoPE on q and k.
        let width = c.in_proj_rows(lp.computes_kv);
        let p = linear(&u, w(li.in_proj), width);
        let mut q = ops::cols(&p, width, 0, qw);
        for sq in q.chunks_exact_mut(s * qw) {
            ops::rope_rows(sq, qw, &self.inv_freq, false);
        }
        if lp.computes_kv {
            let mut k = ops::cols(&p, width, qw, kw);
            for sk in k.chunks_exact_mut(s * kw) {
                ops::rope_rows(sk, kw, &self.inv_freq, false);
            }
            kv[lp.kv_group] = (k, ops::cols(&p, width, qw + kw, vw));
        }
        let xz = if lp.computes_kv { qw + kw + vw } else { qw };
        let x = ops::cols(&p, width, xz, e);
        let z = ops::cols(&p, width, xz + e, e);
        drop(p);
        // 2. Attention branch, per sequence.
        let mask = self.mask(lp, s);
        let att = per_seq(b, |sq| {
            ops::attention(&self.seq_attn(&q, &kv[lp.kv_group], &mask, sq, s))
        });
        let (attn_parts, probs): (Vec<_>, Vec<_>) = att.into_iter().unzip();
        let attn = attn_parts.concat();
        // 3. SSM branch: conv + SiLU, x_proj into (δr, B, C), inner norms, Δ, scan, gate.
        let conv_b = li
            .conv_b
            .map(|i| w(i).to_vec())
            .unwrap_or_else(|| vec![0.0; e]);
        let xc_pre = per_seq(b, |sq| {
            ops::conv(&x[sq * s * e..(sq + 1) * s * e], w(li.conv_w), &conv_b)
        })
        .concat();
        let xc: Vec<f32> = xc_pre.iter().map(|&v| act::silu(v)).collect();
        let pw = r + 2 * n;
        let proj = linear(&xc, w(li.x_proj), pw);
        let raw = [
            ops::cols(&proj, pw, 0, r),
            ops::cols(&proj, pw, r, n),
            ops::cols(&proj, pw, r + n, n),
        ];
        let (dbc, inner_r) = match li.inner {
            Some(ws) => {
                let out: Vec<(Vec<f32>, Vec<f32>)> =
                    (0..3).map(|j| rmsnorm(&raw[j], w(ws[j]), eps)).collect();
                let mut it = out.into_iter();
                let (a0, b0, c0) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                ([a0.0, b0.0, c0.0], [a0.1, b0.1, c0.1])
            }
            None => (raw.clone(), [Vec::new(), Vec::new(), Vec::new()]),
        };
        let mut dt_pre = linear(&dbc[0], w(li.dt_w), e);
        for row in dt_pre.chunks_exact_mut(e) {
            add(row, w(li.dt_b));
        }
        let delta: Vec<f32> = dt_pre.iter().map(|&v| act::softplus(v)).collect();
        let a: Vec<f32> = w(li.a_log).iter().map(|v| -v.exp()).collect();
        let ys = per_seq(b, |sq| {
            let (re, rn) = (sq * s * e..(sq + 1) * s * e, sq * s * n..(sq + 1) * s * n);
            ops::scan(&Scan {
                x: &xc[re.clone()],
                delta: &delta[re],
                a: &a,
                b: &dbc[1][rn.clone()],
                c: &dbc[2][rn],
                d: w(li.d),
            })
        })
        .concat();
        let y: Vec<f32> = ys
            .iter()
            .zip(&z)
            .map(|(v, zz)| v * act::silu(*zz))
            .collect();
        // 4. Fuse and project back.
        let (an, r1) = rmsnorm(&attn, w(li.norm1), eps);
        let (bn, r2) = rmsnorm(&y, w(li.norm2), eps);
        let fused: Vec<f32> = an.iter().zip(&bn).map(|(a, b)| (a + b) * 0.5).collect();
        let mix = linear(&fused, w(li.out_proj), d);
        add(h, &mix);
        // MLP.
        let h_mid = h.to_vec();
        let (u2, r_mlp) = rmsnorm(h, w(li.mlp_norm), eps);
        let g = linear(&u2, w(li.gate), f);
        let upv = linear(&u2, w(li.up), f);
        let actv: Vec<f32> = g.iter().zip(&upv).map(|(g, u)| act::silu(*g) * u).collect();
        let out = linear(&actv, w(li.down), d);
        add(h, &out);
        LayerTape {
            h_in,
            r_in,
            u,
            q,
            x,
            z,
            attn,
            probs,
            xc_pre,
            xc,
            raw,
            inner_r,
            dbc,
            dt_pre,
            delta,
            ys,
            y,
            r1,
            r2,
            f: fused,
            h_mid,
            r_mlp,
            u2,
            g,
            upv,
            act: actv,
        }
    }

    /// Adds the gradient of the batch's mean loss to `grad` (laid out as `params.data`).
    pub fn backward(&self, params: &Params, batch: &Batch, tape: &Tape, grad: &mut [f32]) {
        let c = &self.config;
        let (b, t, d, m) = (batch.b, batch.t, c.hidden_size, c.num_memory_tokens);
        let s = self.rows_per_seq(t);
        let w = |i: usize| &params.data[params.info[i].range.clone()];
        let rg = |i: usize| params.info[i].range.clone();
        let (_, dlogits) = ops::cross_entropy(&tape.logits, &targets(batch), true);
        let dlogits = dlogits.expect("asked for the gradient");
        let dhn = linear_backward(
            &tape.hn,
            w(self.head),
            &dlogits,
            c.vocab_size,
            &mut grad[rg(self.head)],
        );
        drop(dlogits);
        let dreal = rmsnorm_backward(
            &tape.h_final,
            w(self.final_norm),
            &tape.r_final,
            &dhn,
            &mut grad[rg(self.final_norm)],
        );
        let mut dh = vec![0.0; b * s * d];
        for seq in 0..b {
            dh[(seq * s + m) * d..(seq + 1) * s * d]
                .copy_from_slice(&dreal[seq * t * d..(seq + 1) * t * d]);
        }
        let mut dkv: Vec<(Vec<f32>, Vec<f32>)> = tape
            .kv
            .iter()
            .map(|(k, v)| (vec![0.0; k.len()], vec![0.0; v.len()]))
            .collect();
        for i in (0..self.layers.len()).rev() {
            self.layer_backward(
                i,
                params,
                &tape.layers[i],
                &tape.kv,
                &mut dkv,
                &mut dh,
                grad,
                b,
                s,
            );
        }
        // 1. Embedding rows and meta tokens.
        for seq in 0..b {
            if let Some(mi) = self.memory {
                add(&mut grad[rg(mi)], &dh[seq * s * d..(seq * s + m) * d]);
            }
            let ge = &mut grad[rg(self.embed)];
            for (j, &id) in batch.ids[seq * (t + 1)..seq * (t + 1) + t]
                .iter()
                .enumerate()
            {
                let row = seq * s + m + j;
                add(
                    &mut ge[id as usize * d..(id as usize + 1) * d],
                    &dh[row * d..(row + 1) * d],
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        i: usize,
        params: &Params,
        tp: &LayerTape,
        kv: &[(Vec<f32>, Vec<f32>)],
        dkv: &mut [(Vec<f32>, Vec<f32>)],
        dh: &mut [f32],
        grad: &mut [f32],
        b: usize,
        s: usize,
    ) {
        let c = &self.config;
        let (lp, li) = (&self.plan[i], &self.layers[i]);
        let w = |i: usize| &params.data[params.info[i].range.clone()];
        let rg = |i: usize| -> Range<usize> { params.info[i].range.clone() };
        let (d, e, n, r, f) = (
            c.hidden_size,
            c.ssm_width,
            c.mamba_d_state,
            c.mamba_dt_rank,
            c.intermediate_size,
        );
        let (qw, kw, vw) = (c.q_width(), c.k_width(), c.v_width());
        // MLP: h += down(silu(g) ⊙ up).
        let dact = linear_backward(&tp.act, w(li.down), dh, d, &mut grad[rg(li.down)]);
        let mut dg = vec![0.0; dact.len()];
        let mut dup = vec![0.0; dact.len()];
        for j in 0..dact.len() {
            dg[j] = dact[j] * tp.upv[j] * ops::silu_grad(tp.g[j]);
            dup[j] = dact[j] * act::silu(tp.g[j]);
        }
        drop(dact);
        let mut du2 = linear_backward(&tp.u2, w(li.gate), &dg, f, &mut grad[rg(li.gate)]);
        add(
            &mut du2,
            &linear_backward(&tp.u2, w(li.up), &dup, f, &mut grad[rg(li.up)]),
        );
        add(
            dh,
            &rmsnorm_backward(
                &tp.h_mid,
                w(li.mlp_norm),
                &tp.r_mlp,
                &du2,
                &mut grad[rg(li.mlp_norm)],
            ),
        );
        // Fusion: h += out_proj((norm1(attn) + norm2(y)) / 2).
        let mut df = linear_backward(&tp.f, w(li.out_proj), dh, d, &mut grad[rg(li.out_proj)]);
        df.iter_mut().for_each(|v| *v *= 0.5);
        let dattn = rmsnorm_backward(&tp.attn, w(li.norm1), &tp.r1, &df, &mut grad[rg(li.norm1)]);
        let dy = rmsnorm_backward(&tp.y, w(li.norm2), &tp.r2, &df, &mut grad[rg(li.norm2)]);
        drop(df);
        // SSM branch, from the gate back to x and z.
        let mut dys = vec![0.0; dy.len()];
        let mut dz = vec![0.0; dy.len()];
        for j in 0..dy.len() {
            dys[j] = dy[j] * act::silu(tp.z[j]);
            dz[j] = dy[j] * tp.ys[j] * ops::silu_grad(tp.z[j]);
        }
        let a: Vec<f32> = w(li.a_log).iter().map(|v| -v.exp()).collect();
        let sg = per_seq(b, |sq| {
            let (re, rn) = (sq * s * e..(sq + 1) * s * e, sq * s * n..(sq + 1) * s * n);
            let sc = Scan {
                x: &tp.xc[re.clone()],
                delta: &tp.delta[re.clone()],
                a: &a,
                b: &tp.dbc[1][rn.clone()],
                c: &tp.dbc[2][rn],
                d: w(li.d),
            };
            ops::scan_backward(&sc, &dys[re])
        });
        let (mut dxc, mut ddelta, mut dbm, mut dcm) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for g in sg {
            dxc.extend_from_slice(&g.x);
            ddelta.extend_from_slice(&g.delta);
            dbm.extend_from_slice(&g.b);
            dcm.extend_from_slice(&g.c);
            add(&mut grad[rg(li.d)], &g.d);
            // A = −exp(A_log): dA_log = dA · A.
            let ga = &mut grad[rg(li.a_log)];
            for ((o, da), av) in ga.iter_mut().zip(&g.a).zip(&a) {
                *o += da * av;
            }
        }
        // Δ = softplus(dt_proj(δr) + bias).
        let ddt: Vec<f32> = ddelta
            .iter()
            .zip(&tp.dt_pre)
            .map(|(g, x)| g * ops::sigmoid(*x))
            .collect();
        {
            let gb = &mut grad[rg(li.dt_b)];
            for row in ddt.chunks_exact(e) {
                add(gb, row);
            }
        }
        let ddr = linear_backward(&tp.dbc[0], w(li.dt_w), &ddt, e, &mut grad[rg(li.dt_w)]);
        let mut dparts = [ddr, dbm, dcm];
        if let Some(ws) = li.inner {
            for j in 0..3 {
                dparts[j] = rmsnorm_backward(
                    &tp.raw[j],
                    w(ws[j]),
                    &tp.inner_r[j],
                    &dparts[j],
                    &mut grad[rg(ws[j])],
                );
            }
        }
        let pw = r + 2 * n;
        let mut dproj = vec![0.0; tp.xc.len() / e * pw];
        ops::put_cols(&mut dproj, pw, 0, &dparts[0], r);
        ops::put_cols(&mut dproj, pw, r, &dparts[1], n);
        ops::put_cols(&mut dproj, pw, r + n, &dparts[2], n);
        add(
            &mut dxc,
            &linear_backward(&tp.xc, w(li.x_proj), &dproj, pw, &mut grad[rg(li.x_proj)]),
        );
        let dxc_pre: Vec<f32> = dxc
            .iter()
            .zip(&tp.xc_pre)
            .map(|(g, x)| g * ops::silu_grad(*x))
            .collect();
        let conv_b = li
            .conv_b
            .map(|i| w(i).to_vec())
            .unwrap_or_else(|| vec![0.0; e]);
        let cg = per_seq(b, |sq| {
            let re = sq * s * e..(sq + 1) * s * e;
            let (mut gw, mut gb) = (vec![0.0; e * c.mamba_d_conv], vec![0.0; conv_b.len()]);
            let dx = ops::conv_backward(
                &tp.x[re.clone()],
                w(li.conv_w),
                &dxc_pre[re],
                &mut gw,
                &mut gb,
            );
            (dx, gw, gb)
        });
        let mut dx = Vec::with_capacity(tp.x.len());
        for (gx, gw, gb) in cg {
            dx.extend_from_slice(&gx);
            add(&mut grad[rg(li.conv_w)], &gw);
            if let Some(bi) = li.conv_b {
                add(&mut grad[rg(bi)], &gb);
            }
        }
        // Attention branch, into q and the group's K/V.
        let mask = self.mask(lp, s);
        let ag = per_seq(b, |sq| {
            let at = self.seq_attn(&tp.q, &kv[lp.kv_group], &mask, sq, s);
            let (mut gq, gk, gv) =
                ops::attention_backward(&at, &tp.probs[sq], &dattn[sq * s * e..(sq + 1) * s * e]);
            ops::rope_rows(&mut gq, qw, &self.inv_freq, true);
            (gq, gk, gv)
        });
        let mut dq = Vec::with_capacity(tp.q.len());
        {
            let (dk, dv) = &mut dkv[lp.kv_group];
            for (sq, (gq, gk, gv)) in ag.into_iter().enumerate() {
                dq.extend_from_slice(&gq);
                add(&mut dk[sq * s * kw..(sq + 1) * s * kw], &gk);
                add(&mut dv[sq * s * vw..(sq + 1) * s * vw], &gv);
            }
        }
        // in_proj: assemble the gradient of p = [q, (k, v), x, z].
        let width = c.in_proj_rows(lp.computes_kv);
        let rows = tp.u.len() / d;
        let mut dp = vec![0.0; rows * width];
        ops::put_cols(&mut dp, width, 0, &dq, qw);
        let xz = if lp.computes_kv { qw + kw + vw } else { qw };
        if lp.computes_kv {
            // Every consumer of the group has added its part by now (later layers ran first).
            let (dk, dv) = &mut dkv[lp.kv_group];
            for sk in dk.chunks_exact_mut(s * kw) {
                ops::rope_rows(sk, kw, &self.inv_freq, true);
            }
            ops::put_cols(&mut dp, width, qw, dk, kw);
            ops::put_cols(&mut dp, width, qw + kw, dv, vw);
        }
        ops::put_cols(&mut dp, width, xz, &dx, e);
        ops::put_cols(&mut dp, width, xz + e, &dz, e);
        let du = linear_backward(&tp.u, w(li.in_proj), &dp, width, &mut grad[rg(li.in_proj)]);
        add(
            dh,
            &rmsnorm_backward(
                &tp.h_in,
                w(li.input_norm),
                &tp.r_in,
                &du,
                &mut grad[rg(li.input_norm)],
            ),
        );
    }

    /// The mean loss and its gradient (a fresh buffer laid out as `params.data`).
    pub fn loss_and_grad(&self, params: &Params, batch: &Batch) -> (f32, Vec<f32>) {
        let (loss, tape) = self.forward(params, batch);
        let mut grad = vec![0.0; params.len()];
        self.backward(params, batch, &tape, &mut grad);
        (loss, grad)
    }
}

fn targets(batch: &Batch) -> Vec<u32> {
    (0..batch.b)
        .flat_map(|s| batch.ids[s * (batch.t + 1) + 1..(s + 1) * (batch.t + 1)].to_vec())
        .collect()
}
