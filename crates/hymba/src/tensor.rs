//! Tensors of a checkpoint, kept in their stored precision: memory-mapped from safetensors
//! files (single or sharded) or, for data made in memory, held on the heap.

use crate::error::{parse_json, read_to_string, Error, Result};
use half::{bf16, f16};
use hymba_kernels::{Mat, WeightData};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    BF16,
    F16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
        }
    }
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
        }
    }
}

#[derive(Clone, Debug)]
enum Owner {
    Mmap(Arc<Mmap>),
    /// u64 words so the bytes are aligned for any element type.
    Heap(Arc<Vec<u64>>),
}

/// One tensor: dtype, shape and bytes that live in a mapped file or on the heap.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    owner: Owner,
    offset: usize,
    len: usize,
}

impl Tensor {
    /// A heap tensor from raw little-endian bytes.
    pub fn from_bytes(dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Tensor {
        assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size());
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: u64 storage viewed as bytes, within its length.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr() as *mut u8, bytes.len()) };
        Tensor { dtype, shape, owner: Owner::Heap(Arc::new(words)), offset: 0, len: bytes.len() }
    }

    pub fn from_f32(shape: Vec<usize>, v: &[f32]) -> Tensor {
        Tensor::from_bytes(Dtype::F32, shape, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
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
            // SAFETY: the Vec<u64> holds at least offset + len bytes.
            Owner::Heap(w) => unsafe { std::slice::from_raw_parts((w.as_ptr() as *const u8).add(self.offset), self.len) },
        }
    }

    /// The elements, typed. Alignment was checked when the tensor was made.
    pub fn data(&self) -> WeightData<'_> {
        let b = self.bytes();
        let n = self.numel();
        // SAFETY: length and alignment were checked at construction; bf16/f16 are u16 wrappers
        // and every bit pattern is a valid value.
        unsafe {
            match self.dtype {
                Dtype::F32 => WeightData::F32(std::slice::from_raw_parts(b.as_ptr() as *const f32, n)),
                Dtype::BF16 => WeightData::BF16(std::slice::from_raw_parts(b.as_ptr() as *const bf16, n)),
                Dtype::F16 => WeightData::F16(std::slice::from_raw_parts(b.as_ptr() as *const f16, n)),
            }
        }
    }

    /// A 2-D tensor as a matrix view.
    pub fn mat(&self) -> Mat<'_> {
        assert_eq!(self.shape.len(), 2);
        Mat::new(self.data(), self.shape[0], self.shape[1])
    }

    /// All elements widened to f32 (for the small vectors: norms, biases, A, D, conv).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.numel()];
        self.data().to_f32(0, &mut v);
        v
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
            return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found")));
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let v = parse_json(&index, &read_to_string(&index)?)?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Checkpoint {
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
                std::io::Error::new(std::io::ErrorKind::NotFound, "not found (nor model.safetensors.index.json)"),
            ));
        };
        let mut store = TensorStore { tensors: HashMap::new(), source: dir.display().to_string() };
        for f in files {
            store.add_file(&f)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let fname = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only; like every mmap-based loader we assume nobody
        // truncates a checkpoint while it is being served.
        let mmap = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
        let st = safetensors::SafeTensors::deserialize(&mmap[..]).map_err(|e| Error::Checkpoint {
            file: fname.clone(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let base = mmap.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let err = |msg: String| Error::Tensor { file: fname.clone(), tensor: name.clone(), msg };
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => Dtype::F32,
                safetensors::Dtype::BF16 => Dtype::BF16,
                safetensors::Dtype::F16 => Dtype::F16,
                other => return Err(err(format!("dtype {other:?} is not supported (F32, BF16, F16)"))),
            };
            let data = view.data();
            let offset = data.as_ptr() as usize - base;
            let shape = view.shape().to_vec();
            let mut t = Tensor { dtype, shape, owner: Owner::Mmap(mmap.clone()), offset, len: data.len() };
            if offset % dtype.size() != 0 {
                // A misaligned tensor cannot be viewed in place: copy it, same precision.
                t = Tensor::from_bytes(dtype, t.shape.clone(), data);
            }
            if self.tensors.insert(name.clone(), (t, fname.clone())).is_some() {
                return Err(err("appears in two files".into()));
            }
        }
        Ok(())
    }

    /// A store over tensors made in memory.
    pub fn from_tensors(source: &str, tensors: BTreeMap<String, Tensor>) -> TensorStore {
        TensorStore {
            tensors: tensors.into_iter().map(|(k, v)| (k, (v, source.to_string()))).collect(),
            source: source.to_string(),
        }
    }

    /// Removes and returns tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (t, file) = self.tensors.remove(name).ok_or_else(|| Error::Tensor {
            file: self.source.clone(),
            tensor: name.to_string(),
            msg: "missing".into(),
        })?;
        if t.shape != shape {
            return Err(Error::Tensor { file, tensor: name.into(), msg: format!("expected shape {shape:?}, found {:?}", t.shape) });
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
                msg: format!("not part of the model described by config.json ({} unexpected tensors in all)", left.len()),
            });
        }
        Ok(())
    }
}
