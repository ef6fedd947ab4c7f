//! `hymba inspect`: what a model is made of and what one sequence's cache holds.

use anyhow::Result;
use clap::Args;
use hymba::backend::Backend;
use hymba::config::AttnKind;
use hymba::Model;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Where the cache is measured: cpu, or cuda[:N] (its buffers on the card).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Tokens in the sequence whose cache is measured.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let (device, dir) = (a.device.clone(), a.model.clone());
    crate::default_model::with_model(&device, Some(&dir), None, Inspect(a))
}

struct Inspect(InspectArgs);

impl crate::default_model::ModelFn<()> for Inspect {
    fn call<B: Backend>(self, model: Model<B>) -> Result<()> {
        report(self.0, model)
    }
}

fn report<B: Backend>(a: InspectArgs, model: Model<B>) -> Result<()> {
    let model = a.kv_cache.apply(model);
    let c = &model.config;
    let params = model.parameter_counts();
    let plan: Vec<serde_json::Value> = model
        .plan
        .iter()
        .enumerate()
        .map(|(i, lp)| {
            let g = &model.groups[lp.kv_group];
            serde_json::json!({
                "layer": i,
                "attention": if lp.attn == AttnKind::Global { "global" } else { "window" },
                "kv": if lp.computes_kv { "computes".to_string() } else { format!("reuses layer {}", g.layers[0]) },
                "kv_group": lp.kv_group,
            })
        })
        .collect();
    // Measured from the buffers of a live cache holding `context` tokens.
    let cache = model.cache_with_placeholder_tokens(a.context);
    let bytes = cache.bytes();
    // Llama-style: every layer keeps K and V of every token, same widths and element size.
    let elem = model.kv_dtype().size();
    let llama = c.num_hidden_layers * a.context * (c.k_width() + c.v_width()) * elem;
    let ratio = llama as f64 / bytes.per_sequence.max(1) as f64;
    if a.json {
        let v = serde_json::json!({
            "parameters": params,
            "layers": plan,
            "cache": {"context": a.context, "bytes": bytes, "llama_style_bytes": llama, "ratio": ratio, "element_bytes": elem},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("parameters");
    for (k, v) in serde_json::to_value(&params)?.as_object().expect("struct") {
        println!("  {k:<12} {:>14}", v.as_u64().unwrap_or(0));
    }
    println!(
        "\nlayers (W = {:?}, {} meta tokens)",
        c.sliding_window, c.num_memory_tokens
    );
    for p in &plan {
        println!(
            "  {:>3}  {:<6}  {}",
            p["layer"],
            p["attention"].as_str().unwrap_or(""),
            p["kv"].as_str().unwrap_or("")
        );
    }
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "\ncache of one sequence at {} tokens ({:?} K/V, from live buffers)",
        a.context,
        model.kv_dtype()
    );
    println!("  global K/V       {:>10.2} MiB", mib(bytes.global_kv));
    println!("  window K/V rings {:>10.2} MiB", mib(bytes.window_kv));
    println!("  SSM state        {:>10.2} MiB", mib(bytes.ssm_state));
    println!("  conv state       {:>10.2} MiB", mib(bytes.conv_state));
    println!("  per sequence     {:>10.2} MiB", mib(bytes.per_sequence));
    println!(
        "  meta prefix      {:>10.2} MiB (once per model, shared)",
        mib(bytes.meta_prefix_shared)
    );
    println!(
        "  Llama-style      {:>10.2} MiB ({} layers × K/V of every token): {ratio:.2}x larger",
        mib(llama),
        c.num_hidden_layers
    );
    Ok(())
}
