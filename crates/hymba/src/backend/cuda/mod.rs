//! The CUDA backend: weights in their stored precision on the card (f32 or bf16), activations in
//! f32, the K/V stores, SSM and conv states in device memory. Matrix products of few rows run in
//! kernels of our own (GEMV, `gemm_rows`), larger ones through cuBLAS (f32 × f32) or cuBLASLt
//! (bf16 × bf16 with f32 accumulation, see `lt`): activations are rounded to bf16 for a bf16
//! matrix, as the official code computes. Everything else runs in the kernels of `kernels.cu`,
//! compiled by NVRTC when the backend starts.
//!
//! Nothing is linked at build time: the driver, NVRTC and cuBLAS are loaded when a `Cuda` is
//! made, so the same binary runs on machines with and without a GPU. An error of a CUDA call
//! inside a forward is kept (the rest of the step is skipped) and returned by
//! [`Backend::finish`].

mod lt;

use super::{
    AttnInput, Backend, Fuse, Heads, InProjParts, KeyPositions, KvStorage, MatrixInfo,
    RecurrentState, ScanInput, Seq, VectorInfo,
};
use crate::cache::KvDtype;
use crate::error::{Error, Result};
use crate::sample::Draw;
use crate::tensor::{Dtype, Tensor};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig,
};
use hymba_kernels::quant::QK;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// The kernels' source, compiled at run time.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Largest sizes the kernels hold in registers or shared memory.
const MAX_HEAD_DIM: usize = 256;
const MAX_STATE: usize = 32;
const MAX_CONV: usize = 8;

/// The oldest driver API the backend is written against (CUDA 12.0).
const MIN_DRIVER: i32 = 12000;
/// The most floats read back through the kept page-locked buffer (64 MB: a batch of 512
/// sequences' logits); larger reads (every row of a long prompt) are copied as they come.
const HOST_KEEP: usize = 16 << 20;

fn device_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// Compiles the kernels to PTX with NVRTC (no GPU needed: what CI checks): [`KERNELS`], or the
/// file HYMBA_CUDA_KERNELS names (a kernel change tried on a GPU machine without a Rust build;
/// its kernels must keep the names and parameters this module launches them with).
pub fn compile_kernels(arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx> {
    let src = match std::env::var_os("HYMBA_CUDA_KERNELS") {
        Some(p) => std::fs::read_to_string(&p).map_err(|e| {
            Error::Device(format!("HYMBA_CUDA_KERNELS={}: {e}", p.to_string_lossy()))
        })?,
        None => KERNELS.to_string(),
    };
    // SAFETY: only probes whether the shared library loads.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device(
            "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or the `nvidia-cuda-nvrtc` wheel and put its lib folder on LD_LIBRARY_PATH".into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch,
        name: Some("hymba_kernels.cu".into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| Error::Device(format!("the kernels do not compile: {e}")))
}

/// The kernels for `arch`, compiled once a process: NVRTC takes seconds, and a second backend
/// (another model, another test) reuses them.
fn compiled_kernels(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    static COMPILED: Mutex<Vec<(&str, cudarc::nvrtc::Ptx)>> = Mutex::new(Vec::new());
    let mut compiled = COMPILED.lock().expect("compiled kernels");
    if let Some((_, ptx)) = compiled.iter().find(|(a, _)| *a == arch) {
        return Ok(ptx.clone());
    }
    let ptx = compile_kernels(Some(arch))?;
    compiled.push((arch, ptx.clone()));
    Ok(ptx)
}

/// Which CUDA device: `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Option<usize> {
    match s {
        "cuda" => Some(0),
        _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    }
}

/// Keys and values of one source of rows, as the attention kernel takes them (`KvSrc` there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct KvSrc {
    k: u64,
    v: u64,
    pos: u64,
    rows: i32,
    pos0: i32,
    k_stride: i32,
    v_stride: i32,
    bf16: i32,
    pad: i32,
}

// SAFETY: plain data with the layout of the kernel's struct; all zeros is a valid value.
unsafe impl DeviceRepr for KvSrc {}
unsafe impl cudarc::driver::ValidAsZeroBits for KvSrc {}

/// A write of new K/V rows into a store, as `kv_put` takes it (`PutOp` there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PutOp {
    k: u64,
    v: u64,
    dk: u64,
    dv: u64,
    dpos: u64,
    slot: i64,
    rows: i32,
    first_pos: i32,
    kw: i32,
    vw: i32,
    bf16: i32,
    pad: i32,
}

// SAFETY: plain data with the layout of the kernel's struct; all zeros is a valid value.
unsafe impl DeviceRepr for PutOp {}
unsafe impl cudarc::driver::ValidAsZeroBits for PutOp {}

/// Up to three column ranges normed at once, as `rmsnorm_parts` takes them (`NormParts` there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct NormParts {
    w: [u64; 3],
    out: [u64; 3],
    from: [i32; 3],
    d: [i32; 3],
}

// SAFETY: plain data with the layout of the kernel's struct.
unsafe impl DeviceRepr for NormParts {}

/// Where the parts of an in_proj row are, as `split_in_proj` takes them (`InProjParts` there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InProjLayout {
    width: i32,
    qw: i32,
    z_at: i32,
    e: i32,
    kv: i32,
    k_at: i32,
    kw: i32,
    vw: i32,
    dk: i32,
    round: i32,
}

// SAFETY: plain data with the layout of the kernel's struct.
unsafe impl DeviceRepr for InProjLayout {}

/// One sequence of a step, as the kernels take it (`SeqInfo` there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SeqInfo {
    row0: i64,
    len: i32,
    pos0: i32,
    window: i32,
    pad: i32,
}

// SAFETY: plain data with the layout of the kernel's struct; all zeros is a valid value.
unsafe impl DeviceRepr for SeqInfo {}
unsafe impl cudarc::driver::ValidAsZeroBits for SeqInfo {}

/// Device memory of one element type.
#[derive(Clone)]
pub enum DevData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<u16>),
    /// Quantized weights: the quants row-major (`q`: Q8_0's int8, Q4_0's two a byte in the
    /// order `kernels.cu`'s `q4_t` says), and each block of 32's f16 scale, in the same order
    /// (`d`); a matrix's rows are whole blocks.
    Quant {
        kind: Quant,
        q: CudaSlice<u8>,
        d: CudaSlice<u16>,
    },
}

/// The block formats the card multiplies in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Q8_0,
    Q4_0,
}

impl Quant {
    /// Bytes of quants in a block of 32.
    fn block_quants(self) -> usize {
        match self {
            Quant::Q8_0 => QK,
            Quant::Q4_0 => QK / 2,
        }
    }
    /// Its place in the `[Q8_0, Q4_0]` kernel tables (after f32's and bf16's in the GEMV's,
    /// after bf16's in `gemm_rows`').
    fn index(self) -> usize {
        match self {
            Quant::Q8_0 => 0,
            Quant::Q4_0 => 1,
        }
    }
}

impl DevData {
    fn ptr(&self, s: &CudaStream) -> u64 {
        match self {
            DevData::F32(d) => d.device_ptr(s).0,
            DevData::BF16(d) => d.device_ptr(s).0,
            DevData::Quant { q, .. } => q.device_ptr(s).0,
        }
    }

    fn quant(&self) -> Option<Quant> {
        match self {
            DevData::Quant { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// A weight matrix `[rows, cols]` on the card.
pub struct DevMatrix {
    /// Shared where one allocation holds two matrices (the gated MLP's gate and up).
    data: Arc<DevData>,
    /// Where the matrix starts in `data`, elements.
    offset: usize,
    pub rows: usize,
    pub cols: usize,
}

impl MatrixInfo for DevMatrix {
    fn numel(&self) -> usize {
        self.rows * self.cols
    }
    fn nbytes(&self) -> usize {
        self.rows * self.row_bytes()
    }
    fn row_bytes(&self) -> usize {
        self.bytes_at(self.cols) + self.data.quant().map_or(0, |_| 2 * (self.cols / QK))
    }
}

impl DevMatrix {
    /// Bytes of `elems` elements' values (quantized ones: their quants; the scales lie apart,
    /// see [`DevMatrix::scales`]).
    fn bytes_at(&self, elems: usize) -> usize {
        match *self.data {
            DevData::F32(_) => 4 * elems,
            DevData::BF16(_) => 2 * elems,
            DevData::Quant { kind, .. } => elems / QK * kind.block_quants(),
        }
    }

    fn ptr(&self, s: &CudaStream) -> u64 {
        self.data.ptr(s) + self.bytes_at(self.offset) as u64
    }

    /// Where a quantized matrix's scales start (0 for other types).
    fn scales(&self, s: &CudaStream) -> u64 {
        match &*self.data {
            DevData::Quant { d, .. } => d.device_ptr(s).0 + 2 * (self.offset / QK) as u64,
            _ => 0,
        }
    }

    /// The matrix `[self.rows + next.rows, cols]` of both, where `next` follows this one in
    /// the same allocation.
    fn joined(&self, next: &DevMatrix) -> Option<DevMatrix> {
        (Arc::ptr_eq(&self.data, &next.data)
            && next.offset == self.offset + self.numel()
            && next.cols == self.cols)
            .then(|| DevMatrix {
                data: self.data.clone(),
                offset: self.offset,
                rows: self.rows + next.rows,
                cols: self.cols,
            })
    }
}

impl VectorInfo for CudaSlice<f32> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

/// Activation rows on the card: `len` f32 values in a buffer that only grows; and, where the
/// kernel that made them wrote one (`Cuda::copy16`), their bf16 copy for the matrix product that
/// takes them next (`fresh` until the rows are made again). Rows made by a folded norm
/// (`Backend::matmul_add_norm`) hold `h ⊙ w`, with the sums of squares of `h` in `sq`, until a
/// GEMV takes them so or a reader has them scaled (`pending`). Rows made by
/// `Backend::product_rows`, which only matrix products read, may be made as the bf16 copy alone
/// (`only16`, see `Cuda::outputs16`).
#[derive(Default)]
pub struct DevRows {
    buf: Option<CudaSlice<f32>>,
    len: usize,
    half: Option<CudaSlice<u16>>,
    fresh: bool,
    sq: Option<CudaSlice<f32>>,
    pending: Mutex<Option<Pending>>,
    products_only: bool,
    only16: bool,
}

/// A folded norm's scale not yet applied to its rows: `n` sums of squares a row in `DevRows::sq`,
/// rows `d` wide.
#[derive(Clone, Copy)]
struct Pending {
    n: usize,
    d: usize,
    eps: f32,
}

/// The kernel's `NormFold`: a GEMV's part in a folded norm (see kernels.cu); zeros: none.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NormFold {
    w: u64,
    u: u64,
    sq: u64,
    sq_in: u64,
    sq_n: i32,
    eps: f32,
}

// SAFETY: plain data with the layout of the kernel's struct; all zeros is a valid value.
unsafe impl DeviceRepr for NormFold {}

/// One layer's SSM state `[E, N]` and conv state `[K−1, E]` of one sequence.
#[derive(Clone)]
pub struct DevState {
    ssm: CudaSlice<f32>,
    conv: CudaSlice<f32>,
}

impl RecurrentState for DevState {
    fn ssm_bytes(&self) -> usize {
        self.ssm.len() * 4
    }
    fn conv_bytes(&self) -> usize {
        self.conv.len() * 4
    }
}

/// One K/V group's rows on the card, row-major (`[cap, Hkv·dk]`, `[cap, Hkv·dv]`), with the
/// absolute position of each slot. Grows by doubling up to `max` rows.
#[derive(Clone)]
pub struct DevKv {
    k: Option<DevData>,
    v: Option<DevData>,
    pos: Option<CudaSlice<i32>>,
    rows: usize,
    cap: usize,
    max: usize,
    kw: usize,
    vw: usize,
    dtype: KvDtype,
}

impl KvStorage for DevKv {
    fn len(&self) -> usize {
        self.rows
    }
    fn bytes(&self) -> usize {
        self.rows * (self.kw + self.vw) * self.dtype.size()
    }
    fn dtype(&self) -> KvDtype {
        self.dtype
    }
}

/// A store's rows for one attention call.
#[derive(Clone, Copy)]
pub struct DevKvView<'a> {
    src: KvSrc,
    _kv: PhantomData<&'a DevKv>,
}

/// A compiled kernel and its name (for the profile).
struct Kernel {
    f: CudaFunction,
    name: &'static str,
    /// Blocks a multiprocessor holds at once, asked of the driver at first use.
    resident: std::sync::OnceLock<usize>,
}

impl Kernel {
    /// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that one
    /// multiprocessor runs at once (the first call's shape for every later one).
    fn resident(&self, threads: u32, smem: usize) -> usize {
        *self.resident.get_or_init(|| {
            self.f
                .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
                .map_or(1, |b| (b as usize).max(1))
        })
    }
}

/// The backend's kernels (`K`: a loaded kernel; a name where only the names are wanted).
struct Kernels<K = Kernel> {
    embed_f32: K,
    embed_bf16: K,
    /// `[Q8_0, Q4_0]` tables.
    embed_quant: [K; 2],
    /// `[Q8_0, Q4_0]` matrices widened to bf16.
    dequant: [K; 2],
    rmsnorm: K,
    rmsnorm_rows: K,
    norm_settle: K,
    rmsnorm_parts: K,
    columns: K,
    split_in_proj: K,
    to_bf16: K,
    pick_rows: K,
    conv_silu: K,
    conv_state: K,
    conv_silu_step: K,
    softplus_bias: K,
    /// `[f32 gate and up, bf16]`
    silu_mul: [K; 2],
    /// `[up to 16 states, up to 32]`
    scan_chunk_end: [K; 2],
    scan_chunk_carry: K,
    scan_chunk_out: [K; 2],
    scan_seq: [K; 2],
    /// `[up to 16 states, up to 32][f32 dt_proj, bf16 dt_proj]`
    ssm_step: [[K; 2]; 2],
    /// `[dk and dv up to 128, up to 256]`
    attention: [K; 2],
    attention_gqa: K,
    attention_tiles: K,
    /// Tensor-core prefill attention over bf16 K/V, by (dk, dv) (sm_80 and later): `[f32
    /// queries and weights, rounded to bf16]`.
    attention_mma: Vec<((usize, usize), [K; 2])>,
    /// The tensor-core decode attention of many rows, by (dk, dv) (bf16 K/V, sm_80).
    attention_gqa_mma: Vec<((usize, usize), K)>,
    /// `[up to GEMV_ROWS rows, one row, two rows][f32, bf16, Q8_0, Q4_0 weights][Epilogue]`
    gemv: [[[K; 4]; 4]; 3],
    /// `[f32 input up to 16 rows, bf16 input up to 16, bf16 input up to 32][bf16, Q8_0, Q4_0
    /// weights][Epilogue]`, sm_80 and later (else empty).
    gemm_rows: Vec<[[K; 4]; 3]>,
    fuse: K,
    fuse_rows: K,
    kv_put: K,
}

impl<K> Kernels<K> {
    /// Every kernel, by its name in kernels.cu, for a device of compute capability `major`.
    fn load(major: i32, f: &dyn Fn(&'static str) -> Result<K>) -> Result<Kernels<K>> {
        // The tensor-core kernels, `{prefix}_{dk}_{dv}` for each MMA shape (sm_80 and later).
        let by_shape = |prefix: &str| -> Result<Vec<((usize, usize), K)>> {
            if major < 8 {
                return Ok(Vec::new());
            }
            MMA_SHAPES
                .iter()
                .map(|&(dk, dv)| {
                    let name: &'static str =
                        Box::leak(format!("{prefix}_{dk}_{dv}").into_boxed_str());
                    Ok(((dk, dv), f(name)?))
                })
                .collect()
        };
        Ok(Kernels {
            embed_f32: f("embed_f32")?,
            embed_bf16: f("embed_bf16")?,
            embed_quant: [f("embed_q8")?, f("embed_q4")?],
            dequant: [f("dequant_q8")?, f("dequant_q4")?],
            rmsnorm: f("rmsnorm")?,
            rmsnorm_rows: f("rmsnorm_rows")?,
            norm_settle: f("norm_settle")?,
            rmsnorm_parts: f("rmsnorm_parts")?,
            columns: f("columns")?,
            split_in_proj: f("split_in_proj")?,
            to_bf16: f("to_bf16")?,
            pick_rows: f("pick_rows")?,
            conv_silu: f("conv_silu")?,
            conv_state: f("conv_state")?,
            conv_silu_step: f("conv_silu_step")?,
            softplus_bias: f("softplus_bias")?,
            silu_mul: [f("silu_mul")?, f("silu_mul16")?],
            scan_chunk_end: [f("scan_chunk_end_16")?, f("scan_chunk_end_32")?],
            scan_chunk_carry: f("scan_chunk_carry")?,
            scan_chunk_out: [f("scan_chunk_out_16")?, f("scan_chunk_out_32")?],
            scan_seq: [f("scan_seq_16")?, f("scan_seq_32")?],
            ssm_step: [
                [f("ssm_step_16_f32")?, f("ssm_step_16_bf16")?],
                [f("ssm_step_32_f32")?, f("ssm_step_32_bf16")?],
            ],
            attention: [f("attention_4")?, f("attention_8")?],
            attention_gqa: f("attention_gqa")?,
            attention_tiles: f("attention_tiles")?,
            attention_mma: by_shape("attention_mma")?
                .into_iter()
                .zip(by_shape("attention_mma16")?)
                .map(|((shape, f32), (_, bf16))| (shape, [f32, bf16]))
                .collect(),
            attention_gqa_mma: by_shape("attention_gqa_mma")?,
            gemv: {
                // Named gemv[_add|_softplus|_glu]_{f32|bf16|q8|q4}[_1|_2] in kernels.cu.
                let set = |w: &str, rows: &str| -> Result<[K; 4]> {
                    let g =
                        |epi: &str| f(Box::leak(format!("gemv{epi}_{w}{rows}").into_boxed_str()));
                    Ok([g("")?, g("_add")?, g("_softplus")?, g("_glu")?])
                };
                let by_type = |rows: &str| -> Result<[[K; 4]; 4]> {
                    Ok([
                        set("f32", rows)?,
                        set("bf16", rows)?,
                        set("q8", rows)?,
                        set("q4", rows)?,
                    ])
                };
                [by_type("")?, by_type("_1")?, by_type("_2")?]
            },
            gemm_rows: if major >= 8 {
                [("f32", 1), ("bf16", 1), ("bf16", 2)]
                    .iter()
                    .map(|(x, mt)| {
                        let set = |w: &str| {
                            let g = |epi: &str| {
                                f(Box::leak(
                                    format!("gemm_rows_{x}_{mt}_{epi}{w}").into_boxed_str(),
                                ))
                            };
                            Ok::<_, Error>([g("store")?, g("add")?, g("softplus")?, g("glu")?])
                        };
                        Ok::<_, Error>([set("")?, set("_q8")?, set("_q4")?])
                    })
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            },
            fuse: f("fuse")?,
            fuse_rows: f("fuse_rows")?,
            kv_put: f("kv_put")?,
        })
    }
}

/// The names of the kernels the backend loads on a device of compute capability `major`: a
/// test checks that kernels.cu defines each (a misspelt one fails only on a GPU otherwise).
pub fn kernel_names(major: i32) -> Vec<&'static str> {
    let names = std::cell::RefCell::new(Vec::new());
    let record = |name: &'static str| {
        names.borrow_mut().push(name);
        Ok(())
    };
    let _ = Kernels::load(major, &record);
    names.into_inner()
}

/// Scratch buffers of the backend's own: a bf16 copy of a matrix product's input, of a prompt's
/// keys and values (for the tensor-core attention), the MLP's up
/// rows (when cuBLAS makes them), the attention and SSM outputs of the hybrid heads, attention's
/// split partials and the count of splits done per (row, head), the scan's parameters of a
/// prompt, and the positions of the step's rows.
struct Scratch {
    x16: Option<CudaSlice<u16>>,
    kv16: Option<CudaSlice<u16>>,
    up: DevRows,
    /// The gated MLP's gate and up rows in bf16 (a long prompt's, `product_folding`).
    up16: Option<CudaSlice<u16>>,
    attn: DevRows,
    y: DevRows,
    part: DevRows,
    split_count: Option<CudaSlice<i32>>,
    params: ScanRows,
    /// The step, copied to the card once by `begin`: each row's position and sequence, each
    /// sequence's rows and window, its cached K/V per group (`[group][seq][meta, store]`) and
    /// its states per layer (`[layer][seq]`).
    pos: Option<CudaSlice<i32>>,
    row_seq: Option<CudaSlice<i32>>,
    seqs: Option<CudaSlice<SeqInfo>>,
    past: Option<CudaSlice<KvSrc>>,
    ssm: Option<CudaSlice<u64>>,
    conv: Option<CudaSlice<u64>>,
    n_seqs: usize,
    /// Tiles of up to TILE_ROWS query rows, (sequence, first row), for prefill attention; the
    /// longest sequence of the step.
    tiles: Option<CudaSlice<i32>>,
    n_tiles: usize,
    max_len: usize,
    /// The same in tiles of MMA_ROWS, for the tensor-core kernel.
    mma_tiles: Option<CudaSlice<i32>>,
    n_mma_tiles: usize,
    /// Chunks of up to SCAN_CHUNK rows for the selective scan, (sequence, first row in it, rows,
    /// flags), each sequence's first chunk, and whether any sequence has more than one.
    chunks: Option<CudaSlice<i32>>,
    seq_chunks: Option<CudaSlice<i32>>,
    n_chunks: usize,
    multi_chunk: bool,
    /// The chunks' end states from zero, start states and summed Δ (see `scan_chunk_end`).
    hend: DevRows,
    init: DevRows,
    dtsum: DevRows,
    /// K/V writes of the step, made together (`flush`), and their table on the card.
    puts: Vec<PutOp>,
    put_table: Option<CudaSlice<PutOp>>,
    /// The step's token ids (`embed`), kept rather than allocated a step.
    ids: Option<CudaSlice<u32>>,
}

/// The selective scan's input-dependent parameters of a step, made before the scan when it runs
/// over several rows a sequence: δr `[t, R]`, B and C `[t, N]`, Δ `[t, E]`.
#[derive(Default)]
struct ScanRows {
    dr: DevRows,
    b: DevRows,
    c: DevRows,
    delta: DevRows,
}

/// Query rows of one block of prefill attention, and keys it takes at a time (the kernel's BQ
/// and BK).
const TILE_ROWS: usize = 32;
const TILE_KEYS: usize = 32;

/// Query rows of one block of tensor-core attention (the kernel's FA_BQ), and the head sizes it
/// is built for (`ATTENTION_MMA` there).
const MMA_ROWS: usize = 64;
const MMA_SHAPES: [(usize, usize); 4] = [(16, 32), (64, 64), (64, 128), (128, 128)];
/// Keys of one block of the tensor-core attention (FA_BK), and its shared memory: two stages of
/// keys and values (rows padded by FA_PAD = 8) and their positions; on the warpgroup MMA
/// (`attention_wg`), unpadded stages aligned to 1024 bytes, and the slack to align the first.
const MMA_KEYS: usize = 64;
fn mma_smem(dk: usize, dv: usize) -> usize {
    let padded = 2 * (2 * MMA_KEYS * (dk + 8 + dv + 8) + 4 * MMA_KEYS);
    let wg_stage = (2 * MMA_KEYS * (dk + dv) + 4 * MMA_KEYS).next_multiple_of(1024);
    padded.max(2 * wg_stage + 1024)
}

/// Keys of a decode attention warp in flight (kernels.cu's ATTN_STAGES batches of ATTN_KEYS), and
/// their shared memory (four warps): the keys' K and V rows in bf16 and their positions.
const ATTN_STAGES: usize = 4;
const ATTN_KEYS: usize = 2;
fn staged_smem(dk: usize, dv: usize) -> usize {
    4 * ATTN_STAGES * ATTN_KEYS * (2 * (dk + dv) + 4)
}

/// Sequences longer than this take the tiled (flash) attention; shorter ones (decode) the
/// split-K kernel.
const TILED_FROM: usize = 8;
/// Decode rows from which attention runs per K/V head rather than per q head (measured on an
/// H200, 1.5B shapes: batch 2 slower, 4 the same, 8 and 12 8-11% faster, 64 and 256 1.4× and
/// 1.7×).
const GQA_ATTENTION_FROM: usize = 4;
/// Decode rows from which a split of `attention_gqa` takes at least 128 keys (below, one key
/// tile: few rows leave the card idle, more fill it and fewer partials are merged).
const GQA_LONG_SPLITS_FROM: usize = 16;
/// The most key ranges a decode attention is split into (kernels.cu's MAX_SPLITS, the merge's
/// coefficients a head).
const MAX_SPLITS: usize = 128;

/// Query heads `attention_gqa` takes at once (the kernels' DEC_G); its key tiles are the
/// kernels' `dec_tile`.
const GQA_HEADS: usize = 8;

/// Rows of a chunk of the selective scan (see `scan_chunk_end`; the kernels' SCAN_ROWS): prompts
/// run on channels × chunks threads.
const SCAN_CHUNK: usize = 64;
/// Chunks a step's scan is cut into at least, where rows allow (chunks of 16 rows at the least).
const SCAN_MIN_CHUNKS: usize = 11;
/// Rows of a step up to which its prompts' scan walks them in one pass (`scan_seq`); more are
/// cut into chunks, whose threads grow with the rows where `scan_seq`'s lanes grow only with
/// the sequences (on an H100, 1.5B shapes, one prompt's prefill with `scan_seq` against the
/// chunks: 128 rows 27.6K tok/s against 25.1K, 512 67.7K against 64.2K, 1024 82.5K against
/// 80.4K, 2048 88.2-89.1K against 91.8-92.5K, 8192 95.4-97.3K against 97.0-100.1K).
const SEQ_SCAN_UP_TO: usize = 1024;

/// Threads of a `pick_rows` block (a row; the kernel's PICK_THREADS).
const PICK_THREADS: u32 = 1024;

/// Longest sequence whose causal conv runs row after row in one thread a channel (decode).
const CONV_STEP_UP_TO: usize = 8;

/// Rows up to which a matrix product runs as one pass of warps over the weights (the kernel's
/// GEMV_ROWS) rather than through cuBLAS, where `gemm_rows` does not take it (f32 weights, or
/// fewer than GEMM_ROWS_FROM rows).
const GEMV_ROWS: usize = 8;
/// Rows from which an RMSNorm runs a warp a row (`rmsnorm_rows`: the card is full of rows) for
/// widths of at most NORM_WARP_MAX (the kernel's 128 · RMS_V4), rather than a block a row.
const NORM_WARP_ROWS_FROM: usize = 256;
const NORM_WARP_MAX: usize = 2048;
/// The widest rows `fuse_rows` holds (the kernel's 512 · FUSE_V4).
const FUSE_ROWS_MAX: usize = 4096;
/// Rows up to which `matmul_add_norm` folds the norm into the GEMVs (`NormFold`): on an H200 the
/// fold paid at one row and not at two or three, where the next GEMV's sums of the partial sums
/// grow with its rows (the README has the A/B figures).
const FOLD_ROWS: usize = 1;
/// Input rows for which bf16 products run on `gemm_rows` (the tensor cores, weights streamed
/// once; up to 16 · the kernels' largest MT). Measured on an H200 over whole decode steps: at 2
/// rows the GEMV is faster (695 against 567 tok/s), at 8 the tensor cores (1890 against 1370);
/// at 64 cuBLAS (the kernel's input reads from L2 grow with its row tiles).
const GEMM_ROWS_FROM: usize = 4;
const GEMM_ROWS: usize = 32;
/// Rows up to which `gemm_rows` takes its input in f32 and rounds it itself (no `to_bf16`
/// launch): on an H200 batch 4 and 8 read 1185-1248 and 2044-2071 tok/s so against 1062-1088 and
/// 1878-1907, batch 16 and 32 2940-2999 and 3837-3886 against 3288-3346 and 5446-5512.
const GEMM_F32_INPUT_UP_TO: usize = 8;
/// Decode steps of up to this many sequences are captured as CUDA graphs (cuBLAS included; on
/// an H200 batch 64 read 7781-8345 tok/s captured, batch 256 no faster captured than not).
const GRAPH_ROWS: usize = 64;

/// What a matrix product does with its result `s = x · wᵀ` (the `EPI_*` of the kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Epilogue {
    /// `y = s`
    Store = 0,
    /// `y += s`
    Add = 1,
    /// `y = softplus(s + bias)`
    Softplus = 2,
    /// `y = silu(s) ⊙ (x · upᵀ)`
    Glu = 3,
}

/// How a step's kernels reach the GPU. A decode step (one row a sequence, few sequences) is
/// captured into a CUDA graph the second time its shape is seen with the same buffers, and
/// replayed after that: one launch for the whole step instead of hundreds. What changes from
/// step to step (positions, cached K/V, states) is in tables the kernels read, copied before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Eager,
    Capturing(GraphKey),
    Replaying(GraphKey),
}

/// A decode step's rows and the generation of the buffers its kernels were given.
type GraphKey = (usize, u64);

/// A captured step. CUDA graph handles may be used from any thread; every use here is under
/// the `graphs` lock.
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: see above; the driver's graph objects are not tied to the thread that made them.
unsafe impl Send for Graph {}

struct Graphs {
    mode: Mode,
    graphs: std::collections::HashMap<GraphKey, Graph>,
    seen: std::collections::HashSet<GraphKey>,
    /// An eager decode step of this many rows: its key is noted when it ends.
    note: Option<usize>,
}

/// The CUDA backend on one device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// bf16 products, each shape's algorithm timed.
    lt: lt::Products,
    k: Kernels,
    scratch: Mutex<Scratch>,
    /// The first error of a forward, returned by `finish`.
    err: Mutex<Option<String>>,
    /// The device's name and compute capability, for reports.
    pub name: String,
    /// Multiprocessors: how many blocks keep the GPU busy.
    sms: usize,
    /// Bytes of shared memory a `pick_rows` block may keep a row's weights in.
    pick_smem: usize,
    /// Kernels of a captured decode step may start before the previous one ends (sm_90:
    /// programmatic dependent launch).
    pdl: bool,
    /// A residual add's norm folded into the GEMVs around it (`matmul_add_norm`;
    /// HYMBA_CUDA_NO_NORM_FOLD=1 launches the norm, to compare).
    norm_fold: bool,
    /// Whether rows may be made as their bf16 copy alone (`outputs16`) and a long prompt's gate
    /// and up rows as bf16 (HYMBA_CUDA_F32_ROWS: every activation in f32, for A/B runs).
    bf16_only: bool,
    /// Whether any f32 matrix is on the card (then every activation keeps its f32 rows).
    f32_matrices: std::sync::atomic::AtomicBool,
    /// Whether a prompt's attention over bf16 K/V takes its queries and weights rounded to bf16
    /// where every matrix is bf16, as the official bf16 model does (`attention_mma16`;
    /// HYMBA_CUDA_F32_ATTENTION=1: the f32 attention over the bf16 cache, for A/B runs).
    attention16: bool,
    /// Whether a step of few prompt rows has its scan in one pass (`scan_seq`;
    /// HYMBA_CUDA_CHUNKED_SCAN=1: in chunks at any length, to compare).
    seq_scan: bool,
    /// Each launch between two timing events, when HYMBA_CUDA_PROFILE is set (steps then run
    /// eagerly, on one stream: a profile for finding where a step's time goes).
    profile: Option<Mutex<Profile>>,
    /// Bumped whenever a buffer a kernel is given moves (grows): graphs of older generations
    /// are stale.
    generation: std::sync::atomic::AtomicU64,
    graphs: Mutex<Graphs>,
    /// Quantized matrices widened to bf16 for products of many rows (see [`Cuda::dequantized`]):
    /// `[main stream, side stream][the matrix, the gated MLP's up]`.
    dequant: Mutex<[[Option<Arc<DevData>>; 2]; 2]>,
    /// Page-locked host memory that rows come back through (up to HOST_KEEP floats).
    host: Mutex<Option<cudarc::driver::PinnedHostSlice<f32>>>,
    /// What each table buffer (by its address) holds from its last copy (see `put`).
    tables_held: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    /// A replayed step's graph launched where the step ends rather than where it starts (for
    /// A/B runs).
    late_graph: bool,
    /// A forward runs on a thread of rayon's pool, as the CPU's does, rather than on the
    /// caller's (HYMBA_CUDA_ON_POOL=1, to compare; see `run`).
    on_pool: bool,
    /// The SSM branch of a captured decode step (see [`Cuda::branch`]).
    fork: Option<Fork>,
}

/// A second stream for the SSM heads' branch of a captured decode step, and the events that
/// order it against the attention's: the two branches of each layer become parallel paths of
/// the step's graph, so a layer's small attention and scan kernels wait for each other's
/// latency no more.
struct Fork {
    side: Arc<CudaStream>,
    /// Recorded on the main stream after in_proj, on the side stream after the scan.
    in_proj: cudarc::driver::CudaEvent,
    scan: cudarc::driver::CudaEvent,
    /// Launches go to the side stream.
    on_side: std::sync::atomic::AtomicBool,
    /// Whether eager steps part too (not when profiled: its events time one stream).
    eager: bool,
}

/// The SSM branch's stream, at the device's greatest priority (HYMBA_CUDA_EVEN_STREAMS=1: the
/// default one, to compare): as the attention's blocks of a long prompt finish, the scan's are
/// placed first, so the two branches share the multiprocessors rather than take turns.
fn side_stream(
    ctx: &Arc<CudaContext>,
) -> std::result::Result<Arc<CudaStream>, cudarc::driver::DriverError> {
    if std::env::var_os("HYMBA_CUDA_EVEN_STREAMS").is_some() {
        return ctx.new_stream();
    }
    ctx.bind_to_thread()?;
    let (_, greatest) = cudarc::driver::result::stream::get_priority_range()?;
    ctx.new_stream_with_priority(greatest)
}

/// A profile row's name: a kernel's, or a cuBLAS product's with its shape.
type Label = std::borrow::Cow<'static, str>;

/// Kernel times of HYMBA_CUDA_PROFILE: launches timed by events, summed per kernel now and then.
#[derive(Default)]
struct Profile {
    pending: Vec<(Label, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
    /// Seconds, calls and the longest call per kernel.
    sums: std::collections::BTreeMap<Label, (f64, u64, f64)>,
}

impl Profile {
    /// Sums the pending launches' times (the stream synchronized first).
    fn fold(&mut self) {
        for (name, start, end) in self.pending.drain(..) {
            let e = self.sums.entry(name).or_default();
            let s = start.elapsed_ms(&end).unwrap_or(0.0) as f64 * 1e-3;
            e.0 += s;
            e.1 += 1;
            e.2 = e.2.max(s);
        }
    }
}

/// The points where a captured decode step's branches part and meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Branch {
    /// in_proj is out: the SSM branch may start (its conv and scan read x and z in in_proj's
    /// output).
    InProjDone,
    /// The SSM branch's kernels from here on: its conv, x_proj.
    Ssm,
    /// The scan: the SSM branch's last kernel.
    Scan,
    /// Back on the main stream, after the scan (the fusion reads both branches).
    Join,
    /// Back on the main stream for a launch that is not the SSM's (attention).
    Main,
}

/// A grid of `n` threads in blocks of 256, capped (the kernels loop over the rest).
fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535 * 4);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of `threads` over (columns, rows) of a row-wise kernel: a thread a column, the rows
/// in the grid's second dimension (strided past its limit), so no thread divides by the width.
fn by_rows(cols: usize, rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            cols.div_ceil(threads as usize).max(1) as u32,
            rows.clamp(1, 65535) as u32,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of a block that reduces one row: fewer rows than the card has blocks to run at once
/// (decode, batches) wait on each block's chain of loads, so they get the largest blocks; many
/// rows (prefill) fill the GPU with blocks. (H200, two rounds: from 64 to 255 rows with 1024
/// threads, batch 64 11278 / 11869 tok/s against 10939 / 11061 with 256, batch 128 12554 / 13072
/// against 12285 / 12375.)
fn row_threads(rows: usize) -> u32 {
    if rows < 256 {
        1024
    } else {
        256
    }
}

fn rows_of(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Cuda {
    /// Opens device `ordinal`: loads the driver, checks its version, compiles the kernels.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        // SAFETY: only probe whether the shared libraries load.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no NVIDIA driver found (libcuda.so): this machine cannot run --device cuda".into(),
            ));
        }
        cudarc::driver::result::init()
            .map_err(|e| device_err("initialising the CUDA driver", e))?;
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
        if version < MIN_DRIVER {
            return Err(Error::Device(format!(
                "the NVIDIA driver supports CUDA {}.{}; this engine needs {}.{} or newer",
                version / 1000,
                version % 1000 / 10,
                MIN_DRIVER / 1000,
                MIN_DRIVER % 1000 / 10
            )));
        }
        let count =
            CudaContext::device_count().map_err(|e| device_err("counting CUDA devices", e))?;
        if count <= 0 {
            return Err(Error::Device("no CUDA device found".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::Device(format!(
                "--device cuda:{ordinal}: this machine has {count} CUDA device(s), cuda:0..cuda:{}",
                count - 1
            )));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device("cuBLAS (libcublas.so) not found: install the CUDA toolkit or the `nvidia-cublas` wheel and put its lib folder on LD_LIBRARY_PATH".into()));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| device_err("opening the CUDA device", e))?;
        // One stream: the order of launches is the order of the model's operations.
        // SAFETY: nothing here uses more than one stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_err("reading the compute capability", e))?;
        let name = format!("{} (sm_{major}{minor})", ctx.name().unwrap_or_default());
        // For this device's architecture: the tensor-core kernels need sm_80; on sm_90 the
        // bf16 prompt attention takes Hopper's warpgroup MMA, which only sm_90a code may use
        // (HYMBA_CUDA_NO_WGMMA=1: the sm_80 kernels, to compare).
        let wgmma = (major, minor) == (9, 0) && std::env::var_os("HYMBA_CUDA_NO_WGMMA").is_none();
        let arch: &'static str = Box::leak(
            format!("compute_{major}{minor}{}", if wgmma { "a" } else { "" }).into_boxed_str(),
        );
        let ptx = compiled_kernels(arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| device_err("loading the kernels", e))?;
        let f = |name: &'static str| {
            let f = module
                .load_function(name)
                .map_err(|e| device_err(&format!("kernel {name}"), e))?;
            Ok::<_, Error>(Kernel {
                f,
                name,
                resident: Default::default(),
            })
        };
        let k = Kernels::load(major, &f)?;
        let mma = k
            .attention_mma
            .iter()
            .flat_map(|(s, k)| k.iter().map(move |k| (s, k)));
        for ((dk, dv), kernel) in mma.chain(k.attention_gqa_mma.iter().map(|(s, k)| (s, k))) {
            kernel
                .f
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    mma_smem(*dk, *dv) as i32,
                )
                .map_err(|e| device_err("sizing the attention kernel's shared memory", e))?;
        }
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx
            .new_stream()
            .map_err(|e| device_err("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_err("starting cuBLAS", e))?;
        let lt = lt::Products::new(&stream, std::env::var_os("HYMBA_CUDA_PROFILE").is_some())
            .map_err(Error::Device)?;
        let empty = DevRows::default;
        let scratch = Scratch {
            x16: None,
            up16: None,
            kv16: None,
            up: empty(),
            attn: empty(),
            y: empty(),
            part: empty(),
            split_count: None,
            params: ScanRows::default(),
            pos: None,
            row_seq: None,
            seqs: None,
            past: None,
            ssm: None,
            conv: None,
            n_seqs: 0,
            tiles: None,
            n_tiles: 0,
            max_len: 0,
            mma_tiles: None,
            n_mma_tiles: 0,
            chunks: None,
            seq_chunks: None,
            n_chunks: 0,
            multi_chunk: false,
            hend: empty(),
            init: empty(),
            dtsum: empty(),
            puts: Vec::new(),
            put_table: None,
            ids: None,
        };
        let sms =
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| device_err("reading the multiprocessor count", e))? as usize;
        // What a block may ask for beyond the kernel's own 2 KB, up to 192 KB (Hymba's 32001
        // weights take 128 KB).
        let optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| device_err("reading the shared memory a block may use", e))? as usize;
        let pick_smem = optin.saturating_sub(2048).min(192 << 10);
        k.pick_rows
            .f
            .set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                pick_smem as i32,
            )
            .map_err(|e| device_err("sizing the pick kernel's shared memory", e))?;
        let profile =
            std::env::var_os("HYMBA_CUDA_PROFILE").map(|_| Mutex::new(Default::default()));
        // HYMBA_CUDA_NO_FORK=1 keeps a captured step on one stream, to compare.
        let fork = match std::env::var_os("HYMBA_CUDA_NO_FORK") {
            Some(_) => None,
            None => {
                let e = |what| move |err| device_err(what, err);
                Some(Fork {
                    side: side_stream(&ctx).map_err(e("creating a stream"))?,
                    in_proj: ctx.new_event(None).map_err(e("creating an event"))?,
                    scan: ctx.new_event(None).map_err(e("creating an event"))?,
                    on_side: Default::default(),
                    eager: profile.is_none()
                        && std::env::var_os("HYMBA_CUDA_NO_PROMPT_FORK").is_none(),
                })
            }
        };
        let graphs = Mutex::new(Graphs {
            mode: Mode::Eager,
            graphs: Default::default(),
            seen: Default::default(),
            note: None,
        });
        Ok(Cuda {
            ctx,
            stream,
            blas,
            lt,
            k,
            scratch: Mutex::new(scratch),
            err: Mutex::new(None),
            name,
            sms,
            pick_smem,
            pdl: major >= 9 && std::env::var_os("HYMBA_CUDA_NO_PDL").is_none(),
            norm_fold: std::env::var_os("HYMBA_CUDA_NO_NORM_FOLD").is_none(),
            bf16_only: std::env::var_os("HYMBA_CUDA_F32_ROWS").is_none(),
            f32_matrices: Default::default(),
            attention16: std::env::var_os("HYMBA_CUDA_F32_ATTENTION").is_none(),
            seq_scan: std::env::var_os("HYMBA_CUDA_CHUNKED_SCAN").is_none(),
            profile,
            generation: Default::default(),
            graphs,
            dequant: Default::default(),
            host: Mutex::new(None),
            late_graph: std::env::var_os("HYMBA_CUDA_LATE_GRAPH").is_some(),
            on_pool: std::env::var_os("HYMBA_CUDA_ON_POOL").is_some(),
            tables_held: Default::default(),
            fork,
        })
    }

    /// Checks that a model's shapes fit the kernels.
    pub fn check_config(&self, c: &crate::config::Config) -> Result<()> {
        let too = |key: &str, v: usize, max: usize| -> Result<()> {
            if v > max {
                return Err(Error::config(
                    key,
                    format!("{v} is more than the CUDA backend's kernels hold ({max})"),
                ));
            }
            Ok(())
        };
        too("kq_head_dim", c.qk_head_dim, MAX_HEAD_DIM)?;
        too("v_head_dim", c.v_head_dim, MAX_HEAD_DIM)?;
        too("mamba_d_state", c.mamba_d_state, MAX_STATE)?;
        too("mamba_d_conv", c.mamba_d_conv, MAX_CONV)
    }

    /// The device's context (e.g. to read its memory while a model runs).
    pub fn context(&self) -> Arc<CudaContext> {
        self.ctx.clone()
    }

    /// Device-to-device copy bandwidth, bytes read + written a second: the ceiling of a
    /// memory-bound step. Median of 10 copies of 1 GiB.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        let n = 1usize << 28;
        let src = self.alloc::<f32>(n, "the bandwidth probe")?;
        let mut dst = self.alloc::<f32>(n, "the bandwidth probe")?;
        let mut times = Vec::new();
        for i in 0..13 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| device_err("copy", e))?;
            self.synchronize()?;
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(2.0 * (n * 4) as f64 / times[times.len() / 2])
    }

    /// cuBLAS bf16 matrix rate (f32 accumulation) on 8192³ products of random data, FLOP/s:
    /// the ceiling of prefill. Median of 10 after 3 warm-ups.
    pub fn bf16_gemm_rate(&self) -> Result<f64> {
        let n = 8192usize;
        let mut rng = hymba_kernels::testing::Rng::new(7);
        let host: Vec<u16> = (0..n * n)
            .map(|_| half::bf16::from_f32(rng.normal()).to_bits())
            .collect();
        let a = self
            .stream
            .clone_htod(&host)
            .map_err(|e| device_err("upload", e))?;
        let b = self
            .stream
            .clone_htod(&host)
            .map_err(|e| device_err("upload", e))?;
        let mut c = self.alloc::<f32>(n * n, "the matrix-rate probe")?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut times = Vec::new();
        for i in 0..13 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            let cp = c.device_ptr_mut(&self.stream).0;
            // SAFETY: three live n×n buffers.
            unsafe {
                blas::gemm_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    n as i32,
                    n as i32,
                    &alpha as *const f32 as *const _,
                    a.device_ptr(&self.stream).0 as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    b.device_ptr(&self.stream).0 as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    &beta as *const f32 as *const _,
                    cp as *mut _,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    n as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| device_err("cuBLAS GEMM", e))?;
            self.synchronize()?;
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(2.0 * (n as f64).powi(3) / times[times.len() / 2])
    }

    /// An event recorded on the stream, timing on (the profile's).
    fn time_start(&self) -> Option<cudarc::driver::CudaEvent> {
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        self.stream.record_event(Some(flags)).ok()
    }

    fn time_end(&self, name: Label, start: Option<cudarc::driver::CudaEvent>) {
        let (Some(p), Some(start)) = (&self.profile, start) else {
            return;
        };
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        if let Ok(end) = self.stream.record_event(Some(flags)) {
            let mut p = p.lock().expect("profile");
            p.pending.push((name, start, end));
            if p.pending.len() >= 4096 {
                let _ = self.stream.synchronize();
                p.fold();
            }
        }
    }

    /// Matrices of one element type, one after another in one allocation, as stored (bf16 stays
    /// bf16 on the card).
    fn upload_matrices(&self, ts: &[Tensor]) -> Result<DevData> {
        match ts[0].dtype {
            Dtype::F32 => {
                self.f32_matrices
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(DevData::F32(self.upload_weights(
                    ts.iter().flat_map(|t| t.to_f32()).collect(),
                )?))
            }
            Dtype::BF16 => Ok(DevData::BF16(
                self.upload_weights(
                    ts.iter()
                        .flat_map(|t| t.bytes().chunks_exact(2))
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                )?,
            )),
            Dtype::Q8_0 | Dtype::Q4_0 => {
                // GGML blocks (f16 scale, then the quants) apart into quants and scales.
                let kind = if ts[0].dtype == Dtype::Q8_0 {
                    Quant::Q8_0
                } else {
                    Quant::Q4_0
                };
                let bq = kind.block_quants();
                let blocks = ts.iter().flat_map(|t| t.bytes().chunks_exact(2 + bq));
                let (mut q, mut d) = (Vec::new(), Vec::new());
                for b in blocks {
                    d.push(u16::from_le_bytes([b[0], b[1]]));
                    match kind {
                        Quant::Q8_0 => q.extend_from_slice(&b[2..]),
                        Quant::Q4_0 => q.extend(q4_0_chunks(&b[2..])),
                    }
                }
                Ok(DevData::Quant {
                    kind,
                    q: self.upload_weights(q)?,
                    d: self.upload_weights(d)?,
                })
            }
            other => Err(Error::Device(format!(
                "the CUDA backend runs f32, bf16, q8_0 and q4_0 weights, not {other:?} matrices"
            ))),
        }
    }

    fn upload_weights<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        v: Vec<T>,
    ) -> Result<CudaSlice<T>> {
        let mut d = self.alloc::<T>(v.len(), "weights")?;
        self.stream
            .memcpy_htod(&v, &mut d)
            .map_err(|e| device_err("uploading weights", e))?;
        Ok(d)
    }

    /// The profile so far (HYMBA_CUDA_PROFILE), largest first, and clears it.
    pub fn take_profile(&self) -> Option<String> {
        let mut p = self.profile.as_ref()?.lock().expect("profile");
        let _ = self.stream.synchronize();
        p.fold();
        let sums = std::mem::take(&mut p.sums);
        let mut rows: Vec<_> = sums.into_iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        Some(
            rows.iter()
                .map(|(n, (s, c, m))| {
                    format!(
                        "{n:>20} {:>9.2} ms {c:>7} calls, {:>8.1} µs a call, longest {:>8.3} ms\n",
                        s * 1e3,
                        s * 1e6 / *c as f64,
                        m * 1e3
                    )
                })
                .collect(),
        )
    }

    /// Free and total device memory, bytes.
    pub fn memory(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    /// Waits for the work queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_err("synchronizing", e))
    }

    /// Keeps the first error of a step.
    fn fail(&self, what: &str, e: impl std::fmt::Debug) {
        let mut err = self.err.lock().expect("error slot");
        if err.is_none() {
            *err = Some(format!("{what}: {e:?}"));
        }
    }

    fn failed(&self) -> bool {
        self.err.lock().expect("error slot").is_some()
    }

    fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        let b = self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            let (free, total) = self.memory();
            Error::Device(format!(
                "out of GPU memory for {what}: {} MB needed, {} MB free of {} MB ({e:?})",
                (n * std::mem::size_of::<T>()).div_ceil(1 << 20),
                free >> 20,
                total >> 20
            ))
        })?;
        self.fork_barrier();
        Ok(b)
    }

    /// In an eager step that parts its branches, both streams wait for each other: a buffer
    /// allocated (or filled) on the main stream is ready for the side's kernels, and the old one
    /// its caller drops is freed on the main stream after the side's kernels that read it.
    fn fork_barrier(&self) {
        let Some(f) = &self.fork else { return };
        if !f.eager || self.failed() || self.mode() != Mode::Eager {
            return;
        }
        let r = f
            .scan
            .record(&f.side)
            .and_then(|()| self.stream.wait(&f.scan))
            .and_then(|()| f.in_proj.record(&self.stream))
            .and_then(|()| f.side.wait(&f.in_proj));
        if let Err(e) = r {
            self.fail("ordering the branches' streams", e);
        }
    }

    fn mode(&self) -> Mode {
        self.graphs.lock().expect("graphs").mode
    }

    /// A buffer moved: graphs made before are stale. Moving one while a graph is captured or
    /// replayed would be a bug of the shape logic.
    fn moved(&self) {
        if self.mode() != Mode::Eager {
            self.fail("CUDA graph", "a buffer grew inside a captured step");
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Decides how a step's kernels go (see [`Mode`]), once its tables are on the card.
    fn start_step(&self, seqs: &[Seq<Cuda>]) {
        let mut g = self.graphs.lock().expect("graphs");
        g.mode = Mode::Eager;
        g.note = None;
        let decode = seqs.iter().all(|s| s.rows.len() == 1)
            && seqs.len() <= GRAPH_ROWS
            && self.profile.is_none();
        if !decode || self.failed() {
            return;
        }
        let key = (
            seqs.len(),
            self.generation.load(std::sync::atomic::Ordering::Relaxed),
        );
        if g.graphs.contains_key(&key) {
            g.mode = Mode::Replaying(key);
            // The graph runs now: the walk over the layers that follows only keeps the host's
            // books (a replayed step's launches return at once), so it overlaps the card's work
            // instead of delaying its start (HYMBA_CUDA_LATE_GRAPH=1: launched at the step's
            // end, to compare).
            if !self.late_graph {
                if let Err(e) = g.graphs[&key].0.launch() {
                    self.fail("running a CUDA graph", e);
                }
            }
        } else if g.seen.contains(&key) {
            match self.stream.begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
            ) {
                Ok(()) => g.mode = Mode::Capturing(key),
                Err(e) => self.fail("starting a CUDA graph capture", e),
            }
        } else {
            g.note = Some(seqs.len());
        }
    }

    /// Ends a step's graph part: the captured graph is made and run, or the stored one run.
    /// Called before anything that is not part of the layers (K/V writes, reads, the end).
    fn end_step(&self) {
        let mut g = self.graphs.lock().expect("graphs");
        let gen = self.generation.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = g.note.take() {
            g.seen.insert((t, gen));
        }
        if let Some(f) = &self.fork {
            f.on_side.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        match std::mem::replace(&mut g.mode, Mode::Eager) {
            Mode::Eager => {}
            Mode::Capturing(key) => {
                let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
                match self.stream.end_capture(flags) {
                    Ok(Some(graph)) => {
                        if let Err(e) = graph.launch() {
                            self.fail("running a CUDA graph", e);
                        }
                        g.graphs.retain(|k, _| k.1 == gen);
                        if key.1 == gen {
                            g.graphs.insert(key, Graph(graph));
                        }
                    }
                    Ok(None) => self.fail("CUDA graph capture", "empty graph"),
                    Err(e) => self.fail("ending a CUDA graph capture", e),
                }
            }
            Mode::Replaying(key) => {
                if self.late_graph {
                    if let Err(e) = g.graphs[&key].0.launch() {
                        self.fail("running a CUDA graph", e);
                    }
                }
            }
        }
    }

    /// `rows` resized to `n` values (contents kept up to the old length when it grows).
    /// (Rows are shaped to be made again: a folded norm's pending scale is dropped with them.)
    fn shape(&self, rows: &mut DevRows, n: usize) {
        rows.fresh = false;
        rows.only16 = false;
        *rows.pending.get_mut().expect("pending scale") = None;
        let cap = rows.buf.as_ref().map_or(0, |b| b.len());
        if n > cap {
            self.moved();
            let want = n.max(cap * 3 / 2);
            match self.alloc::<f32>(want, "activations") {
                Ok(mut b) => {
                    if let Some(old) = &rows.buf {
                        if rows.len > 0 {
                            if let Err(e) = self
                                .stream
                                .memcpy_dtod(&old.slice(0..rows.len), &mut b.slice_mut(0..rows.len))
                            {
                                self.fail("copying activations", e);
                            }
                            self.fork_barrier();
                        }
                    }
                    rows.buf = Some(b);
                }
                Err(e) => self.fail("allocating", e),
            }
        }
        rows.len = n;
    }

    /// The rows' address, their values final (a folded norm's scale applied first).
    fn p(&self, rows: &DevRows) -> u64 {
        self.settle(rows);
        self.raw_p(rows)
    }

    /// The rows' address, as they are.
    fn raw_p(&self, rows: &DevRows) -> u64 {
        if rows.only16 {
            self.fail(
                "activations",
                "rows kept as their bf16 copy alone (`Backend::product_rows`) were read as f32",
            );
        }
        rows.buf
            .as_ref()
            .map_or(0, |b| b.device_ptr(&self.stream).0)
    }

    /// Applies a folded norm's pending scale to its rows (`norm_settle`), for a reader other than
    /// the GEMV that takes them unscaled.
    fn settle(&self, rows: &DevRows) {
        let Some(pn) = rows.pending.lock().expect("pending scale").take() else {
            return;
        };
        let sq = rows.sq.as_ref().map_or(0, |b| b.device_ptr(&self.stream).0);
        let (up, n, d, eps) = (self.raw_p(rows), pn.n as i32, pn.d as i32, pn.eps);
        self.launch(
            &self.k.norm_settle,
            rows_of(rows.len / pn.d.max(1), 256),
            &[&up, &sq, &n, &d, &eps],
        );
    }

    fn pv(&self, v: &CudaSlice<f32>) -> u64 {
        v.device_ptr(&self.stream).0
    }

    /// Parts or joins a step's branches: in a captured decode step, and in an eager step (a
    /// prompt) unless profiled or HYMBA_CUDA_NO_PROMPT_FORK is set (then one stream).
    fn branch(&self, at: Branch) {
        let Some(f) = &self.fork else { return };
        let on = match self.mode() {
            Mode::Capturing(_) => true,
            Mode::Eager => f.eager,
            Mode::Replaying(_) => false,
        };
        if self.failed() || !on {
            return;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let r = match at {
            Branch::InProjDone => f.in_proj.record(&self.stream),
            Branch::Ssm => {
                f.on_side.store(true, Relaxed);
                f.side.wait(&f.in_proj)
            }
            Branch::Scan => {
                f.on_side.store(true, Relaxed);
                Ok(())
            }
            Branch::Join => {
                f.on_side.store(false, Relaxed);
                f.scan
                    .record(&f.side)
                    .and_then(|()| self.stream.wait(&f.scan))
            }
            Branch::Main => {
                f.on_side.store(false, Relaxed);
                Ok(())
            }
        };
        if let Err(e) = r {
            self.fail("parting a CUDA graph's branches", e);
        }
    }

    fn launch_stream(&self) -> cudarc::driver::sys::CUstream {
        match &self.fork {
            Some(f) if f.on_side.load(std::sync::atomic::Ordering::Relaxed) => f.side.cu_stream(),
            _ => self.stream.cu_stream(),
        }
    }

    /// Launches `f` with `args` (each a `&` to a plain value); errors are kept.
    fn launch(&self, k: &Kernel, cfg: LaunchConfig, args: &[&dyn Arg]) {
        if self.failed() || matches!(self.mode(), Mode::Replaying(_)) {
            return;
        }
        let t = self.profile.as_ref().map(|_| self.time_start());
        use cudarc::driver::sys;
        let mut params: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.param()).collect();
        // Programmatic dependent launch (see `grid_dep` in the kernels) in captured decode steps,
        // where the device has it: there it measured 2% faster, in a 512-token prefill slower.
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.launch_stream(),
            attrs: &mut attr,
            numAttrs: (self.pdl && matches!(self.mode(), Mode::Capturing(_))) as u32,
        };
        // SAFETY: every kernel's arguments are given in its order and types by the callers
        // below (each parameter points at a value alive for the call), pointers from live
        // allocations of the sizes the shapes say.
        let r = unsafe {
            sys::cuLaunchKernelEx(
                &config,
                k.f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.fail("launching a kernel", r);
        }
        if let Some(t) = t {
            self.time_end(k.name.into(), t);
        }
    }

    /// Makes the K/V writes recorded since the last flush, in one launch. Called before
    /// anything reads a store (`begin`) and at the end of a step (`finish`).
    fn flush(&self, scratch: &mut Scratch) {
        if scratch.puts.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut scratch.puts);
        self.put(&mut scratch.put_table, &ops);
        let most = ops
            .iter()
            .map(|o| o.rows as usize * o.kw.max(o.vw) as usize)
            .max()
            .unwrap_or(1);
        let cfg = LaunchConfig {
            grid_dim: (most.div_ceil(256).min(1024) as u32, ops.len() as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let tp = self.table(&scratch.put_table, 0);
        self.launch(&self.k.kv_put, cfg, &[&tp]);
    }

    /// `host` copied into `dst`, which grows to fit; not copied again where `dst` holds it from
    /// the last copy (a decode step's tables mostly repeat the last step's).
    fn put<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        dst: &mut Option<CudaSlice<T>>,
        host: &[T],
    ) {
        if host.is_empty() {
            return;
        }
        let fresh = dst.as_ref().is_none_or(|d| d.len() < host.len());
        if fresh {
            self.moved();
            match self.alloc::<T>(host.len().next_power_of_two(), "the step's tables") {
                Ok(d) => *dst = Some(d),
                Err(e) => return self.fail("allocating", e),
            }
        }
        let d = dst.as_mut().expect("allocated");
        // SAFETY: the tables' element types are integers and `repr(C)` structs of integers
        // with their padding as named fields: every byte is initialized.
        let bytes = unsafe {
            std::slice::from_raw_parts(host.as_ptr() as *const u8, std::mem::size_of_val(host))
        };
        let at = d.device_ptr(&self.stream).0;
        let mut held = self.tables_held.lock().expect("tables held");
        if !fresh && held.get(&at).is_some_and(|h| h[..] == *bytes) {
            return;
        }
        if let Err(e) = self
            .stream
            .memcpy_htod(host, &mut d.slice_mut(0..host.len()))
        {
            held.remove(&at);
            return self.fail("uploading the step's tables", e);
        }
        held.insert(at, bytes.to_vec());
    }

    /// Device address of element `at` of a table made by `begin`.
    fn table<T: DeviceRepr>(&self, t: &Option<CudaSlice<T>>, at: usize) -> u64 {
        t.as_ref().map_or(0, |t| {
            t.device_ptr(&self.stream).0 + (at * std::mem::size_of::<T>()) as u64
        })
    }

    fn pv_i(&self, v: &CudaSlice<i32>) -> u64 {
        v.device_ptr(&self.stream).0
    }

    /// Where the kernel about to make `rows` (`t` of them, shaped already) writes their bf16 copy:
    /// for products of more than GEMM_F32_INPUT_UP_TO rows, which take their input as bf16
    /// (`rounded`), so they need no `to_bf16` launch (a batch-64 decode step had five a layer);
    /// 0 (none) for fewer rows.
    fn copy16(&self, rows: &mut DevRows, t: usize) -> u64 {
        if t <= GEMM_F32_INPUT_UP_TO || self.failed() {
            return 0;
        }
        if rows.half.as_ref().is_none_or(|h| h.len() < rows.len) {
            self.moved();
            let cap = rows.buf.as_ref().map_or(rows.len, |b| b.len());
            match self.alloc::<u16>(cap.max(rows.len), "activations") {
                Ok(h) => rows.half = Some(h),
                Err(e) => {
                    self.fail("allocating", e);
                    return 0;
                }
            }
        }
        rows.fresh = true;
        rows.half
            .as_ref()
            .map_or(0, |h| h.device_ptr(&self.stream).0)
    }

    /// Where the kernel about to make `rows` (`t` of them, shaped already) writes them: `(f32,
    /// bf16 copy)`. Rows that only matrix products read (`Backend::product_rows`: the norms',
    /// the fusion's, the MLP's activation) are made as the bf16 copy alone (f32 address 0) where
    /// those products take their input as bf16: more than GEMM_F32_INPUT_UP_TO rows, and every
    /// matrix bf16 (no f32 product would want them). An 8192-token prefill writes ~390 MB a layer
    /// fewer so.
    fn outputs16(&self, rows: &mut DevRows, t: usize) -> (u64, u64) {
        let o16 = self.copy16(rows, t);
        if o16 != 0
            && rows.products_only
            && self.bf16_only
            && !self.f32_matrices.load(std::sync::atomic::Ordering::Relaxed)
        {
            rows.only16 = true;
            return (0, o16);
        }
        (self.p(rows), o16)
    }

    /// A bf16 scratch buffer of at least `len` elements (`slot` of the scratch, grown when
    /// short), its address.
    fn scratch16(
        &self,
        slot: impl Fn(&mut Scratch) -> &mut Option<CudaSlice<u16>>,
        len: usize,
    ) -> Option<u64> {
        let mut scratch = self.scratch.lock().expect("scratch");
        let b = slot(&mut scratch);
        if b.as_ref().is_none_or(|b| b.len() < len) {
            self.moved();
            match self.alloc::<u16>(len, "activations") {
                Ok(n) => *b = Some(n),
                Err(e) => {
                    self.fail("allocating", e);
                    return None;
                }
            }
        }
        b.as_ref().map(|b| b.device_ptr(&self.stream).0)
    }

    /// `x` rounded to bf16 (as the official bf16 model computes its products): the copy its
    /// kernel wrote beside it (`copy16`), else made by `to_bf16` in the scratch buffer (unless
    /// `done`: the last call made it there); the address of the copy.
    fn rounded(&self, x: &DevRows, done: bool) -> Option<u64> {
        if let (true, Some(h)) = (x.fresh, &x.half) {
            return Some(h.device_ptr(&self.stream).0);
        }
        let mut scratch = self.scratch.lock().expect("scratch");
        let len = x.len;
        if scratch.x16.as_ref().is_none_or(|b| b.len() < len) {
            self.moved();
            match self.alloc::<u16>(len, "activations") {
                Ok(b) => scratch.x16 = Some(b),
                Err(e) => {
                    self.fail("allocating", e);
                    return None;
                }
            }
        }
        let xs = scratch.x16.as_ref()?.device_ptr(&self.stream).0;
        if !done {
            let (src, nn) = (self.p(x), len as i64);
            self.launch(&self.k.to_bf16, flat(len.div_ceil(4)), &[&src, &xs, &nn]);
        }
        Some(xs)
    }

    /// `y = x · wᵀ + β·y` through cuBLAS (for a bf16 matrix, the input rounded to bf16 first, as
    /// the official bf16 model computes, and the product through cuBLASLt with the algorithm
    /// timed fastest for its shape; `rounded`: the previous call rounded this same `x`).
    fn gemm(&self, x: &DevRows, w: &DevMatrix, beta: f32, y: &mut DevRows, rounded: bool) {
        let yp = self.p(y);
        self.gemm_to(x, w, beta, (yp, false), rounded);
    }

    /// `gemm` into the f32 rows at `yp`, or (`out16`, bf16 matrices only) bf16 rows there.
    fn gemm_to(
        &self,
        x: &DevRows,
        w: &DevMatrix,
        beta: f32,
        (yp, out16): (u64, bool),
        rounded: bool,
    ) {
        let t = x.len / w.cols.max(1);
        let xp = match *w.data {
            DevData::F32(_) => self.p(x),
            DevData::BF16(_) => match self.rounded(x, rounded) {
                Some(xs) => xs,
                None => return,
            },
            // `product` widens them first (`dequantized`).
            DevData::Quant { .. } => {
                return self.fail("matrix product", "quantized weights not widened")
            }
        };
        let mode = self.mode();
        if matches!(mode, Mode::Replaying(_)) {
            return;
        }
        let timer = self.profile.as_ref().map(|_| self.time_start());
        let wp = w.ptr(&self.stream);
        // On the stream of the branch the product belongs to (see `branch`).
        let stream = self.launch_stream();
        let r = match *w.data {
            DevData::BF16(_) => {
                let side = stream != self.stream.cu_stream();
                let tune = (mode == Mode::Eager).then_some(&self.stream);
                // SAFETY: pointers of live device buffers holding these shapes.
                unsafe {
                    self.lt.product(
                        (w.rows, t, w.cols),
                        (beta != 0.0, out16),
                        (wp, xp, yp),
                        stream,
                        side,
                        tune,
                    )
                }
            }
            DevData::F32(_) if !out16 => self.gemm_f32(w.rows, t, w.cols, beta, wp, xp, yp, stream),
            DevData::F32(_) => Err("an f32 matrix's product into bf16 rows".into()),
            DevData::Quant { .. } => Err("quantized weights not widened".into()),
        };
        if let Err(e) = r {
            self.fail("matrix product", e);
        }
        if let Some(timer) = timer {
            let to = if out16 { " to bf16" } else { "" };
            self.time_end(format!("cublas {}x{}{to}", w.rows, w.cols).into(), timer);
        }
    }

    /// `y[n, m] = x[n, k] · w[m, k]ᵀ + β·y`, all f32, through cuBLAS on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_f32(
        &self,
        m: usize,
        n: usize,
        k: usize,
        beta: f32,
        w: u64,
        x: u64,
        y: u64,
        stream: cudarc::driver::sys::CUstream,
    ) -> std::result::Result<(), String> {
        let alpha = 1.0f32;
        let (m, n, k) = (m as i32, n as i32, k as i32);
        let f32t = blas_sys::cudaDataType::CUDA_R_32F;
        // SAFETY: the handle and the stream are alive as long as the backend; pointers of live
        // device buffers holding these shapes.
        unsafe {
            blas::set_stream(*self.blas.handle(), stream as _)
                .map_err(|e| format!("cuBLAS stream: {e:?}"))?;
            // Row-major y[t, n] = x[t, k] · w[n, k]ᵀ is column-major C(m×n) = Aᵀ(m×k) B(k×n)
            // with A = w as column-major [k, m], B = x as column-major [k, t].
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const _,
                w as *const _,
                f32t,
                k,
                x as *const _,
                f32t,
                k,
                &beta as *const f32 as *const _,
                y as *mut _,
                f32t,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(|e| format!("cuBLAS GEMM: {e:?}"))
        }
    }

    /// Blocks of 8 warps over `units` pieces of work (the matrix kernels' row pairs or groups):
    /// the fewest warps a unit among `splits` that still give the card four blocks a
    /// multiprocessor, else the last of `splits`; that count and the launch shape.
    fn warps_per_unit(&self, units: usize, splits: &[usize]) -> (i32, LaunchConfig) {
        let last = splits.last().copied().unwrap_or(8);
        let split = splits
            .iter()
            .copied()
            .find(|s| units.div_ceil(8 / s) >= 4 * self.sms)
            .unwrap_or(last);
        let cfg = LaunchConfig {
            grid_dim: (units.div_ceil(8 / split) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        (split as i32, cfg)
    }

    /// `product` of GEMM_ROWS_FROM to GEMM_ROWS rows on the tensor cores: groups of 16 weight rows (8 of gate
    /// and of up) in blocks of 8 warps, as many warps a group (1, 2, 4 or 8, splitting k) as
    /// give the card four blocks a multiprocessor.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rows(
        &self,
        x: &DevRows,
        w: &DevMatrix,
        epi: Epilogue,
        up: Option<&DevMatrix>,
        bias: Option<&CudaSlice<f32>>,
        y: &mut DevRows,
        t: usize,
    ) {
        // Few rows: the kernel rounds the f32 input itself; more: `to_bf16` first (half the
        // input bytes for every weight tile to read).
        let f32_input = t <= GEMM_F32_INPUT_UP_TO;
        let xs = if f32_input {
            self.p(x)
        } else {
            let Some(xs) = self.rounded(x, false) else {
                return;
            };
            xs
        };
        let (w0, yp) = (w.ptr(&self.stream), self.p(y));
        let w1 = up.map_or(0, |u| u.ptr(&self.stream));
        let (s0, s1) = (
            w.scales(&self.stream),
            up.map_or(0, |u| u.scales(&self.stream)),
        );
        let wi = w.data.quant().map_or(0, |q| 1 + q.index());
        let bp = bias.map_or(0, |b| self.pv(b));
        let (ti, ni, ki) = (t as i32, w.rows as i32, w.cols as i32);
        let groups = if epi == Epilogue::Glu {
            w.rows.div_ceil(8)
        } else {
            w.rows.div_ceil(16)
        };
        let (si, cfg) = self.warps_per_unit(groups, &[1, 2, 4, 8]);
        let variant = if f32_input { 0 } else { 1 + (t > 16) as usize };
        self.launch(
            &self.k.gemm_rows[variant][wi][epi as usize],
            cfg,
            &[&xs, &w0, &w1, &s0, &s1, &bp, &yp, &ti, &ni, &ki, &si],
        );
    }

    /// The scan's parameters of a step of several rows a sequence (spec §3.3), into `p`: δr, B
    /// and C cut out of x_proj's output (normed where the layer has inner norms), then
    /// Δ = softplus(δr · dt_projᵀ + bias). A decode step makes them inside `ssm_step` instead.
    /// Where the product runs through cuBLAS, whose epilogues have no softplus, Δ is left as
    /// δr · dt_projᵀ and the bias's address returned: the scan's kernels finish it as they read
    /// it (a pass over [t, E] less).
    fn scan_params(&self, s: &ScanInput<Cuda>, n: usize, p: &mut ScanRows) -> u64 {
        let r = s.dt_rank;
        let pw = r + 2 * n;
        let ScanRows { dr, b, c, delta } = p;
        match s.norms {
            Some([wd, wb, wc]) => {
                let mut parts = [(0, wd, &mut *dr), (r, wb, b), (r + n, wc, c)];
                self.rmsnorm_parts(s.proj, pw, s.eps, &mut parts);
            }
            None => {
                self.columns(s.proj, pw, 0, r, dr);
                self.columns(s.proj, pw, r, n, b);
                self.columns(s.proj, pw, r + n, n, c);
            }
        }
        let t = dr.len / r.max(1);
        let bf16 = matches!(*s.dt_proj.data, DevData::BF16(_));
        let cublas = t > GEMV_ROWS && !(bf16 && self.rows_kernel_takes(t, s.dt_proj));
        let epi = if cublas {
            Epilogue::Store
        } else {
            Epilogue::Softplus
        };
        self.product(dr, s.dt_proj, epi, None, Some(s.dt_bias), delta);
        if cublas {
            self.pv(s.dt_bias)
        } else {
            0
        }
    }

    /// RMSNorm of columns `from..from + w.len()` of each row of `x` (rows `width` wide), for
    /// each part `(from, w, out)`.
    fn rmsnorm_parts(
        &self,
        x: &DevRows,
        width: usize,
        eps: f32,
        parts: &mut [(usize, &CudaSlice<f32>, &mut DevRows)],
    ) {
        let rows = x.len / width.max(1);
        for chunk in parts.chunks_mut(3) {
            let mut np = NormParts::default();
            for (i, (from, w, out)) in chunk.iter_mut().enumerate() {
                self.shape(out, rows * w.len());
                (np.w[i], np.out[i], np.from[i], np.d[i]) =
                    (self.pv(w), self.p(out), *from as i32, w.len() as i32);
            }
            // A warp a (row, part).
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8).max(1) as u32, chunk.len() as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (xp, wi, ri) = (self.p(x), width as i32, rows as i64);
            self.launch(&self.k.rmsnorm_parts, cfg, &[&xp, &wi, &np, &eps, &ri]);
        }
    }

    /// Columns `from..from + n` of every row of `x` (rows `width` wide).
    fn columns(&self, x: &DevRows, width: usize, from: usize, n: usize, out: &mut DevRows) {
        let rows = x.len / width.max(1);
        self.shape(out, rows * n);
        let (xp, op) = (self.p(x), self.p(out));
        let (wi, fi, ni, total) = (width as i32, from as i32, n as i32, (rows * n) as i64);
        self.launch(
            &self.k.columns,
            flat(rows * n),
            &[&xp, &wi, &fi, &ni, &total, &op],
        );
    }

    /// `y ∘= x · wᵀ` by the epilogue `epi` (`up` for `Glu`, `bias` for `Softplus`): one pass
    /// over the weights of `gemm_rows` (bf16, GEMM_ROWS_FROM to GEMM_ROWS rows) or of the GEMV
    /// (up to GEMV_ROWS rows), else cuBLAS, then the epilogue (`Add` in the GEMM's β).
    fn product(
        &self,
        x: &DevRows,
        w: &DevMatrix,
        epi: Epilogue,
        up: Option<&DevMatrix>,
        bias: Option<&CudaSlice<f32>>,
        y: &mut DevRows,
    ) {
        self.product_folding(x, w, epi, up, bias, y, NormFold::default());
    }

    /// `w` (quantized) widened and rounded to bf16, into a buffer kept for the stream the product runs
    /// on and its operand (`slot`: 0 the matrix, 1 the gated MLP's up), as a matrix of its own:
    /// what a product of more rows than the GEMV takes (the tensor-core and cuBLAS paths multiply
    /// bf16). None where the buffer could not be made (the error recorded).
    fn dequantized(&self, w: &DevMatrix, slot: usize) -> Option<DevMatrix> {
        let n = w.numel();
        let side = (self.launch_stream() != self.stream.cu_stream()) as usize;
        let data = {
            let mut bufs = self.dequant.lock().expect("dequantized weights");
            let buf = &mut bufs[side][slot];
            let fits = |d: &DevData| matches!(d, DevData::BF16(b) if b.len() >= n);
            if !buf.as_deref().is_some_and(fits) {
                self.moved();
                match self.alloc::<u16>(n, "dequantized weights") {
                    Ok(b) => *buf = Some(Arc::new(DevData::BF16(b))),
                    Err(e) => {
                        self.fail("allocating", e);
                        return None;
                    }
                }
            }
            buf.clone()?
        };
        let (qp, sp, nn) = (w.ptr(&self.stream), w.scales(&self.stream), n as i64);
        let out = data.ptr(&self.stream);
        let Some(kind) = w.data.quant() else {
            self.fail("widening weights", "not quantized");
            return None;
        };
        let kernel = &self.k.dequant[kind.index()];
        self.launch(kernel, flat(n.div_ceil(8)), &[&qp, &sp, &nn, &out]);
        Some(DevMatrix {
            data,
            offset: 0,
            rows: w.rows,
            cols: w.cols,
        })
    }

    /// Whether `gemm_rows` takes a bf16 product of `t` rows over `w`.
    fn rows_kernel_takes(&self, t: usize, w: &DevMatrix) -> bool {
        (GEMM_ROWS_FROM..=GEMM_ROWS).contains(&t)
            && w.cols.is_multiple_of(8)
            && !self.k.gemm_rows.is_empty()
    }

    /// Whether `product` of `t` rows over `w` alone runs the GEMV (else `gemm_rows` or cuBLAS).
    fn gemv_takes(&self, t: usize, w: &DevMatrix) -> bool {
        t <= GEMV_ROWS && !(rows_kernel_weights(&w.data) && self.rows_kernel_takes(t, w))
    }

    /// `product`, its GEMV making a folded norm's rows (`fold`'s producer part: only where
    /// `gemv_takes`); an input left by one is taken unscaled by the GEMV, scaled first elsewhere.
    #[allow(clippy::too_many_arguments)]
    fn product_folding(
        &self,
        x: &DevRows,
        w: &DevMatrix,
        epi: Epilogue,
        up: Option<&DevMatrix>,
        bias: Option<&CudaSlice<f32>>,
        y: &mut DevRows,
        mut fold: NormFold,
    ) {
        let t = x.len / w.cols.max(1);
        if epi == Epilogue::Add {
            assert_eq!(y.len, t * w.rows, "the residual's shape");
        } else {
            self.shape(y, t * w.rows);
        }
        if t == 0 || self.failed() {
            return;
        }
        if t > GEMV_ROWS && w.data.quant().is_some() && !self.rows_kernel_takes(t, w) {
            // Gate and up prepared together stay one matrix (one product of both).
            let (wd, ud) = match up.map(|u| (u, w.joined(u))) {
                Some((_, Some(both))) => {
                    let Some(d) = self.dequantized(&both, 0) else {
                        return;
                    };
                    let part = |offset, rows| DevMatrix {
                        data: d.data.clone(),
                        offset,
                        rows,
                        cols: w.cols,
                    };
                    (part(0, w.rows), Some(part(w.numel(), both.rows - w.rows)))
                }
                Some((u, None)) => match (self.dequantized(w, 0), self.dequantized(u, 1)) {
                    (Some(wd), Some(ud)) => (wd, Some(ud)),
                    _ => return,
                },
                None => match self.dequantized(w, 0) {
                    Some(wd) => (wd, None),
                    None => return,
                },
            };
            return self.product_folding(x, &wd, epi, ud.as_ref(), bias, y, fold);
        }
        let same_type =
            up.is_none_or(|u| std::mem::discriminant(&*u.data) == std::mem::discriminant(&*w.data));
        if same_type && rows_kernel_weights(&w.data) && self.rows_kernel_takes(t, w) {
            return self.gemm_rows(x, w, epi, up, bias, y, t);
        }
        if t <= GEMV_ROWS {
            let wi = match (&*w.data, up.map(|u| &*u.data)) {
                (DevData::F32(_), None | Some(DevData::F32(_))) => 0,
                (DevData::BF16(_), None | Some(DevData::BF16(_))) => 1,
                (DevData::Quant { kind, .. }, None) => 2 + kind.index(),
                (DevData::Quant { kind, .. }, Some(DevData::Quant { kind: up, .. }))
                    if up == kind =>
                {
                    2 + kind.index()
                }
                _ => return self.fail("the gated MLP", "gate and up matrices of different types"),
            };
            let pending = *x.pending.lock().expect("pending scale");
            let xp = match pending {
                Some(pn) if pn.d == w.cols => {
                    fold.sq_in = x.sq.as_ref().map_or(0, |b| b.device_ptr(&self.stream).0);
                    (fold.sq_n, fold.eps) = (pn.n as i32, pn.eps);
                    self.raw_p(x)
                }
                _ => self.p(x),
            };
            let (w0, yp) = (w.ptr(&self.stream), self.p(y));
            let w1 = up.map_or(0, |u| u.ptr(&self.stream));
            let (s0, s1) = (
                w.scales(&self.stream),
                up.map_or(0, |u| u.scales(&self.stream)),
            );
            let bp = bias.map_or(0, |b| self.pv(b));
            let (ti, ni, ki) = (t as i32, w.rows as i32, w.cols as i32);
            // Pairs of weight rows in blocks of 8 warps, 2 warps a pair (the fastest of 1, 2, 4
            // and 8 over a whole step on an H200) unless that leaves the card with under four
            // blocks a multiprocessor: then 4 or 8 (narrow matrices: down and out_proj).
            let pairs = if epi == Epilogue::Glu {
                w.rows
            } else {
                w.rows.div_ceil(2)
            };
            // One and two rows (decode steps of one or two sequences) have kernels of their own:
            // fewer registers, more loads in flight (on an H200 batch 1 read 468-474 tok/s so,
            // 386-398 without; batch 2 770-782 against 669-681).
            let kernel = &self.k.gemv[if t <= 2 { t } else { 0 }][wi][epi as usize];
            // One row: the most warps a pair whose blocks the card holds all at once, where some
            // count does. out_proj's and down's 800 pairs (1.5B) take 4 warps a pair in 400
            // blocks, not 8 in 800, which at four blocks a multiprocessor need a second wave
            // (H100, three rounds: batch 1 521 / 530 / 527 tok/s against 495 / 491 / 482; the
            // rule itself against the one below, two rounds: 529 / 531 against 495 / 501). Two
            // rows read slower so (747-757 against 766-782) and keep the rule below.
            let wave = kernel.resident(256, 0) * self.sms;
            let (si, cfg) = match [8, 4, 2]
                .into_iter()
                .find(|s| t == 1 && pairs.div_ceil(8 / s) <= wave)
            {
                Some(s) => self.warps_per_unit(pairs, &[s]),
                None => self.warps_per_unit(pairs, &[2, 4, 8]),
            };
            return self.launch(
                kernel,
                cfg,
                &[&xp, &w0, &w1, &s0, &s1, &bp, &yp, &ti, &ni, &ki, &si, &fold],
            );
        }
        match epi {
            Epilogue::Store => self.gemm(x, w, 0.0, y, false),
            Epilogue::Add => self.gemm(x, w, 1.0, y, false),
            Epilogue::Softplus => {
                self.gemm(x, w, 0.0, y, false);
                let bias = bias.expect("softplus has a bias");
                let (yp, bp, e) = (self.p(y), self.pv(bias), bias.len());
                let (ei, ri) = (e as i32, (y.len / e.max(1)) as i64);
                self.launch(
                    &self.k.softplus_bias,
                    by_rows(e, y.len / e.max(1), 256),
                    &[&yp, &bp, &ei, &ri],
                );
            }
            Epilogue::Glu => {
                let up = up.expect("the gated MLP has an up matrix");
                let f = w.rows;
                let mut u = std::mem::take(&mut self.scratch.lock().expect("scratch").up);
                // Gate and up as one product where they are one allocation (`glu_matrices`):
                // gate's columns then up's in each row of `u`; else one product each. bf16
                // matrices' joined product goes out rounded to bf16, as the official bf16 model
                // has gate and up (half the bytes of the widest product's output to write and
                // read again: 360 MB → 180 MB at 8192 rows).
                let bf16 = matches!(*w.data, DevData::BF16(_)) && self.bf16_only;
                let (gp, upp, stride, in16) = match w.joined(up) {
                    Some(both) if bf16 => {
                        let Some(at) = self.scratch16(|s| &mut s.up16, t * both.rows) else {
                            return;
                        };
                        self.gemm_to(x, &both, 0.0, (at, true), false);
                        (at, at + 2 * f as u64, 2 * f as i64, true)
                    }
                    Some(both) => {
                        self.shape(&mut u, t * both.rows);
                        self.gemm(x, &both, 0.0, &mut u, false);
                        let at = self.p(&u);
                        (at, at + 4 * f as u64, 2 * f as i64, false)
                    }
                    None => {
                        self.gemm(x, w, 0.0, y, false);
                        self.shape(&mut u, t * up.rows);
                        self.gemm(x, up, 0.0, &mut u, true);
                        (self.p(y), self.p(&u), f as i64, false)
                    }
                };
                let (yp, g16) = self.outputs16(y, t);
                let (fi, ri) = (f as i32, t as i64);
                self.launch(
                    &self.k.silu_mul[in16 as usize],
                    flat(y.len.div_ceil(4)),
                    &[&gp, &upp, &stride, &fi, &ri, &yp, &g16],
                );
                self.scratch.lock().expect("scratch").up = u;
            }
        }
    }
}

/// Whether `gemm_rows` multiplies weights of this type (bf16, and quantized ones widened as it
/// reads them).
fn rows_kernel_weights(d: &DevData) -> bool {
    matches!(d, DevData::BF16(_) | DevData::Quant { .. })
}

/// A Q4_0 block's 16 bytes of quants (GGML's: byte j holds element j low, 16 + j high) in the
/// card's order (`kernels.cu`'s `q4_t`: a chunk of eight elements a word, byte j of chunk c
/// holding element 8c + j low and 8c + 4 + j high).
fn q4_0_chunks(qs: &[u8]) -> [u8; QK / 2] {
    let nibble = |e: usize| if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 };
    std::array::from_fn(|i| {
        let (c, j) = (i / 4, i % 4);
        nibble(8 * c + j) | nibble(8 * c + 4 + j) << 4
    })
}

/// A kernel argument: a plain value pushed by reference.
trait Arg {
    /// The address of the value, as the driver takes a kernel parameter.
    fn param(&self) -> *mut std::ffi::c_void;
}

impl<T: DeviceRepr> Arg for T {
    fn param(&self) -> *mut std::ffi::c_void {
        self as *const T as *mut std::ffi::c_void
    }
}

impl Backend for Cuda {
    type Matrix = DevMatrix;
    type Vector = CudaSlice<f32>;
    type Rows = DevRows;
    type State = DevState;
    type Kv = DevKv;
    type KvView<'a> = DevKvView<'a>;

    fn matrix(&self, t: Tensor) -> Result<DevMatrix> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let data = Arc::new(self.upload_matrices(&[t])?);
        Ok(DevMatrix {
            data,
            offset: 0,
            rows,
            cols,
        })
    }

    /// Gate and up in one allocation, so that a product of many rows takes both as one matrix.
    fn glu_matrices(&self, gate: Tensor, up: Tensor) -> Result<(DevMatrix, DevMatrix)> {
        if gate.dtype != up.dtype || gate.shape[1] != up.shape[1] {
            return Ok((self.matrix(gate)?, self.matrix(up)?));
        }
        let (rg, ru, cols) = (gate.shape[0], up.shape[0], gate.shape[1]);
        let data = Arc::new(self.upload_matrices(&[gate, up])?);
        let at = |offset, rows| DevMatrix {
            data: data.clone(),
            offset,
            rows,
            cols,
        };
        Ok((at(0, rg), at(rg * cols, ru)))
    }

    fn vector(&self, v: Vec<f32>) -> Result<CudaSlice<f32>> {
        let mut d = self.alloc::<f32>(v.len(), "parameters")?;
        if !v.is_empty() {
            self.stream
                .memcpy_htod(&v, &mut d)
                .map_err(|e| device_err("uploading parameters", e))?;
        }
        Ok(d)
    }

    /// A forward runs on the caller's thread: its host work has no parallel loops for a pool to
    /// share, and handing it to a pool thread and back costs two wake-ups a step, while the card
    /// waits for the next step's graph.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.on_pool {
            return hymba_kernels::on_pool(f);
        }
        f()
    }

    fn begin(&self, seqs: &[Seq<Cuda>]) {
        let pos: Vec<i32> = seqs
            .iter()
            .flat_map(|s| (s.pos0..s.pos0 + s.rows.len()).map(|p| p as i32))
            .collect();
        let row_seq: Vec<i32> = seqs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.rows.clone().map(move |_| i as i32))
            .collect();
        let infos: Vec<SeqInfo> = seqs
            .iter()
            .map(|s| SeqInfo {
                row0: s.rows.start as i64,
                len: s.rows.len() as i32,
                pos0: s.pos0 as i32,
                window: s.window.min(i32::MAX as usize) as i32,
                pad: 0,
            })
            .collect();
        let groups = seqs.first().map_or(0, |s| s.past.len());
        let mut past = vec![KvSrc::default(); groups * seqs.len() * 2];
        for g in 0..groups {
            for (i, s) in seqs.iter().enumerate() {
                let views: Vec<&DevKvView> = s.past[g].iter().filter(|v| v.src.rows > 0).collect();
                assert!(
                    views.len() <= 2,
                    "at most a meta prefix and a store per group"
                );
                for (j, v) in views.iter().enumerate() {
                    past[(g * seqs.len() + i) * 2 + j] = v.src;
                }
            }
        }
        let layers = seqs.first().map_or(0, |s| s.states.len());
        let table = |f: &dyn Fn(&DevState) -> u64| -> Vec<u64> {
            (0..layers)
                .flat_map(|l| seqs.iter().map(move |s| f(&s.states[l])))
                .collect()
        };
        let ssm = table(&|st| self.pv(&st.ssm));
        let conv = table(&|st| self.pv(&st.conv));
        let mut scratch = self.scratch.lock().expect("scratch");
        self.flush(&mut scratch);
        self.put(&mut scratch.pos, &pos);
        self.put(&mut scratch.row_seq, &row_seq);
        self.put(&mut scratch.seqs, &infos);
        self.put(&mut scratch.past, &past);
        self.put(&mut scratch.ssm, &ssm);
        self.put(&mut scratch.conv, &conv);
        let tiles = |rows: usize| -> Vec<i32> {
            seqs.iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    (0..s.rows.len())
                        .step_by(rows)
                        .flat_map(move |r| [i as i32, r as i32])
                })
                .collect()
        };
        let (small, large) = (tiles(TILE_ROWS), tiles(MMA_ROWS));
        self.put(&mut scratch.tiles, &small);
        self.put(&mut scratch.mma_tiles, &large);
        scratch.n_tiles = small.len() / 2;
        scratch.n_mma_tiles = large.len() / 2;
        // Chunks of SCAN_CHUNK rows, or fewer (down to 16) where that would leave under
        // SCAN_MIN_CHUNKS of them: a chunk's threads walk its rows one after another, so a
        // short prompt's scan is a chain of memory round trips on few blocks (on an H200, 1.5B
        // shapes: prefill of 128 tokens 17.1-17.3K tok/s against 14.8-15.2K, 512 38.9-39.2K
        // against 35.4-36.5K).
        let total: usize = seqs.iter().map(|s| s.rows.len()).sum();
        let rows = (total / SCAN_MIN_CHUNKS).clamp(16, SCAN_CHUNK) / 16 * 16;
        let (mut chunks, mut seq_chunks) = (Vec::new(), vec![0i32]);
        for (i, s) in seqs.iter().enumerate() {
            let len = s.rows.len();
            for r in (0..len).step_by(rows) {
                let flags = (r == 0) as i32 | (((r + rows >= len) as i32) << 1);
                chunks.extend([i as i32, r as i32, rows.min(len - r) as i32, flags]);
            }
            seq_chunks.push((chunks.len() / 4) as i32);
        }
        self.put(&mut scratch.chunks, &chunks);
        self.put(&mut scratch.seq_chunks, &seq_chunks);
        scratch.n_chunks = chunks.len() / 4;
        scratch.multi_chunk = seqs.iter().any(|s| s.rows.len() > rows);
        scratch.max_len = seqs.iter().map(|s| s.rows.len()).max().unwrap_or(0);
        scratch.n_seqs = seqs.len();
        drop(scratch);
        self.start_step(seqs);
    }

    fn kv(&self, heads: Heads, max: usize, dtype: KvDtype) -> DevKv {
        DevKv {
            k: None,
            v: None,
            pos: None,
            rows: 0,
            cap: 0,
            max,
            kw: heads.kv * heads.dk,
            vw: heads.kv * heads.dv,
            dtype,
        }
    }

    fn kv_write(
        &self,
        kv: &mut DevKv,
        slot: usize,
        first_pos: usize,
        k: &DevRows,
        v: &DevRows,
        rows: Range<usize>,
    ) {
        self.end_step();
        let n = rows.len();
        if n == 0 || self.failed() {
            return;
        }
        let need = (slot + n).max(kv.rows);
        assert!(
            need <= kv.max,
            "K/V rows: {need} exceed the maximum of {}",
            kv.max
        );
        if need > kv.cap {
            // Writes still pending may target the old buffer: make them before copying it.
            self.flush(&mut self.scratch.lock().expect("scratch"));
            let cap = need.max(2 * kv.cap).max(16).min(kv.max);
            let grow = |old: &Option<DevData>, w: usize| -> Result<DevData> {
                let mut new = match kv.dtype {
                    KvDtype::F32 => DevData::F32(self.alloc::<f32>(cap * w, "the K/V cache")?),
                    KvDtype::BF16 => DevData::BF16(self.alloc::<u16>(cap * w, "the K/V cache")?),
                };
                let used = kv.rows * w;
                match (old, &mut new) {
                    (Some(DevData::F32(o)), DevData::F32(n)) if used > 0 => self
                        .stream
                        .memcpy_dtod(&o.slice(0..used), &mut n.slice_mut(0..used)),
                    (Some(DevData::BF16(o)), DevData::BF16(n)) if used > 0 => self
                        .stream
                        .memcpy_dtod(&o.slice(0..used), &mut n.slice_mut(0..used)),
                    _ => Ok(()),
                }
                .map_err(|e| device_err("growing the K/V cache", e))?;
                Ok(new)
            };
            let grown = (|| -> Result<_> {
                let (nk, nv) = (grow(&kv.k, kv.kw)?, grow(&kv.v, kv.vw)?);
                let mut np = self.alloc::<i32>(cap, "the K/V cache")?;
                if let (Some(o), true) = (&kv.pos, kv.rows > 0) {
                    self.stream
                        .memcpy_dtod(&o.slice(0..kv.rows), &mut np.slice_mut(0..kv.rows))
                        .map_err(|e| device_err("growing the K/V cache", e))?;
                }
                Ok((nk, nv, np))
            })();
            match grown {
                Ok((nk, nv, np)) => {
                    kv.k = Some(nk);
                    kv.v = Some(nv);
                    kv.pos = Some(np);
                    kv.cap = cap;
                }
                Err(e) => return self.fail("K/V cache", e),
            }
        }
        let (kd, vd) = (
            kv.k.as_ref().expect("allocated"),
            kv.v.as_ref().expect("allocated"),
        );
        let op = PutOp {
            k: self.p(k) + (rows.start * kv.kw * 4) as u64,
            v: self.p(v) + (rows.start * kv.vw * 4) as u64,
            dk: kd.ptr(&self.stream),
            dv: vd.ptr(&self.stream),
            dpos: self.pv_i(kv.pos.as_ref().expect("allocated")),
            slot: slot as i64,
            rows: n as i32,
            first_pos: first_pos as i32,
            kw: kv.kw as i32,
            vw: kv.vw as i32,
            bf16: (kv.dtype == KvDtype::BF16) as i32,
            pad: 0,
        };
        self.scratch.lock().expect("scratch").puts.push(op);
        kv.rows = need;
    }

    fn kv_flush(&self) {
        self.end_step();
        self.flush(&mut self.scratch.lock().expect("scratch"));
    }

    fn kv_view<'a>(&self, kv: &'a DevKv, _pos: KeyPositions<'a>) -> DevKvView<'a> {
        // Positions are kept on the card beside the rows.
        let ptr = |d: &Option<DevData>| d.as_ref().map_or(0, |d| d.ptr(&self.stream));
        let src = KvSrc {
            k: ptr(&kv.k),
            v: ptr(&kv.v),
            pos: kv.pos.as_ref().map_or(0, |p| self.pv_i(p)),
            rows: kv.rows as i32,
            pos0: 0,
            k_stride: kv.kw as i32,
            v_stride: kv.vw as i32,
            bf16: (kv.dtype == KvDtype::BF16) as i32,
            pad: 0,
        };
        DevKvView {
            src,
            _kv: PhantomData,
        }
    }

    fn state(&self, e: usize, n: usize, k: usize) -> DevState {
        let z = |len: usize| {
            self.alloc::<f32>(len, "the SSM state")
                .unwrap_or_else(|e| panic!("{e}"))
        };
        DevState {
            ssm: z(e * n),
            conv: z((k - 1) * e),
        }
    }

    fn rows(&self) -> DevRows {
        DevRows::default()
    }

    fn product_rows(&self) -> DevRows {
        DevRows {
            products_only: true,
            ..Default::default()
        }
    }

    fn upload(&self, host: &[f32], out: &mut DevRows) {
        self.shape(out, host.len());
        if let (Some(b), false) = (out.buf.as_mut(), host.is_empty()) {
            if let Err(e) = self
                .stream
                .memcpy_htod(host, &mut b.slice_mut(0..host.len()))
            {
                self.fail("uploading activations", e);
            }
        }
    }

    fn read<R>(&self, rows: &DevRows, f: impl FnOnce(&[f32]) -> R) -> R {
        self.settle(rows);
        if rows.only16 {
            self.raw_p(rows); // fails: such rows have no f32 values to read
        }
        self.end_step();
        let b = match &rows.buf {
            Some(b) if rows.len > 0 && !self.failed() => b.slice(0..rows.len),
            _ => return f(&vec![0.0; rows.len]),
        };
        // Through the page-locked buffer where it is small enough to keep (a batch's logits):
        // a copy from pageable memory goes through the driver's staging buffers, at a fraction
        // of the bus's rate.
        if rows.len <= HOST_KEEP {
            let mut host = self.host.lock().expect("host buffer");
            if host.as_ref().is_none_or(|h| h.len() < rows.len) {
                *host = None;
                // SAFETY: plain (cached, not write-combined) page-locked memory; every element
                // read below is first written by the copy.
                match unsafe { self.ctx.alloc_pinned_with_flags::<f32>(rows.len, 0) } {
                    Ok(h) => *host = Some(h),
                    Err(e) => self.fail("allocating page-locked host memory", e),
                }
            }
            if let Some(h) = host.as_mut() {
                // The copy's length is its destination's: exactly the rows.
                let copied = h.as_mut_slice().and_then(|s| {
                    let s = &mut s[..rows.len];
                    self.stream.memcpy_dtoh(&b, s)?;
                    self.stream.synchronize()?;
                    Ok(s)
                });
                match copied {
                    Ok(s) => return f(s),
                    Err(e) => self.fail("downloading", e),
                }
            }
            return f(&vec![0.0; rows.len]);
        }
        match self.stream.clone_dtoh(&b) {
            Ok(v) => f(&v),
            Err(e) => {
                self.fail("downloading", e);
                f(&vec![0.0; rows.len])
            }
        }
    }

    fn finish(&self) -> Result<()> {
        self.end_step();
        self.flush(&mut self.scratch.lock().expect("scratch"));
        if let Err(e) = self.stream.synchronize() {
            self.fail("running the step", e);
        }
        match self.err.lock().expect("error slot").take() {
            Some(e) => Err(Error::Device(e)),
            None => Ok(()),
        }
    }

    fn embed(&self, table: &DevMatrix, ids: &[u32], d: usize, out: &mut DevRows) {
        // Rows are added after those there: those made final first.
        self.settle(out);
        let start = out.len;
        self.shape(out, start + ids.len() * d);
        let ip = {
            let mut scratch = self.scratch.lock().expect("scratch");
            self.put(&mut scratch.ids, ids);
            self.table(&scratch.ids, 0)
        };
        let (op, tp, dd) = (
            self.p(out) + (start * 4) as u64,
            table.ptr(&self.stream),
            d as i32,
        );
        let cfg = rows_of(ids.len(), 128);
        match *table.data {
            DevData::F32(_) => self.launch(&self.k.embed_f32, cfg, &[&op, &tp, &ip, &dd]),
            DevData::BF16(_) => self.launch(&self.k.embed_bf16, cfg, &[&op, &tp, &ip, &dd]),
            DevData::Quant { kind, .. } => {
                let sp = table.scales(&self.stream);
                let k = &self.k.embed_quant[kind.index()];
                self.launch(k, cfg, &[&op, &tp, &sp, &ip, &dd])
            }
        }
    }

    fn matmul(&self, x: &DevRows, w: &DevMatrix, y: &mut DevRows) {
        self.product(x, w, Epilogue::Store, None, None, y);
    }

    fn matmul_add(&self, x: &DevRows, w: &DevMatrix, h: &mut DevRows) {
        self.product(x, w, Epilogue::Add, None, None, h);
    }

    /// Where the GEMV runs the product of up to FOLD_ROWS rows, the norm is folded into it and
    /// into the next GEMV (see `NormFold` in kernels.cu): `u` holds `h ⊙ norm` and the sums of
    /// squares until then.
    fn matmul_add_norm(
        &self,
        x: &DevRows,
        w: &DevMatrix,
        h: &mut DevRows,
        norm: &CudaSlice<f32>,
        eps: f32,
        u: &mut DevRows,
    ) {
        let t = x.len / w.cols.max(1);
        if !self.norm_fold
            || !(1..=FOLD_ROWS).contains(&t)
            || norm.len() != w.rows
            || !self.gemv_takes(t, w)
        {
            self.matmul_add(x, w, h);
            return self.rmsnorm(h, norm, eps, u);
        }
        let pairs = w.rows.div_ceil(2);
        self.shape(u, t * w.rows);
        if u.sq.as_ref().is_none_or(|b| b.len() < t * pairs) {
            self.moved();
            match self.alloc::<f32>(t * pairs, "activations") {
                Ok(b) => u.sq = Some(b),
                Err(e) => return self.fail("allocating", e),
            }
        }
        let fold = NormFold {
            w: self.pv(norm),
            u: self.raw_p(u),
            sq: u.sq.as_ref().map_or(0, |b| b.device_ptr(&self.stream).0),
            ..Default::default()
        };
        self.product_folding(x, w, Epilogue::Add, None, None, h, fold);
        *u.pending.get_mut().expect("pending scale") = Some(Pending {
            n: pairs,
            d: w.rows,
            eps,
        });
    }

    fn glu(&self, x: &DevRows, gate: &DevMatrix, up: &DevMatrix, out: &mut DevRows) {
        self.product(x, gate, Epilogue::Glu, Some(up), None, out);
    }

    fn rmsnorm(&self, x: &DevRows, w: &CudaSlice<f32>, eps: f32, out: &mut DevRows) {
        let d = w.len();
        let rows = x.len / d.max(1);
        self.shape(out, rows * d);
        let (xp, wp) = (self.p(x), self.pv(w));
        let (op, o16) = self.outputs16(out, rows);
        if rows >= NORM_WARP_ROWS_FROM && d.is_multiple_of(4) && d <= NORM_WARP_MAX {
            let (di, ri) = (d as i32, rows as i64);
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            return self.launch(
                &self.k.rmsnorm_rows,
                cfg,
                &[&xp, &wp, &di, &eps, &ri, &op, &o16],
            );
        }
        let (wi, fi, di) = (d as i32, 0i32, d as i32);
        self.launch(
            &self.k.rmsnorm,
            rows_of(rows, row_threads(rows)),
            &[&xp, &wi, &fi, &wp, &di, &eps, &op, &o16],
        );
    }

    fn gather(&self, x: &DevRows, width: usize, rows: &[Range<usize>], out: &mut DevRows) {
        let n: usize = rows.iter().map(|r| r.len()).sum();
        self.settle(x);
        self.shape(out, n * width);
        let (Some(src), Some(dst)) = (x.buf.as_ref(), out.buf.as_mut()) else {
            return;
        };
        if matches!(self.mode(), Mode::Replaying(_)) {
            return;
        }
        let mut at = 0;
        for r in rows {
            let len = r.len() * width;
            if let Err(e) = self.stream.memcpy_dtod(
                &src.slice(r.start * width..r.end * width),
                &mut dst.slice_mut(at..at + len),
            ) {
                return self.fail("gathering rows", e);
            }
            at += len;
        }
    }

    fn pick(&self, x: &DevRows, width: usize, draws: &[Draw], out: &mut DevRows) {
        let rows = x.len / width;
        assert_eq!(draws.len(), rows, "a draw a row");
        self.shape(out, rows);
        if rows == 0 {
            return;
        }
        // The draws' (temperature, min-p, top-k, top-p, u) to the card, unless every pick is an
        // argmax.
        let table = draws.iter().any(|d| d.temperature != 0.0).then(|| {
            let t: Vec<f32> = draws
                .iter()
                .flat_map(|d| {
                    let top_k = d.top_k.min(width) as f32;
                    [d.temperature, d.min_p, top_k, d.top_p, d.u]
                })
                .collect();
            self.stream.clone_htod(&t)
        });
        let dp = match &table {
            None => 0,
            Some(Ok(t)) => t.device_ptr(&self.stream).0,
            Some(Err(e)) => return self.fail("uploading the draws", e),
        };
        let (xp, op, w) = (self.p(x), self.p(out), width as i64);
        // Rows that fit keep their weights in shared memory, where top-k and top-p cut.
        let cache = if draws.iter().any(|d| d.temperature != 0.0 && d.cuts(width))
            && 4 * width <= self.pick_smem
        {
            width
        } else {
            0
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (PICK_THREADS, 1, 1),
            shared_mem_bytes: 4 * cache as u32,
        };
        let cache = cache as i64;
        self.launch(&self.k.pick_rows, cfg, &[&xp, &w, &dp, &cache, &op]);
    }

    fn split_in_proj(
        &self,
        p: &DevRows,
        parts: InProjParts,
        inv_freq: &CudaSlice<f32>,
        _seqs: &[Seq<Cuda>],
        q: &mut DevRows,
        kv: Option<(&mut DevRows, &mut DevRows)>,
    ) {
        let rows = p.len / parts.width.max(1);
        self.shape(q, rows * parts.q);
        let mut l = InProjLayout {
            width: parts.width as i32,
            qw: parts.q as i32,
            z_at: parts.z_at as i32,
            e: parts.e as i32,
            dk: parts.dk as i32,
            ..Default::default()
        };
        let (mut kp, mut vp) = (0u64, 0u64);
        if let (Some(split), Some((k, v))) = (parts.kv, kv) {
            self.shape(k, rows * split.kw);
            self.shape(v, rows * split.vw);
            (kp, vp) = (self.p(k), self.p(v));
            (l.kv, l.k_at, l.kw, l.vw, l.round) = (
                1,
                split.k_at as i32,
                split.kw as i32,
                split.vw as i32,
                (split.dtype == KvDtype::BF16) as i32,
            );
        }
        let pos = match &self.scratch.lock().expect("scratch").pos {
            Some(pos) => self.pv_i(pos),
            None => return self.fail("split_in_proj", "no positions: begin was not called"),
        };
        let per_row = parts.q / 2
            + if l.kv == 1 {
                (l.kw / 2 + l.vw) as usize
            } else {
                0
            };
        let (pp, fp, qp, r) = (self.p(p), self.pv(inv_freq), self.p(q), rows as i64);
        self.branch(Branch::InProjDone);
        self.launch(
            &self.k.split_in_proj,
            by_rows(per_row, rows, 256),
            &[&pp, &l, &pos, &fp, &r, &qp, &kp, &vp],
        );
    }

    fn conv_silu(
        &self,
        p: &DevRows,
        width: usize,
        from: usize,
        layer: usize,
        taps: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        seqs: &mut [Seq<Cuda>],
        out: &mut DevRows,
    ) {
        let e = bias.len();
        let kk = taps.len() / e.max(1);
        let t: usize = seqs.iter().map(|s| s.rows.len()).sum();
        self.shape(out, t * e);
        let o16 = self.copy16(out, t);
        self.branch(Branch::Ssm);
        let scratch = self.scratch.lock().expect("scratch");
        let n = scratch.n_seqs;
        let (sp, rp, cp) = (
            self.table(&scratch.seqs, 0),
            self.table(&scratch.row_seq, 0),
            self.table(&scratch.conv, layer * n),
        );
        let (pp, tp, bp, op) = (self.p(p), self.pv(taps), self.pv(bias), self.p(out));
        let (wi, fi, ei, ki, rows) = (width as i32, from as i32, e as i32, kk as i32, t as i64);
        let per_seq = LaunchConfig {
            grid_dim: (e.div_ceil(128) as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        if scratch.max_len <= CONV_STEP_UP_TO {
            // Short sequences (decode): a thread walks a channel's rows, then keeps the state.
            return self.launch(
                &self.k.conv_silu_step,
                per_seq,
                &[&pp, &wi, &fi, &sp, &cp, &tp, &bp, &ei, &ki, &op, &o16],
            );
        }
        // CONV_ROWS (8) rows a block.
        self.launch(
            &self.k.conv_silu,
            by_rows(e, t.div_ceil(8), 128),
            &[
                &pp, &wi, &fi, &sp, &rp, &cp, &tp, &bp, &ei, &ki, &rows, &op, &o16,
            ],
        );
        self.launch(
            &self.k.conv_state,
            per_seq,
            &[&pp, &wi, &fi, &sp, &cp, &ei, &ki],
        );
    }

    fn hybrid_heads(
        &self,
        at: &AttnInput<Cuda>,
        ssm: &ScanInput<Cuda>,
        fuse: &Fuse<Cuda>,
        seqs: &mut [Seq<Cuda>],
        out: &mut DevRows,
    ) {
        let e = fuse.attn_norm.len();
        let n = ssm.a.len() / e.max(1);
        let t: usize = seqs.iter().map(|s| s.rows.len()).sum();
        // A decode step (one row a sequence) makes the scan's parameters inside its kernel.
        let step = self.scratch.lock().expect("scratch").max_len <= 1;
        let mut params = std::mem::take(&mut self.scratch.lock().expect("scratch").params);
        let dt_bias = if step {
            0
        } else {
            self.branch(Branch::Scan);
            self.scan_params(ssm, n, &mut params)
        };
        self.branch(Branch::Main);
        let mut scratch = self.scratch.lock().expect("scratch");
        let ns = scratch.n_seqs;
        let (seqs_p, rows_p) = (
            self.table(&scratch.seqs, 0),
            self.table(&scratch.row_seq, 0),
        );
        let past_p = self.table(&scratch.past, at.group * ns * 2);
        let ssm_p = self.table(&scratch.ssm, ssm.layer * ns);
        let (tiles_p, n_tiles, max_len) = (
            self.table(&scratch.tiles, 0),
            scratch.n_tiles,
            scratch.max_len,
        );
        // (The tensor-core kernel's tiles go along the grid's y: at most 65535.)
        let mma_fits = scratch.n_mma_tiles <= 65535;
        let Scratch { attn, y, part, .. } = &mut *scratch;
        self.shape(attn, t * e);
        self.shape(y, t * e);
        self.shape(out, t * e);
        let hd = at.heads;
        let (qp, ap, yp) = (self.p(at.q), self.p(attn), self.p(y));
        let scale = 1.0 / (hd.dk as f32).sqrt();
        let (heads, kv_heads, dk, dv) = (hd.q as i32, hd.kv as i32, hd.dk as i32, hd.dv as i32);
        // 2. Attention of every row over its sequence's meta prefix, store and this call's rows.
        // Keys are split when rows × heads alone would leave the multiprocessors idle (decode).
        let (nk, nv) = (self.p(at.k), self.p(at.v));
        let global = (at.kind == crate::config::AttnKind::Global) as i32;
        let meta = at.meta as i32;
        let smem = 4
            * (TILE_ROWS * (hd.dk + 1)
                + TILE_KEYS * (hd.dk + 1)
                + TILE_KEYS * hd.dv
                + TILE_ROWS * (TILE_KEYS + 1));
        let mma = self
            .k
            .attention_mma
            .iter()
            .find(|(shape, _)| *shape == (hd.dk, hd.dv))
            .map(|(_, k)| {
                let all_bf16 = !self.f32_matrices.load(std::sync::atomic::Ordering::Relaxed);
                &k[(self.attention16 && all_bf16) as usize]
            });
        if let (true, KvDtype::BF16, Some(kernel)) =
            (max_len > TILED_FROM && mma_fits, at.kv_dtype, mma)
        {
            // This call's keys and values as bf16 (the kernel copies bf16 rows to shared memory
            // without rounding them on the way).
            let (kl, vl) = (t * hd.kv * hd.dk, t * hd.kv * hd.dv);
            if scratch.kv16.as_ref().is_none_or(|b| b.len() < kl + vl) {
                self.moved();
                match self.alloc::<u16>(kl + vl, "keys and values") {
                    Ok(b) => scratch.kv16 = Some(b),
                    Err(e) => return self.fail("allocating", e),
                }
            }
            let Some(kv16) = scratch.kv16.as_ref() else {
                return;
            };
            let k16 = kv16.device_ptr(&self.stream).0;
            // kl is a multiple of 8 (dk is, for every MMA shape): v16 starts 16-byte aligned.
            let v16 = k16 + 2 * kl as u64;
            for (src, dst, len) in [(nk, k16, kl), (nv, v16, vl)] {
                let n = len as i64;
                self.launch(&self.k.to_bf16, flat(len.div_ceil(4)), &[&src, &dst, &n]);
            }
            let (tp, n) = (self.table(&scratch.mma_tiles, 0), scratch.n_mma_tiles);
            // Heads along x: the kernel takes the tiles from the last (see attention_mma).
            let cfg = LaunchConfig {
                grid_dim: (hd.q as u32, n as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: mma_smem(hd.dk, hd.dv) as u32,
            };
            self.launch(
                kernel,
                cfg,
                &[
                    &qp, &heads, &kv_heads, &seqs_p, &tp, &past_p, &k16, &v16, &global, &meta,
                    &scale, &ap,
                ],
            );
        } else if max_len > TILED_FROM && smem <= 48 << 10 {
            let cfg = LaunchConfig {
                grid_dim: (n_tiles as u32, hd.q as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            self.launch(
                &self.k.attention_tiles,
                cfg,
                &[
                    &qp, &heads, &kv_heads, &dk, &dv, &seqs_p, &tiles_p, &past_p, &nk, &nv,
                    &global, &meta, &scale, &ap,
                ],
            );
        } else {
            // The most splits, from the rows alone (not the keys, which grow), so that a captured
            // step stays right.
            // The per-q-head kernel's bf16 sources through shared memory (`attention_rows`).
            let staged = (at.kv_dtype == KvDtype::BF16
                && hd.dk.is_multiple_of(8)
                && hd.dv.is_multiple_of(8)) as i32;
            // From GQA_ATTENTION_FROM rows the q heads of a K/V head run together
            // (`attention_gqa`, which takes as many splits as the keys need), and in global layers
            // (whose keys grow long) at any when the per-q-head kernel cannot stage its keys: at
            // 8192 keys and one row, 82 µs a layer against 105 a q head a block with plain loads.
            // Staged, the per-q-head kernel is the faster (H200, one row at 8192 keys: 53 µs a
            // global layer against 61, whole steps 462 / 472 tok/s against 435 / 446).
            let gqa = (t >= GQA_ATTENTION_FROM || (global == 1 && staged == 0))
                && hd.dk.is_multiple_of(4)
                && hd.dv.is_multiple_of(4);
            // From GQA_ATTENTION_FROM rows with bf16 K/V and at most 16 q heads a group, on the
            // tensor cores (`attention_gqa_mma`; H200, two rounds: batch 64 8449 / 8480 tok/s
            // against 7795 / 7543, batch 256 11741 / 10232 against 8854 / 8517; at one row, in
            // the global layers, it was no faster and in the window layers slower).
            let gqa_mma = self
                .k
                .attention_gqa_mma
                .iter()
                .find(|(shape, _)| *shape == (hd.dk, hd.dv))
                .map(|(_, k)| k)
                .filter(|_| {
                    gqa && t >= GQA_ATTENTION_FROM
                        && at.kv_dtype == KvDtype::BF16
                        && hd.q / hd.kv <= 16
                });
            // Its key tile, and the fewest keys a split takes.
            let tile: usize = if hd.dk + hd.dv <= 256 { 32 } else { 16 };
            let min_keys = if t >= GQA_LONG_SPLITS_FROM {
                128
            } else {
                tile as i32
            };
            // Four blocks a multiprocessor, in up to MAX_SPLITS splits (a global layer at 8192
            // keys and one row: 339-343 tok/s against 331-332 with at most 32).
            let blocks_per_split = t * if gqa || gqa_mma.is_some() {
                hd.kv
            } else {
                hd.q
            };
            let splits = match gqa_mma {
                // The tensor-core kernel holds fewer blocks a multiprocessor (3 for dk 64 / dv
                // 128: registers and shared memory): as many splits as fill one wave, no second
                // wave's tail (batch 64 11748 / 11609 tok/s against 10886 / 11007 with 4 blocks
                // a multiprocessor's worth, batch 16 3882 / 3778 against 3679 / 3689).
                Some(k) => (k.resident(128, mma_smem(hd.dk, hd.dv)) * self.sms / blocks_per_split)
                    .clamp(1, MAX_SPLITS),
                _ => (4 * self.sms)
                    .div_ceil(blocks_per_split)
                    .clamp(1, MAX_SPLITS),
            };
            if splits > 1 {
                self.shape(part, t * hd.q * splits * (hd.dv + 2));
            }
            let pp = if splits > 1 { self.p(part) } else { 0 };
            // The splits' count per (row, head), zero between launches (the last split resets
            // it), made once for the most rows.
            if scratch
                .split_count
                .as_ref()
                .is_none_or(|c| c.len() < t * hd.q)
            {
                self.moved();
                match self.alloc::<i32>((t * hd.q).next_power_of_two(), "attention") {
                    Ok(c) => scratch.split_count = Some(c),
                    Err(e) => return self.fail("allocating", e),
                }
            }
            let cp = self.table(&scratch.split_count, 0);
            let zs = splits as i32;
            let (kernel, cfg) = if let Some(k) = gqa_mma {
                let cfg = LaunchConfig {
                    grid_dim: (t as u32, hd.kv as u32, splits as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: mma_smem(hd.dk, hd.dv) as u32,
                };
                (k, cfg)
            } else if gqa {
                let gc = (hd.q / hd.kv).min(GQA_HEADS);
                let floats =
                    gc * hd.dk + tile * (hd.dk + 4) + tile * hd.dv + gc * tile + 3 * gc + tile;
                let cfg = LaunchConfig {
                    grid_dim: (t as u32, hd.kv as u32, splits as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (4 * floats) as u32,
                };
                (&self.k.attention_gqa, cfg)
            } else {
                let cfg = LaunchConfig {
                    grid_dim: (t as u32, hd.q as u32, splits as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: if staged != 0 {
                        staged_smem(hd.dk, hd.dv) as u32
                    } else {
                        0
                    },
                };
                (&self.k.attention[(hd.dk.max(hd.dv) > 128) as usize], cfg)
            };
            let mut args: Vec<&dyn Arg> = vec![
                &qp, &heads, &kv_heads, &dk, &dv, &seqs_p, &rows_p, &past_p, &nk, &nv, &global,
                &meta, &scale, &zs, &ap, &pp, &cp,
            ];
            if gqa_mma.is_some() {
                args = vec![
                    &qp, &heads, &kv_heads, &seqs_p, &rows_p, &past_p, &nk, &nv, &global, &meta,
                    &scale, &zs, &ap, &pp, &cp,
                ];
            } else if gqa {
                args.push(&min_keys);
            } else {
                args.push(&staged);
            }
            self.launch(kernel, cfg, &args);
        }
        // 3. The selective scan of every sequence from its state, gated by silu(z): a decode step
        // in one kernel with its parameters, prompts in one pass (up to SEQ_SCAN_UP_TO rows) or
        // in chunks.
        let (xp, a_p, dd) = (self.p(ssm.x), self.pv(ssm.a), self.pv(ssm.d));
        let (zp, zs) = (self.p(ssm.z) + 4 * ssm.z_at as u64, ssm.z_width as i64);
        let (ei, ni) = (e as i32, n as i32);
        let chunks_p = self.table(&scratch.chunks, 0);
        let n_chunks = scratch.n_chunks;
        self.branch(Branch::Scan);
        if step {
            let r = ssm.dt_rank;
            let [wd, wb, wc] = ssm
                .norms
                .map_or([0; 3], |w| w.each_ref().map(|v| self.pv(v)));
            let (pp, ri, eps) = (self.p(ssm.proj), r as i32, ssm.eps);
            let (wp, bp) = (ssm.dt_proj.ptr(&self.stream), self.pv(ssm.dt_bias));
            // Lanes a channel: a lane four states (`ssm_step`).
            let lanes = if n > 16 { 8 } else { 4 };
            let cfg = LaunchConfig {
                grid_dim: ((e * lanes).div_ceil(128) as u32, n_chunks as u32, 1),
                block_dim: (128, 1, 1),
                // δr, B and C, each from a multiple of 4 floats.
                shared_mem_bytes: (4 * (r.next_multiple_of(4) + 2 * n.next_multiple_of(4))) as u32,
            };
            let wi = matches!(*ssm.dt_proj.data, DevData::BF16(_)) as usize;
            self.launch(
                &self.k.ssm_step[(n > 16) as usize][wi],
                cfg,
                &[
                    &pp, &ri, &ni, &wd, &wb, &wc, &eps, &wp, &bp, &xp, &zp, &zs, &a_p, &dd,
                    &seqs_p, &chunks_p, &ssm_p, &ei, &yp,
                ],
            );
        } else if self.seq_scan && t <= SEQ_SCAN_UP_TO {
            let (dp, bp, cp) = (self.p(&params.delta), self.p(&params.b), self.p(&params.c));
            // A block walks a sequence's rows for 128 / N channels, a lane a state (`scan_seq`).
            let channels = if n > 16 { 4 } else { 8 };
            let cfg = LaunchConfig {
                grid_dim: (e.div_ceil(channels) as u32, ns as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.k.scan_seq[(n > 16) as usize],
                cfg,
                &[
                    &xp, &dp, &dt_bias, &bp, &cp, &zp, &zs, &a_p, &dd, &seqs_p, &ssm_p, &ei, &ni,
                    &yp,
                ],
            );
        } else {
            let (dp, bp, cp) = (self.p(&params.delta), self.p(&params.b), self.p(&params.c));
            let blocks = e.div_ceil(128) as u32;
            if scratch.multi_chunk {
                let Scratch {
                    hend, init, dtsum, ..
                } = &mut *scratch;
                self.shape(hend, n_chunks * n * e);
                self.shape(init, n_chunks * n * e);
                self.shape(dtsum, n_chunks * e);
                let (hp, ip, sp) = (self.p(hend), self.p(init), self.p(dtsum));
                let cfg = LaunchConfig {
                    grid_dim: (blocks, n_chunks as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                self.launch(
                    &self.k.scan_chunk_end[(n > 16) as usize],
                    cfg,
                    &[
                        &xp, &dp, &dt_bias, &bp, &a_p, &seqs_p, &chunks_p, &ei, &ni, &hp, &sp,
                    ],
                );
                let sc = self.table(&scratch.seq_chunks, 0);
                let cfg = LaunchConfig {
                    grid_dim: ((e * n).div_ceil(128) as u32, ns as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                self.launch(
                    &self.k.scan_chunk_carry,
                    cfg,
                    &[&a_p, &sc, &ssm_p, &ei, &ni, &hp, &sp, &ip],
                );
            }
            let ip = self.p(&scratch.init);
            // `scan_chunk_end` has finished Δ where it ran.
            let dt_bias = if scratch.multi_chunk { 0 } else { dt_bias };
            let cfg = LaunchConfig {
                grid_dim: (blocks, n_chunks as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                &self.k.scan_chunk_out[(n > 16) as usize],
                cfg,
                &[
                    &xp, &dp, &dt_bias, &bp, &cp, &zp, &zs, &a_p, &dd, &seqs_p, &chunks_p, &ssm_p,
                    &ei, &ni, &ip, &yp,
                ],
            );
        }
        // 4. Fusion of every row.
        self.branch(Branch::Join);
        let (w1, w2) = (self.pv(fuse.attn_norm), self.pv(fuse.ssm_norm));
        let (op, o16) = self.outputs16(out, t);
        // Many rows: four warps a row, held in registers (`fuse_rows`); else a block a row.
        let (kernel, cfg) =
            match t >= NORM_WARP_ROWS_FROM && e.is_multiple_of(4) && e <= FUSE_ROWS_MAX {
                true => (&self.k.fuse_rows, rows_of(t, 128)),
                false => (&self.k.fuse, rows_of(t, row_threads(t))),
            };
        self.launch(
            kernel,
            cfg,
            &[&ap, &yp, &w1, &w2, &ei, &fuse.eps, &op, &o16],
        );
        scratch.params = params;
    }
}

#[cfg(test)]
mod tests {
    /// The Q4_0 order the card reads (`q4_t` in kernels.cu: element 8c + r of a block in byte
    /// 4c + r % 4, its low nibble for r < 4) holds each element of GGML's block.
    #[test]
    fn q4_0_chunks_keep_every_element() {
        let mut rng = hymba_kernels::testing::Rng::new(3);
        for _ in 0..64 {
            let qs: Vec<u8> = (0..16).map(|_| rng.below(256) as u8).collect();
            let out = super::q4_0_chunks(&qs);
            for e in 0..32 {
                let ggml = if e < 16 { qs[e] & 15 } else { qs[e - 16] >> 4 };
                let (c, r) = (e / 8, e % 8);
                let byte = out[4 * c + r % 4];
                let card = if r < 4 { byte & 15 } else { byte >> 4 };
                assert_eq!(card, ggml, "element {e} of block {qs:?}");
            }
        }
    }
}
