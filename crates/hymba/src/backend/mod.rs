//! The seam between the model's math and the machine it runs on.
//!
//! `model.rs` describes Hymba once, as a sequence of operations at its own granularity (matrix
//! product, RMSNorm, RoPE, the causal conv, the selective scan, attention with its mask as data,
//! the fusion of the two branches, the MLP's activation); a [`Backend`] carries them out. The
//! backend owns the weights' layout (the CPU's bf16 panels; device memory on a GPU), the
//! activation buffers, and how work is spread over threads or streams. The model never sees a
//! thread, a pointer or a device.
//!
//! [`Cpu`] is the first backend: the kernels of `hymba-kernels` on rayon's pool.

pub mod cpu;
pub mod cuda;

pub use cpu::Cpu;
pub use cuda::Cuda;

use crate::cache::KvDtype;
use crate::config::AttnKind;
use crate::error::Result;
use crate::mask::Mask;
use crate::sample::Draw;
use crate::tensor::Tensor;
use std::ops::Range;

/// Head counts and widths of the attention branch.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// H query heads of `dk`.
    pub q: usize,
    /// Hkv K/V heads: keys of `dk`, values of `dv`.
    pub kv: usize,
    pub dk: usize,
    pub dv: usize,
}

/// Absolute positions of a K/V store's rows.
#[derive(Clone, Copy, Debug)]
pub enum KeyPositions<'a> {
    /// Row `i` is at position `start + i`.
    Contiguous(usize),
    /// A ring: slot `i` holds position `slots[i]` (see [`crate::cache::KvStore`]).
    Ring { slots: &'a [usize] },
}

/// Sizes of a backend's weight matrix, for accounting.
pub trait MatrixInfo {
    fn numel(&self) -> usize;
    /// Bytes held, in the stored precision.
    fn nbytes(&self) -> usize;
    /// Bytes of one row.
    fn row_bytes(&self) -> usize;
}

/// Length of a backend's parameter vector.
pub trait VectorInfo {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the cache needs to know of a backend's K/V rows.
pub trait KvStorage: Clone + Send + Sync {
    /// Rows held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of the rows held.
    fn bytes(&self) -> usize;
    fn dtype(&self) -> KvDtype;
}

/// What the cache needs to know of a backend's recurrent state of one layer.
pub trait RecurrentState: Clone + Send + Sync {
    fn ssm_bytes(&self) -> usize;
    fn conv_bytes(&self) -> usize;
}

/// One sequence's part of a forward call, as the operations see it.
pub struct Seq<'a, B: Backend + 'a> {
    /// Its rows of the call's activations.
    pub rows: Range<usize>,
    /// Absolute position of its first row (meta tokens count).
    pub pos0: usize,
    /// Effective sliding window for this call (see [`crate::mask::DecodeWindow`]).
    pub window: usize,
    /// K/V cached before this call, per K/V group: the meta prefix, then the sequence's store.
    pub past: Vec<Vec<B::KvView<'a>>>,
    /// SSM and conv state per layer, updated in place.
    pub states: &'a mut [B::State],
}

/// The parts of the in_proj output row (spec §3, "Mixer" step 1): q, in a layer that computes
/// its group's K/V then k and v, then the SSM's x (read by the conv, not cut), then the gate z.
#[derive(Clone, Copy, Debug)]
pub struct InProjParts {
    /// Width of the in_proj output row.
    pub width: usize,
    /// q is columns `0..q`, heads of `dk`.
    pub q: usize,
    pub dk: usize,
    /// z is columns `z_at..z_at + e`.
    pub z_at: usize,
    pub e: usize,
    /// Where a K/V-computing layer's k and v are.
    pub kv: Option<KvSplit>,
}

/// Where a layer's new K/V rows are in the in_proj output, and the element type the cache keeps
/// them in (new rows are rounded to it before any query reads them).
#[derive(Clone, Copy, Debug)]
pub struct KvSplit {
    /// First column of k; v follows it.
    pub k_at: usize,
    pub kw: usize,
    pub vw: usize,
    pub dtype: KvDtype,
}

/// The attention branch's inputs for one layer, every sequence's rows together.
pub struct AttnInput<'r, B: Backend> {
    /// `[t, H·dk]`, RoPE applied.
    pub q: &'r B::Rows,
    /// This call's K/V rows of the layer's group: `[t, Hkv·dk]`, `[t, Hkv·dv]`, RoPE applied.
    pub k: &'r B::Rows,
    pub v: &'r B::Rows,
    /// The layer's K/V group: the index into [`Seq::past`].
    pub group: usize,
    pub heads: Heads,
    /// The layer's kind of attention (global or sliding window).
    pub kind: AttnKind,
    /// Meta tokens (always visible).
    pub meta: usize,
    /// The element type the cache holds K/V in (the new rows were rounded to it).
    pub kv_dtype: KvDtype,
}

impl<B: Backend> AttnInput<'_, B> {
    /// The mask of a sequence's queries in this layer.
    pub fn mask(&self, seq: &Seq<B>) -> Mask {
        Mask {
            kind: self.kind,
            window: seq.window,
            meta: self.meta,
        }
    }
}

/// The SSM branch's inputs for one layer (spec §3.3), every sequence's rows together. Its
/// input-dependent parameters come as x_proj's output, raw: the backend norms δr, B and C and
/// makes Δ = softplus(δr · dt_projᵀ + bias) where that costs least (a GPU does it inside the
/// scan's kernel in a decode step, as Mamba's own scan takes Δ's bias and softplus).
pub struct ScanInput<'r, B: Backend> {
    /// Index of the layer, into [`Seq::states`].
    pub layer: usize,
    /// Conv output after SiLU `[t, E]`.
    pub x: &'r B::Rows,
    /// The gate z: columns `z_at..z_at + E` of `z`'s rows, `z_width` wide (in_proj's output,
    /// read where it is).
    pub z: &'r B::Rows,
    pub z_at: usize,
    pub z_width: usize,
    /// x_proj's output `[t, R + 2N]`: δr, B, C.
    pub proj: &'r B::Rows,
    /// R, the rank of δr.
    pub dt_rank: usize,
    /// The RMSNorm scales of δr, B and C, where the layer has them (Hymba's inner norms).
    pub norms: Option<&'r [B::Vector; 3]>,
    pub eps: f32,
    /// dt_proj `[E, R]` and its bias `[E]`.
    pub dt_proj: &'r B::Matrix,
    pub dt_bias: &'r B::Vector,
    /// A = −exp(A_log) `[E, N]`, D `[E]`.
    pub a: &'r B::Vector,
    pub d: &'r B::Vector,
}

/// The fusion's parameters (spec §3.4): the per-channel norm scales of the two branches.
pub struct Fuse<'r, B: Backend> {
    pub attn_norm: &'r B::Vector,
    pub ssm_norm: &'r B::Vector,
    pub eps: f32,
}

/// The operations the model is written in. Shapes are rows × width, row-major, f32; an output
/// buffer is resized by the operation to the shape it produces (its storage is kept between
/// calls, so a forward allocates once per step shape).
pub trait Backend: Send + Sync + Sized + 'static {
    /// A weight matrix `[rows, cols]` in this backend's layout and the tensor's precision.
    type Matrix: MatrixInfo + Send + Sync;
    /// A small parameter vector, in f32.
    type Vector: VectorInfo + Send + Sync;
    /// Activation rows, in f32.
    type Rows: Send + Sync;
    /// One layer's recurrent state (SSM `[E, N]` and conv `[K−1, E]`) of one sequence.
    type State: RecurrentState;
    /// One K/V group's rows: keys of Hkv heads of `dk`, values of Hkv heads of `dv`, written
    /// into numbered slots.
    type Kv: KvStorage;
    /// K/V rows cached earlier (the meta prefix, a sequence's store), with their positions.
    type KvView<'a>: Copy + Send + Sync
    where
        Self: 'a;

    /// Rows of one sequence's prompt a forward takes at once, where more run slower; the model
    /// feeds a longer prompt in parts of this many (llama.cpp's micro-batch). None: any number.
    fn prompt_part(&self) -> Option<usize> {
        None
    }
    /// Runs a forward (`f`, the model's calls of this backend) on the threads this backend
    /// wants it on: by default a thread of rayon's pool (`hymba_kernels::on_pool`).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        hymba_kernels::on_pool(f)
    }
    /// Starts a forward over `seqs` (called once, before the layers), e.g. to copy the rows'
    /// positions to a device once rather than per operation.
    fn begin(&self, _seqs: &[Seq<Self>]) {}
    /// Prepares a weight matrix read by matrix products (e.g. rearranged into panels, or copied
    /// to the device).
    fn matrix(&self, t: Tensor) -> Result<Self::Matrix>;
    /// The gated MLP's gate and up matrices (`glu`'s), prepared together: a backend may lay them
    /// out as one, so that one product computes both.
    fn glu_matrices(&self, gate: Tensor, up: Tensor) -> Result<(Self::Matrix, Self::Matrix)> {
        Ok((self.matrix(gate)?, self.matrix(up)?))
    }
    fn vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    /// Empty K/V rows of one group, room for up to `max` rows.
    fn kv(&self, heads: Heads, max: usize, dtype: KvDtype) -> Self::Kv;
    /// Rows `rows` of this call's keys `k` `[t, Hkv·dk]` and values `v` `[t, Hkv·dv]` into slots
    /// `slot..` (at most one past the last row held: the store grows by appending); their
    /// positions are `first_pos..`.
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        slot: usize,
        first_pos: usize,
        k: &Self::Rows,
        v: &Self::Rows,
        rows: Range<usize>,
    );
    /// Makes K/V writes a backend deferred (to make a step's writes together): the rows they
    /// read from are about to be reused or dropped.
    fn kv_flush(&self) {}
    /// The rows, for attention.
    fn kv_view<'a>(&self, kv: &'a Self::Kv, pos: KeyPositions<'a>) -> Self::KvView<'a>;
    /// A zero recurrent state (a sequence's start).
    fn state(&self, e: usize, n: usize, k: usize) -> Self::State;
    /// An empty activation buffer.
    fn rows(&self) -> Self::Rows;
    /// An empty activation buffer that only matrix products will read (the norms' outputs, the
    /// fusion's, the MLP's activation): a backend may keep such rows in no more precision than
    /// its products take them in (the CUDA backend: the bf16 copies of long prompts' rows).
    fn product_rows(&self) -> Self::Rows {
        self.rows()
    }
    /// Rows from host memory.
    fn upload(&self, host: &[f32], out: &mut Self::Rows);
    /// The rows on the host, as `f` sees them (no copy beyond the device's own).
    fn read<R>(&self, rows: &Self::Rows, f: impl FnOnce(&[f32]) -> R) -> R;
    /// The rows, copied to host memory.
    fn download(&self, rows: &Self::Rows) -> Vec<f32> {
        self.read(rows, |s| s.to_vec())
    }
    /// Ends a forward: the first error of its operations, if any (a device's launch or memory
    /// error); the operations themselves do not fail.
    fn finish(&self) -> Result<()> {
        Ok(())
    }

    /// Appends the embedding rows of `ids` (`table`: `[V, d]`) after the rows `out` holds.
    fn embed(&self, table: &Self::Matrix, ids: &[u32], d: usize, out: &mut Self::Rows);
    /// `y = x · wᵀ`: `x` `[t, cols]`, `y` `[t, rows]`.
    fn matmul(&self, x: &Self::Rows, w: &Self::Matrix, y: &mut Self::Rows);
    /// RMSNorm of each `w.len()`-wide row, in f32.
    fn rmsnorm(&self, x: &Self::Rows, w: &Self::Vector, eps: f32, out: &mut Self::Rows);
    /// The rows in `rows` (ranges of row indices, in order) of `x`, `width` wide.
    fn gather(&self, x: &Self::Rows, width: usize, rows: &[Range<usize>], out: &mut Self::Rows);
    /// Each `width`-wide row of logits `x`'s token by `draws[row]`, as [`crate::sample::draw`]
    /// picks it (temperature 0: the argmax, the first on ties; a NaN wins only as a row's first
    /// value), made where the rows are. One value a row in `out`, the index as f32 (exact:
    /// widths are below 2^24). A draw's running sums may be added in another order than the
    /// host's, so where its variate falls within rounding of a boundary between two tokens,
    /// either may come.
    fn pick(&self, x: &Self::Rows, width: usize, draws: &[Draw], out: &mut Self::Rows);
    /// `h += x · wᵀ`: a residual connection through a projection.
    fn matmul_add(&self, x: &Self::Rows, w: &Self::Matrix, h: &mut Self::Rows);
    /// `h += x · wᵀ`, then `u` = RMSNorm of `h`: a block's residual add and the norm that starts
    /// the next, which a backend may fuse (the CUDA one into the products around it).
    fn matmul_add_norm(
        &self,
        x: &Self::Rows,
        w: &Self::Matrix,
        h: &mut Self::Rows,
        norm: &Self::Vector,
        eps: f32,
        u: &mut Self::Rows,
    ) {
        self.matmul_add(x, w, h);
        self.rmsnorm(h, norm, eps, u);
    }
    /// `out = silu(x · gateᵀ) ⊙ (x · upᵀ)`: the gated MLP's hidden rows.
    fn glu(&self, x: &Self::Rows, gate: &Self::Matrix, up: &Self::Matrix, out: &mut Self::Rows);
    /// The in_proj output `p` cut into the attention's inputs: `q` with RoPE at each sequence's
    /// positions, and in a layer that computes its group's K/V, this call's `k` (RoPE) and `v`,
    /// rounded to the cache's element type. (The SSM's x and z are read where they are.)
    fn split_in_proj(
        &self,
        p: &Self::Rows,
        parts: InProjParts,
        inv_freq: &Self::Vector,
        seqs: &[Seq<Self>],
        q: &mut Self::Rows,
        kv: Option<(&mut Self::Rows, &mut Self::Rows)>,
    );
    /// The depthwise causal conv of columns `from..from + E` of `p` (rows `width` wide), each
    /// sequence from its conv state (updated), then SiLU. `taps` `[K, E]`, `bias` `[E]`.
    ///
    /// It starts the SSM heads' branch: it and the products the model asks for until
    /// `hybrid_heads` (x_proj) read neither q nor K/V, so a backend may run them beside the
    /// attention's (the CUDA backend does, on a second stream of a captured decode step).
    #[allow(clippy::too_many_arguments)]
    fn conv_silu(
        &self,
        p: &Self::Rows,
        width: usize,
        from: usize,
        layer: usize,
        taps: &Self::Vector,
        bias: &Self::Vector,
        seqs: &mut [Seq<Self>],
        out: &mut Self::Rows,
    );
    /// The two heads of the hybrid mixer side by side, then their fusion (spec §3.2–3.4): per
    /// sequence, attention over its past K/V and this call's rows under the layer's mask, and
    /// the selective scan from its SSM state (updated, the scan's parameters made from x_proj's
    /// output first), gated by silu(z); then
    /// `(norm(attn; attn_norm) + norm(y; ssm_norm)) / 2` into `out` `[t, E]`.
    fn hybrid_heads(
        &self,
        attn: &AttnInput<Self>,
        ssm: &ScanInput<Self>,
        fuse: &Fuse<Self>,
        seqs: &mut [Seq<Self>],
        out: &mut Self::Rows,
    );
}
