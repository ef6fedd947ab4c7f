//! AdamW with decoupled weight decay, linear warmup then cosine decay, and global gradient-norm
//! clipping.

use crate::params::Params;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Schedule {
    pub lr: f32,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_frac: f32,
    pub warmup: usize,
    pub steps: usize,
}

impl Schedule {
    /// Learning rate of step `s` (0-based).
    pub fn at(&self, s: usize) -> f32 {
        if s < self.warmup {
            return self.lr * (s + 1) as f32 / self.warmup as f32;
        }
        let span = (self.steps.saturating_sub(self.warmup)).max(1) as f32;
        let p = ((s - self.warmup) as f32 / span).min(1.0);
        let min = self.lr * self.min_lr_frac;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f32::consts::PI * p).cos())
    }
}

pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// First and second moments, laid out as the parameters.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl AdamW {
    pub fn new(n: usize, weight_decay: f32) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One update with learning rate `lr` at (1-based) step `t`.
    pub fn step(&mut self, params: &mut Params, grad: &[f32], lr: f32, t: usize) {
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        for info in &params.info {
            let decay = if info.decay { self.weight_decay } else { 0.0 };
            for i in info.range.clone() {
                let g = grad[i];
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
                let update = (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + self.eps);
                params.data[i] -= lr * (update + decay * params.data[i]);
            }
        }
    }
}

/// Scales `grad` so its global L2 norm is at most `max`; returns the norm before clipping.
pub fn clip_grad_norm(grad: &mut [f32], max: f32) -> f32 {
    let norm = grad
        .iter()
        .map(|g| (*g as f64) * (*g as f64))
        .sum::<f64>()
        .sqrt() as f32;
    if norm > max && norm.is_finite() {
        let s = max / norm;
        grad.iter_mut().for_each(|g| *g *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            lr: 1e-3,
            min_lr_frac: 0.1,
            warmup: 10,
            steps: 110,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-9);
        assert!((s.at(9) - 1e-3).abs() < 1e-9);
        assert!((s.at(10) - 1e-3).abs() < 1e-9);
        assert!((s.at(60) - 0.55e-3).abs() < 1e-6);
        assert!((s.at(110) - 1e-4).abs() < 1e-9);
        assert!((1..110).all(|i| i < 10 || s.at(i) <= s.at(i - 1)));
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut g = vec![0.3, 0.4];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g, vec![0.3, 0.4]);
    }
}
