//! Element-wise activations, as PyTorch computes them.

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `log(1 + e^x)`, linear above 20 like `torch.nn.functional.softplus` (beta 1, threshold 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn silu_inplace(x: &mut [f32]) {
    for v in x {
        *v = silu(*v);
    }
}

/// `a[i] = silu(a[i]) * b[i]`: the gated MLP and the SSM output gate.
pub fn silu_mul(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, g) in a.iter_mut().zip(b) {
        *x = silu(*x) * g;
    }
}
