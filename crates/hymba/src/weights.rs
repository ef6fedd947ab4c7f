//! The model's parameters, one named field per official tensor (spec §2). Large matrices stay in
//! their stored precision; the small vectors (norms, biases, A, D, conv taps) are widened to f32
//! once at load.

use crate::config::{Config, Dims, LayerPlan};
use crate::error::Result;
use crate::tensor::{Tensor, TensorStore};

/// One layer, prefix `model.layers.{i}.`.
pub struct LayerWeights {
    /// input_layernorm.weight [d]
    pub input_norm: Vec<f32>,
    /// mamba.in_proj.weight [q (+ k + v) + x + z, d]
    pub in_proj: Tensor,
    /// mamba.conv1d.weight [E, 1, K], held tap-major as [K, E] (see `conv::taps`)
    pub conv_w: Vec<f32>,
    /// mamba.conv1d.bias [E] (zeros when mamba_conv_bias is false)
    pub conv_b: Vec<f32>,
    /// mamba.x_proj.0.weight [R + 2N, E]
    pub x_proj: Tensor,
    /// mamba.dt_proj.0.weight [E, R]
    pub dt_proj: Tensor,
    /// mamba.dt_proj.0.bias [E]
    pub dt_bias: Vec<f32>,
    /// A = −exp(mamba.A_log.0) [E, N]
    pub a: Vec<f32>,
    /// mamba.D.0 [E]
    pub d: Vec<f32>,
    /// mamba.{dt,B,C}_layernorm.weight [R], [N], [N], when mamba_inner_layernorms
    pub inner_norms: Option<[Vec<f32>; 3]>,
    /// mamba.pre_avg_layernorm1.weight [E]: scales the attention branch before fusion
    pub attn_norm: Vec<f32>,
    /// mamba.pre_avg_layernorm2.weight [E]: scales the SSM branch before fusion
    pub ssm_norm: Vec<f32>,
    /// mamba.out_proj.weight [d, E]
    pub out_proj: Tensor,
    /// pre_moe_layernorm.weight [d]
    pub mlp_norm: Vec<f32>,
    /// moe.experts.0.{gate,up}_proj.weight [F, d]
    pub gate: Tensor,
    pub up: Tensor,
    /// moe.experts.0.down_proj.weight [d, F]
    pub down: Tensor,
}

pub struct Weights {
    /// model.embed_tokens.weight [V, d]
    pub embed: Tensor,
    /// model.memory_tokens [M, d]
    pub memory_tokens: Vec<f32>,
    /// model.final_layernorm.weight [d]
    pub final_norm: Vec<f32>,
    /// lm_head.weight [V, d]; None when tied to the embedding
    pub lm_head: Option<Tensor>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// Takes every tensor the config predicts from `store`, checking shapes; leftovers are an
    /// error.
    pub fn load(cfg: &Config, plan: &[LayerPlan], mut store: TensorStore) -> Result<Weights> {
        let Dims { v, d, e, n, k, r, f, m } = cfg.dims();
        let embed = store.take("model.embed_tokens.weight", &[v, d])?;
        let memory_tokens = if m > 0 { store.take("model.memory_tokens", &[m, d])?.to_f32() } else { Vec::new() };
        let final_norm = store.take("model.final_layernorm.weight", &[d])?.to_f32();
        let lm_head = if cfg.tie_word_embeddings {
            // Tied: a stored copy, if any, equals the embedding and is not needed.
            store.take_opt("lm_head.weight", &[v, d])?;
            None
        } else {
            Some(store.take("lm_head.weight", &[v, d])?)
        };
        let mut layers = Vec::with_capacity(plan.len());
        for (i, lp) in plan.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut vec = |s: &str, shape: &[usize]| store.take(&p(s), shape).map(|t| t.to_f32());
            let input_norm = vec("input_layernorm.weight", &[d])?;
            let conv_w = hymba_kernels::conv::taps(&vec("mamba.conv1d.weight", &[e, 1, k])?, e);
            let conv_b = if cfg.mamba_conv_bias { vec("mamba.conv1d.bias", &[e])? } else { vec![0.0; e] };
            let dt_bias = vec("mamba.dt_proj.0.bias", &[e])?;
            let a = vec("mamba.A_log.0", &[e, n])?.iter().map(|x| -x.exp()).collect();
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
            layers.push(LayerWeights {
                input_norm,
                in_proj: store.take(&p("mamba.in_proj.weight"), &[cfg.in_proj_rows(lp.computes_kv), d])?,
                conv_w,
                conv_b,
                x_proj: store.take(&p("mamba.x_proj.0.weight"), &[r + 2 * n, e])?,
                dt_proj: store.take(&p("mamba.dt_proj.0.weight"), &[e, r])?,
                dt_bias,
                a,
                d: dd,
                inner_norms,
                attn_norm,
                ssm_norm,
                out_proj: store.take(&p("mamba.out_proj.weight"), &[d, e])?,
                mlp_norm,
                gate: store.take(&p("moe.experts.0.gate_proj.weight"), &[f, d])?,
                up: store.take(&p("moe.experts.0.up_proj.weight"), &[f, d])?,
                down: store.take(&p("moe.experts.0.down_proj.weight"), &[d, f])?,
            });
        }
        store.finish()?;
        Ok(Weights { embed, memory_tokens, final_norm, lm_head, layers })
    }

    /// The output projection: lm_head, or the embedding when tied.
    pub fn output(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
