//! Named model shapes for `hymba train --config NAME`. Each uses every Hymba feature: meta
//! tokens, global and sliding-window layers, K/V reuse groups, GQA, inner SSM norms.

use serde_json::{json, Value};

const BASE: &str = include_str!("../../../assets/hymba-1.5b-config.json");

pub const NAMES: [&str; 2] = ["tiny", "micro"];

/// The config.json of preset `name` for a vocabulary of `vocab_size` tokens.
pub fn preset(name: &str, vocab_size: usize) -> Option<Value> {
    // (hidden, layers, heads, kv heads, ffn, meta tokens, window, global layers, reuse groups)
    type Shape = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Vec<usize>,
        Vec<Vec<usize>>,
    );
    let (d, l, h, hkv, f, m, w, global, groups): Shape = match name {
        // The shipped default model: 4.4M parameters at a 4096-token vocabulary.
        "tiny" => (
            192,
            6,
            3,
            1,
            512,
            16,
            128,
            vec![0, 5],
            vec![vec![1, 2], vec![3, 4]],
        ),
        // For tests and smoke runs: trains in seconds.
        "micro" => (64, 3, 2, 1, 128, 4, 16, vec![0], vec![vec![1, 2]]),
        _ => return None,
    };
    // Hymba-1.5B's own config.json with the shape keys replaced, so every other key NVIDIA's
    // code reads keeps its released value.
    let mut cfg: Value =
        serde_json::from_str(BASE).expect("the embedded Hymba-1.5B config is JSON");
    let conv_dim: serde_json::Map<String, Value> =
        (0..l).map(|i| (i.to_string(), json!(2 * d))).collect();
    let set = json!({
        "vocab_size": vocab_size,
        "hidden_size": d,
        "num_hidden_layers": l,
        "num_attention_heads": h,
        "num_key_value_heads": hkv,
        "v_head_dim": 2 * d / h,
        "mamba_expand": 2,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_dt_rank": d.div_ceil(16),
        "intermediate_size": f,
        "num_memory_tokens": m,
        "sliding_window": w,
        "global_attn_idx": global,
        "kv_reuse_group": groups,
        "layer_type": vec!["h"; l],
        "conv_dim": conv_dim,
        "max_position_embeddings": 2048,
        "orig_max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    });
    for (k, v) in set.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    Some(cfg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn presets_are_valid_configs() {
        for n in super::NAMES {
            let v = super::preset(n, 300).unwrap();
            hymba::Config::from_value(v).unwrap_or_else(|e| panic!("preset {n}: {e}"));
        }
    }
}
