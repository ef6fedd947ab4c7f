//! bf16 matrix products through cuBLASLt, each shape's algorithm picked by timing.
//!
//! cuBLAS's own pick for a product is its heuristic's first candidate, which is not always the
//! fastest: on an H200 the 8192-row products of a prompt ran 3-13% faster with another of the
//! heuristic's candidates, and the batch-64 logits product 17%. So the first time a shape runs
//! outside a captured graph, every candidate the heuristic offers is timed on the card (into a
//! scratch output) and the fastest kept. Decode batches (up to EXACT_ROWS rows) are timed per row
//! count; longer products (prompts) share the choice made for the first of their bucket of row
//! counts (rounded up to a power of two), so prompts of many lengths do not each pay for a
//! timing. Products of different algorithms may differ in the last bits (the order of the sums
//! over k), as cuBLAS's own choices for different row counts already do.

use cudarc::cublaslt::sys as lt;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Workspace a product may use (cuBLASLt's recommendation for Hopper).
const WORKSPACE: usize = 32 << 20;

/// Candidates asked of the heuristic for a shape.
const CANDIDATES: usize = 16;

/// Products of up to this many rows are timed for their own row count.
const EXACT_ROWS: usize = 256;

/// A product's shape: `y[n, m] (+)= x[n, k] · w[m, k]ᵀ`, with or without the accumulation, `y`
/// f32 or bf16 (`out16`); `n` is the bucket's for more than EXACT_ROWS rows.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    out16: bool,
}

fn check(what: &str, s: lt::cublasStatus_t) -> Result<(), String> {
    match s {
        lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        e => Err(format!("cuBLASLt {what}: {e:?}")),
    }
}

/// The layouts of a product's input and output for `n` rows.
struct Rows {
    n: usize,
    x: lt::cublasLtMatrixLayout_t,
    y: lt::cublasLtMatrixLayout_t,
}

/// A dense column-major layout of `rows × cols` elements of `dtype`.
fn layout(
    dtype: lt::cudaDataType,
    rows: usize,
    cols: usize,
) -> Result<lt::cublasLtMatrixLayout_t, String> {
    let mut l = std::ptr::null_mut();
    // SAFETY: an out-pointer.
    check("layout", unsafe {
        lt::cublasLtMatrixLayoutCreate(&mut l, dtype, rows as u64, cols as u64, rows as i64)
    })?;
    Ok(l)
}

impl Rows {
    fn new(m: usize, n: usize, k: usize, out16: bool) -> Result<Self, String> {
        let mut r = Rows {
            n,
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
        };
        // Column-major: x is k × n (bf16), y is m × n (f32 or bf16). A failure leaves the rest
        // null, which Drop's destroy accepts.
        r.x = layout(lt::cudaDataType::CUDA_R_16BF, k, n)?;
        r.y = match out16 {
            true => layout(lt::cudaDataType::CUDA_R_16BF, m, n)?,
            false => layout(lt::cudaDataType::CUDA_R_32F, m, n)?,
        };
        Ok(r)
    }
}

impl Drop for Rows {
    fn drop(&mut self) {
        // SAFETY: made by `Rows::new`, destroyed once.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.x);
            lt::cublasLtMatrixLayoutDestroy(self.y);
        }
    }
}

/// The descriptors of one shape and its algorithm.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    /// The weights, k × m column-major, transposed by the product.
    w: lt::cublasLtMatrixLayout_t,
    /// For the row count the plan was made with.
    rows: Rows,
    algo: lt::cublasLtMatmulAlgo_t,
    /// Picked by timing (else the heuristic's first: the shape first ran inside a capture).
    timed: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by `Plan::new`, destroyed once.
        unsafe {
            lt::cublasLtMatrixLayoutDestroy(self.w);
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

impl Plan {
    fn new(m: usize, n: usize, k: usize, out16: bool) -> Result<Self, String> {
        let mut p = Plan {
            desc: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            rows: Rows::new(m, n, k, out16)?,
            // SAFETY: plain data, all zero is a valid (empty) algorithm.
            algo: unsafe { std::mem::zeroed() },
            timed: false,
        };
        // SAFETY: out-pointers to fields of `p`; a failure leaves the rest null, which Drop's
        // destroy calls accept.
        unsafe {
            check(
                "descriptor",
                lt::cublasLtMatmulDescCreate(
                    &mut p.desc,
                    lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lt::cudaDataType::CUDA_R_32F,
                ),
            )?;
            let t: i32 = 1; // CUBLAS_OP_T
            check(
                "transpose",
                lt::cublasLtMatmulDescSetAttribute(
                    p.desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &t as *const i32 as *const _,
                    4,
                ),
            )?;
        }
        p.w = layout(lt::cudaDataType::CUDA_R_16BF, k, m)?;
        Ok(p)
    }
}

/// The cuBLASLt handle, a workspace for each stream products run on, and the plans.
pub(super) struct Products {
    handle: lt::cublasLtHandle_t,
    /// `[main stream, side stream]` (products of a captured step's two branches may overlap):
    /// the buffer and its device address.
    workspace: [(CudaSlice<u8>, u64); 2],
    plans: Mutex<HashMap<Shape, Plan>>,
    /// Print each timed shape's candidates (HYMBA_CUDA_PROFILE).
    report: bool,
}

// SAFETY: the handle and descriptors are used only under the `plans` lock; cuBLASLt handles may
// be used from any thread.
unsafe impl Send for Products {}
unsafe impl Sync for Products {}

impl Products {
    pub(super) fn new(stream: &Arc<CudaStream>, report: bool) -> Result<Self, String> {
        // SAFETY: only probes whether the shared library loads.
        if !unsafe { lt::is_culib_present() } {
            return Err("cuBLASLt (libcublasLt.so) not found: install the CUDA toolkit or the `nvidia-cublas` wheel and put its lib folder on LD_LIBRARY_PATH".into());
        }
        let mut handle = std::ptr::null_mut();
        // SAFETY: an out-pointer.
        check("start", unsafe { lt::cublasLtCreate(&mut handle) })?;
        let ws = || {
            let b = stream
                .alloc_zeros::<u8>(WORKSPACE)
                .map_err(|e| format!("out of GPU memory for cuBLASLt's workspace: {e:?}"))?;
            let at = b.device_ptr(stream).0;
            Ok::<_, String>((b, at))
        };
        Ok(Self {
            handle,
            workspace: [ws()?, ws()?],
            plans: Mutex::new(HashMap::new()),
            report,
        })
    }

    /// The heuristic's candidates for a plan's product over `rows`, best first.
    fn candidates(&self, p: &Plan, rows: &Rows) -> Result<Vec<lt::cublasLtMatmulAlgo_t>, String> {
        let mut pref = std::ptr::null_mut();
        // SAFETY: out-pointers and live descriptors; the preference is destroyed below.
        unsafe {
            check("preference", lt::cublasLtMatmulPreferenceCreate(&mut pref))?;
            let ws = WORKSPACE as u64;
            let r = check(
                "preference",
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const _,
                    8,
                ),
            )
            .and_then(|()| {
                let mut found = vec![std::mem::zeroed::<lt::cublasLtMatmulHeuristicResult_t>(); CANDIDATES];
                let mut count = 0;
                check(
                    "heuristic",
                    lt::cublasLtMatmulAlgoGetHeuristic(
                        self.handle,
                        p.desc,
                        p.w,
                        rows.x,
                        rows.y,
                        rows.y,
                        pref,
                        CANDIDATES as i32,
                        found.as_mut_ptr(),
                        &mut count,
                    ),
                )?;
                found.truncate(count.max(0) as usize);
                Ok(found
                    .into_iter()
                    .filter(|h| h.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                    .map(|h| h.algo)
                    .collect::<Vec<_>>())
            });
            lt::cublasLtMatmulPreferenceDestroy(pref);
            match r {
                Ok(v) if v.is_empty() => Err("cuBLASLt has no algorithm for this product".into()),
                r => r,
            }
        }
    }

    /// Whether `algo` computes a plan's product over `rows` within the workspace.
    fn serves(&self, p: &Plan, rows: &Rows, algo: &lt::cublasLtMatmulAlgo_t) -> bool {
        // SAFETY: live descriptors; plain-data out-parameter.
        unsafe {
            let mut r = std::mem::zeroed::<lt::cublasLtMatmulHeuristicResult_t>();
            let s = lt::cublasLtMatmulAlgoCheck(
                self.handle,
                p.desc,
                p.w,
                rows.x,
                rows.y,
                rows.y,
                algo,
                &mut r,
            );
            s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE
        }
    }

    /// One product with `algo` over `rows` on `stream` (its workspace: `side`).
    ///
    /// # Safety
    /// `w`, `x`, `y` are device pointers of live buffers of the plan's shape over `rows`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        p: &Plan,
        rows: &Rows,
        algo: &lt::cublasLtMatmulAlgo_t,
        accumulate: bool,
        (w, x, y): (u64, u64, u64),
        stream: cudarc::driver::sys::CUstream,
        side: bool,
    ) -> Result<(), String> {
        let (alpha, beta) = (1.0f32, accumulate as u8 as f32);
        check(
            "product",
            lt::cublasLtMatmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const _,
                w as *const _,
                p.w,
                x as *const _,
                rows.x,
                &beta as *const f32 as *const _,
                y as *const _,
                rows.y,
                y as *mut _,
                rows.y,
                algo,
                self.workspace[side as usize].1 as *mut _,
                WORKSPACE,
                stream as _,
            ),
        )
    }

    /// `y[n, m] = x[n, k] · w[m, k]ᵀ (+ y if accumulate)`, bf16 `w` and `x`, f32 `y` (bf16 if
    /// `out16`: the f32 sums rounded), queued on `stream`. `tune`: the stream may be synchronized (not inside a capture) and `main` is it,
    /// so a new shape's candidates are timed there first.
    ///
    /// # Safety
    /// `w`, `x`, `y` are device pointers of live buffers of these shapes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        &self,
        (m, n, k): (usize, usize, usize),
        (accumulate, out16): (bool, bool),
        (w, x, y): (u64, u64, u64),
        stream: cudarc::driver::sys::CUstream,
        side: bool,
        tune: Option<&Arc<CudaStream>>,
    ) -> Result<(), String> {
        let bucket = if n <= EXACT_ROWS {
            n
        } else {
            n.next_power_of_two()
        };
        let shape = Shape {
            m,
            n: bucket,
            k,
            accumulate,
            out16,
        };
        let mut plans = self.plans.lock().expect("plans");
        let ready = plans.get(&shape).is_some_and(|p| p.timed || tune.is_none());
        if !ready {
            let mut p = match plans.remove(&shape) {
                Some(p) if p.rows.n == n => p,
                _ => Plan::new(m, n, k, out16)?,
            };
            let found = self.candidates(&p, &p.rows)?;
            p.algo = found[0];
            if let Some(main) = tune {
                p.algo = self.fastest(&p, shape, &found, (w, x), main)?;
                p.timed = true;
            }
            plans.insert(shape, p);
        }
        let p = &plans[&shape];
        if p.rows.n == n {
            return self.run(p, &p.rows, &p.algo, accumulate, (w, x, y), stream, side);
        }
        // Another row count of the bucket: its algorithm where it serves these rows.
        let rows = Rows::new(m, n, k, out16)?;
        let algo = match self.serves(p, &rows, &p.algo) {
            true => p.algo,
            false => self.candidates(p, &rows)?[0],
        };
        self.run(p, &rows, &algo, accumulate, (w, x, y), stream, side)
    }

    /// The fastest of `found` for the plan, timed on `main` into a scratch output: each
    /// candidate run once, then three rounds of three runs each, the best round kept.
    ///
    /// # Safety
    /// As `product`.
    unsafe fn fastest(
        &self,
        p: &Plan,
        s: Shape,
        found: &[lt::cublasLtMatmulAlgo_t],
        (w, x): (u64, u64),
        main: &Arc<CudaStream>,
    ) -> Result<lt::cublasLtMatmulAlgo_t, String> {
        let err = |e| format!("timing cuBLASLt's candidates: {e:?}");
        let mut out = main.alloc_zeros::<f32>(s.m * p.rows.n).map_err(err)?;
        let (y, _sync) = out.device_ptr_mut(main);
        let cs = main.cu_stream();
        let ptrs = (w, x, y);
        let usable: Vec<_> = found
            .iter()
            .filter(|a| {
                self.run(p, &p.rows, a, s.accumulate, ptrs, cs, false)
                    .is_ok()
            })
            .collect();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut best = vec![f32::INFINITY; usable.len()];
        for _ in 0..3 {
            for (a, b) in usable.iter().zip(best.iter_mut()) {
                let start = main.record_event(flags).map_err(err)?;
                for _ in 0..3 {
                    self.run(p, &p.rows, a, s.accumulate, ptrs, cs, false)?;
                }
                let end = main.record_event(flags).map_err(err)?;
                end.synchronize().map_err(err)?;
                *b = b.min(start.elapsed_ms(&end).map_err(err)? / 3.0);
            }
        }
        let i = (0..usable.len())
            .min_by(|&i, &j| best[i].total_cmp(&best[j]))
            .ok_or("no cuBLASLt candidate ran")?;
        if self.report {
            let us: Vec<String> = best.iter().map(|t| format!("{:.1}", t * 1e3)).collect();
            eprintln!(
                "cuBLASLt {}x{}x{}{}{}: candidates {} µs, picked #{i}",
                s.m,
                p.rows.n,
                s.k,
                if s.accumulate { " +=" } else { "" },
                if s.out16 { " bf16" } else { "" },
                us.join(" ")
            );
        }
        Ok(*usable[i])
    }
}

impl Drop for Products {
    fn drop(&mut self) {
        self.plans.lock().expect("plans").clear();
        // SAFETY: made by `new`, destroyed once, after its plans.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}
