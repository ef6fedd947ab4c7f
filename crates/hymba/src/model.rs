//! The Hymba forward pass (spec §3), in f32 arithmetic over weights in their stored precision.
//!
//! `Model::forward` runs new tokens of one sequence against its [`Cache`]: a prompt (prefill,
//! possibly in chunks) or one token at a time (decode); both go through the same code, so
//! decoding is a prefill of one row. `Model::forward_uncached` is the official no-cache forward
//! (meta tokens prepended, blank state) and serves as the reference in tests.
//!
//! The math is written once, in [`Net`], as operations of a [`Backend`]; [`Model`] owns the
//! weights prepared for the CPU backend and the caches, and feeds the network each call's rows.

use crate::backend::{
    AttnInput, Backend, Cpu, Fuse, Heads, InProjParts, KeyPositions, KvSplit, MatrixInfo,
    ScanInput, Seq, VectorInfo,
};
use crate::cache::{Cache, KvDtype, KvStore, MetaPrefix};
use crate::config::{AttnKind, Config, KvGroup, LayerPlan};
use crate::error::{Error, Result};
use crate::mask::DecodeWindow;
use crate::sample::Draw;
use crate::tensor::{Dtype, TensorStore};
use crate::weights::{LayerWeights, Weights};
use hymba_kernels::rope;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Which rows of a forward call get logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Logits {
    /// Only the last row (generation).
    Last,
    /// Every row (scoring, `hymba logits`).
    All,
    /// Only the last row's greedy pick, its argmax ([`BatchLogits::pick`]), found where the
    /// logits were made: on a GPU none of them is copied out (a batch of 64 has 8 MB of them).
    Greedy,
    /// Only the last row's token by this draw ([`crate::sample::draw`]), made where the logits
    /// were, as `Greedy`'s pick.
    Sample(Draw),
}

impl Logits {
    /// The draw that picks this step's token where the logits are, if it asks for one.
    fn draw(&self) -> Option<Draw> {
        match *self {
            Logits::Greedy => Some(Draw::GREEDY),
            Logits::Sample(d) => Some(d),
            Logits::Last | Logits::All => None,
        }
    }
}

/// The logits of a batched forward call, kept by the caller from one call to the next: step
/// `i`'s rows (its last, all of them for [`Logits::All`], none for [`Logits::Greedy`] and
/// [`Logits::Sample`]), each `vocab` wide, one after another in one buffer, and the other
/// steps' picks. Reusing it spares a step of many sequences fresh memory for every
/// one of them (at 256 sequences of Hymba's 32001 logits, 32 MB that the allocator handed back
/// to the system after each step and the kernel zeroed again in page faults).
#[derive(Clone, Debug, Default)]
pub struct BatchLogits {
    data: Vec<f32>,
    /// Where each step's rows end, in rows.
    ends: Vec<usize>,
    /// Each step's token, for [`Logits::Greedy`] and [`Logits::Sample`] steps.
    picks: Vec<Option<u32>>,
    vocab: usize,
}

impl BatchLogits {
    /// Steps held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Step `i`'s logits `[rows, vocab]` (no rows for a [`Logits::Greedy`] or [`Logits::Sample`]
    /// step).
    pub fn get(&self, i: usize) -> &[f32] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start * self.vocab..self.ends[i] * self.vocab]
    }

    /// Step `i`'s token where it asked for [`Logits::Greedy`] (the index of its last row's
    /// largest logit, the first on ties, as [`crate::sample::argmax`]) or [`Logits::Sample`].
    pub fn pick(&self, i: usize) -> Option<u32> {
        self.picks[i]
    }
}

/// One sequence's part of a batched forward call.
pub struct Step<'a, B: Backend = Cpu> {
    pub cache: &'a mut Cache<B>,
    /// New tokens: a prompt (or a chunk of one) or a single decoded token.
    pub ids: &'a [u32],
    pub logits: Logits,
    pub window: DecodeWindow,
}

/// A Hymba model on a backend (the CPU unless said otherwise): its weights, prepared for the
/// backend, and the meta prefix every sequence starts from.
pub struct Model<B: Backend = Cpu> {
    pub config: Config,
    pub plan: Vec<LayerPlan>,
    pub groups: Vec<KvGroup>,
    pub weights: Weights<B>,
    backend: B,
    /// RoPE inverse frequencies [dqk / 2]
    inv_freq: B::Vector,
    /// The element type of every K/V cache this model makes.
    kv_dtype: KvDtype,
    /// The K/V type of the checkpoint's own precision (see [`Model::checkpoint_kv_dtype`]).
    checkpoint_kv: KvDtype,
    /// Computed on first use, so choosing the K/V type after loading costs nothing.
    meta: OnceLock<Arc<MetaPrefix<B>>>,
    /// Rows of a lone prompt a forward takes at once (see [`Backend::prompt_part`]).
    prompt_part: Option<usize>,
    /// The activations of the last forward, kept for the next: their buffers are made once per
    /// step shape (a GPU backend replays a step whose buffers have not moved).
    run: std::sync::Mutex<Option<Run<B>>>,
}

/// Every activation of one forward call, `t` rows (llama2.c's RunState): each buffer is made
/// once and reused by every layer.
struct Run<B: Backend> {
    /// The residual stream [t, d]
    h: B::Rows,
    /// Its normed copy, the input of the mixer and of the MLP [t, d]
    u: B::Rows,
    /// in_proj output [t, q (+ k + v) + x + z]; the conv and the scan read x and z there
    p: B::Rows,
    /// Queries [t, H·dqk], conv output after SiLU [t, E]
    q: B::Rows,
    xc: B::Rows,
    /// x_proj output [t, R + 2N]: δr, B, C
    proj: B::Rows,
    /// The fused branches [t, E]
    fused: B::Rows,
    /// The MLP's hidden rows silu(gate) ⊙ up [t, F]
    gate: B::Rows,
    /// Logits [rows asked for, V]
    out: B::Rows,
    /// Their picks, a row each, and the rows copied out where a batch has picked steps
    /// beside others
    picks: B::Rows,
    kept: B::Rows,
    /// This call's K/V rows per group [t, Hkv·dqk], [t, Hkv·dv], from the group's first layer
    k: Vec<B::Rows>,
    v: Vec<B::Rows>,
}

impl<B: Backend> Run<B> {
    fn new(b: &B, groups: usize) -> Self {
        Run {
            h: b.rows(),
            u: b.product_rows(),
            p: b.rows(),
            q: b.rows(),
            xc: b.rows(),
            proj: b.rows(),
            fused: b.product_rows(),
            gate: b.product_rows(),
            out: b.rows(),
            picks: b.rows(),
            kept: b.rows(),
            k: (0..groups).map(|_| b.rows()).collect(),
            v: (0..groups).map(|_| b.rows()).collect(),
        }
    }
}

/// The network of spec §3 over one backend's weights.
struct Net<'m, B: Backend> {
    b: &'m B,
    c: &'m Config,
    plan: &'m [LayerPlan],
    w: &'m Weights<B>,
    inv_freq: &'m B::Vector,
    kv_dtype: KvDtype,
}

impl<B: Backend> Net<'_, B> {
    /// Spec §3 step 3 for every layer, over the rows `run.h` of every sequence. Each group's new
    /// K/V rows are left in `run.k`/`run.v` for the caller to store. When `trace` is given, it
    /// receives every layer's input and the final output.
    fn layers(&self, run: &mut Run<B>, seqs: &mut [Seq<B>], mut trace: Option<&mut Vec<Vec<f32>>>) {
        let (b, eps) = (self.b, self.c.rms_norm_eps);
        b.begin(seqs);
        let layers = &self.w.layers;
        // Each layer: input norm → mixer → MLP norm → MLP. The two residual adds and the norms
        // after them are one backend call each (`matmul_add_norm`, which a backend may fuse):
        // the mixer's add with the MLP's norm, the MLP's with the next layer's input norm.
        if let Some(first) = layers.first() {
            b.rmsnorm(&run.h, &first.input_norm, eps, &mut run.u);
        }
        for (i, lw) in layers.iter().enumerate() {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(b.download(&run.h));
            }
            self.mixer(i, lw, run, seqs);
            self.mlp(lw, layers.get(i + 1).map(|next| &next.input_norm), run);
        }
        if let Some(tr) = trace {
            tr.push(b.download(&run.h));
        }
    }

    /// The hybrid mixer of layer `i` (spec §3, "Mixer") on `run.u`, added to the residual
    /// stream `run.h`: in_proj, the attention and SSM heads side by side, fused by per-channel
    /// norms and averaged, then out_proj; `run.u` left normed for the MLP. Projections run over
    /// all rows at once; attention and the SSM per sequence.
    fn mixer(&self, i: usize, lw: &LayerWeights<B>, run: &mut Run<B>, seqs: &mut [Seq<B>]) {
        let (b, c, lp) = (self.b, self.c, &self.plan[i]);
        let e = c.ssm_width;
        let (qw, kw, vw) = (c.q_width(), c.k_width(), c.v_width());
        // 1. in_proj, split q [, k, v], x, z.
        let width = c.in_proj_rows(lp.computes_kv);
        let xz = if lp.computes_kv { qw + kw + vw } else { qw };
        b.matmul(&run.u, &lw.in_proj, &mut run.p);
        // 2. Attention's inputs: RoPE on q, and on k of a layer that computes the group's K/V.
        let g = lp.kv_group;
        let kv = lp.computes_kv.then_some(KvSplit {
            k_at: qw,
            kw,
            vw,
            dtype: self.kv_dtype,
        });
        let parts = InProjParts {
            width,
            q: qw,
            dk: c.qk_head_dim,
            z_at: xz + e,
            e,
            kv,
        };
        let new_kv = lp.computes_kv.then_some((&mut run.k[g], &mut run.v[g]));
        b.split_in_proj(&run.p, parts, self.inv_freq, seqs, &mut run.q, new_kv);
        // 3. The SSM's input: the causal conv of x from each sequence's state, SiLU; then x_proj
        // into (δr, B, C), from which the scan makes its input-dependent parameters.
        b.conv_silu(
            &run.p,
            width,
            xz,
            i,
            &lw.conv_w,
            &lw.conv_b,
            seqs,
            &mut run.xc,
        );
        b.matmul(&run.xc, &lw.x_proj, &mut run.proj);
        // 2 ∥ 3, then 4: the two heads side by side, fused.
        let heads = Heads {
            q: c.num_attention_heads,
            kv: c.num_key_value_heads,
            dk: c.qk_head_dim,
            dv: c.v_head_dim,
        };
        let attn = AttnInput {
            q: &run.q,
            k: &run.k[g],
            v: &run.v[g],
            group: g,
            heads,
            kind: lp.attn,
            meta: c.num_memory_tokens,
            kv_dtype: self.kv_dtype,
        };
        let ssm = ScanInput {
            layer: i,
            x: &run.xc,
            z: &run.p,
            z_at: parts.z_at,
            z_width: width,
            proj: &run.proj,
            dt_rank: c.mamba_dt_rank,
            norms: lw.inner_norms.as_ref(),
            eps: c.rms_norm_eps,
            dt_proj: &lw.dt_proj,
            dt_bias: &lw.dt_bias,
            a: &lw.a,
            d: &lw.d,
        };
        let fuse = Fuse {
            attn_norm: &lw.attn_norm,
            ssm_norm: &lw.ssm_norm,
            eps: c.rms_norm_eps,
        };
        b.hybrid_heads(&attn, &ssm, &fuse, seqs, &mut run.fused);
        b.matmul_add_norm(
            &run.fused,
            &lw.out_proj,
            &mut run.h,
            &lw.mlp_norm,
            c.rms_norm_eps,
            &mut run.u,
        );
    }

    /// Gated MLP on `run.u`, added to the residual stream `run.h`: down(silu(gate(x)) ⊙ up(x));
    /// then `run.u` normed by `next_norm`, the next layer's input norm (none after the last).
    fn mlp(&self, lw: &LayerWeights<B>, next_norm: Option<&B::Vector>, run: &mut Run<B>) {
        let b = self.b;
        b.glu(&run.u, &lw.gate, &lw.up, &mut run.gate);
        match next_norm {
            Some(norm) => b.matmul_add_norm(
                &run.gate,
                &lw.down,
                &mut run.h,
                norm,
                self.c.rms_norm_eps,
                &mut run.u,
            ),
            None => b.matmul_add(&run.gate, &lw.down, &mut run.h),
        }
    }

    /// Final norm and output projection of rows `rows` of the residual stream, into `run.out`.
    fn logits(&self, run: &mut Run<B>, rows: &[std::ops::Range<usize>]) {
        let b = self.b;
        b.gather(&run.h, self.c.hidden_size, rows, &mut run.u);
        b.rmsnorm(
            &run.u,
            &self.w.final_norm,
            self.c.rms_norm_eps,
            &mut run.fused,
        );
        b.matmul(&run.fused, self.w.output(), &mut run.out);
    }
}

impl Model<Cpu> {
    /// Loads `dir/config.json` and the weights beside it, then computes the meta-token prefix.
    pub fn load(dir: &Path) -> Result<Model> {
        Model::load_quantized(dir, None)
    }

    /// Loads and, when `quant` is Q8_0 or Q4_0, quantizes the large matrices (see
    /// [`crate::tensor::is_quantizable`]); a pre-quantized checkpoint loads as it is.
    pub fn load_quantized(dir: &Path, quant: Option<Dtype>) -> Result<Model> {
        Model::load_on(Cpu, dir, quant)
    }

    /// The model over `store`'s tensors, prepared for the CPU backend (where the matrix products
    /// run faster on panels, the bf16 matrices are rearranged into them, keeping their precision).
    pub fn from_store(config: Config, store: TensorStore) -> Result<Model> {
        Model::on(Cpu, config, store)
    }

    /// Per-layer inputs over meta + real rows (`[L + 1][M + n, d]`, the last entry after the
    /// final norm), as the official `output_hidden_states` gives them. For debugging.
    pub fn hidden_states_uncached(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut hs = Vec::new();
        self.backend.run(|| self.run_uncached(ids, Some(&mut hs)))?;
        let last = hs
            .last_mut()
            .expect("the trace ends with the final hidden state");
        hymba_kernels::norm::rmsnorm_inplace(
            last,
            &self.weights.final_norm,
            self.config.rms_norm_eps,
        );
        Ok(hs)
    }
}

impl<B: Backend> Model<B> {
    /// Loads `dir` (see [`Model::load_quantized`]) onto `backend`.
    pub fn load_on(backend: B, dir: &Path, quant: Option<Dtype>) -> Result<Model<B>> {
        Model::load_on_reporting(backend, dir, quant, &mut |_, _| {})
    }

    /// [`Model::load_on`], telling `layers_done` (done, of how many) as each layer's weights
    /// are prepared, for a progress display.
    pub fn load_on_reporting(
        backend: B,
        dir: &Path,
        quant: Option<Dtype>,
        layers_done: &mut dyn FnMut(usize, usize),
    ) -> Result<Model<B>> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let mut store = TensorStore::open(dir)?;
        if let Some(q) = quant {
            store.quantize(q);
        }
        Model::on_reporting(backend, config, store, layers_done)
    }

    /// The model over `store`'s tensors, prepared for backend `b`.
    pub fn on(backend: B, config: Config, store: TensorStore) -> Result<Model<B>> {
        Model::on_reporting(backend, config, store, &mut |_, _| {})
    }

    fn on_reporting(
        backend: B,
        config: Config,
        store: TensorStore,
        layers_done: &mut dyn FnMut(usize, usize),
    ) -> Result<Model<B>> {
        let (plan, groups) = config.plan();
        let total = plan.len();
        let checkpoint_kv = match store.get("model.embed_tokens.weight").map(|t| t.dtype) {
            Some(Dtype::F32) | None => KvDtype::F32,
            Some(_) => KvDtype::BF16,
        };
        let weights = Weights::load(&backend, &config, &plan, store, &mut |done| {
            layers_done(done, total)
        })?;
        let inv_freq = backend.vector(rope::inv_freq(config.rope_base(), config.qk_head_dim))?;
        Ok(Model {
            config,
            plan,
            groups,
            weights,
            prompt_part: backend.prompt_part(),
            backend,
            inv_freq,
            kv_dtype: KvDtype::F32,
            checkpoint_kv,
            meta: OnceLock::new(),
            run: Default::default(),
        })
    }

    /// Computes the meta prefix now, and reports the first error of the backend (a GPU's):
    /// call before serving.
    pub fn ready(&self) -> Result<()> {
        self.backend.run(|| self.meta());
        self.backend.finish()
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The network over the backend's weights.
    fn net(&self) -> Net<'_, B> {
        Net {
            b: &self.backend,
            c: &self.config,
            plan: &self.plan,
            w: &self.weights,
            inv_freq: &self.inv_freq,
            kv_dtype: self.kv_dtype,
        }
    }

    /// The model with K/V caches held in `dtype` (see [`KvDtype`]); the meta prefix is computed
    /// in it. Caches made before do not fit the returned model.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Model<B> {
        if dtype != self.kv_dtype {
            self.kv_dtype = dtype;
            self.meta = OnceLock::new();
        }
        self
    }

    /// The model feeding a lone sequence's prompt longer than `rows` in parts of `rows` (None:
    /// whole), instead of its backend's choice ([`Backend::prompt_part`]). The parts' logits are
    /// the whole prompt's to the tolerance of chunked prefill, not bit for bit.
    pub fn with_prompt_part(mut self, rows: Option<usize>) -> Model<B> {
        self.prompt_part = rows.filter(|&r| r > 0);
        self
    }

    /// Rows of a lone prompt a forward takes at once (see [`Model::with_prompt_part`]).
    pub fn prompt_part(&self) -> Option<usize> {
        self.prompt_part
    }

    /// The shared meta prefix, computed the first time it is asked for (the first
    /// [`Model::new_cache`] or [`Model::meta_prefix`]; not from inside a rayon task, which could
    /// re-enter the computation on the same thread).
    fn meta(&self) -> &Arc<MetaPrefix<B>> {
        self.meta
            .get_or_init(|| Arc::new(self.backend.run(|| self.compute_meta_prefix())))
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// The K/V type that keeps the checkpoint's own precision: f32 for f32 weights, bf16 for
    /// bf16 (or quantized) ones, as the official code holds K/V in the model's dtype (vLLM's
    /// `auto`). The model's default stays f32 (the parity with the official f32 outputs).
    pub fn checkpoint_kv_dtype(&self) -> KvDtype {
        self.checkpoint_kv
    }

    /// The meta tokens' K/V and recurrent state: the same for every sequence (spec §5).
    fn compute_meta_prefix(&self) -> MetaPrefix<B> {
        let m = self.config.num_memory_tokens;
        let mut states = self.blank_states();
        let mut run = Run::new(&self.backend, self.groups.len());
        if m > 0 {
            self.backend.upload(&self.weights.memory_tokens, &mut run.h);
            let mut seq = [self.blank_seq(m, &mut states)];
            self.net().layers(&mut run, &mut seq, None);
        }
        let kv = run
            .k
            .iter()
            .zip(&run.v)
            .map(|(k, v)| {
                let mut kv = self.new_kv(m);
                self.backend.kv_write(&mut kv, 0, 0, k, v, 0..m);
                kv
            })
            .collect();
        self.backend.kv_flush();
        MetaPrefix { len: m, kv, states }
    }

    /// Empty K/V rows of one group, up to `max` of them.
    fn new_kv(&self, max: usize) -> B::Kv {
        self.backend.kv(self.heads(), max, self.kv_dtype)
    }

    fn heads(&self) -> Heads {
        let c = &self.config;
        Heads {
            q: c.num_attention_heads,
            kv: c.num_key_value_heads,
            dk: c.qk_head_dim,
            dv: c.v_head_dim,
        }
    }

    /// A sequence that starts from nothing (not even the meta prefix): `len` rows from
    /// position 0.
    fn blank_seq<'a>(&self, len: usize, states: &'a mut [B::State]) -> Seq<'a, B> {
        let past = vec![Vec::new(); self.groups.len()];
        Seq {
            rows: 0..len,
            pos0: 0,
            past,
            states,
            window: self.window(DecodeWindow::Trained, false),
        }
    }

    fn blank_states(&self) -> Vec<B::State> {
        let c = &self.config;
        (0..c.num_hidden_layers)
            .map(|_| {
                self.backend
                    .state(c.ssm_width, c.mamba_d_state, c.mamba_d_conv)
            })
            .collect()
    }

    /// A new sequence: starts from the meta prefix, positions continue at M.
    pub fn new_cache(&self) -> Cache<B> {
        let w = self.config.sliding_window.unwrap_or(0);
        let kv = self
            .groups
            .iter()
            .map(|g| match g.attn {
                AttnKind::Global => KvStore::Global {
                    kv: self.new_kv(usize::MAX),
                    start: self.meta().len,
                },
                // A query sees itself and the W tokens before it; its own row comes from the
                // call's new rows, so the ring keeps only the W past tokens.
                AttnKind::Window => KvStore::Window {
                    kv: self.new_kv(w),
                    pos: Vec::new(),
                    cap: w,
                },
            })
            .collect();
        let meta = self.meta().clone();
        Cache {
            pos: meta.len,
            states: meta.states.clone(),
            meta,
            kv,
        }
    }

    /// A cache holding `n` tokens of zero K/V, its buffers sized exactly as `n` real tokens
    /// would size them, without running the model: for memory accounting (`hymba inspect`).
    pub fn cache_with_placeholder_tokens(&self, n: usize) -> Cache<B> {
        let mut cache = self.new_cache();
        let (kw, vw) = (self.config.k_width(), self.config.v_width());
        // In bounded steps so a long context never needs one huge temporary.
        let step = 256;
        let (mut zk, mut zv) = (self.backend.rows(), self.backend.rows());
        self.backend.upload(&vec![0.0; step * kw], &mut zk);
        self.backend.upload(&vec![0.0; step * vw], &mut zv);
        let mut done = 0;
        while done < n {
            let k = step.min(n - done);
            for store in cache.kv.iter_mut() {
                store.append(&self.backend, &zk, &zv, 0..k, cache.pos);
            }
            cache.pos += k;
            done += k;
        }
        self.backend.kv_flush();
        cache
    }

    /// The meta prefix every sequence shares (computed now if it was not yet).
    pub fn meta_prefix(&self) -> &MetaPrefix<B> {
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
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.config.vocab_size)
        {
            return Err(Error::Input(format!(
                "token id {id} at index {i} is out of range: the vocabulary has {} tokens",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Runs `ids` of one sequence after what `cache` holds and returns logits `[rows, V]`.
    /// `window` matters only for a single-token step: see [`DecodeWindow`]. On error the cache
    /// is unchanged. A picked token ([`Logits::Greedy`], [`Logits::Sample`]) comes with no
    /// rows: [`Model::forward_batch_into`] hands it over ([`BatchLogits::pick`]).
    pub fn forward(
        &self,
        cache: &mut Cache<B>,
        ids: &[u32],
        logits: Logits,
        window: DecodeWindow,
    ) -> Result<Vec<f32>> {
        let mut out = self.forward_batch(&mut [Step {
            cache,
            ids,
            logits,
            window,
        }])?;
        Ok(out.pop().expect("one step, one result"))
    }

    /// Runs one step of several sequences together: their rows share every matrix product (one
    /// pass over the weights for the whole batch) while attention and the SSM run per sequence
    /// on its own cache. Returns each step's logits. On error no cache is changed.
    pub fn forward_batch(&self, steps: &mut [Step<B>]) -> Result<Vec<Vec<f32>>> {
        let mut out = BatchLogits::default();
        self.forward_batch_into(steps, &mut out)?;
        Ok((0..out.len()).map(|i| out.get(i).to_vec()).collect())
    }

    /// [`Model::forward_batch`] with the logits written into `out` (its buffer reused: a serving
    /// loop keeps one). On error `out` holds no steps.
    pub fn forward_batch_into(&self, steps: &mut [Step<B>], out: &mut BatchLogits) -> Result<()> {
        out.ends.clear();
        out.picks.clear();
        match (steps, self.prompt_part) {
            ([step], Some(part)) if step.ids.len() > part => {
                self.backend.run(|| self.forward_in_parts(step, part, out))
            }
            (steps, _) => self.backend.run(|| self.forward_batch_here(steps, out)),
        }
    }

    /// One sequence's long prompt in parts of `part` rows, one forward each; the step's logits
    /// are the last part's (all parts' rows, in order, for [`Logits::All`]). Every id is checked
    /// first and the other checks are the first part's, so where the operations themselves do
    /// not fail (the CPU's) an error leaves the cache unchanged.
    fn forward_in_parts(
        &self,
        step: &mut Step<B>,
        part: usize,
        out: &mut BatchLogits,
    ) -> Result<()> {
        self.check_ids(step.ids)?;
        let n = step.ids.len().div_ceil(part);
        let mut rows = Vec::new();
        for (k, ids) in step.ids.chunks(part).enumerate() {
            let logits = match step.logits {
                _ if k + 1 == n => step.logits,
                Logits::All => Logits::All,
                // Only the last part's rows are wanted: the kind that copies out none.
                _ => Logits::Greedy,
            };
            out.ends.clear();
            out.picks.clear();
            let mut one = [Step {
                cache: &mut *step.cache,
                ids,
                logits,
                window: step.window,
            }];
            self.forward_batch_here(&mut one, out)?;
            if step.logits == Logits::All && k + 1 < n {
                rows.extend_from_slice(out.get(0));
            }
        }
        if !rows.is_empty() {
            // The earlier parts' rows before the last's, as one step's.
            rows.extend_from_slice(out.get(0));
            out.ends = vec![rows.len() / out.vocab.max(1)];
            out.data = rows;
        }
        Ok(())
    }

    fn forward_batch_here(&self, steps: &mut [Step<B>], out: &mut BatchLogits) -> Result<()> {
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
        let (b, d) = (&self.backend, self.config.hidden_size);
        // The last forward's buffers when no other call holds them.
        let mut run = self
            .run
            .try_lock()
            .ok()
            .and_then(|mut r| r.take())
            .unwrap_or_else(|| Run::new(b, self.groups.len()));
        b.upload(&[], &mut run.h);
        let ids: Vec<u32> = steps.iter().flat_map(|s| s.ids.iter().copied()).collect();
        b.embed(&self.weights.embed, &ids, d, &mut run.h);
        let mut start = 0;
        let mut seqs: Vec<Seq<B>> = steps
            .iter_mut()
            .map(|s| {
                let single = s.ids.len() == 1 && !s.cache.is_empty();
                let window = self.window(s.window, single);
                let Cache {
                    meta,
                    pos,
                    kv,
                    states,
                } = &mut *s.cache;
                let past = (0..self.groups.len())
                    .map(|g| {
                        let mut views = Vec::with_capacity(2);
                        if meta.len > 0 {
                            views.push(b.kv_view(&meta.kv[g], KeyPositions::Contiguous(0)));
                        }
                        views.push(kv[g].view(b));
                        views
                    })
                    .collect();
                let seq = Seq {
                    rows: start..start + s.ids.len(),
                    pos0: *pos,
                    past,
                    states,
                    window,
                };
                start += s.ids.len();
                seq
            })
            .collect();
        self.net().layers(&mut run, &mut seqs, None);
        let rows: Vec<_> = seqs.iter().map(|s| s.rows.clone()).collect();
        drop(seqs);
        // One output projection for every requested row of the batch.
        let wanted: Vec<_> = steps
            .iter()
            .zip(&rows)
            .map(|(s, r)| {
                if s.logits == Logits::All {
                    r.clone()
                } else {
                    r.end - 1..r.end
                }
            })
            .collect();
        self.net().logits(&mut run, &wanted);
        // Each sequence's new K/V rows into its stores.
        for (s, r) in steps.iter_mut().zip(&rows) {
            for (g, store) in s.cache.kv.iter_mut().enumerate() {
                store.append(b, &run.k[g], &run.v[g], r.clone(), s.cache.pos);
            }
            s.cache.pos += s.ids.len();
        }
        b.kv_flush();
        let v = self.config.vocab_size;
        // Each step's rows among the logits'.
        let mut at = 0;
        let spans: Vec<_> = wanted
            .iter()
            .map(|r| {
                at += r.len();
                at - r.len()..at
            })
            .collect();
        let draws: Vec<Option<Draw>> = steps.iter().map(|s| s.logits.draw()).collect();
        let picked: Vec<bool> = draws.iter().map(Option::is_some).collect();
        let any_picked = picked.contains(&true);
        if any_picked {
            // A draw a row of logits: a step's own on its last row, the argmax on the others
            // (not read).
            let mut each = vec![Logits::Greedy.draw().expect("a draw"); at];
            for (s, d) in spans.iter().zip(&draws) {
                if let Some(d) = d {
                    each[s.end - 1] = *d;
                }
            }
            b.pick(&run.out, v, &each, &mut run.picks);
        }
        // Beside picked steps, the others' rows are gathered so that only they are copied out.
        let mixed = any_picked && picked.contains(&false);
        if mixed {
            let keep: Vec<_> = spans
                .iter()
                .zip(&picked)
                .filter(|(_, &g)| !g)
                .map(|(s, _)| s.clone())
                .collect();
            b.gather(&run.out, v, &keep, &mut run.kept);
        }
        b.finish()?;
        out.vocab = v;
        let mut rows = 0;
        out.ends.extend(spans.iter().zip(&picked).map(|(s, &g)| {
            rows += if g { 0 } else { s.len() };
            rows
        }));
        if any_picked {
            b.read(&run.picks, |p| {
                let pick =
                    |(s, &g): (&std::ops::Range<usize>, &bool)| g.then(|| p[s.end - 1] as u32);
                out.picks.extend(spans.iter().zip(&picked).map(pick))
            });
        } else {
            out.picks.resize(steps.len(), None);
        }
        out.data.clear();
        if rows > 0 {
            let src = if mixed { &run.kept } else { &run.out };
            b.read(src, |all| out.data.extend_from_slice(&all[..rows * v]));
        }
        if let Ok(mut slot) = self.run.try_lock() {
            *slot = Some(run);
        }
        Ok(())
    }

    /// The official no-cache forward: meta tokens prepended, blank state; logits for every real
    /// position. The reference the cached path is tested against.
    pub fn forward_uncached(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.backend.run(|| {
            let n = ids.len();
            let mut run = self.run_uncached(ids, None)?;
            let m = self.config.num_memory_tokens;
            let real = m..m + n;
            self.net().logits(&mut run, std::slice::from_ref(&real));
            self.backend.finish()?;
            Ok(self.backend.download(&run.out))
        })
    }

    /// The layers over meta + real rows from a blank state; the residual stream is left in
    /// `run.h`.
    fn run_uncached(&self, ids: &[u32], trace: Option<&mut Vec<Vec<f32>>>) -> Result<Run<B>> {
        self.check_ids(ids)?;
        let (b, d, m) = (
            &self.backend,
            self.config.hidden_size,
            self.config.num_memory_tokens,
        );
        let mut run = Run::new(b, self.groups.len());
        b.upload(&self.weights.memory_tokens, &mut run.h);
        b.embed(&self.weights.embed, ids, d, &mut run.h);
        let mut states = self.blank_states();
        let mut seq = [self.blank_seq(m + ids.len(), &mut states)];
        self.net().layers(&mut run, &mut seq, trace);
        Ok(run)
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

impl<B: Backend> Model<B> {
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
            let qkv = c.q_width()
                + if lp.computes_kv {
                    c.k_width() + c.v_width()
                } else {
                    0
                };
            p.attention += qkv * d;
            p.ssm += 2 * c.ssm_width * d
                + lw.conv_w.len()
                + if c.mamba_conv_bias {
                    lw.conv_b.len()
                } else {
                    0
                }
                + lw.x_proj.numel()
                + lw.dt_proj.numel()
                + lw.dt_bias.len()
                + lw.a.len()
                + lw.d.len()
                + lw.inner_norms
                    .as_ref()
                    .map_or(0, |n| n.iter().map(|v| v.len()).sum());
            p.fusion += lw.attn_norm.len() + lw.ssm_norm.len() + lw.out_proj.numel();
            p.mlp += lw.gate.numel() + lw.up.numel() + lw.down.numel();
            p.norms += lw.input_norm.len() + lw.mlp_norm.len();
        }
        p.total = p.embedding
            + p.meta_tokens
            + p.attention
            + p.ssm
            + p.fusion
            + p.mlp
            + p.norms
            + p.lm_head;
        p
    }
}

impl<B: Backend> Model<B> {
    /// Bytes of weights one decoded token reads: every matrix once, the small vectors, and one
    /// embedding row.
    pub fn weight_bytes_per_token(&self) -> usize {
        let w = &self.weights;
        let mut b = w.output().nbytes() + w.embed.row_bytes() + w.final_norm.len() * 4;
        for l in &w.layers {
            b += [
                &l.in_proj,
                &l.x_proj,
                &l.dt_proj,
                &l.out_proj,
                &l.gate,
                &l.up,
                &l.down,
            ]
            .iter()
            .map(|t| t.nbytes())
            .sum::<usize>();
            b += 4
                * (l.input_norm.len()
                    + l.conv_w.len()
                    + l.conv_b.len()
                    + l.dt_bias.len()
                    + l.a.len()
                    + l.d.len()
                    + l.attn_norm.len()
                    + l.ssm_norm.len()
                    + l.mlp_norm.len()
                    + l.inner_norms
                        .as_ref()
                        .map_or(0, |n| n.iter().map(|v| v.len()).sum()));
        }
        b
    }
}
