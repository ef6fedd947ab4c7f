//! # hymba-train
//!
//! Trains Hymba models from scratch (or continues from a checkpoint) on CPU, with every
//! architecture feature: hybrid attention + SSM heads, meta tokens, sliding-window and global
//! layers, K/V reuse groups. Gradients are hand-written backward passes of the spec's forward
//! ([`ops`] for the pieces, [`model`] for their composition), checked against finite
//! differences; the result is written in the official layout, which the engine loads unchanged.

pub mod model;
pub mod ops;
pub mod params;

pub use model::{Batch, TrainModel};
pub use params::Params;
