//! Which keys a query sees (spec §4): the one place this is decided.

use crate::config::AttnKind;
use hymba_kernels::attention::Visibility;

/// Effective window of a sliding-window layer for one forward call.
///
/// The model was trained with `W` (a query sees itself and the `W` tokens before it). NVIDIA's
/// official decode path trims its cache so a token decoded after the prompt sees one fewer
/// (`W − 1`); [`DecodeWindow::Official`] reproduces that for tokens fed one at a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeWindow {
    /// The trained window everywhere: decoding equals prefill done one token at a time.
    #[default]
    Trained,
    /// NVIDIA's `generate`: single-token steps see `W − 1` past tokens.
    Official,
}

/// Which keys a query sees in one layer for one call, as data: the layer's kind, its effective
/// window, and the number of meta tokens (always visible). What a backend's attention takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mask {
    pub kind: AttnKind,
    pub window: usize,
    pub meta: usize,
}

impl Mask {
    /// Whether a query at position `t` sees the key at `s` (see [`sees`]).
    #[inline]
    pub fn sees(&self, t: usize, s: usize) -> bool {
        self.visibility().sees(t, s)
    }

    /// The mask in the attention kernels' terms: causal, the window in window layers, the meta
    /// tokens as always-visible sinks.
    pub fn visibility(&self) -> Visibility {
        Visibility {
            window: (self.kind == AttnKind::Window).then_some(self.window),
            sinks: self.meta,
        }
    }
}

/// True when a query at absolute position `t` may attend to a key at `s`, in a layer of kind
/// `attn` with window `window`, `meta` being the number of meta tokens (always visible).
#[inline]
pub fn sees(attn: AttnKind, window: usize, meta: usize, t: usize, s: usize) -> bool {
    Mask {
        kind: attn,
        window,
        meta,
    }
    .sees(t, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_layer_sees_meta_plus_w_plus_one_recent() {
        let (w, m) = (4, 3);
        let t = 20;
        let seen: Vec<usize> = (0..=25)
            .filter(|&s| sees(AttnKind::Window, w, m, t, s))
            .collect();
        assert_eq!(seen, vec![0, 1, 2, 16, 17, 18, 19, 20]);
        let all: Vec<usize> = (0..=25)
            .filter(|&s| sees(AttnKind::Global, w, m, t, s))
            .collect();
        assert_eq!(all, (0..=20).collect::<Vec<_>>());
    }
}
