//! The loss curve as a PNG: training loss (blue), validation loss (red dots), reference levels
//! such as the n-gram baselines (grey dashes), with numbered axes in a tiny bitmap font.

use crate::train::History;
use hymba::{Error, Result};
use std::path::Path;

const W: usize = 900;
const H: usize = 520;
/// Margins: left, right, top, bottom.
const L: usize = 70;
const R: usize = 20;
const T: usize = 20;
const B: usize = 50;

/// 3×5 glyphs for the characters axis labels need, one row per 3-bit line.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        _ => [0; 5],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let f = i as f64 / n as f64;
            self.set(
                (x0 + f * (x1 - x0)).round() as i64,
                (y0 + f * (y1 - y0)).round() as i64,
                rgb,
            );
        }
    }

    fn text(&mut self, s: &str, x: i64, y: i64) {
        const S: i64 = 2;
        for (k, c) in s.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for dy in 0..S {
                            for dx in 0..S {
                                self.set(
                                    x + k as i64 * 4 * S + col * S + dx,
                                    y + row as i64 * S + dy,
                                    [0, 0, 0],
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Writes the curve of `history` with horizontal `levels` to `path` (atomically).
pub fn loss_png(history: &History, levels: &[f32], path: &Path) -> Result<()> {
    let mut c = Canvas {
        px: vec![255; W * H * 3],
    };
    let steps = history.train.last().map_or(1, |s| s.0).max(1) as f64;
    let mut ys: Vec<f32> = history
        .train
        .iter()
        .map(|s| s.1)
        .chain(history.valid.iter().map(|v| v.1))
        .chain(levels.iter().copied())
        .collect();
    ys.retain(|v| v.is_finite());
    // Skip the first steps' very high losses when choosing the scale, so the tail is readable.
    let skip = history.train.len() / 50;
    let top = history
        .train
        .iter()
        .skip(skip)
        .map(|s| s.1)
        .chain(levels.iter().copied())
        .fold(f32::MIN, f32::max);
    let lo = ys.iter().copied().fold(f32::MAX, f32::min).floor() as f64;
    let hi = (top.max(lo as f32 + 1.0)).ceil() as f64;
    let (pw, ph) = ((W - L - R) as f64, (H - T - B) as f64);
    let px = |s: f64| L as f64 + s / steps * pw;
    let py = |v: f64| T as f64 + (hi - v.clamp(lo, hi)) / (hi - lo) * ph;
    // Axes, grid and labels.
    let ticks = 5;
    for i in 0..=ticks {
        let v = lo + (hi - lo) * i as f64 / ticks as f64;
        let y = py(v);
        c.line((L as f64, y), ((W - R) as f64, y), [225, 225, 225]);
        c.text(&format!("{v:.1}"), 8, y as i64 - 5);
        let s = steps * i as f64 / ticks as f64;
        let x = px(s);
        c.line((x, T as f64), (x, (H - B) as f64), [225, 225, 225]);
        c.text(
            &format!("{}", s.round() as u64),
            x as i64 - 10,
            (H - B + 10) as i64,
        );
    }
    c.line((L as f64, T as f64), (L as f64, (H - B) as f64), [0, 0, 0]);
    c.line(
        (L as f64, (H - B) as f64),
        ((W - R) as f64, (H - B) as f64),
        [0, 0, 0],
    );
    for &lv in levels {
        let y = py(lv as f64);
        let mut x = L as f64;
        while x < (W - R) as f64 {
            c.line((x, y), ((x + 6.0).min((W - R) as f64), y), [120, 120, 120]);
            x += 12.0;
        }
    }
    for w in history.train.windows(2) {
        c.line(
            (px(w[0].0 as f64), py(w[0].1 as f64)),
            (px(w[1].0 as f64), py(w[1].1 as f64)),
            [40, 90, 220],
        );
    }
    for &(s, v) in &history.valid {
        let (x, y) = (px(s as f64) as i64, py(v as f64) as i64);
        for dy in -3..=3 {
            for dx in -3..=3 {
                if dx * dx + dy * dy <= 9 {
                    c.set(x + dx, y + dy, [220, 40, 40]);
                }
            }
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc
            .write_header()
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        wr.write_image_data(&c.px)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    }
    hymba::error::write_atomic(path, &bytes)
}
