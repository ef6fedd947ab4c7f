//! The model's parameters, one named field per official tensor (spec §2), prepared for a
//! [`Backend`]. Large matrices stay in their stored precision; the small vectors (norms, biases,
//! A, D, conv taps) are widened to f32 once at load.

use crate::backend::{Backend, Cpu};
use crate::config::{Config, Dims, LayerPlan};
use crate::error::Result;
use crate::tensor::TensorStore;

/// One layer, prefix `model.layers.{i}.`.
pub struct LayerWeights<B: Backend = Cpu> {
    /// input_layernorm.weight [d]
    pub input_norm: B::Vector,
    /// mamba.in_proj.weight [q (+ k + v) + x + z, d]
    pub in_proj: B::Matrix,
    /// mamba.conv1d.weight [E, 1, K], held tap-major as [K, E] (see `conv::taps`)
    pub conv_w: B::Vector,
    /// mamba.conv1d.bias [E] (zeros when mamba_conv_bias is false)
    pub conv_b: B::Vector,
    /// mamba.x_proj.0.weight [R + 2N, E]
    pub x_proj: B::Matrix,
    /// mamba.dt_proj.0.weight [E, R]
    pub dt_proj: B::Matrix,
    /// mamba.dt_proj.0.bias [E]
    pub dt_bias: B::Vector,
    /// A = −exp(mamba.A_log.0) [E, N]
    pub a: B::Vector,
    /// mamba.D.0 [E]
    pub d: B::Vector,
    /// mamba.{dt,B,C}_layernorm.weight [R], [N], [N], when mamba_inner_layernorms
    pub inner_norms: Option<[B::Vector; 3]>,
    /// mamba.pre_avg_layernorm1.weight [E]: scales the attention branch before fusion
    pub attn_norm: B::Vector,
    /// mamba.pre_avg_layernorm2.weight [E]: scales the SSM branch before fusion
    pub ssm_norm: B::Vector,
    /// mamba.out_proj.weight [d, E]
    pub out_proj: B::Matrix,
    /// pre_moe_layernorm.weight [d]
    pub mlp_norm: B::Vector,
    /// moe.experts.0.{gate,up}_proj.weight [F, d]
    pub gate: B::Matrix,
    pub up: B::Matrix,
    /// moe.experts.0.down_proj.weight [d, F]
    pub down: B::Matrix,
}

pub struct Weights<B: Backend = Cpu> {
    /// model.embed_tokens.weight [V, d]
    pub embed: B::Matrix,
    /// model.memory_tokens [M, d], in host memory: the first rows of the meta prefix's forward
    pub memory_tokens: Vec<f32>,
    /// model.final_layernorm.weight [d]
    pub final_norm: B::Vector,
    /// lm_head.weight [V, d]; None when tied to the embedding
    pub lm_head: Option<B::Matrix>,
    pub layers: Vec<LayerWeights<B>>,
}

impl<B: Backend> Weights<B> {
    /// Takes every tensor the config predicts from `store`, checking shapes, and prepares it for
    /// `b` (packed, quantized or copied to a device: most of a load's time), telling `layer_done`
    /// the number of layers done after each; leftovers are an error.
    pub fn load(
        b: &B,
        cfg: &Config,
        plan: &[LayerPlan],
        mut store: TensorStore,
        layer_done: &mut dyn FnMut(usize),
    ) -> Result<Weights<B>> {
        let Dims {
            v,
            d,
            e,
            n,
            k,
            r,
            f,
            m,
        } = cfg.dims();
        let embed = b.matrix(store.take("model.embed_tokens.weight", &[v, d])?)?;
        let memory_tokens = if m > 0 {
            store.take("model.memory_tokens", &[m, d])?.to_f32()
        } else {
            Vec::new()
        };
        let final_norm = b.vector(store.take("model.final_layernorm.weight", &[d])?.to_f32())?;
        let lm_head = if cfg.tie_word_embeddings {
            // Tied: a stored copy, if any, equals the embedding and is not needed.
            store.take_opt("lm_head.weight", &[v, d])?;
            None
        } else {
            Some(b.matrix(store.take("lm_head.weight", &[v, d])?)?)
        };
        let mut layers = Vec::with_capacity(plan.len());
        for (i, lp) in plan.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut vec = |s: &str, shape: &[usize]| store.take(&p(s), shape).map(|t| t.to_f32());
            let input_norm = vec("input_layernorm.weight", &[d])?;
            let conv_w = hymba_kernels::conv::taps(&vec("mamba.conv1d.weight", &[e, 1, k])?, e);
            let conv_b = if cfg.mamba_conv_bias {
                vec("mamba.conv1d.bias", &[e])?
            } else {
                vec![0.0; e]
            };
            let dt_bias = vec("mamba.dt_proj.0.bias", &[e])?;
            let a = vec("mamba.A_log.0", &[e, n])?
                .iter()
                .map(|x| -x.exp())
                .collect();
            let dd = vec("mamba.D.0", &[e])?;
            let inner_norms = if cfg.mamba_inner_layernorms {
                Some([
                    vec("mamba.dt_layernorm.weight", &[r])?,
                    vec("mamba.B_layernorm.weight", &[n])?,
                    vec("mamba.C_layernorm.weight", &[n])?,
                ])
            } else {
                None
            };
            let attn_norm = vec("mamba.pre_avg_layernorm1.weight", &[e])?;
            let ssm_norm = vec("mamba.pre_avg_layernorm2.weight", &[e])?;
            let mlp_norm = vec("pre_moe_layernorm.weight", &[d])?;
            let (gate, up) = b.glu_matrices(
                store.take(&p("moe.experts.0.gate_proj.weight"), &[f, d])?,
                store.take(&p("moe.experts.0.up_proj.weight"), &[f, d])?,
            )?;
            let mut mat =
                |s: &str, shape: &[usize]| store.take(&p(s), shape).and_then(|t| b.matrix(t));
            layers.push(LayerWeights {
                input_norm: b.vector(input_norm)?,
                in_proj: mat(
                    "mamba.in_proj.weight",
                    &[cfg.in_proj_rows(lp.computes_kv), d],
                )?,
                conv_w: b.vector(conv_w)?,
                conv_b: b.vector(conv_b)?,
                x_proj: mat("mamba.x_proj.0.weight", &[r + 2 * n, e])?,
                dt_proj: mat("mamba.dt_proj.0.weight", &[e, r])?,
                dt_bias: b.vector(dt_bias)?,
                a: b.vector(a)?,
                d: b.vector(dd)?,
                inner_norms: match inner_norms {
                    Some([x, y, z]) => Some([b.vector(x)?, b.vector(y)?, b.vector(z)?]),
                    None => None,
                },
                attn_norm: b.vector(attn_norm)?,
                ssm_norm: b.vector(ssm_norm)?,
                out_proj: mat("mamba.out_proj.weight", &[d, e])?,
                mlp_norm: b.vector(mlp_norm)?,
                gate,
                up,
                down: mat("moe.experts.0.down_proj.weight", &[d, f])?,
            });
            layer_done(i + 1);
        }
        store.finish()?;
        Ok(Weights {
            embed,
            memory_tokens,
            final_norm,
            lm_head,
            layers,
        })
    }

    /// The output projection: lm_head, or the embedding when tied.
    pub fn output(&self) -> &B::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
