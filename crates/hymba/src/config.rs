//! The model configuration (`config.json`), validated, and the per-layer plan derived from it
//! (spec §1). Every key is read with its own error message, and values this engine does not
//! implement are refused by name rather than ignored.

use crate::error::{parse_json, read_to_string, Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// How a RoPE base is chosen (spec §3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    Default,
    /// NTK-aware scaling of the base from `orig_max_position_embeddings` to
    /// `max_position_embeddings`.
    Ntk,
}

/// Hymba hyper-parameters. Derived sizes are methods.
#[derive(Clone, Debug)]
pub struct Config {
    /// V
    pub vocab_size: usize,
    /// d
    pub hidden_size: usize,
    /// L
    pub num_hidden_layers: usize,
    /// H
    pub num_attention_heads: usize,
    /// Hkv
    pub num_key_value_heads: usize,
    /// dqk
    pub qk_head_dim: usize,
    /// dv
    pub v_head_dim: usize,
    /// E = mamba_expand · d
    pub ssm_width: usize,
    /// N
    pub mamba_d_state: usize,
    /// K
    pub mamba_d_conv: usize,
    /// R
    pub mamba_dt_rank: usize,
    /// F
    pub intermediate_size: usize,
    /// M, the meta tokens
    pub num_memory_tokens: usize,
    /// W (None when every layer is global)
    pub sliding_window: Option<usize>,
    pub rms_norm_eps: f32,
    pub global_attn_idx: Vec<usize>,
    pub kv_reuse_group: Vec<Vec<usize>>,
    pub rope_theta: f64,
    pub rope_type: RopeType,
    pub max_position_embeddings: usize,
    pub orig_max_position_embeddings: usize,
    pub mamba_conv_bias: bool,
    pub mamba_inner_layernorms: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The JSON it was read from, kept so a checkpoint can be written back unchanged.
    pub raw: Value,
}

/// Sizes named as in spec §1: vocabulary V, hidden d, SSM width E, state N, conv K, dt rank R,
/// MLP F, meta tokens M.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub v: usize,
    pub d: usize,
    pub e: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
    pub f: usize,
    pub m: usize,
}

/// Attention span of a layer (spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKind {
    /// Full causal attention.
    Global,
    /// Meta tokens plus the `W + 1` most recent tokens.
    Window,
}

/// One layer's part in the model: its attention span and which K/V it reads.
#[derive(Clone, Debug)]
pub struct LayerPlan {
    pub attn: AttnKind,
    /// Index of the K/V group this layer reads (see [`KvGroup`]).
    pub kv_group: usize,
    /// True for the first layer of a group: it computes K/V; the others reuse them.
    pub computes_kv: bool,
}

/// Layers that share one K/V: the first computes it, the rest reuse it. A layer in no reuse
/// group forms a group of one.
#[derive(Clone, Debug)]
pub struct KvGroup {
    pub layers: Vec<usize>,
    /// Stored in full when any member is a global layer, otherwise as a window ring.
    pub attn: AttnKind,
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = read_to_string(path)?;
        let v = parse_json(path, &text)?;
        Config::from_value(v)
    }

    /// Validates a parsed `config.json`.
    pub fn from_value(raw: Value) -> Result<Config> {
        let obj = raw
            .as_object()
            .ok_or_else(|| Error::config("(top level)", "expected a JSON object"))?;
        let r = Reader(obj);
        if let Some(mt) = r.opt_str("model_type")? {
            if mt != "hymba" {
                return Err(Error::config(
                    "model_type",
                    format!("expected \"hymba\", found {mt:?}"),
                ));
            }
        }
        let d = r.pos_usize("hidden_size")?;
        let l = r.pos_usize("num_hidden_layers")?;
        let h = r.pos_usize("num_attention_heads")?;
        let hkv = r.usize_or("num_key_value_heads", h)?;
        if hkv == 0 || h % hkv != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{hkv} does not divide num_attention_heads ({h})"),
            ));
        }
        let attn_hidden = match r.i64_or("attn_hidden_size", -1)? {
            -1 => d,
            v if v > 0 => v as usize,
            v => {
                return Err(Error::config(
                    "attn_hidden_size",
                    format!("expected -1 or a positive size, found {v}"),
                ))
            }
        };
        let dqk = match r.i64_or("kq_head_dim", -1)? {
            -1 => {
                if attn_hidden % h != 0 {
                    let key = if attn_hidden == d {
                        "hidden_size"
                    } else {
                        "attn_hidden_size"
                    };
                    return Err(Error::config(
                        key,
                        format!("{attn_hidden} is not divisible by num_attention_heads ({h})"),
                    ));
                }
                attn_hidden / h
            }
            v if v > 0 => v as usize,
            v => {
                return Err(Error::config(
                    "kq_head_dim",
                    format!("expected -1 or a positive size, found {v}"),
                ))
            }
        };
        if dqk % 2 != 0 {
            return Err(Error::config(
                "kq_head_dim",
                format!("the query/key head size {dqk} must be even for RoPE"),
            ));
        }
        let expand = r.pos_usize("mamba_expand")?;
        let e = expand * d;
        let dv = match r.opt_i64("v_head_dim")? {
            None => {
                if e % h != 0 {
                    return Err(Error::config(
                        "num_attention_heads",
                        format!("{h} does not divide the SSM width {e}"),
                    ));
                }
                e / h
            }
            Some(v) if v > 0 => v as usize,
            Some(v) => {
                return Err(Error::config(
                    "v_head_dim",
                    format!("expected a positive size, found {v}"),
                ))
            }
        };
        if dv * h != e {
            return Err(Error::config(
                "v_head_dim",
                format!("{dv} × num_attention_heads ({h}) must equal mamba_expand × hidden_size ({e}): the branches are fused channel by channel"),
            ));
        }
        // Keys whose other values change the architecture in ways this engine does not implement.
        if !r.bool_or("rope", true)? {
            return Err(Error::config("rope", "only rope = true is supported"));
        }
        let rope_type = match r.str_or("rope_type", "default")?.as_str() {
            "default" => RopeType::Default,
            "ntk" => RopeType::Ntk,
            other => {
                return Err(Error::config(
                    "rope_type",
                    format!("{other:?} is not supported (expected \"default\" or \"ntk\")"),
                ))
            }
        };
        let n_exp = r.usize_or("num_experts", 1)?;
        if n_exp != 1 {
            return Err(Error::config(
                "num_experts",
                format!("only 1 is supported, found {n_exp}"),
            ));
        }
        let num_mamba = r.usize_or("num_mamba", 1)?;
        if num_mamba != 1 {
            return Err(Error::config(
                "num_mamba",
                format!("only 1 is supported, found {num_mamba}"),
            ));
        }
        match obj.get("kq_norm") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(other) => {
                return Err(Error::config(
                    "kq_norm",
                    format!("only \"none\" is supported, found {other}"),
                ))
            }
        }
        let inter = r.i64_or("memory_tokens_interspersed_every", 0)?;
        if inter != 0 {
            return Err(Error::config(
                "memory_tokens_interspersed_every",
                format!("only 0 is supported, found {inter}"),
            ));
        }
        let act = r.str_or("mlp_hidden_act", "silu")?;
        if act != "silu" {
            return Err(Error::config(
                "mlp_hidden_act",
                format!("only \"silu\" is supported, found {act:?}"),
            ));
        }
        if r.bool_or("mamba_proj_bias", false)? {
            return Err(Error::config(
                "mamba_proj_bias",
                "only false is supported (in_proj and out_proj without bias)",
            ));
        }
        if r.bool_or("kv_weight_reuse", false)? {
            return Err(Error::config("kv_weight_reuse", "only false is supported"));
        }
        let every = r.i64_or("kv_reuse_every_i_layer", -1)?;
        if every != -1 {
            return Err(Error::config(
                "kv_reuse_every_i_layer",
                format!("only -1 is supported (use kv_reuse_group), found {every}"),
            ));
        }
        if let Some(lt) = obj.get("layer_type") {
            let arr = lt
                .as_array()
                .ok_or_else(|| Error::config("layer_type", "expected a list of strings"))?;
            if arr.len() != l {
                return Err(Error::config(
                    "layer_type",
                    format!("has {} entries, num_hidden_layers is {l}", arr.len()),
                ));
            }
            for (i, t) in arr.iter().enumerate() {
                if t.as_str() != Some("h") {
                    return Err(Error::config(
                        "layer_type",
                        format!("layer {i} is {t}; only \"h\" (hybrid) is supported"),
                    ));
                }
            }
        }
        if let Some(cd) = obj.get("conv_dim") {
            let m = cd
                .as_object()
                .ok_or_else(|| Error::config("conv_dim", "expected an object of layer -> width"))?;
            for (k, v) in m {
                if v.as_u64() != Some(e as u64) {
                    return Err(Error::config("conv_dim", format!("layer {k} has width {v}; only mamba_expand × hidden_size = {e} is supported")));
                }
            }
        }
        let global_attn_idx = r.index_list("global_attn_idx", l)?.unwrap_or_default();
        let mut kv_reuse_group = Vec::new();
        if let Some(v) = obj.get("kv_reuse_group").filter(|v| !v.is_null()) {
            let groups = v.as_array().ok_or_else(|| {
                Error::config(
                    "kv_reuse_group",
                    "expected a list of lists of layer indices",
                )
            })?;
            let mut seen = vec![false; l];
            for g in groups {
                let g = g.as_array().ok_or_else(|| {
                    Error::config(
                        "kv_reuse_group",
                        format!("{g} is not a list of layer indices"),
                    )
                })?;
                if g.is_empty() {
                    return Err(Error::config("kv_reuse_group", "a group is empty"));
                }
                let mut layers = Vec::new();
                for x in g {
                    let i = x.as_u64().filter(|&i| (i as usize) < l).ok_or_else(|| {
                        Error::config(
                            "kv_reuse_group",
                            format!("{x} is not a layer index (num_hidden_layers is {l})"),
                        )
                    })? as usize;
                    if seen[i] {
                        return Err(Error::config(
                            "kv_reuse_group",
                            format!("layer {i} is in two reuse groups"),
                        ));
                    }
                    if layers.last().is_some_and(|&p| p >= i) {
                        return Err(Error::config(
                            "kv_reuse_group",
                            format!("group {g:?} must list its layers in increasing order"),
                        ));
                    }
                    seen[i] = true;
                    layers.push(i);
                }
                kv_reuse_group.push(layers);
            }
        }
        let sliding_window = match obj.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(_) => Some(r.pos_usize("sliding_window")?),
        };
        if sliding_window.is_none() && (0..l).any(|i| !global_attn_idx.contains(&i)) {
            return Err(Error::config(
                "sliding_window",
                "missing, but some layers are not in global_attn_idx",
            ));
        }
        let max_pos = r.usize_or("max_position_embeddings", 8192)?;
        let orig_max_pos = r.usize_or("orig_max_position_embeddings", max_pos)?;
        if rope_type == RopeType::Ntk && (orig_max_pos == 0 || dqk <= 2) {
            return Err(Error::config(
                "orig_max_position_embeddings",
                "ntk RoPE needs a positive value and a head size above 2",
            ));
        }
        let eps = r.f64_or("rms_norm_eps", 1e-6)?;
        if eps.is_nan() || eps <= 0.0 {
            return Err(Error::config(
                "rms_norm_eps",
                format!("expected a positive number, found {eps}"),
            ));
        }
        let vocab_size = r.pos_usize("vocab_size")?;
        // Greedy picks travel as f32 indices (`Backend::argmax`).
        if vocab_size > 1 << 24 {
            return Err(Error::config(
                "vocab_size",
                format!("{vocab_size} is above the 2^24 tokens this engine supports"),
            ));
        }
        let cfg = Config {
            vocab_size,
            hidden_size: d,
            num_hidden_layers: l,
            num_attention_heads: h,
            num_key_value_heads: hkv,
            qk_head_dim: dqk,
            v_head_dim: dv,
            ssm_width: e,
            mamba_d_state: r.pos_usize("mamba_d_state")?,
            mamba_d_conv: r.pos_usize("mamba_d_conv")?,
            mamba_dt_rank: r.pos_usize("mamba_dt_rank")?,
            intermediate_size: r.pos_usize("intermediate_size")?,
            num_memory_tokens: r.usize_or("num_memory_tokens", 0)?,
            sliding_window,
            rms_norm_eps: eps as f32,
            global_attn_idx,
            kv_reuse_group,
            rope_theta: r.f64_or("rope_theta", 10000.0)?,
            rope_type,
            max_position_embeddings: max_pos,
            orig_max_position_embeddings: orig_max_pos,
            mamba_conv_bias: r.bool_or("mamba_conv_bias", true)?,
            mamba_inner_layernorms: r.bool_or("mamba_inner_layernorms", true)?,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", true)?,
            bos_token_id: r.opt_token("bos_token_id")?,
            eos_token_id: r.opt_token("eos_token_id")?,
            pad_token_id: r.opt_token("pad_token_id")?,
            raw: raw.clone(),
        };
        if cfg.rope_theta.is_nan() || cfg.rope_theta <= 0.0 {
            return Err(Error::config("rope_theta", "expected a positive number"));
        }
        Ok(cfg)
    }

    /// The spec's symbols (§1) together, for code that builds or checks tensor shapes.
    pub fn dims(&self) -> Dims {
        Dims {
            v: self.vocab_size,
            d: self.hidden_size,
            e: self.ssm_width,
            n: self.mamba_d_state,
            k: self.mamba_d_conv,
            r: self.mamba_dt_rank,
            f: self.intermediate_size,
            m: self.num_memory_tokens,
        }
    }

    /// Rows of `in_proj` for q, k, v (k and v only in a K/V-computing layer).
    pub fn q_width(&self) -> usize {
        self.qk_head_dim * self.num_attention_heads
    }
    pub fn k_width(&self) -> usize {
        self.qk_head_dim * self.num_key_value_heads
    }
    pub fn v_width(&self) -> usize {
        self.v_head_dim * self.num_key_value_heads
    }
    /// Rows of `in_proj` for a layer: q [, k, v], x, z.
    pub fn in_proj_rows(&self, computes_kv: bool) -> usize {
        let kv = if computes_kv {
            self.k_width() + self.v_width()
        } else {
            0
        };
        self.q_width() + kv + 2 * self.ssm_width
    }

    /// RoPE base after the `rope_type` adjustment (spec §3.2).
    pub fn rope_base(&self) -> f64 {
        match self.rope_type {
            RopeType::Default => self.rope_theta,
            RopeType::Ntk => {
                let dim = self.qk_head_dim as f64;
                let ratio = 2.0 * self.max_position_embeddings as f64
                    / self.orig_max_position_embeddings as f64
                    - 1.0;
                self.rope_theta * ratio.powf(dim / (dim - 2.0))
            }
        }
    }

    /// The layer plan and the K/V groups, in layer order.
    pub fn plan(&self) -> (Vec<LayerPlan>, Vec<KvGroup>) {
        let l = self.num_hidden_layers;
        let kind = |i: usize| {
            if self.global_attn_idx.contains(&i) {
                AttnKind::Global
            } else {
                AttnKind::Window
            }
        };
        let mut group_of: Vec<Option<usize>> = vec![None; l];
        let mut groups: Vec<KvGroup> = Vec::new();
        for i in 0..l {
            if group_of[i].is_some() {
                continue;
            }
            let members = self
                .kv_reuse_group
                .iter()
                .find(|g| g[0] == i)
                .cloned()
                .unwrap_or_else(|| vec![i]);
            let attn = if members.iter().any(|&j| kind(j) == AttnKind::Global) {
                AttnKind::Global
            } else {
                AttnKind::Window
            };
            for &j in &members {
                group_of[j] = Some(groups.len());
            }
            groups.push(KvGroup {
                layers: members,
                attn,
            });
        }
        let plans = (0..l)
            .map(|i| {
                let g = group_of[i].expect("every layer is in a group");
                LayerPlan {
                    attn: kind(i),
                    kv_group: g,
                    computes_kv: groups[g].layers[0] == i,
                }
            })
            .collect();
        (plans, groups)
    }
}

/// Typed access to config keys with errors that name the key.
struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn pos_usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => Err(Error::config(key, "missing")),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(Error::config(
                    key,
                    format!("expected a positive integer, found {v}"),
                )),
            },
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::config(key, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Error::config(key, format!("expected an integer, found {v}"))),
        }
    }
    fn i64_or(&self, key: &str, default: i64) -> Result<i64> {
        Ok(self.opt_i64(key)?.unwrap_or(default))
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::config(key, format!("expected a number, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::config(key, format!("expected true or false, found {v}"))),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| Error::config(key, format!("expected a string, found {v}"))),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> Result<String> {
        Ok(self.opt_str(key)?.unwrap_or_else(|| default.to_string()))
    }
    fn opt_token(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| Some(n as u32))
                .ok_or_else(|| Error::config(key, format!("expected a token id, found {v}"))),
        }
    }
    /// A list of layer indices, each checked against the layer count.
    fn index_list(&self, key: &str, l: usize) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v.as_array().ok_or_else(|| {
            Error::config(key, format!("expected a list of layer indices, found {v}"))
        })?;
        arr.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&i| (i as usize) < l)
                    .map(|i| i as usize)
                    .ok_or_else(|| {
                        Error::config(
                            key,
                            format!("{x} is not a layer index (num_hidden_layers is {l})"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
