//! Tensors of a checkpoint, kept in their stored precision: memory-mapped from safetensors
//! files (single or sharded) or, for data made in memory, held on the heap.

use crate::error::{parse_json, read_to_string, Error, Result};
use half::{bf16, f16};
use hymba_kernels::quant::{self, BlockQ4_0, BlockQ8_0, QK};
use hymba_kernels::{matmul, qpanel, Mat, WeightData};
use memmap2::{Mmap, MmapMut};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    BF16,
    F16,
    /// GGML Q8_0: blocks of 32 values along a row, 34 bytes each.
    Q8_0,
    /// GGML Q4_0: blocks of 32 values along a row, 18 bytes each.
    Q4_0,
}

impl Dtype {
    /// Bytes that `numel` elements take in a file (a whole number of blocks for the quantized
    /// formats).
    pub fn nbytes(self, numel: usize) -> usize {
        match self {
            Dtype::F32 => 4 * numel,
            Dtype::BF16 | Dtype::F16 => 2 * numel,
            Dtype::Q8_0 => numel / QK * 34,
            Dtype::Q4_0 => numel / QK * 18,
        }
    }
    /// Alignment the elements need to be viewed in place.
    fn align(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::Q8_0 | Dtype::Q4_0 => 1,
        }
    }
    /// The safetensors dtype the bytes are stored as (quantized blocks are raw bytes).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::Q8_0 | Dtype::Q4_0 => "U8",
        }
    }
    pub fn quant_name(self) -> Option<&'static str> {
        match self {
            Dtype::Q8_0 => Some("q8_0"),
            Dtype::Q4_0 => Some("q4_0"),
            _ => None,
        }
    }
    /// `q8_0` or `q4_0`.
    pub fn parse_quant(s: &str) -> Option<Dtype> {
        match s {
            "q8_0" => Some(Dtype::Q8_0),
            "q4_0" => Some(Dtype::Q4_0),
            _ => None,
        }
    }
}

/// Metadata key of a safetensors file that maps each quantized tensor to its format and its
/// logical shape: `{"name": {"format": "q8_0", "shape": [rows, cols]}}`.
pub const QUANT_METADATA_KEY: &str = "hymba_quant";

/// The large matrices a token reads: the weights of the matrix products, and the embedding
/// (also the output matrix when tied).
fn is_large_matrix(name: &str) -> bool {
    const LAYER_MATRICES: [&str; 6] = [
        ".mamba.in_proj.weight",
        ".mamba.x_proj.0.weight",
        ".mamba.out_proj.weight",
        ".moe.experts.0.gate_proj.weight",
        ".moe.experts.0.up_proj.weight",
        ".moe.experts.0.down_proj.weight",
    ];
    name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
        || LAYER_MATRICES.iter().any(|s| name.ends_with(s))
}

/// Matrices worth quantizing: the large ones a token reads, when their rows are whole blocks.
/// Norms, A, D, conv and dt_proj keep their precision.
pub fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    is_large_matrix(name) && shape.len() == 2 && shape[1].is_multiple_of(QK)
}

#[derive(Clone, Debug)]
enum Owner {
    Mmap(Arc<Mmap>),
    /// Bytes built into the program (an embedded model).
    Static(&'static [u8]),
    /// u64 words so the bytes are aligned for any element type.
    Heap(Arc<Vec<u64>>),
    /// A large tensor made in memory: a mapping of its own, so its pages go back to the OS when
    /// it is dropped (a converted copy replacing it), in huge pages where the OS has them (a few
    /// thousand page faults to fill gigabytes rather than a million, fewer TLB misses).
    Anon(Arc<MmapMut>),
}

impl Owner {
    /// `len` fresh zeroed bytes, 8-aligned, written by `fill`.
    fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> Owner {
        const LARGE: usize = 1 << 20;
        if let Some(mut m) = (len >= LARGE)
            .then(|| MmapMut::map_anon(len).ok())
            .flatten()
        {
            #[cfg(target_os = "linux")]
            let _ = m.advise(memmap2::Advice::HugePage);
            fill(&mut m);
            return Owner::Anon(Arc::new(m));
        }
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: u64 storage viewed as bytes, within its length.
        fill(unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) });
        Owner::Heap(Arc::new(words))
    }
}

/// One tensor: dtype, shape and bytes that live in a mapped file or on the heap.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    owner: Owner,
    offset: usize,
    len: usize,
    /// Row-major as in the file, or a bf16 or quantized matrix rearranged into panels of 16
    /// rows: same values, the order the matrix products read.
    layout: Layout,
}

/// The order of a matrix's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    RowMajor,
    /// [`WeightData::BF16Panels`], [`WeightData::Q8_0Panels`], [`WeightData::Q4_0Panels`].
    Panels,
    /// [`WeightData::BF16Pairs`].
    Pairs,
}

impl Tensor {
    /// A heap tensor from raw little-endian bytes.
    pub fn from_bytes(dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Tensor {
        assert_eq!(bytes.len(), dtype.nbytes(shape.iter().product::<usize>()));
        let owner = Owner::filled(bytes.len(), |b| b.copy_from_slice(bytes));
        Tensor {
            dtype,
            shape,
            owner,
            offset: 0,
            len: bytes.len(),
            layout: Layout::RowMajor,
        }
    }

    pub fn from_f32(shape: Vec<usize>, v: &[f32]) -> Tensor {
        Tensor::from_bytes(
            Dtype::F32,
            shape,
            &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(),
        )
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the tensor occupies in its stored precision.
    pub fn nbytes(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.owner {
            Owner::Mmap(m) => &m[self.offset..self.offset + self.len],
            Owner::Static(b) => &b[self.offset..self.offset + self.len],
            // SAFETY: the Vec<u64> holds at least offset + len bytes.
            Owner::Heap(w) => unsafe {
                std::slice::from_raw_parts((w.as_ptr() as *const u8).add(self.offset), self.len)
            },
            Owner::Anon(m) => &m[self.offset..self.offset + self.len],
        }
    }

    /// The elements, typed. Alignment was checked when the tensor was made.
    pub fn data(&self) -> WeightData<'_> {
        let b = self.bytes();
        let n = self.numel();
        if self.layout != Layout::RowMajor {
            // SAFETY: as below; the length is the padded panels' (see `to_panels`), the panel
            // blocks plain bytes and f16 (alignment 2), pairs u32 (the heap buffer is 8-aligned).
            return unsafe {
                match self.dtype {
                    Dtype::BF16 if self.layout == Layout::Pairs => WeightData::BF16Pairs(
                        std::slice::from_raw_parts(b.as_ptr() as *const u32, b.len() / 4),
                    ),
                    Dtype::BF16 => WeightData::BF16Panels(std::slice::from_raw_parts(
                        b.as_ptr() as *const bf16,
                        b.len() / 2,
                    )),
                    Dtype::Q8_0 => WeightData::Q8_0Panels(std::slice::from_raw_parts(
                        b.as_ptr() as *const qpanel::PanelQ8_0,
                        b.len() / std::mem::size_of::<qpanel::PanelQ8_0>(),
                    )),
                    Dtype::Q4_0 => WeightData::Q4_0Panels(std::slice::from_raw_parts(
                        b.as_ptr() as *const qpanel::PanelQ4_0,
                        b.len() / std::mem::size_of::<qpanel::PanelQ4_0>(),
                    )),
                    other => unreachable!("{other:?} matrices are not packed"),
                }
            };
        }
        // SAFETY: length and alignment were checked at construction; bf16/f16 are u16 wrappers
        // and every bit pattern is a valid value.
        unsafe {
            match self.dtype {
                Dtype::F32 => {
                    WeightData::F32(std::slice::from_raw_parts(b.as_ptr() as *const f32, n))
                }
                Dtype::BF16 => {
                    WeightData::BF16(std::slice::from_raw_parts(b.as_ptr() as *const bf16, n))
                }
                Dtype::F16 => {
                    WeightData::F16(std::slice::from_raw_parts(b.as_ptr() as *const f16, n))
                }
                Dtype::Q8_0 => WeightData::Q8_0(quant::q8_0_blocks(b)),
                Dtype::Q4_0 => WeightData::Q4_0(quant::q4_0_blocks(b)),
            }
        }
    }

    /// A 2-D tensor as a matrix view.
    pub fn mat(&self) -> Mat<'_> {
        assert_eq!(self.shape.len(), 2);
        Mat::new(self.data(), self.shape[0], self.shape[1])
    }

    /// This matrix quantized to `to` (Q8_0 or Q4_0), row by row from its widened values.
    pub fn quantize(&self, to: Dtype) -> Tensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let nb = cols / QK;
        let mut row = vec![0f32; cols];
        let mut bytes = Vec::with_capacity(to.nbytes(rows * cols));
        let (mut b8, mut b4) = (
            vec![BlockQ8_0::default(); nb],
            vec![BlockQ4_0::default(); nb],
        );
        let m = self.mat();
        for r in 0..rows {
            m.row_f32(r, &mut row);
            match to {
                Dtype::Q8_0 => {
                    quant::quantize_q8_0(&row, &mut b8);
                    bytes.extend_from_slice(quant::block_bytes(&b8));
                }
                Dtype::Q4_0 => {
                    quant::quantize_q4_0(&row, &mut b4);
                    bytes.extend_from_slice(quant::block_bytes(&b4));
                }
                other => panic!("{other:?} is not a quantized format"),
            }
        }
        Tensor::from_bytes(to, self.shape.clone(), &bytes)
    }

    /// All elements widened to f32 (for the small vectors: norms, biases, A, D, conv).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.numel()];
        if self.layout != Layout::RowMajor {
            let m = self.mat();
            for (r, row) in v.chunks_exact_mut(m.cols.max(1)).enumerate() {
                m.row_f32(r, row);
            }
        } else {
            self.data().to_f32(0, &mut v);
        }
        v
    }

    /// Gives the pages of a memory-mapped tensor back to the OS once a converted copy replaces
    /// it, so a load holds one copy of the weights at a time rather than both.
    fn release_pages(&self) {
        if let Owner::Mmap(m) = &self.owner {
            // SAFETY: a shared read-only file mapping: dropped pages read the same bytes back from
            // the file if touched again, so no view of them changes. Only a hint: errors ignored.
            let _ = unsafe {
                m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.offset, self.len)
            };
        }
    }

    /// This matrix in panels (see [`Tensor::to_panels`]), the mapped pages it was read from
    /// given back, so a load holds one copy.
    pub fn into_panels(self) -> Tensor {
        let packed = self.to_panels();
        self.release_pages();
        packed
    }

    /// A gated MLP's gate and up matrices (`[f, k]` each, row-major, bf16, Q8_0 or Q4_0) as
    /// one tensor for [`matmul::matmul_glu`]: packed as [`Tensor::to_panels`] packs them (bf16
    /// in pairs), their panels in turn ([`matmul::pack_glu`]). Its shape is `[2·f, k]`, the
    /// two stacked; its product runs over `2 · f` rounded up to whole panels of rows.
    pub fn glu_panels(gate: &Tensor, up: &Tensor) -> Tensor {
        assert!(
            gate.dtype == up.dtype && gate.shape == up.shape && gate.shape.len() == 2,
            "gate and up are matrices of one type and shape"
        );
        let (f, k) = (gate.shape[0], gate.shape[1]);
        let (g, u) = (gate.to_panels_with(true), up.to_panels_with(true));
        fn merged<T: Copy + Send + Sync>(g: &[T], u: &[T], panel: usize) -> (Owner, usize) {
            let len = 2 * std::mem::size_of_val(g);
            let owner = Owner::filled(len, |b| {
                // SAFETY: `len` bytes, 8-aligned, viewed as 2·|g| panel elements (plain data
                // with alignment at most 4, any bit pattern valid: each is overwritten).
                let out = unsafe {
                    std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut T, 2 * g.len())
                };
                matmul::pack_glu(g, u, panel, out)
            });
            (owner, len)
        }
        let (owner, len) = match (g.data(), u.data()) {
            (WeightData::BF16Pairs(g), WeightData::BF16Pairs(u)) => {
                merged(g, u, matmul::PANEL * matmul::pair_words(k))
            }
            (WeightData::Q8_0Panels(g), WeightData::Q8_0Panels(u)) => merged(g, u, k / QK),
            (WeightData::Q4_0Panels(g), WeightData::Q4_0Panels(u)) => merged(g, u, k / QK),
            _ => panic!("only bf16, Q8_0 and Q4_0 matrices are packed"),
        };
        Tensor {
            dtype: gate.dtype,
            shape: vec![2 * f, k],
            owner,
            offset: 0,
            len,
            layout: g.layout,
        }
    }

    /// Whether the matrix is held in panels (see [`Tensor::to_panels`]).
    pub fn is_panels(&self) -> bool {
        self.layout != Layout::RowMajor
    }

    /// This bf16, Q8_0 or Q4_0 matrix rearranged into panels of 16 rows for the matrix
    /// products (bf16 in pairs of columns for AVX-512 BF16's and AMX's, else for AVX2's; the
    /// quantized ones for AVX-512 VNNI's); the values and their precision are unchanged.
    pub fn to_panels(&self) -> Tensor {
        self.to_panels_with(matmul::pairs_pay())
    }

    /// [`Tensor::to_panels`], bf16 in pairs of columns or not as asked, whatever this machine's
    /// choice (to compare the two; pairs are read only where the CPU has AVX-512 BF16).
    pub fn to_panels_with(&self, bf16_pairs: bool) -> Tensor {
        assert!(
            self.shape.len() == 2 && self.layout == Layout::RowMajor,
            "only row-major matrices are packed"
        );
        let (rows, cols) = (self.shape[0], self.shape[1]);
        // Packed straight into fresh zeroed memory: no copy.
        fn packed<P: Copy>(n: usize, fill: impl FnOnce(&mut [P])) -> (Owner, usize) {
            let size = n * std::mem::size_of::<P>();
            let owner = Owner::filled(size, |b| {
                // SAFETY: `size` bytes, 8-aligned, viewed as n panel elements (plain data with
                // alignment at most 2, any bit pattern valid: each is overwritten by `fill`).
                fill(unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut P, n) })
            });
            (owner, size)
        }
        let pairs = self.dtype == Dtype::BF16 && bf16_pairs;
        let (owner, len) = match self.data() {
            WeightData::BF16(d) if pairs => packed(matmul::pairs_len(rows, cols), |out| {
                matmul::pack_bf16_pairs(d, rows, cols, out)
            }),
            WeightData::BF16(d) => packed(matmul::panels_len(rows, cols), |out| {
                matmul::pack_bf16_panels(d, rows, cols, out)
            }),
            WeightData::Q8_0(b) => packed(qpanel::panels_len(rows, cols), |out| {
                qpanel::pack(b, rows, cols, out)
            }),
            WeightData::Q4_0(b) => packed(qpanel::panels_len(rows, cols), |out| {
                qpanel::pack(b, rows, cols, out)
            }),
            _ => panic!("only bf16, Q8_0 and Q4_0 matrices are packed"),
        };
        Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            len,
            owner,
            offset: 0,
            layout: if pairs { Layout::Pairs } else { Layout::Panels },
        }
    }
}

/// Every tensor of a checkpoint by name, and the file each came from.
pub struct TensorStore {
    tensors: HashMap<String, (Tensor, String)>,
    /// Where the weights were read from, for messages.
    pub source: String,
}

impl TensorStore {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<TensorStore> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let v = parse_json(&index, &read_to_string(&index)?)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Checkpoint {
                    file: index.display().to_string(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = Vec::new();
            for (t, f) in map {
                let f = f.as_str().ok_or_else(|| Error::Checkpoint {
                    file: index.display().to_string(),
                    msg: format!("weight_map entry for `{t}` is not a file name"),
                })?;
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_string());
                }
            }
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found (nor model.safetensors.index.json)",
                ),
            ));
        };
        let mut store = TensorStore {
            tensors: HashMap::new(),
            source: dir.display().to_string(),
        };
        for f in files {
            store.add_file(&f)?;
        }
        Ok(store)
    }

    /// A store over a safetensors file built into the program (`include_bytes!`), read in
    /// place; `source` names it in messages.
    pub fn from_static(source: &str, bytes: &'static [u8]) -> Result<TensorStore> {
        let mut store = TensorStore {
            tensors: HashMap::new(),
            source: source.to_string(),
        };
        store.add_bytes(source, bytes, &|| Owner::Static(bytes))?;
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only; like every mmap-based loader we assume nobody
        // truncates a checkpoint while it is being served.
        let mmap = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
        self.add_bytes(&path.display().to_string(), &mmap[..], &|| {
            Owner::Mmap(mmap.clone())
        })
    }

    /// Adds the tensors of safetensors `bytes`, each viewing them through `owner()`.
    fn add_bytes(&mut self, fname: &str, bytes: &[u8], owner: &dyn Fn() -> Owner) -> Result<()> {
        let fname = fname.to_string();
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
            file: fname.clone(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let base = bytes.as_ptr() as usize;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Checkpoint {
                file: fname.clone(),
                msg: format!("not a valid safetensors file: {e}"),
            })?;
        let quant: serde_json::Map<String, serde_json::Value> = match meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(QUANT_METADATA_KEY))
        {
            None => Default::default(),
            Some(s) => serde_json::from_str(s).map_err(|e| Error::Checkpoint {
                file: fname.clone(),
                msg: format!("metadata `{QUANT_METADATA_KEY}` is not a JSON object: {e}"),
            })?,
        };
        for (name, view) in st.tensors() {
            let err = |msg: String| Error::Tensor {
                file: fname.clone(),
                tensor: name.clone(),
                msg,
            };
            let (dtype, shape) = match (view.dtype(), quant.get(&name)) {
                (safetensors::Dtype::U8, Some(q)) => {
                    let dtype = q
                        .get("format")
                        .and_then(|f| f.as_str())
                        .and_then(Dtype::parse_quant);
                    let shape: Option<Vec<usize>> = q
                        .get("shape")
                        .and_then(|s| serde_json::from_value(s.clone()).ok());
                    match (dtype, shape) {
                        (Some(d), Some(s))
                            if s.len() == 2
                                && s[1] % QK == 0
                                && d.nbytes(s[0] * s[1]) == view.data().len() =>
                        {
                            (d, s)
                        }
                        _ => {
                            return Err(err(format!(
                                "bad quantization metadata {q} for {} bytes",
                                view.data().len()
                            )))
                        }
                    }
                }
                (safetensors::Dtype::F32, None) => (Dtype::F32, view.shape().to_vec()),
                (safetensors::Dtype::BF16, None) => (Dtype::BF16, view.shape().to_vec()),
                (safetensors::Dtype::F16, None) => (Dtype::F16, view.shape().to_vec()),
                (other, _) => {
                    return Err(err(format!(
                        "dtype {other:?} is not supported (F32, BF16, F16, or q8_0/q4_0 blocks)"
                    )))
                }
            };
            let data = view.data();
            let offset = data.as_ptr() as usize - base;
            let mut t = Tensor {
                dtype,
                shape,
                owner: owner(),
                offset,
                len: data.len(),
                layout: Layout::RowMajor,
            };
            if !(data.as_ptr() as usize).is_multiple_of(dtype.align()) {
                // A misaligned tensor cannot be viewed in place: copy it, same precision.
                t = Tensor::from_bytes(dtype, t.shape.clone(), data);
            }
            if self
                .tensors
                .insert(name.clone(), (t, fname.clone()))
                .is_some()
            {
                return Err(err("appears in two files".into()));
            }
        }
        Ok(())
    }

    /// A store over tensors made in memory.
    pub fn from_tensors(source: &str, tensors: BTreeMap<String, Tensor>) -> TensorStore {
        TensorStore {
            tensors: tensors
                .into_iter()
                .map(|(k, v)| (k, (v, source.to_string())))
                .collect(),
            source: source.to_string(),
        }
    }

    /// Replaces every quantizable matrix (see [`is_quantizable`]) by its `to` quantization.
    pub fn quantize(&mut self, to: Dtype) {
        for (name, (t, _)) in self.tensors.iter_mut() {
            if is_quantizable(name, &t.shape) && t.dtype.quant_name().is_none() {
                std::mem::replace(t, t.quantize(to)).release_pages();
            }
        }
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }

    /// Writes every tensor to one safetensors file (atomically), quantized ones as raw block
    /// bytes described in the `hymba_quant` metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let names = self.names();
        assert!(
            self.tensors.values().all(|(t, _)| !t.is_panels()),
            "a store is saved before its matrices are packed"
        );
        let entries: Vec<(String, &Tensor)> = names
            .into_iter()
            .map(|n| {
                let t = self.get(&n).expect("listed");
                (n, t)
            })
            .collect();
        let mut quant = serde_json::Map::new();
        let headers: Vec<(String, &'static str, Vec<usize>, usize)> = entries
            .iter()
            .map(|(n, t)| {
                let stored = match t.dtype.quant_name() {
                    Some(f) => {
                        quant.insert(
                            n.clone(),
                            serde_json::json!({"format": f, "shape": t.shape}),
                        );
                        vec![t.nbytes()]
                    }
                    None => t.shape.clone(),
                };
                (n.clone(), t.dtype.safetensors_name(), stored, t.nbytes())
            })
            .collect();
        let meta = if quant.is_empty() {
            None
        } else {
            Some((
                QUANT_METADATA_KEY,
                serde_json::Value::Object(quant).to_string(),
            ))
        };
        write_safetensors(path, &headers, meta, |i, out| {
            out.extend_from_slice(entries[i].1.bytes())
        })
    }

    /// Removes and returns tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (t, file) = self.tensors.remove(name).ok_or_else(|| Error::Tensor {
            file: self.source.clone(),
            tensor: name.to_string(),
            msg: "missing".into(),
        })?;
        if t.shape != shape {
            return Err(Error::Tensor {
                file,
                tensor: name.into(),
                msg: format!("expected shape {shape:?}, found {:?}", t.shape),
            });
        }
        Ok(t)
    }

    /// Removes `name` if present (checking its shape).
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Fails when tensors remain that no part of the model claimed: a checkpoint that does not
    /// match its config.
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<_> = self.tensors.into_iter().collect();
        left.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((name, (_, file))) = left.first() {
            return Err(Error::Tensor {
                file: file.clone(),
                tensor: name.clone(),
                msg: format!(
                    "not part of the model described by config.json ({} unexpected tensors in all)",
                    left.len()
                ),
            });
        }
        Ok(())
    }
}

/// Streams a safetensors file to `path` atomically: `headers` gives (name, dtype, stored shape,
/// bytes) in order, `fill(i, buf)` appends tensor i's bytes. Only one tensor is in memory at a
/// time.
pub fn write_safetensors(
    path: &Path,
    headers: &[(String, &str, Vec<usize>, usize)],
    metadata: Option<(&str, String)>,
    mut fill: impl FnMut(usize, &mut Vec<u8>),
) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::io(path, e);
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    if let Some((k, v)) = metadata {
        meta.insert(k.into(), v.into());
    }
    header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    let mut off = 0usize;
    for (name, dtype, shape, nbytes) in headers {
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}));
        off += nbytes;
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    // Pad so the data starts 8-byte aligned, as the reference writer does.
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&hbytes).map_err(io)?;
        let mut buf = Vec::new();
        for (i, h) in headers.iter().enumerate() {
            buf.clear();
            fill(i, &mut buf);
            assert_eq!(
                buf.len(),
                h.3,
                "tensor {} produced the wrong number of bytes",
                h.0
            );
            w.write_all(&buf).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
