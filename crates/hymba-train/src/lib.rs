//! # hymba-train
//!
//! Trains Hymba models on CPU, from scratch or from a checkpoint's weights (fine-tuning), with
//! every architecture feature: hybrid attention +
//! SSM heads, meta tokens, sliding-window and global layers, K/V reuse groups. Gradients are
//! hand-written backward passes of the spec's forward ([`ops`] for the pieces, [`model`] for
//! their composition), checked against finite differences; [`train::export`] writes the
//! official layout, which the engine (and NVIDIA's code) loads unchanged.

pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plot;
pub mod presets;
pub mod train;

pub use model::{Batch, TrainModel};
pub use params::Params;
pub use train::{train, Progress, Start, TrainOptions};
