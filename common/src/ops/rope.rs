//! Rotary position embedding in HF's non-interleaved `rotate_half` convention:
//! `y = x * cos + rotate_half(x) * sin`, `rotate_half([x1, x2]) = [-x2, x1]`, with the
//! frequencies of `transformers.modeling_rope_utils` (default, linear, llama3).
//!
//! Positions come per token, so packed sequences whose positions restart at 0 get the
//! same rotation as if they were alone.

use candle_core::{DType, Device, Tensor, D};
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
        if head_dim == 0 || head_dim % 2 != 0 {
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
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_len * head_dim);
        let mut sin = Vec::with_capacity(max_len * head_dim);
        for p in 0..max_len {
            // HF multiplies float32 positions by float32 inv_freq, then takes cos/sin in f32.
            let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        debug_assert_eq!(cos.len(), max_len * 2 * half);
        Ok(Self {
            head_dim,
            max_len,
            inv_freq,
            cos: Tensor::from_vec(cos, (max_len, head_dim), device)?,
            sin: Tensor::from_vec(sin, (max_len, head_dim), device)?,
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

    /// cos and sin rows for `position_ids` `[B, T]`, shaped `[B, 1, T, D]` to broadcast
    /// over heads, in `dtype`.
    fn gather(&self, op: &str, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        if position_ids.dtype() != DType::U32 || position_ids.rank() != 2 {
            return Err(Error::Msg(format!(
                "{op}: position_ids must be [batch, seq] u32, got {:?} {:?}",
                position_ids.dims(),
                position_ids.dtype()
            )));
        }
        let (b, t) = position_ids.dims2()?;
        if b * t > 0 {
            // Checked here, not left to the device gather, which would not bounds-check.
            let max = position_ids.max_all()?.to_scalar::<u32>()? as usize;
            if max >= self.max_len {
                return Err(Error::Msg(format!(
                    "{op}: position id {max} is beyond the RoPE table of {} positions",
                    self.max_len
                )));
            }
        }
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

fn check_x(op: &str, x: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<()> {
    let ok = match x.dims() {
        &[b, _, t, d] => d == table.head_dim && position_ids.dims() == [b, t],
        _ => false,
    };
    if !ok {
        return Err(Error::Msg(format!(
            "{op}: input has shape {:?} and position_ids {:?}; expected [B, H, T, {}] and [B, T]",
            x.dims(),
            position_ids.dims(),
            table.head_dim
        )));
    }
    Ok(())
}

/// `x`: `[B, H, T, D]`, `position_ids`: `[B, T]` u32. Returns `x` rotated by each token's
/// position.
pub fn rope_fwd(x: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_fwd", x, table, position_ids)?;
    let (cos, sin) = table.gather("rope_fwd", position_ids, x.dtype())?;
    Ok((x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?)?)
}

/// The rotation is orthogonal, so its transpose is the rotation by minus the angle:
/// `dx = dy * cos - rotate_half(dy) * sin` (sin has equal halves, so `rotate_half`
/// commutes with the multiplication by it).
pub fn rope_bwd(dy: &Tensor, table: &RopeTable, position_ids: &Tensor) -> Result<Tensor> {
    check_x("rope_bwd", dy, table, position_ids)?;
    let (cos, sin) = table.gather("rope_bwd", position_ids, dy.dtype())?;
    Ok((dy.broadcast_mul(&cos)? - rotate_half(dy)?.broadcast_mul(&sin)?)?)
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
        let (b, h, t, d) = x.dims4().unwrap();
        let xv = to_f64_vec(x);
        let pv = pos.to_vec2::<u32>().unwrap();
        let half = d / 2;
        let mut out = vec![0.0; xv.len()];
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let base = ((bi * h + hi) * t + ti) * d;
                    for i in 0..half {
                        let (a, c) = (xv[base + i], xv[base + i + half]);
                        let angle = pv[bi][ti] as f64 * inv_freq[i];
                        let (s, co) = angle.sin_cos();
                        out[base + i] = a * co - c * s;
                        out[base + i + half] = a * s + c * co;
                    }
                }
            }
        }
        out
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
