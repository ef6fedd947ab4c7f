//! # hymba
//!
//! A Rust engine for NVIDIA's Hymba hybrid-head language models: attention heads and Mamba (SSM)
//! heads side by side in every layer, learnable meta tokens prepended to every sequence, K/V
//! shared across consecutive layers and sliding-window attention in all but a few layers.
//!
//! The math follows `HYMBA_SPEC.md` (cited as "spec §n"). A minimal use:
//!
//! ```no_run
//! use hymba::{Model, Logits, DecodeWindow};
//! let model = Model::load(std::path::Path::new("hymba-1.5b"))?;
//! let mut cache = model.new_cache();
//! let logits = model.forward(&mut cache, &[1, 450, 4996], Logits::Last, DecodeWindow::Trained)?;
//! # Ok::<(), hymba::Error>(())
//! ```

pub mod backend;
pub mod cache;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod hub;
pub mod mask;
pub mod model;
pub mod prompt_cache;
pub mod sample;
pub mod score;
pub mod session;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use cache::{Cache, CacheBytes, KvDtype};
pub use chat::{ChatTemplate, Message};
pub use config::Config;
pub use engine::{Engine, EngineOptions, Event, Request, SubmitError};
pub use error::{Error, Result};
pub use generate::{generate, Accepted, Decoder, FinishReason, GenerateOptions, Generation};
pub use hymba_kernels as kernels;
pub use mask::DecodeWindow;
pub use model::{BatchLogits, Logits, Model, ParamCounts, Step};
pub use prompt_cache::PromptCache;
pub use sample::{Sampler, SamplingParams};
pub use tokenizer::{Detokenizer, Tokenizer};
