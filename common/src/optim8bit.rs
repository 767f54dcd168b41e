//! The 8-bit state of AdamW: bitsandbytes' block-wise dynamic quantization (Dettmers et
//! al., "8-bit Optimizers via Block-wise Quantization", 2022), as `bnb.optim.AdamW8bit`
//! and HF's `optim = "adamw_bnb_8bit"` / `"paged_adamw_8bit"` keep it.
//!
//! Each moment is stored as one byte per value plus one f32 `absmax` per block of
//! [`BLOCKSIZE`] values: a byte is an index into a 256-entry code book (the "dynamic map"
//! of [`create_dynamic_map`], signed for `exp_avg`, unsigned for `exp_avg_sq`), and a value
//! is `code[byte] · absmax`. A step dequantizes a block, runs the fp32 AdamW update, and
//! quantizes the new moments against the block's new absmax. Parameter tensors with fewer
//! than [`MIN_8BIT_SIZE`] values keep fp32 moments, as bitsandbytes' `min_8bit_size`.

use crate::{Error, Result};

/// Values per quantization block (bitsandbytes' block-wise optimizers use 256).
pub const BLOCKSIZE: usize = 256;

/// bitsandbytes' default `min_8bit_size`: smaller parameter tensors keep fp32 moments
/// (their state is small, and one absmax per 256 values would be a large relative cost).
pub const MIN_8BIT_SIZE: usize = 4096;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// f32 codes in [-1, 1] (signed) or [0, 1] (unsigned), dense near zero. Each decade
/// 10^(i-6), i = 0..6, holds 2^i (signed, per sign) or 2^(i+1) (unsigned) codes at the
/// midpoints of an even split of [0.1, 1]; then 0 and 1 close the table.
///
/// Computed in f32 exactly as torch does it for bitsandbytes (torch.linspace evaluates
/// `start + step·i` as one fused multiply-add), so the table equals bitsandbytes' bit for bit.
pub fn create_dynamic_map(signed: bool) -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let fraction_items = if signed { (1usize << i) + 1 } else { (1usize << (i + 1)) + 1 };
        let boundaries = torch_linspace_f32(0.1, 1.0, fraction_items);
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i) as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("the dynamic map has 256 entries")
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up
/// from `start`, the second half down from `end`, each as one fused multiply-add.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The code of `code` nearest to `x` (ties to the lower code), as bitsandbytes'
/// `quantize_blockwise`. `code` is sorted ascending.
pub fn nearest_code(code: &[f32; 256], x: f32) -> u8 {
    // Largest index whose code is ≤ x (0 when x is below every code).
    let upper = code.partition_point(|&c| c <= x);
    let lo = upper.saturating_sub(1);
    if lo < 255 && (x - code[lo + 1]).abs() < (x - code[lo]).abs() {
        (lo + 1) as u8
    } else {
        lo as u8
    }
}

/// Quantizes one block: returns its absmax and writes one code per value. `keep_sign`
/// (for `exp_avg`) moves a negative value that rounded to the zero code one code down, as
/// bitsandbytes' 8-bit optimizer kernels do, so a small negative momentum keeps its sign.
/// An all-zero block has absmax 0 and every value on the zero code.
pub fn quantize_block(code: &[f32; 256], values: &[f32], codes: &mut [u8], keep_sign: bool) -> f32 {
    let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (c, &v) in codes.iter_mut().zip(values) {
        let x = if absmax > 0.0 { v / absmax } else { 0.0 };
        let mut q = nearest_code(code, x);
        if keep_sign && x < 0.0 && code[q as usize] >= 0.0 {
            q -= 1;
        }
        *c = q;
    }
    absmax
}

/// The values of one block: `code[byte] · absmax`.
pub fn dequantize_block(code: &[f32; 256], codes: &[u8], absmax: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = code[c as usize] * absmax;
    }
}

/// Block-wise quantization of a whole vector (blocks of [`BLOCKSIZE`], the last one
/// partial): the codes and one absmax per block.
pub fn quantize_blockwise(code: &[f32; 256], values: &[f32], keep_sign: bool) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; values.len()];
    let absmax = values
        .chunks(BLOCKSIZE)
        .zip(codes.chunks_mut(BLOCKSIZE))
        .map(|(v, c)| quantize_block(code, v, c, keep_sign))
        .collect();
    (codes, absmax)
}

/// Inverse of [`quantize_blockwise`] (up to the quantization error).
pub fn dequantize_blockwise(code: &[f32; 256], codes: &[u8], absmax: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; codes.len()];
    for ((o, c), &a) in out.chunks_mut(BLOCKSIZE).zip(codes.chunks(BLOCKSIZE)).zip(absmax) {
        dequantize_block(code, c, a, o);
    }
    out
}

/// One stretch of the flat parameter buffer that the optimizer updates as a unit: at most
/// [`BLOCKSIZE`] values of one parameter tensor, with either 8-bit moments (codes at
/// `state`, absmax at `absmax`) or fp32 moments (at `state` in the fp32 moment buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBlock {
    /// First value in the flat parameter buffer.
    pub param: usize,
    pub len: usize,
    /// First value in the code buffers (8-bit) or in the fp32 moment buffers.
    pub state: usize,
    /// Index of the block's absmax; None for fp32 moments.
    pub absmax: Option<usize>,
}

/// How the moments of a flat buffer made of parameter tensors are stored: which tensors
/// are 8-bit, and the blocks each splits into. Blocks never straddle two tensors, so every
/// tensor is quantized as bitsandbytes quantizes it on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    pub blocks: Vec<StateBlock>,
    /// Values with 8-bit moments (the length of each code buffer).
    pub n_8bit: usize,
    /// Values with fp32 moments (the length of each fp32 moment buffer).
    pub n_fp32: usize,
    /// Blocks with 8-bit moments (the length of each absmax buffer).
    pub n_absmax: usize,
}

impl StateLayout {
    /// The layout for parameter tensors of `tensor_lens` values, laid end to end in this
    /// order; tensors of fewer than `min_8bit_size` values keep fp32 moments.
    pub fn new(tensor_lens: &[usize], min_8bit_size: usize) -> Self {
        let mut layout = StateLayout { blocks: Vec::new(), n_8bit: 0, n_fp32: 0, n_absmax: 0 };
        let mut param = 0;
        for &len in tensor_lens {
            let eight_bit = len >= min_8bit_size;
            for start in (0..len).step_by(BLOCKSIZE) {
                let n = BLOCKSIZE.min(len - start);
                let block = if eight_bit {
                    layout.n_absmax += 1;
                    layout.n_8bit += n;
                    StateBlock { param: param + start, len: n, state: layout.n_8bit - n, absmax: Some(layout.n_absmax - 1) }
                } else {
                    layout.n_fp32 += n;
                    StateBlock { param: param + start, len: n, state: layout.n_fp32 - n, absmax: None }
                };
                layout.blocks.push(block);
            }
            param += len;
        }
        layout
    }

    /// Parameters covered.
    pub fn num_params(&self) -> usize {
        self.n_8bit + self.n_fp32
    }

    /// Bytes of optimizer state: two codes per 8-bit value, two absmax per 8-bit block, two
    /// f32 per fp32 value.
    pub fn state_bytes(&self) -> usize {
        2 * self.n_8bit + 8 * self.n_absmax + 8 * self.n_fp32
    }
}

/// The 8-bit moments of [`crate::optim::AdamW`] on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments8bit {
    pub layout: StateLayout,
    /// bitsandbytes' `qmap1` (signed) and `qmap2` (unsigned).
    pub qmap1: [f32; 256],
    pub qmap2: [f32; 256],
    /// bitsandbytes' `state1`/`state2`: codes of exp_avg / exp_avg_sq (8-bit values only).
    pub state1: Vec<u8>,
    pub state2: Vec<u8>,
    pub absmax1: Vec<f32>,
    pub absmax2: Vec<f32>,
    /// exp_avg / exp_avg_sq of the values that keep fp32 moments.
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl Moments8bit {
    /// Zero moments for `layout`: every code on the map's zero, absmax 0.
    pub fn zeros(layout: StateLayout) -> Self {
        let (qmap1, qmap2) = (create_dynamic_map(true), create_dynamic_map(false));
        let zero1 = nearest_code(&qmap1, 0.0);
        let zero2 = nearest_code(&qmap2, 0.0);
        Moments8bit {
            state1: vec![zero1; layout.n_8bit],
            state2: vec![zero2; layout.n_8bit],
            absmax1: vec![0.0; layout.n_absmax],
            absmax2: vec![0.0; layout.n_absmax],
            exp_avg: vec![0.0; layout.n_fp32],
            exp_avg_sq: vec![0.0; layout.n_fp32],
            qmap1,
            qmap2,
            layout,
        }
    }

    /// Drops the codes, absmax and fp32 moments (kept elsewhere, e.g. on a device), keeping
    /// the layout and code books.
    pub fn clear_buffers(&mut self) {
        for v in [&mut self.state1, &mut self.state2] {
            *v = Vec::new();
        }
        for v in [&mut self.absmax1, &mut self.absmax2, &mut self.exp_avg, &mut self.exp_avg_sq] {
            *v = Vec::new();
        }
    }

    /// Checks that loaded buffers have the layout's sizes; `what` names the source in errors.
    pub fn check_sizes(&self, what: &str) -> Result<()> {
        let l = &self.layout;
        for (name, got, want) in [
            ("state1", self.state1.len(), l.n_8bit),
            ("state2", self.state2.len(), l.n_8bit),
            ("absmax1", self.absmax1.len(), l.n_absmax),
            ("absmax2", self.absmax2.len(), l.n_absmax),
            ("exp_avg", self.exp_avg.len(), l.n_fp32),
            ("exp_avg_sq", self.exp_avg_sq.len(), l.n_fp32),
        ] {
            if got != want {
                return Err(Error::Msg(format!(
                    "8-bit AdamW state from {what}: `{name}` holds {got} values, the parameter layout needs {want}"
                )));
            }
        }
        Ok(())
    }

    /// exp_avg and exp_avg_sq of every parameter, dequantized, in parameter order.
    pub fn dequantized(&self) -> (Vec<f32>, Vec<f32>) {
        let n = self.layout.num_params();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for b in &self.layout.blocks {
            let (pm, pv) = (&mut m[b.param..b.param + b.len], &mut v[b.param..b.param + b.len]);
            match b.absmax {
                Some(a) => {
                    dequantize_block(&self.qmap1, &self.state1[b.state..b.state + b.len], self.absmax1[a], pm);
                    dequantize_block(&self.qmap2, &self.state2[b.state..b.state + b.len], self.absmax2[a], pv);
                }
                None => {
                    pm.copy_from_slice(&self.exp_avg[b.state..b.state + b.len]);
                    pv.copy_from_slice(&self.exp_avg_sq[b.state..b.state + b.len]);
                }
            }
        }
        (m, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = format!("{}/../tests/fixtures/optim/adamw8bit.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn vec_f32(v: &Value) -> Vec<f32> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// bitsandbytes' map written out the naive way, in f64 with numpy-style linspace and a
    /// linear nearest search: the reference for the f32 code under test.
    fn naive_map(signed: bool) -> Vec<f64> {
        let mut data = Vec::new();
        for i in 0..7 {
            let items = if signed { (1 << i) + 1 } else { (1 << (i + 1)) + 1 };
            let b: Vec<f64> = (0..items).map(|k| 0.1 + 0.9 * k as f64 / (items - 1) as f64).collect();
            for k in 0..items - 1 {
                let mean = (b[k] + b[k + 1]) / 2.0 * 10f64.powi(i - 6);
                data.push(mean);
                if signed {
                    data.push(-mean);
                }
            }
        }
        data.extend([0.0, 1.0]);
        data.sort_by(f64::total_cmp);
        data
    }

    fn naive_nearest(map: &[f32; 256], x: f32) -> usize {
        let mut best = 0;
        for i in 1..256 {
            if ((x - map[i]).abs()) < (x - map[best]).abs() {
                best = i;
            }
        }
        best
    }

    #[test]
    fn dynamic_maps_equal_bitsandbytes_and_the_naive_formula() {
        let fx = fixture();
        for (signed, key) in [(true, "qmap_signed"), (false, "qmap_unsigned")] {
            let map = create_dynamic_map(signed);
            assert_eq!(map.to_vec(), vec_f32(&fx[key]), "{key}: not bitsandbytes' create_dynamic_map");
            for (i, (&got, want)) in map.iter().zip(naive_map(signed)).enumerate() {
                assert!((got as f64 - want).abs() <= 1e-6 * want.abs(), "{key}[{i}]: {got} vs naive {want}");
            }
        }
        // The shape that makes it "dynamic": 1 and 0 are codes, and the signed map is
        // symmetric apart from its +1.
        let s = create_dynamic_map(true);
        assert_eq!((s[255], s.iter().filter(|&&c| c == 0.0).count()), (1.0, 1));
        assert_eq!(s[0], -s[254]);
    }

    #[test]
    fn quantize_round_trip_matches_a_naive_nearest_search() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        for signed in [true, false] {
            let map = create_dynamic_map(signed);
            // Magnitudes over eight decades, so every part of the map is used.
            let values: Vec<f32> = (0..1000)
                .map(|_| {
                    let mag = 10f64.powf(-8.0 * next()) as f32;
                    if signed && next() < 0.5 { -mag } else { mag }
                })
                .collect();
            let (codes, absmax) = quantize_blockwise(&map, &values, false);
            let back = dequantize_blockwise(&map, &codes, &absmax);
            for (i, ((&v, &c), &b)) in values.iter().zip(&codes).zip(&back).enumerate() {
                let block_max = values[i / BLOCKSIZE * BLOCKSIZE..((i / BLOCKSIZE + 1) * BLOCKSIZE).min(values.len())]
                    .iter()
                    .fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(absmax[i / BLOCKSIZE], block_max, "block {}", i / BLOCKSIZE);
                let want = naive_nearest(&map, v / block_max);
                assert_eq!(c as usize, want, "value {i} = {v}: code {c}, naive nearest {want}");
                assert_eq!(b, map[want] * block_max, "value {i}: dequantized");
            }
        }
    }

    /// bitsandbytes' CPU `quantize_blockwise` finds codes with an approximate search (a
    /// bucketed lookup): near the midpoint between two codes it may pick the farther one,
    /// and it puts 0 on a small non-zero code. Ours is the exact nearest (see the naive
    /// test), so it must agree with bitsandbytes on the absmax bit for bit and on nearly
    /// every code (97%), and where they differ ours must be the closer one and bitsandbytes'
    /// choice off by at most a quarter of the gap between the two codes (observed: 12%).
    #[test]
    fn quantize_blockwise_matches_bitsandbytes() {
        for case in fixture()["quantize"].as_array().unwrap() {
            let signed = case["signed"].as_bool().unwrap();
            let map = create_dynamic_map(signed);
            let x = vec_f32(&case["x"]);
            let (codes, absmax) = quantize_blockwise(&map, &x, false);
            assert_eq!(absmax, vec_f32(&case["absmax"]), "signed {signed}: absmax");
            let want: Vec<u8> = serde_json::from_value(case["codes"].clone()).unwrap();
            let mut differ = 0;
            let mut compared = 0;
            for (i, (&c, &w)) in codes.iter().zip(&want).enumerate() {
                let a = absmax[i / BLOCKSIZE];
                if a == 0.0 || x[i] == 0.0 {
                    continue;
                }
                compared += 1;
                if c == w {
                    continue;
                }
                differ += 1;
                let n = x[i] / a;
                let (ours, theirs) = ((n - map[c as usize]).abs(), (n - map[w as usize]).abs());
                let gap = (map[c as usize] - map[w as usize]).abs();
                assert!(
                    ours <= theirs && theirs - ours <= 0.25 * gap,
                    "signed {signed}, value {i} (x/absmax = {n}): code {c} ({}) vs bitsandbytes {w} ({})",
                    map[c as usize],
                    map[w as usize]
                );
            }
            assert!(differ * 100 <= 3 * compared, "signed {signed}: {differ} of {compared} codes differ");
        }
    }

    #[test]
    fn keep_sign_moves_small_negatives_off_zero() {
        let map = create_dynamic_map(true);
        let zero = nearest_code(&map, 0.0) as usize;
        let (codes, absmax) = quantize_blockwise(&map, &[1.0, -1e-9, 1e-9, 0.0], true);
        assert_eq!(absmax, [1.0]);
        assert_eq!(codes[1] as usize, zero - 1, "a tiny negative must keep its sign");
        assert!(map[zero - 1] < 0.0);
        assert_eq!((codes[2] as usize, codes[3] as usize), (zero, zero));
    }

    #[test]
    fn layout_splits_tensors_into_blocks_and_keeps_small_ones_fp32() {
        let l = StateLayout::new(&[300, 5000, 10], 4096);
        assert_eq!((l.n_fp32, l.n_8bit, l.n_absmax), (310, 5000, 20));
        assert_eq!(l.num_params(), 5310);
        // No block straddles a tensor: the 5000-value tensor starts a fresh block at 300.
        let eight: Vec<&StateBlock> = l.blocks.iter().filter(|b| b.absmax.is_some()).collect();
        assert_eq!((eight[0].param, eight[0].len, eight[0].state), (300, 256, 0));
        assert_eq!((eight[19].param, eight[19].len, eight[19].absmax), (300 + 19 * 256, 5000 - 19 * 256, Some(19)));
        let last = l.blocks.last().unwrap();
        assert_eq!((last.param, last.len, last.state, last.absmax), (5300, 10, 300, None));
        // Blocks tile the buffer in order.
        let mut at = 0;
        for b in &l.blocks {
            assert_eq!(b.param, at);
            at += b.len;
        }
        assert_eq!(l.state_bytes(), 2 * 5000 + 8 * 20 + 8 * 310);
    }
}
