//! Trainable parameters: every tensor of the official layout (names and shapes from
//! [`hymba::synthetic::tensor_specs`]) as f32 in one flat buffer, so the optimizer and the
//! gradients are plain slices with the same offsets.

use hymba::config::Config;
use hymba::kernels::testing::Rng;
use hymba::synthetic::{tensor_specs, Init};
use hymba::tensor::{Dtype, Tensor, TensorStore};
use hymba::{Error, Result};
use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// Weight decay applies to matrices only (not norms, biases, A, D).
    pub decay: bool,
}

#[derive(Clone)]
pub struct Params {
    pub info: Vec<ParamInfo>,
    pub data: Vec<f32>,
}

impl Params {
    /// Fresh parameters for `cfg`, initialised as Hymba/Mamba do: matrices normal with std
    /// 0.02 (the residual output projections scaled by 1/sqrt(2L), as GPT-2 does), norms 1,
    /// `A_log = log(1..=N)`, `D = 1`, Δ bias giving Δ in [1e-3, 1e-1], conv and dt_proj
    /// uniform on ±1/sqrt(fan_in) as PyTorch's defaults.
    pub fn init(cfg: &Config, seed: u64) -> Params {
        let mut rng = Rng::new(seed);
        let mut info = Vec::new();
        let mut data = Vec::new();
        let resid = 0.02 / (2.0 * cfg.num_hidden_layers as f32).sqrt();
        for (name, shape, init) in tensor_specs(cfg, 1.0) {
            let numel: usize = shape.iter().product();
            let start = data.len();
            let uniform = |rng: &mut Rng, a: f32| (rng.uniform() as f32 * 2.0 - 1.0) * a;
            let is = |s: &str| name.ends_with(s);
            if is("conv1d.weight") || is("conv1d.bias") {
                let a = 1.0 / (cfg.mamba_d_conv as f32).sqrt();
                data.extend((0..numel).map(|_| uniform(&mut rng, a)));
            } else if is("dt_proj.0.weight") {
                let a = 1.0 / (cfg.mamba_dt_rank as f32).sqrt();
                data.extend((0..numel).map(|_| uniform(&mut rng, a)));
            } else {
                match init {
                    Init::Random(_) => {
                        let std = if is("out_proj.weight") || is("down_proj.weight") {
                            resid
                        } else {
                            0.02
                        };
                        data.extend((0..numel).map(|_| rng.normal() * std));
                    }
                    Init::Const(c) => data.resize(start + numel, c),
                    Init::ALog => {
                        for _ in 0..shape[0] {
                            data.extend((1..=shape[1]).map(|j| (j as f32).ln()));
                        }
                    }
                    Init::DtBias => {
                        for _ in 0..numel {
                            let dt = (1e-3f64.ln() + rng.uniform() * (1e-1f64.ln() - 1e-3f64.ln()))
                                .exp();
                            data.push((dt + (-(-dt).exp_m1()).ln()) as f32);
                        }
                    }
                }
            }
            let decay = shape.len() == 2 && !name.contains("A_log");
            info.push(ParamInfo {
                name,
                shape,
                range: start..data.len(),
                decay,
            });
        }
        Params { info, data }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Index of a tensor by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.info.iter().position(|p| p.name == name)
    }

    /// The parameters as tensors in `dtype` under their official names.
    pub fn to_store(&self, dtype: Dtype) -> TensorStore {
        let mut tensors = BTreeMap::new();
        for p in &self.info {
            let v = &self.data[p.range.clone()];
            let t = Tensor::from_f32(p.shape.clone(), v);
            let t = match dtype {
                Dtype::F32 => t,
                Dtype::BF16 => Tensor::from_bytes(
                    Dtype::BF16,
                    p.shape.clone(),
                    &v.iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect::<Vec<_>>(),
                ),
                Dtype::F16 => Tensor::from_bytes(
                    Dtype::F16,
                    p.shape.clone(),
                    &v.iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect::<Vec<_>>(),
                ),
                q => t.quantize(q),
            };
            tensors.insert(p.name.clone(), t);
        }
        TensorStore::from_tensors("(trained)", tensors)
    }

    /// Replaces every value with the tensor of the same name in `store` (widened to f32),
    /// checking that each is present with the expected shape.
    pub fn load_from(&mut self, store: &TensorStore, what: &str) -> Result<()> {
        for p in &self.info {
            let t = store
                .get(&p.name)
                .ok_or_else(|| Error::Input(format!("{what}: tensor {} is missing", p.name)))?;
            if t.shape != p.shape {
                return Err(Error::Input(format!(
                    "{what}: tensor {} has shape {:?}, the config needs {:?}",
                    p.name, t.shape, p.shape
                )));
            }
            self.data[p.range.clone()].copy_from_slice(&t.to_f32());
        }
        Ok(())
    }
}
