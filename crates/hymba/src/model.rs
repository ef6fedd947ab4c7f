//! The Hymba forward pass (spec §3), in f32 arithmetic over weights in their stored precision.
//!
//! `Model::forward` runs new tokens of one sequence against its [`Cache`]: a prompt (prefill,
//! possibly in chunks) or one token at a time (decode); both go through the same code, so
//! decoding is a prefill of one row. `Model::forward_uncached` is the official no-cache forward
//! (meta tokens prepended, blank state) and serves as the reference in tests.

use crate::cache::{Cache, Kv, KvDtype, KvRows, KvStore, KvView, LayerState, MetaPrefix};
use crate::config::{AttnKind, Config, KvGroup, LayerPlan};
use crate::error::{Error, Result};
use crate::mask::{sees, DecodeWindow};
use crate::tensor::{Dtype, TensorStore};
use crate::weights::{LayerWeights, Weights};
use half::bf16;
use hymba_kernels::attention::{attention, AttnShape, KeyPos, KvBlock, KvElem};
use hymba_kernels::{act, conv::causal_conv, matmul, norm, on_pool, rope, scan};
use rayon::prelude::*;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Which rows of a forward call get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last row (generation).
    Last,
    /// Every row (scoring, `hymba logits`).
    All,
}

/// One sequence's part of a batched forward call.
pub struct Step<'a> {
    pub cache: &'a mut Cache,
    /// New tokens: a prompt (or a chunk of one) or a single decoded token.
    pub ids: &'a [u32],
    pub logits: Logits,
    pub window: DecodeWindow,
}

/// A sequence's rows inside the layers.
struct Segment<'a> {
    /// Its rows of the batch: `start..start + len`.
    start: usize,
    len: usize,
    /// Absolute position of its first row.
    pos0: usize,
    /// Earlier K/V per group (meta prefix, cache store).
    past: Vec<Vec<KvView<'a>>>,
    /// SSM and conv state per layer, updated in place.
    states: &'a mut [LayerState],
    /// Effective sliding window for this call.
    window: usize,
    /// New rows' K/V per group, from the group's producer layer.
    new_kv: Vec<KvRows>,
}

pub struct Model {
    pub config: Config,
    pub plan: Vec<LayerPlan>,
    pub groups: Vec<KvGroup>,
    pub weights: Weights,
    /// RoPE inverse frequencies [dqk / 2]
    inv_freq: Vec<f32>,
    /// The element type of every K/V cache this model makes.
    kv_dtype: KvDtype,
    /// Computed on first use, so choosing the K/V type after loading costs nothing.
    meta: OnceLock<Arc<MetaPrefix>>,
}

/// A sequence's cached K/V blocks (`past`, each taken as `T` by `as_t`) followed by this call's
/// new rows (`k`, `v`, from position `pos0`).
fn with_new_rows<'a, T: KvElem>(
    past: &[KvView<'a>],
    as_t: fn(&KvView<'a>) -> Option<KvBlock<'a, T>>,
    k: &'a [T],
    v: &'a [T],
    kw: usize,
    pos0: usize,
) -> Vec<KvBlock<'a, T>> {
    let mut blocks: Vec<KvBlock<T>> = past.iter().map(|b| as_t(b).expect("caches were checked to hold the model's K/V type")).collect();
    blocks.push(KvBlock::row_major(k, v, kw, KeyPos::Contiguous(pos0)));
    blocks
}

/// Columns `a..a + w` of every row of a `[t, width]` matrix.
fn columns(m: &[f32], width: usize, a: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.len() / width.max(1) * w);
    for r in m.chunks_exact(width) {
        out.extend_from_slice(&r[a..a + w]);
    }
    out
}

impl Model {
    /// Loads `dir/config.json` and the weights beside it, then computes the meta-token prefix.
    pub fn load(dir: &Path) -> Result<Model> {
        Model::load_quantized(dir, None)
    }

    /// Loads and, when `quant` is Q8_0 or Q4_0, quantizes the large matrices (see
    /// [`crate::tensor::is_quantizable`]); a pre-quantized checkpoint loads as it is.
    pub fn load_quantized(dir: &Path, quant: Option<Dtype>) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found")));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let mut store = TensorStore::open(dir)?;
        if let Some(q) = quant {
            store.quantize(q);
        }
        Model::from_store(config, store)
    }

    /// The model over `store`'s tensors. Where the matrix products run faster on panels (AVX2),
    /// the bf16 matrices are rearranged into them here, keeping their precision.
    pub fn from_store(config: Config, mut store: TensorStore) -> Result<Model> {
        if hymba_kernels::matmul::panels_pay() {
            store.pack_panels();
        }
        let (plan, groups) = config.plan();
        let weights = Weights::load(&config, &plan, store)?;
        let inv_freq = rope::inv_freq(config.rope_base(), config.qk_head_dim);
        Ok(Model { config, plan, groups, weights, inv_freq, kv_dtype: KvDtype::F32, meta: OnceLock::new() })
    }

    /// The model with K/V caches held in `dtype` (see [`KvDtype`]); the meta prefix is computed
    /// in it. Caches made before do not fit the returned model.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Model {
        if dtype != self.kv_dtype {
            self.kv_dtype = dtype;
            self.meta = OnceLock::new();
        }
        self
    }

    /// The shared meta prefix, computed the first time it is asked for (the first
    /// [`Model::new_cache`] or [`Model::meta_prefix`]; not from inside a rayon task, which could
    /// re-enter the computation on the same thread).
    fn meta(&self) -> &Arc<MetaPrefix> {
        self.meta.get_or_init(|| Arc::new(on_pool(|| self.compute_meta_prefix())))
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// The meta tokens' K/V and recurrent state: the same for every sequence (spec §5).
    fn compute_meta_prefix(&self) -> MetaPrefix {
        let m = self.config.num_memory_tokens;
        let mut states = self.blank_states();
        let mut h = self.weights.memory_tokens.clone();
        let rows = if m == 0 {
            vec![KvRows::default(); self.groups.len()]
        } else {
            let mut seg = [self.blank_segment(m, &mut states)];
            self.layers(&mut h, &mut seg, None);
            let [seg] = seg;
            seg.new_kv
        };
        let kv = rows
            .iter()
            .map(|r| {
                let mut kv = self.new_kv(m);
                kv.k.extend(&r.k);
                kv.v.extend(&r.v);
                kv
            })
            .collect();
        MetaPrefix { len: m, kv, states }
    }

    /// Empty K/V rows of one group, up to `max` of them.
    fn new_kv(&self, max: usize) -> Kv {
        let c = &self.config;
        Kv::new(c.num_key_value_heads, c.qk_head_dim, c.v_head_dim, max, self.kv_dtype)
    }

    /// A sequence that starts from nothing (not even the meta prefix): `len` rows from
    /// position 0.
    fn blank_segment<'a>(&self, len: usize, states: &'a mut [LayerState]) -> Segment<'a> {
        let past = vec![Vec::new(); self.groups.len()];
        Segment { start: 0, len, pos0: 0, past, states, window: self.window(DecodeWindow::Trained, false), new_kv: Vec::new() }
    }

    fn blank_states(&self) -> Vec<LayerState> {
        let c = &self.config;
        (0..c.num_hidden_layers).map(|_| LayerState::zeros(c.ssm_width, c.mamba_d_state, c.mamba_d_conv)).collect()
    }

    /// A new sequence: starts from the meta prefix, positions continue at M.
    pub fn new_cache(&self) -> Cache {
        let w = self.config.sliding_window.unwrap_or(0);
        let kv = self
            .groups
            .iter()
            .map(|g| match g.attn {
                AttnKind::Global => KvStore::Global { kv: self.new_kv(usize::MAX), start: self.meta().len },
                // A query sees itself and the W tokens before it; its own row comes from the
                // call's new rows, so the ring keeps only the W past tokens.
                AttnKind::Window => KvStore::Window { kv: self.new_kv(w), pos: Vec::new(), cap: w },
            })
            .collect();
        let meta = self.meta().clone();
        Cache { pos: meta.len, states: meta.states.clone(), meta, kv }
    }

    /// A cache holding `n` tokens of zero K/V, its buffers sized exactly as `n` real tokens
    /// would size them, without running the model: for memory accounting (`hymba inspect`).
    pub fn cache_with_placeholder_tokens(&self, n: usize) -> Cache {
        let mut cache = self.new_cache();
        let (kw, vw) = (self.config.k_width(), self.config.v_width());
        // In bounded steps so a long context never needs one huge temporary.
        let step = 256;
        let zeros = KvRows { k: vec![0.0; step * kw], v: vec![0.0; step * vw] };
        let mut done = 0;
        while done < n {
            let k = step.min(n - done);
            let rows = KvRows { k: zeros.k[..k * kw].to_vec(), v: zeros.v[..k * vw].to_vec() };
            for store in cache.kv.iter_mut() {
                store.append(&rows, cache.pos, kw, vw);
            }
            cache.pos += k;
            done += k;
        }
        cache
    }

    /// The meta prefix every sequence shares (computed now if it was not yet).
    pub fn meta_prefix(&self) -> &MetaPrefix {
        self.meta()
    }

    fn window(&self, mode: DecodeWindow, single_token_step: bool) -> usize {
        let w = self.config.sliding_window.unwrap_or(usize::MAX);
        match mode {
            DecodeWindow::Official if single_token_step => w.saturating_sub(1),
            _ => w,
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Input("no input tokens".into()));
        }
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= self.config.vocab_size) {
            return Err(Error::Input(format!(
                "token id {id} at index {i} is out of range: the vocabulary has {} tokens",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    fn embed(&self, ids: &[u32], h: &mut Vec<f32>) {
        let d = self.config.hidden_size;
        let start = h.len();
        h.resize(start + ids.len() * d, 0.0);
        let embed = self.weights.embed.mat();
        for (row, &id) in h[start..].chunks_exact_mut(d).zip(ids) {
            embed.row_f32(id as usize, row);
        }
    }

    /// Runs `ids` of one sequence after what `cache` holds and returns logits `[rows, V]`.
    /// `window` matters only for a single-token step: see [`DecodeWindow`]. On error the cache
    /// is unchanged.
    pub fn forward(&self, cache: &mut Cache, ids: &[u32], logits: Logits, window: DecodeWindow) -> Result<Vec<f32>> {
        let mut out = self.forward_batch(&mut [Step { cache, ids, logits, window }])?;
        Ok(out.pop().expect("one step, one result"))
    }

    /// Runs one step of several sequences together: their rows share every matrix product (one
    /// pass over the weights for the whole batch) while attention and the SSM run per sequence
    /// on its own cache. Returns each step's logits. On error no cache is changed.
    pub fn forward_batch(&self, steps: &mut [Step]) -> Result<Vec<Vec<f32>>> {
        on_pool(|| self.forward_batch_here(steps))
    }

    fn forward_batch_here(&self, steps: &mut [Step]) -> Result<Vec<Vec<f32>>> {
        for s in steps.iter() {
            self.check_ids(s.ids)?;
            if s.cache.kv_dtype() != self.kv_dtype {
                return Err(Error::Input(format!(
                    "the cache holds {:?} K/V but the model runs with {:?}: make caches with this model",
                    s.cache.kv_dtype(),
                    self.kv_dtype
                )));
            }
        }
        let mut h = Vec::new();
        for s in steps.iter() {
            self.embed(s.ids, &mut h);
        }
        let mut start = 0;
        let mut segs: Vec<Segment> = steps
            .iter_mut()
            .map(|s| {
                let single = s.ids.len() == 1 && !s.cache.is_empty();
                let window = self.window(s.window, single);
                let Cache { meta, pos, kv, states } = &mut *s.cache;
                let past = (0..self.groups.len())
                    .map(|g| {
                        let mut b = Vec::with_capacity(2);
                        if meta.len > 0 {
                            b.push(meta.kv[g].block(KeyPos::Contiguous(0)));
                        }
                        b.push(kv[g].block());
                        b
                    })
                    .collect();
                let seg = Segment { start, len: s.ids.len(), pos0: *pos, past, states, window, new_kv: Vec::new() };
                start += s.ids.len();
                seg
            })
            .collect();
        self.layers(&mut h, &mut segs, None);
        let new_kv: Vec<Vec<KvRows>> = segs.into_iter().map(|s| s.new_kv).collect();
        let (kw, vw) = (self.config.k_width(), self.config.v_width());
        for (s, rows) in steps.iter_mut().zip(&new_kv) {
            for (store, r) in s.cache.kv.iter_mut().zip(rows) {
                store.append(r, s.cache.pos, kw, vw);
            }
            s.cache.pos += s.ids.len();
        }
        // One output projection for every requested row of the batch.
        let d = self.config.hidden_size;
        let (mut rows, mut counts) = (Vec::new(), Vec::new());
        let mut start = 0;
        for s in steps.iter() {
            let end = start + s.ids.len();
            let first = if s.logits == Logits::All { start } else { end - 1 };
            rows.extend_from_slice(&h[first * d..end * d]);
            counts.push(end - first);
            start = end;
        }
        let all = self.logits(&rows);
        let v = self.config.vocab_size;
        let mut out = Vec::with_capacity(steps.len());
        let mut at = 0;
        for n in counts {
            out.push(all[at * v..(at + n) * v].to_vec());
            at += n;
        }
        Ok(out)
    }

    /// The official no-cache forward: meta tokens prepended, blank state; logits for every real
    /// position. The reference the cached path is tested against.
    pub fn forward_uncached(&self, ids: &[u32]) -> Result<Vec<f32>> {
        on_pool(|| Ok(self.logits(&self.hidden_uncached(ids, None)?)))
    }

    /// Per-layer inputs over meta + real rows (`[L + 1][M + n, d]`, the last entry after the
    /// final norm), as the official `output_hidden_states` gives them. For debugging.
    pub fn hidden_states_uncached(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut hs = Vec::new();
        on_pool(|| self.hidden_uncached(ids, Some(&mut hs)))?;
        let last = hs.last_mut().expect("the trace ends with the final hidden state");
        norm::rmsnorm_inplace(last, &self.weights.final_norm, self.config.rms_norm_eps);
        Ok(hs)
    }

    /// Hidden rows of the real tokens before the final norm, from a blank state.
    fn hidden_uncached(&self, ids: &[u32], trace: Option<&mut Vec<Vec<f32>>>) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let d = self.config.hidden_size;
        let m = self.config.num_memory_tokens;
        let mut h = self.weights.memory_tokens.clone();
        self.embed(ids, &mut h);
        let mut states = self.blank_states();
        let mut seg = [self.blank_segment(m + ids.len(), &mut states)];
        self.layers(&mut h, &mut seg, trace);
        Ok(h.split_off(m * d))
    }

    /// Final norm and output projection of hidden rows (`[t, d]`, before the norm).
    fn logits(&self, rows: &[f32]) -> Vec<f32> {
        let d = self.config.hidden_size;
        let mut x = vec![0.0; rows.len()];
        norm::rmsnorm(rows, &self.weights.final_norm, self.config.rms_norm_eps, &mut x);
        let mut out = vec![0.0; rows.len() / d * self.config.vocab_size];
        matmul(&x, self.weights.output().mat(), &mut out);
        out
    }

    /// Spec §3 step 3 for every layer, over the rows `h` of every segment. Each segment's new
    /// K/V rows are left in its `new_kv` for the caller to store. When `trace` is given, it
    /// receives every layer's input and the final output.
    fn layers(&self, h: &mut [f32], segs: &mut [Segment], mut trace: Option<&mut Vec<Vec<f32>>>) {
        let c = &self.config;
        for s in segs.iter_mut() {
            s.new_kv = vec![KvRows::default(); self.groups.len()];
        }
        let mut u = vec![0.0; h.len()];
        for (i, lw) in self.weights.layers.iter().enumerate() {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(h.to_vec());
            }
            norm::rmsnorm(h, &lw.input_norm, c.rms_norm_eps, &mut u);
            let mixed = self.mixer(i, lw, &u, segs);
            for (a, b) in h.iter_mut().zip(&mixed) {
                *a += b;
            }
            norm::rmsnorm(h, &lw.mlp_norm, c.rms_norm_eps, &mut u);
            let mlp = self.mlp(lw, &u);
            for (a, b) in h.iter_mut().zip(&mlp) {
                *a += b;
            }
        }
        if let Some(tr) = trace {
            tr.push(h.to_vec());
        }
    }

    /// The hybrid mixer of layer `i` (spec §3, "Mixer"): in_proj, attention and SSM branches in
    /// parallel, fused by per-channel norms and averaged, then out_proj. Projections run over
    /// all rows at once; attention and the SSM per sequence.
    fn mixer(&self, i: usize, lw: &LayerWeights, u: &[f32], segs: &mut [Segment]) -> Vec<f32> {
        let c = &self.config;
        let lp = &self.plan[i];
        let (t, e) = (u.len() / c.hidden_size, c.ssm_width);
        let (qw, kw, vw) = (c.q_width(), c.k_width(), c.v_width());
        // 1. in_proj, split q [, k, v], x, z.
        let width = c.in_proj_rows(lp.computes_kv);
        let mut p = vec![0.0; t * width];
        matmul(u, lw.in_proj.mat(), &mut p);
        let mut q = columns(&p, width, 0, qw);
        let xz = if lp.computes_kv { qw + kw + vw } else { qw };
        let x = columns(&p, width, xz, e);
        let z = columns(&p, width, xz + e, e);
        let shape = AttnShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            dk: c.qk_head_dim,
            dv: c.v_head_dim,
        };
        let scale = 1.0 / (c.qk_head_dim as f32).sqrt();
        let mut attn_out = vec![0.0; t * e];
        let mut y = vec![0.0; t * e];
        let mut xc = vec![0.0; t * e];
        // Each sequence's rows, split off in order so the sequences can run in parallel (a
        // batched decode step has many small ones). First per sequence: RoPE, the new rows'
        // K/V, and the SSM's causal conv + SiLU (the conv reads the sequence's state).
        let mut parts = Vec::with_capacity(segs.len());
        let (mut q_rest, mut c_rest) = (&mut q[..], &mut xc[..]);
        for s in segs.iter_mut() {
            let (qs, qr) = std::mem::take(&mut q_rest).split_at_mut(s.len * qw);
            let (cs, cr) = std::mem::take(&mut c_rest).split_at_mut(s.len * e);
            (q_rest, c_rest) = (qr, cr);
            parts.push((s, qs, cs));
        }
        parts.into_par_iter().for_each(|(s, qs, cs)| {
            let rows = s.start..s.start + s.len;
            for (row, ps) in qs.chunks_exact_mut(qw).zip(s.pos0..) {
                rope::apply(row, ps, &self.inv_freq);
            }
            if lp.computes_kv {
                let ps = &p[rows.start * width..rows.end * width];
                let mut k = columns(ps, width, qw, kw);
                let mut v = columns(ps, width, qw + kw, vw);
                for (row, pp) in k.chunks_exact_mut(kw).zip(s.pos0..) {
                    rope::apply(row, pp, &self.inv_freq);
                }
                if self.kv_dtype == KvDtype::BF16 {
                    // What the cache will hold, so this call's queries see it too.
                    for x in k.iter_mut().chain(v.iter_mut()) {
                        *x = bf16::from_f32(*x).to_f32();
                    }
                }
                s.new_kv[lp.kv_group] = KvRows { k, v };
            }
            causal_conv(&x[rows.start * e..rows.end * e], &mut s.states[i].conv, &lw.conv_w, &lw.conv_b, cs);
            act::silu_inplace(cs);
        });
        // The SSM's input-dependent parameters, all rows at once (one pass over x_proj and
        // dt_proj for the whole batch).
        let (delta, bm, cm) = self.ssm_params(lw, &xc);
        // Then per sequence: attention and the selective scan, and their fusion.
        let mut fused = vec![0.0; t * e];
        let mut parts = Vec::with_capacity(segs.len());
        let (mut a_rest, mut y_rest, mut f_rest) = (&mut attn_out[..], &mut y[..], &mut fused[..]);
        for s in segs.iter_mut() {
            let (os, or) = std::mem::take(&mut a_rest).split_at_mut(s.len * e);
            let (ys, yr) = std::mem::take(&mut y_rest).split_at_mut(s.len * e);
            let (fs, fr) = std::mem::take(&mut f_rest).split_at_mut(s.len * e);
            (a_rest, y_rest, f_rest) = (or, yr, fr);
            parts.push((s, os, ys, fs));
        }
        let n = c.mamba_d_state;
        parts.into_par_iter().for_each(|(s, out, ys, fs)| {
            let rows = s.start..s.start + s.len;
            let qs = &q[rows.start * qw..rows.end * qw];
            let pos: Vec<usize> = (s.pos0..s.pos0 + s.len).collect();
            // 2. Attention branch over the group's past K/V and this call's rows.
            let (past, cur) = (&s.past[lp.kv_group], &s.new_kv[lp.kv_group]);
            let (kind, m, window) = (lp.attn, c.num_memory_tokens, s.window);
            let visible = move |tq: usize, sk: usize| sees(kind, window, m, tq, sk);
            // 3. SSM branch, beside attention: a core that finishes its share of one takes
            // work from the other.
            let state = &mut s.states[i].ssm;
            let inp = scan::ScanInput {
                x: &xc[rows.start * e..rows.end * e],
                delta: &delta[rows.start * e..rows.end * e],
                a: &lw.a,
                b: &bm[rows.start * n..rows.end * n],
                c: &cm[rows.start * n..rows.end * n],
                d: &lw.d,
            };
            rayon::join(
                || {
                    // The cached blocks and this call's rows, in the cache's element type.
                    match self.kv_dtype {
                        KvDtype::F32 => {
                            let blocks = with_new_rows(past, KvView::f32, &cur.k, &cur.v, kw, s.pos0);
                            attention(qs, &pos, &blocks, shape, scale, &visible, out)
                        }
                        KvDtype::BF16 => {
                            let narrow = |r: &[f32]| -> Vec<bf16> { r.iter().map(|&x| bf16::from_f32(x)).collect() };
                            let (k, v) = (narrow(&cur.k), narrow(&cur.v));
                            let blocks = with_new_rows(past, KvView::bf16, &k, &v, kw, s.pos0);
                            attention(qs, &pos, &blocks, shape, scale, &visible, out)
                        }
                    }
                },
                || {
                    scan::selective_scan(&inp, state, ys);
                    let mut gate = z[rows.start * e..rows.end * e].to_vec();
                    act::silu_inplace(&mut gate);
                    for (v, g) in ys.iter_mut().zip(&gate) {
                        *v *= g;
                    }
                },
            );
            // 4. Fuse, these rows: (norm1(attn) + norm2(y)) / 2.
            norm::rmsnorm(out, &lw.attn_norm, c.rms_norm_eps, fs);
            norm::rmsnorm_inplace(ys, &lw.ssm_norm, c.rms_norm_eps);
            for (f, y) in fs.iter_mut().zip(ys.iter()) {
                *f = (*f + y) * 0.5;
            }
        });
        drop(p);
        // ... then out_proj over all rows.
        let mut out = vec![0.0; t * c.hidden_size];
        matmul(&fused, lw.out_proj.mat(), &mut out);
        out
    }

    /// The Mamba-1 branch's input-dependent parameters (spec §3.3), for rows of conv output
    /// `xc`: x_proj into normed (δr, B, C), then Δ = softplus(dt_proj(δr) + bias). Returns
    /// (Δ, B, C). The conv before and the selective scan after run per sequence in [`Self::mixer`].
    fn ssm_params(&self, lw: &LayerWeights, xc: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = &self.config;
        let (e, n, r) = (c.ssm_width, c.mamba_d_state, c.mamba_dt_rank);
        let t = xc.len() / e;
        let pw = r + 2 * n;
        let mut proj = vec![0.0; t * pw];
        matmul(xc, lw.x_proj.mat(), &mut proj);
        let mut dr = columns(&proj, pw, 0, r);
        let mut bm = columns(&proj, pw, r, n);
        let mut cm = columns(&proj, pw, r + n, n);
        if let Some([wd, wb, wc]) = &lw.inner_norms {
            norm::rmsnorm_inplace(&mut dr, wd, c.rms_norm_eps);
            norm::rmsnorm_inplace(&mut bm, wb, c.rms_norm_eps);
            norm::rmsnorm_inplace(&mut cm, wc, c.rms_norm_eps);
        }
        let mut delta = vec![0.0; t * e];
        matmul(&dr, lw.dt_proj.mat(), &mut delta);
        delta.par_chunks_mut(e).for_each(|row| act::softplus_bias(row, &lw.dt_bias));
        (delta, bm, cm)
    }

    /// Gated MLP: down(silu(gate(x)) ⊙ up(x)).
    fn mlp(&self, lw: &LayerWeights, x: &[f32]) -> Vec<f32> {
        let t = x.len() / self.config.hidden_size;
        let f = self.config.intermediate_size;
        let mut g = vec![0.0; t * f];
        let mut u = vec![0.0; t * f];
        matmul(x, lw.gate.mat(), &mut g);
        matmul(x, lw.up.mat(), &mut u);
        g.par_chunks_mut(f).zip(u.par_chunks(f)).for_each(|(g, u)| act::silu_mul(g, u));
        let mut out = vec![0.0; x.len()];
        matmul(&g, lw.down.mat(), &mut out);
        out
    }
}

/// Parameter counts by the part of the model they belong to.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ParamCounts {
    pub embedding: usize,
    pub meta_tokens: usize,
    /// q, k, v rows of in_proj
    pub attention: usize,
    /// x, z rows of in_proj, conv, x_proj, dt_proj, A, D, inner norms
    pub ssm: usize,
    /// pre-average norms and out_proj
    pub fusion: usize,
    pub mlp: usize,
    /// input, pre-MLP and final norms
    pub norms: usize,
    /// 0 when tied to the embedding
    pub lm_head: usize,
    pub total: usize,
}

impl Model {
    pub fn parameter_counts(&self) -> ParamCounts {
        let c = &self.config;
        let w = &self.weights;
        let d = c.hidden_size;
        let mut p = ParamCounts {
            embedding: w.embed.numel(),
            meta_tokens: w.memory_tokens.len(),
            norms: w.final_norm.len(),
            lm_head: w.lm_head.as_ref().map_or(0, |t| t.numel()),
            ..Default::default()
        };
        for (lw, lp) in w.layers.iter().zip(&self.plan) {
            let qkv = c.q_width() + if lp.computes_kv { c.k_width() + c.v_width() } else { 0 };
            p.attention += qkv * d;
            p.ssm += 2 * c.ssm_width * d
                + lw.conv_w.len()
                + if c.mamba_conv_bias { lw.conv_b.len() } else { 0 }
                + lw.x_proj.numel()
                + lw.dt_proj.numel()
                + lw.dt_bias.len()
                + lw.a.len()
                + lw.d.len()
                + lw.inner_norms.as_ref().map_or(0, |n| n.iter().map(Vec::len).sum());
            p.fusion += lw.attn_norm.len() + lw.ssm_norm.len() + lw.out_proj.numel();
            p.mlp += lw.gate.numel() + lw.up.numel() + lw.down.numel();
            p.norms += lw.input_norm.len() + lw.mlp_norm.len();
        }
        p.total = p.embedding + p.meta_tokens + p.attention + p.ssm + p.fusion + p.mlp + p.norms + p.lm_head;
        p
    }
}

impl Model {
    /// Bytes of weights one decoded token reads: every matrix once, the small vectors, and one
    /// embedding row.
    pub fn weight_bytes_per_token(&self) -> usize {
        let c = &self.config;
        let w = &self.weights;
        let mut b = w.output().nbytes() + w.embed.dtype.nbytes(c.hidden_size) + w.final_norm.len() * 4;
        for l in &w.layers {
            b += [&l.in_proj, &l.x_proj, &l.dt_proj, &l.out_proj, &l.gate, &l.up, &l.down].iter().map(|t| t.nbytes()).sum::<usize>();
            b += 4 * (l.input_norm.len() + l.conv_w.len() + l.conv_b.len() + l.dt_bias.len() + l.a.len() + l.d.len()
                + l.attn_norm.len() + l.ssm_norm.len() + l.mlp_norm.len()
                + l.inner_norms.as_ref().map_or(0, |n| n.iter().map(Vec::len).sum()));
        }
        b
    }
}
