//! Rotary position embedding in HF's non-interleaved `rotate_half` convention:
//! `y = x * cos + rotate_half(x) * sin`, `rotate_half([x1, x2]) = [-x2, x1]`, with the
//! frequencies of `transformers.modeling_rope_utils` (default, linear, llama3).
//!
//! Positions come per token, so packed sequences whose positions restart at 0 get the
//! same rotation as if they were alone.
//!
//! On a CUDA device, bf16 and f32 inputs go to the fused kernel of
//! [`crate::kernels::fused`]; the `*_reference` functions are the candle formulation that
//! every other device runs and that the kernel is checked against.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, TensorId, D};
use serde::Deserialize;

use crate::{Error, Result};

/// The `rope_scaling` object of an HF `config.json`. The kind is read from `rope_type`,
/// or from the older `type` key, as transformers does.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawRopeScaling")]
pub enum RopeScaling {
    /// `rope_type: "default"`: plain RoPE, same as no `rope_scaling`.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, the band between
    /// interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

impl TryFrom<RawRopeScaling> for RopeScaling {
    type Error = String;

    fn try_from(raw: RawRopeScaling) -> std::result::Result<Self, String> {
        let kind = raw
            .rope_type
            .or(raw.legacy_type)
            .ok_or_else(|| "rope_scaling: neither `rope_type` nor `type` is set".to_string())?;
        let need = |v: Option<f64>, key: &str| {
            v.ok_or_else(|| format!("rope_scaling: `{key}` is required for rope_type `{kind}`"))
        };
        let positive = |v: f64, key: &str| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(format!(
                    "rope_scaling: `{key}` must be a positive number, got {v}"
                ))
            }
        };
        match kind.as_str() {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: positive(need(raw.factor, "factor")?, "factor")?,
            }),
            "llama3" => {
                let factor = positive(need(raw.factor, "factor")?, "factor")?;
                let low = positive(
                    need(raw.low_freq_factor, "low_freq_factor")?,
                    "low_freq_factor",
                )?;
                let high = positive(
                    need(raw.high_freq_factor, "high_freq_factor")?,
                    "high_freq_factor",
                )?;
                // The smooth band divides by (high - low); transformers only warns here, but
                // the frequencies it then produces are meaningless.
                if high <= low {
                    return Err(format!(
                        "rope_scaling: `high_freq_factor` ({high}) must be greater than \
                         `low_freq_factor` ({low})"
                    ));
                }
                let original = raw.original_max_position_embeddings.ok_or_else(|| {
                    "rope_scaling: `original_max_position_embeddings` is required for rope_type \
                     `llama3`"
                        .to_string()
                })?;
                if original == 0 {
                    return Err(
                        "rope_scaling: `original_max_position_embeddings` must be positive".into(),
                    );
                }
                Ok(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                })
            }
            other => Err(format!(
                "rope_scaling: rope_type `{other}` is not supported (supported: default, linear, \
                 llama3)"
            )),
        }
    }
}

/// Inverse frequencies and the cos/sin tables for positions `0..max_len`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    head_dim: usize,
    max_len: usize,
    inv_freq: Vec<f32>,
    /// `[max_len, head_dim]`, each row `cat(cos(p·f), cos(p·f))` as HF's `emb`.
    cos: Tensor,
    sin: Tensor,
    /// The last `position_ids` tensor found within the table. A step passes the same
    /// tensor to every layer, and the range check reads its maximum back to the host (a
    /// device synchronisation), so it runs once per tensor instead of once per call.
    /// Tensor ids are never reused, and position ids are not written in place.
    checked_positions: Arc<Mutex<Option<TensorId>>>,
}

/// `_compute_default_rope_parameters`: `1 / base^(arange(0, dim, 2) / dim)`, in f32 as
/// transformers computes it (the exponent is a float32 tensor).
fn default_inv_freq(head_dim: usize, rope_theta: f64) -> Vec<f32> {
    let base = rope_theta as f32;
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect()
}

/// `_compute_llama3_parameters`, step by step in f32 like the torch original.
fn llama3_inv_freq(
    inv_freq: &[f32],
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: usize,
) -> Vec<f32> {
    let old_context_len = original_max_position_embeddings as f64;
    let low_freq_wavelen = (old_context_len / low_freq_factor) as f32;
    let high_freq_wavelen = (old_context_len / high_freq_factor) as f32;
    let (factor, low, old) = (
        factor as f32,
        low_freq_factor as f32,
        old_context_len as f32,
    );
    let band = (high_freq_factor - low_freq_factor) as f32;
    inv_freq
        .iter()
        .map(|&f| {
            // torch evaluates `2π / inv_freq` as `reciprocal(inv_freq) * 2π`.
            let wavelen = (1.0 / f) * (2.0 * std::f32::consts::PI);
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth = ((1.0 / wavelen) * old - low) / band;
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}

impl RopeTable {
    pub fn new(
        head_dim: usize,
        rope_theta: f64,
        scaling: Option<RopeScaling>,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "rope: head_dim must be even and positive, got {head_dim}"
            )));
        }
        if !(rope_theta > 0.0 && rope_theta.is_finite()) {
            return Err(Error::Config(format!(
                "rope_theta must be positive, got {rope_theta}"
            )));
        }
        if max_len == 0 {
            return Err(Error::Config("rope: max_len must be positive".into()));
        }
        let base = default_inv_freq(head_dim, rope_theta);
        let inv_freq = match scaling {
            None | Some(RopeScaling::Default) => base,
            Some(RopeScaling::Linear { factor }) => {
                base.iter().map(|f| f / factor as f32).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => llama3_inv_freq(
                &base,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ),
        };
        let mut cos = Vec::with_capacity(max_len * head_dim);
        let mut sin = Vec::with_capacity(max_len * head_dim);
        for p in 0..max_len {
            // HF multiplies float32 positions by float32 inv_freq, then takes cos/sin in
            // f32; doing the same keeps the table within 1 ulp of transformers'.
            let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok(Self {
            head_dim,
            max_len,
            inv_freq,
            cos: Tensor::from_vec(cos, (max_len, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_len, head_dim), device)?,
            checked_positions: Arc::new(Mutex::new(None)),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    /// The `head_dim / 2` inverse frequencies, after scaling.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
    /// `[max_len, head_dim]` f32.
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }
    /// `[max_len, head_dim]` f32.
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// Checks that `position_ids` is `[batch, seq]` u32 with every id inside the table.
    /// Done here, not left to the device gather or the kernel, which do not bounds-check.
    pub(crate) fn check_positions(&self, op: &str, position_ids: &Tensor) -> Result<()> {
        if position_ids.dtype() != DType::U32 || position_ids.rank() != 2 {
            return Err(Error::Msg(format!(
                "{op}: position_ids must be [batch, seq] u32, got {:?} {:?}",
                position_ids.dims(),
                position_ids.dtype()
            )));
        }
        let mut checked = self
            .checked_positions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *checked == Some(position_ids.id()) || position_ids.elem_count() == 0 {
            return Ok(());
        }
        let max = position_ids.max_all()?.to_scalar::<u32>()? as usize;
        if max >= self.max_len {
            return Err(Error::Msg(format!(
                "{op}: position id {max} is beyond the RoPE table of {} positions",
                self.max_len
            )));
        }
        *checked = Some(position_ids.id());
        Ok(())
    }

    /// cos and sin rows for `position_ids` `[B, T]`, shaped `[B, 1, T, D]` to broadcast
    /// over heads, in `dtype`.
    fn gather(&self, op: &str, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        self.check_positions(op, position_ids)?;
        let (b, t) = position_ids.dims2()?;
        let flat = position_ids.flatten_all()?;
        let pick = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .index_select(&flat, 0)?
                .reshape((b, 1, t, self.head_dim))?
                .to_dtype(dtype)?)
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// `[x1, x2] -> [-x2, x1]` along the last dim.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Checks `x` against `[B, H, T, D]` (`bthd`: `[B, T, H, D]`) and `position_ids` `[B, T]`.
fn check_x(op: &str, x: &Tensor, table: &RopeTable, position_ids: &Tensor, bthd: bool) -> Result<()> {
    let ok = match (bthd, x.dims()) {
        (false, &[b, _, t, d]) | (true, &[b, t, _, d]) => {
            d == table.head_dim && position_ids.dims() == [b, t]
        }
        _ => false,
    };
    if !ok {
        let order = if bthd { "B, T, H" } else { "B, H, T" };
        return Err(Error::Msg(format!(
            "{op}: input has shape {:?} and position_ids {:?}; expected [{order}, {}] and [B, T]",
            x.dims(),
            position_ids.dims(),
            table.head_dim
        )));
    }
    Ok(())
}

/// Whether the fused kernel takes this call: the ops' dispatch rule, plus the cos/sin
/// tables on the input's device (a table built for another device goes to the reference,
/// which reports the mismatch).
#[cfg(feature = "cuda")]
fn use_kernel(x: &Tensor, table: &RopeTable, position_ids: &Tensor) -> bool {
    crate::kernels::fused::applies(&[x])
        && table.cos.device().same_device(x.device())
        && position_ids.device().same_device(x.device())
}

/// `x`: `[B, H, T, D]`, `position_ids`: `[B, T]` u32. Returns `x` rotated by each token's
/// position.
pub fn rope_fwd(x: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_fwd", x, table, position_ids, false)?;
    #[cfg(feature = "cuda")]
    if use_kernel(x, table, position_ids) {
        use crate::kernels::fused::{rope, HeadLayout};
        return rope(x, table, position_ids, HeadLayout::Bhtd, HeadLayout::Bhtd, false);
    }
    rope_fwd_reference(x, table, position_ids)
}

/// [`rope_fwd`] as candle ops on any device, in x's dtype (cos/sin rounded to it).
pub fn rope_fwd_reference(x: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_fwd", x, table, position_ids, false)?;
    let (cos, sin) = table.gather("rope_fwd", position_ids, x.dtype())?;
    Ok((x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?)?)
}

/// The rotation is orthogonal, so its transpose is the rotation by minus the angle:
/// `dx = dy * cos - rotate_half(dy) * sin` (sin has equal halves, so `rotate_half`
/// commutes with the multiplication by it).
pub fn rope_bwd(dy: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_bwd", dy, table, position_ids, false)?;
    #[cfg(feature = "cuda")]
    if use_kernel(dy, table, position_ids) {
        use crate::kernels::fused::{rope, HeadLayout};
        return rope(dy, table, position_ids, HeadLayout::Bhtd, HeadLayout::Bhtd, true);
    }
    rope_bwd_reference(dy, table, position_ids)
}

/// [`rope_bwd`] as candle ops on any device, in dy's dtype.
pub fn rope_bwd_reference(dy: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_bwd", dy, table, position_ids, false)?;
    let (cos, sin) = table.gather("rope_bwd", position_ids, dy.dtype())?;
    Ok((dy.broadcast_mul(&cos)? - rotate_half(dy)?.broadcast_mul(&sin)?)?)
}

/// [`rope_fwd`] of a linear layer's output viewed as `[B, T, H, D]`, returned as
/// `[B, H, T, D]`: the head transpose before attention and the rotation in one pass on
/// CUDA (elsewhere: transpose, copy, rotate).
pub fn rope_fwd_from_bthd(x: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_fwd_from_bthd", x, table, position_ids, true)?;
    #[cfg(feature = "cuda")]
    if use_kernel(x, table, position_ids) {
        use crate::kernels::fused::{rope, HeadLayout};
        return rope(x, table, position_ids, HeadLayout::Bthd, HeadLayout::Bhtd, false);
    }
    rope_fwd_reference(&x.transpose(1, 2)?.contiguous()?, table, position_ids)
}

/// The backward of [`rope_fwd_from_bthd`]: `dy` `[B, H, T, D]` rotated back and returned
/// as `[B, T, H, D]`, ready to reshape into the linear layer's `[B·T, H·D]` gradient.
pub fn rope_bwd_to_bthd(dy: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_bwd_to_bthd", dy, table, position_ids, false)?;
    #[cfg(feature = "cuda")]
    if use_kernel(dy, table, position_ids) {
        use crate::kernels::fused::{rope, HeadLayout};
        return rope(dy, table, position_ids, HeadLayout::Bhtd, HeadLayout::Bthd, true);
    }
    Ok(rope_bwd_reference(dy, table, position_ids)?.transpose(1, 2)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, assert_close_vec, fd_grad, rand_tensor, to_f64_vec};
    use candle_core::Var;
    use std::f64::consts::PI;

    const LLAMA31: RopeScaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };

    fn packed_positions() -> Tensor {
        // Row 0 packs two sequences (positions restart at 0); row 1 starts mid-sequence.
        Tensor::new(&[[0u32, 1, 2, 3, 0, 1], [5, 6, 7, 0, 1, 2]], &Device::Cpu).unwrap()
    }

    fn naive_default_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
        (0..head_dim / 2)
            .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64))
            .collect()
    }

    /// Each pair (x[i], x[i + D/2]) as the complex number a + ib, multiplied by e^{i p f_i}.
    fn naive_rope(x: &Tensor, pos: &Tensor, inv_freq: &[f64]) -> Vec<f64> {
        let (_, h, t, d) = x.dims4().unwrap();
        let xv = to_f64_vec(x);
        let pv = pos.to_vec2::<u32>().unwrap();
        let half = d / 2;
        let mut out = vec![0.0; xv.len()];
        for (bi, row_pos) in pv.iter().enumerate() {
            for hi in 0..h {
                for (ti, &p) in row_pos.iter().enumerate() {
                    let base = ((bi * h + hi) * t + ti) * d;
                    for (i, f) in inv_freq.iter().enumerate().take(half) {
                        let (a, c) = (xv[base + i], xv[base + i + half]);
                        let angle = p as f64 * f;
                        let (s, co) = angle.sin_cos();
                        out[base + i] = a * co - c * s;
                        out[base + i + half] = a * s + c * co;
                    }
                }
            }
        }
        out
    }

    // f32 bit patterns from transformers 5.17.0 / torch 2.11.0 (`LlamaRotaryEmbedding`,
    // `inv_freq` and the cos/sin it returns): Llama-3.1 rope (head_dim 128, theta 5e5,
    // llama3 factor 8, low 1, high 4, original 8192); linear factor 4 and default, both
    // head_dim 64, theta 1e4. Cos/sin are the first half of the row for position 65535,
    // where any difference in how the angle is rounded would show.
    const HF_LLAMA3_INV_FREQ: [u32; 64] = [
        0x3f800000, 0x3f508ac1, 0x3f29e1c6, 0x3f0a6384, 0x3ee177bc, 0x3eb7ab7d, 0x3e959ee3,
        0x3e73c461, 0x3e4693b0, 0x3e21c3a0, 0x3e03c6a0, 0x3dd6b19c, 0x3daee4ad, 0x3d8e7898,
        0x3d681e67, 0x3d3d1684, 0x3d1a08c8, 0x3cfaf53f, 0x3ccc6f49, 0x3ca68939, 0x3c87a9c3,
        0x3c5d06ec, 0x3c340d6d, 0x3c12ac7f, 0x3beef74f, 0x3bc2aa76, 0x3b9e9402, 0x3b812e35,
        0x3b527720, 0x3b0dfd06, 0x3ab3d11d, 0x3a60979e, 0x3a0995d2, 0x39a3f108, 0x393b2dd2,
        0x38c86886, 0x38a3418d, 0x3884fdbf, 0x3858ac81, 0x38308199, 0x380fc8f8, 0x37ea426f,
        0x37bed4f4, 0x379b7475, 0x377d45c3, 0x374e51f5, 0x3728126b, 0x3708ea0f, 0x36df10c4,
        0x36b5b687, 0x369406cb, 0x36712b80, 0x36447610, 0x36200a69, 0x36025f34, 0x35d46808,
        0x35ad07a7, 0x358cf400, 0x3565a54d, 0x353b12c7, 0x351864a7, 0x34f848c2, 0x34ca41b0,
        0x34a4c2ff,
    ];
    const HF_LINEAR_INV_FREQ: [u32; 32] = [
        0x3e800000, 0x3e3ff911, 0x3e0ff59a, 0x3dd7e89b, 0x3da1e89b, 0x3d72d423, 0x3d361887,
        0x3d088d77, 0x3ccccccd, 0x3c99940d, 0x3c6655c2, 0x3c2cba15, 0x3c0186e3, 0x3bc2434f,
        0x3b91ad39, 0x3b5a7bf2, 0x3b23d70a, 0x3af5b9b0, 0x3ab8449c, 0x3a8a2e77, 0x3a4f3e38,
        0x3a1b690d, 0x39e91528, 0x39aec98e, 0x3983126f, 0x3944948c, 0x39136a16, 0x38dd1725,
        0x38a5cb60, 0x3878a815, 0x383a7753, 0x380bd472,
    ];
    const HF_DEFAULT_INV_FREQ: [u32; 32] = [
        0x3f800000, 0x3f3ff911, 0x3f0ff59a, 0x3ed7e89b, 0x3ea1e89b, 0x3e72d423, 0x3e361887,
        0x3e088d77, 0x3dcccccd, 0x3d99940d, 0x3d6655c2, 0x3d2cba15, 0x3d0186e3, 0x3cc2434f,
        0x3c91ad39, 0x3c5a7bf2, 0x3c23d70a, 0x3bf5b9b0, 0x3bb8449c, 0x3b8a2e77, 0x3b4f3e38,
        0x3b1b690d, 0x3ae91528, 0x3aaec98e, 0x3a83126f, 0x3a44948c, 0x3a136a16, 0x39dd1725,
        0x39a5cb60, 0x3978a815, 0x393a7753, 0x390bd472,
    ];
    const HF_LLAMA3_COS_65535: [u32; 64] = [
        0x3e44f5d5, 0xbf284636, 0xbf7fc575, 0xbf38e34e, 0x3f39fa3e, 0xbf298b2c, 0x3f7fffeb,
        0x3f751d2a, 0xbf0d7a7f, 0xbeb96803, 0x3d9fdb79, 0xbf57f2b6, 0xbe7ba4c4, 0xbf59b791,
        0x3f62f422, 0xbf7ffe3a, 0x3d8b9403, 0xbf7ce84a, 0xbe808be1, 0x3f791c17, 0xbe069526,
        0xbe857041, 0xbf370ebf, 0xbf33e723, 0x3f6b84fb, 0x3f792880, 0xbf7d25f9, 0x3f3bede3,
        0xbf7fec34, 0xbf512994, 0xbeb9f081, 0x3f6ba544, 0xbf7ca8b2, 0xbd9361b8, 0x3f257e55,
        0x3f7ff233, 0x3ec25160, 0xbf073804, 0xbf786c9d, 0xbf6d61ff, 0xbf2022ba, 0xbe834af5,
        0x3da38db8, 0x3eb299f6, 0x3f0c9b9b, 0x3f3143fc, 0x3f4ac868, 0x3f5c40cd, 0x3f68162b,
        0x3f700bd1, 0x3f756020, 0x3f78eeda, 0x3f7b4d93, 0x3f7ce13f, 0x3f7ded95, 0x3f7e9fdb,
        0x3f7f163f, 0x3f7f64d9, 0x3f7f9907, 0x3f7fbba9, 0x3f7fd2a6, 0x3f7fe1e7, 0x3f7fec07,
        0x3f7ff2bf,
    ];
    const HF_LLAMA3_SIN_65535: [u32; 64] = [
        0x3f7b3848, 0xbf40ec9d, 0xbd2d1788, 0x3f3110f7, 0x3f2febe6, 0xbf3fcf47, 0x3ace5a1e,
        0xbe93b7d9, 0xbf555a91, 0xbf6ea020, 0x3f7f380d, 0x3f097c70, 0xbf78264b, 0xbf06aad5,
        0x3eece14f, 0xbbf11faa, 0x3f7f679e, 0xbe1eaff3, 0x3f77ccdc, 0x3e6bfa54, 0xbf7dc785,
        0xbf772723, 0xbf32f536, 0x3f362103, 0x3ec8aa30, 0xbe6b284f, 0x3e186a98, 0x3f2dd5c1,
        0x3cc95707, 0xbf139abf, 0x3f6e8592, 0xbec81256, 0x3e24e5b4, 0x3f7f5615, 0xbf43509c,
        0xbca8199d, 0xbf6cd8a3, 0xbf595ffd, 0xbe7744ef, 0x3ebfae58, 0x3f47bb33, 0x3f7770a4,
        0x3f7f2eaf, 0x3f6feb67, 0x3f55edb8, 0x3f38b264, 0x3f1c40de, 0x3f027a6a, 0x3ed81283,
        0x3eb1eb6a, 0x3e91f886, 0x3e6ef166, 0x3e434155, 0x3e1f6334, 0x3e02049b, 0x3dd405c7,
        0x3dacd24d, 0x3d8cd6f8, 0x3d65859c, 0x3d3b0166, 0x3d185b0f, 0x3cf83e0f, 0x3cca3ba3,
        0x3ca4bf82,
    ];

    fn from_bits(bits: &[u32]) -> Vec<f64> {
        bits.iter().map(|&b| f32::from_bits(b) as f64).collect()
    }

    #[test]
    fn inv_freq_is_bit_exact_with_transformers() {
        let bits = |t: &RopeTable| t.inv_freq().iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let dev = &Device::Cpu;
        let llama3 = RopeTable::new(128, 500_000.0, Some(LLAMA31), 1, dev).unwrap();
        assert_eq!(bits(&llama3), HF_LLAMA3_INV_FREQ, "llama3");
        let linear = RopeTable::new(64, 1e4, Some(RopeScaling::Linear { factor: 4.0 }), 1, dev);
        assert_eq!(bits(&linear.unwrap()), HF_LINEAR_INV_FREQ, "linear");
        let default = RopeTable::new(64, 1e4, None, 1, dev).unwrap();
        assert_eq!(bits(&default), HF_DEFAULT_INV_FREQ, "default");
    }

    #[test]
    fn cos_sin_match_transformers_at_a_far_position() {
        let table = RopeTable::new(128, 500_000.0, Some(LLAMA31), 65536, &Device::Cpu).unwrap();
        for (tab, hf, what) in [
            (table.cos(), &HF_LLAMA3_COS_65535, "cos"),
            (table.sin(), &HF_LLAMA3_SIN_65535, "sin"),
        ] {
            let row = to_f64_vec(&tab.get(65535).unwrap());
            let want = from_bits(hf);
            // Both halves of a row carry the same frequencies (HF `cat(freqs, freqs)`).
            let want: Vec<f64> = want.iter().chain(&want).copied().collect();
            // 1 ulp of f32 near 1: torch's and Rust's cos/sin may round differently.
            assert_close_vec(&row, &want, 6e-8, 0.0, what);
        }
    }

    #[test]
    fn default_inv_freq_matches_formula() {
        let table = RopeTable::new(64, 10_000.0, None, 4, &Device::Cpu).unwrap();
        let got: Vec<f64> = table.inv_freq().iter().map(|&f| f as f64).collect();
        assert_close_vec(
            &got,
            &naive_default_inv_freq(64, 10_000.0),
            0.0,
            1e-6,
            "inv_freq",
        );
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let scaling = RopeScaling::Linear { factor: 4.0 };
        let table = RopeTable::new(32, 500_000.0, Some(scaling), 4, &Device::Cpu).unwrap();
        let want: Vec<f64> = naive_default_inv_freq(32, 500_000.0)
            .iter()
            .map(|f| f / 4.0)
            .collect();
        let got: Vec<f64> = table.inv_freq().iter().map(|&f| f as f64).collect();
        assert_close_vec(&got, &want, 0.0, 1e-6, "linear inv_freq");
    }

    #[test]
    fn llama3_inv_freq_matches_transformers_formula() {
        // transformers `_compute_llama3_parameters`, re-derived here in f64.
        let (factor, low, high, old) = (8.0, 1.0, 4.0, 8192.0);
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        let mut regimes = [0usize; 3];
        let want: Vec<f64> = naive_default_inv_freq(128, 500_000.0)
            .into_iter()
            .map(|f| {
                let wavelen = 2.0 * PI / f;
                if wavelen < high_wavelen {
                    regimes[0] += 1;
                    f
                } else if wavelen > low_wavelen {
                    regimes[1] += 1;
                    f / factor
                } else {
                    regimes[2] += 1;
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect();
        assert!(
            regimes.iter().all(|&n| n > 0),
            "all three bands exercised: {regimes:?}"
        );
        let table = RopeTable::new(128, 500_000.0, Some(LLAMA31), 4, &Device::Cpu).unwrap();
        let got: Vec<f64> = table.inv_freq().iter().map(|&f| f as f64).collect();
        assert_close_vec(&got, &want, 0.0, 1e-5, "llama3 inv_freq");
    }

    #[test]
    fn forward_matches_complex_rotation() {
        let (theta, d) = (10_000.0, 8);
        let table = RopeTable::new(d, theta, None, 16, &Device::Cpu).unwrap();
        let x = rand_tensor(1, (2, 3, 6, d), DType::F32);
        let y = rope_fwd(&x, &table, &packed_positions()).unwrap();
        let want = naive_rope(&x, &packed_positions(), &naive_default_inv_freq(d, theta));
        assert_close_vec(&to_f64_vec(&y), &want, 1e-5, 1e-5, "rope forward");
    }

    #[test]
    fn scaled_forward_matches_complex_rotation() {
        let table = RopeTable::new(
            16,
            10_000.0,
            Some(RopeScaling::Linear { factor: 2.0 }),
            16,
            &Device::Cpu,
        )
        .unwrap();
        let x = rand_tensor(2, (2, 1, 6, 16), DType::F32);
        let y = rope_fwd(&x, &table, &packed_positions()).unwrap();
        let inv: Vec<f64> = naive_default_inv_freq(16, 10_000.0)
            .iter()
            .map(|f| f / 2.0)
            .collect();
        let want = naive_rope(&x, &packed_positions(), &inv);
        assert_close_vec(
            &to_f64_vec(&y),
            &want,
            1e-5,
            1e-5,
            "linear-scaled rope forward",
        );
    }

    #[test]
    fn backward_matches_candle_autograd() {
        let d = 8;
        let table = RopeTable::new(d, 10_000.0, Some(LLAMA31), 16, &Device::Cpu).unwrap();
        let pos = packed_positions();
        let x = Var::from_tensor(&rand_tensor(3, (2, 3, 6, d), DType::F32)).unwrap();
        let dy = rand_tensor(4, (2, 3, 6, d), DType::F32);

        let flat = pos.flatten_all().unwrap();
        let rows = |t: &Tensor| {
            t.index_select(&flat, 0)
                .unwrap()
                .reshape((2, 1, 6, d))
                .unwrap()
        };
        let (cos, sin) = (rows(table.cos()), rows(table.sin()));
        let xt = x.as_tensor();
        let x1 = xt.narrow(3, 0, d / 2).unwrap();
        let x2 = xt.narrow(3, d / 2, d / 2).unwrap();
        let rot = Tensor::cat(&[&(x2 * -1.0).unwrap(), &x1], 3).unwrap();
        let y = (xt.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap();
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();

        let got = rope_bwd(&dy, &table, &pos).unwrap();
        assert_close(
            &got,
            grads.get(xt).unwrap(),
            1e-6,
            1e-5,
            "rope dx vs autograd",
        );
    }

    #[test]
    fn backward_matches_finite_differences_f64() {
        let d = 6;
        let table = RopeTable::new(d, 10_000.0, None, 16, &Device::Cpu).unwrap();
        let pos = packed_positions();
        let x = rand_tensor(5, (2, 1, 6, d), DType::F64);
        let dy = rand_tensor(6, (2, 1, 6, d), DType::F64);
        let got = rope_bwd(&dy, &table, &pos).unwrap();
        let want = fd_grad(|x| rope_fwd(x, &table, &pos), &x, &dy, 1e-5);
        assert_close(&got, &want, 1e-8, 1e-7, "rope dx vs finite differences");
    }

    #[test]
    fn from_bthd_matches_complex_rotation_of_the_transpose() {
        let (theta, d) = (10_000.0, 8);
        let table = RopeTable::new(d, theta, None, 16, &Device::Cpu).unwrap();
        let x = rand_tensor(9, (2, 6, 3, d), DType::F32); // [B, T, H, D]
        let y = rope_fwd_from_bthd(&x, &table, &packed_positions()).unwrap();
        assert_eq!(y.dims(), &[2, 3, 6, d]);
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let want = naive_rope(&xt, &packed_positions(), &naive_default_inv_freq(d, theta));
        assert_close_vec(&to_f64_vec(&y), &want, 1e-5, 1e-5, "rope from [B, T, H, D]");
    }

    #[test]
    fn bwd_to_bthd_is_the_adjoint_of_fwd_from_bthd() {
        // <fwd(x), dy> = <x, bwd(dy)> for every x and dy: the defining property of the
        // backward of a linear map, here across the two layouts.
        let table = RopeTable::new(8, 10_000.0, Some(LLAMA31), 16, &Device::Cpu).unwrap();
        let pos = packed_positions();
        let x = rand_tensor(10, (2, 6, 3, 8), DType::F64); // [B, T, H, D]
        let dy = rand_tensor(11, (2, 3, 6, 8), DType::F64); // [B, H, T, D]
        let dx = rope_bwd_to_bthd(&dy, &table, &pos).unwrap();
        assert_eq!(dx.dims(), x.dims());
        let y = rope_fwd_from_bthd(&x, &table, &pos).unwrap();
        let dot = |a: &Tensor, b: &Tensor| -> f64 {
            to_f64_vec(a).iter().zip(to_f64_vec(b)).map(|(p, q)| p * q).sum()
        };
        let (lhs, rhs) = (dot(&y, &dy), dot(&x, &dx));
        assert!((lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }

    #[test]
    fn a_checked_position_tensor_does_not_excuse_the_next_one() {
        let table = RopeTable::new(4, 10_000.0, None, 6, &Device::Cpu).unwrap();
        let x = rand_tensor(12, (2, 1, 6, 4), DType::F32);
        let ok = Tensor::new(&[[0u32, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]], &Device::Cpu).unwrap();
        rope_fwd(&x, &table, &ok).unwrap();
        rope_bwd(&x, &table, &ok).unwrap();
        let err = rope_bwd(&x, &table, &packed_positions()).unwrap_err().to_string();
        assert!(err.contains("position id 7 is beyond"), "{err}");
    }

    #[test]
    fn position_beyond_table_is_a_typed_error() {
        let table = RopeTable::new(4, 10_000.0, None, 6, &Device::Cpu).unwrap();
        let x = rand_tensor(7, (2, 1, 6, 4), DType::F32);
        let err = rope_fwd(&x, &table, &packed_positions())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("position id 7 is beyond the RoPE table of 6 positions"),
            "{err}"
        );
        let short = Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap();
        let err = rope_bwd(&x, &table, &short).unwrap_err().to_string();
        assert!(err.contains("expected [B, H, T, 4] and [B, T]"), "{err}");
        let err = RopeTable::new(5, 10_000.0, None, 6, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("head_dim must be even"), "{err}");
    }

    #[test]
    fn deserialises_hf_rope_scaling() {
        let parse = |s: &str| serde_json::from_str::<RopeScaling>(s);
        // Llama-3.1-8B config.json.
        let llama31 = r#"{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#;
        assert_eq!(parse(llama31).unwrap(), LLAMA31);
        // Older configs spell the kind `type`.
        assert_eq!(
            parse(r#"{"type": "linear", "factor": 2.0}"#).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
        assert_eq!(
            parse(r#"{"rope_type": "default"}"#).unwrap(),
            RopeScaling::Default
        );
        let err = parse(r#"{"rope_type": "yarn", "factor": 4.0}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_type `yarn` is not supported"), "{err}");
        let err = parse(r#"{"rope_type": "linear"}"#).unwrap_err().to_string();
        assert!(
            err.contains("`factor` is required for rope_type `linear`"),
            "{err}"
        );
        let err = parse(
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("must be greater than"), "{err}");
    }
}
