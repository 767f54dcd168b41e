//! NF4 (4-bit NormalFloat) weights, byte-compatible with bitsandbytes.
//!
//! Layout, as in bitsandbytes `quantize_4bit(quant_type="nf4")`: the weight is flattened
//! row-major and cut into blocks of `blocksize` (64) values; each block is scaled by its
//! absolute maximum (`absmax`) and every value becomes the index of the nearest NF4 code.
//! Two indices share a byte, the first (even) element in the high nibble. With double
//! quantization (`compress_statistics=True`) the f32 absmax are centred on their mean
//! (`offset`) and stored as 8-bit codes of bitsandbytes' dynamic map, in blocks of 256
//! with one f32 scale (`nested_absmax`) each.
//!
//! Quantization follows bitsandbytes' CUDA kernels (`kQuantizeBlockwise` with
//! `dQuantizeNF4` / `dQuantize`), which is how published bnb checkpoints are made, and
//! bnb's pure-torch reference backend, which agrees with them:
//! - the scaled value is `x * (1 / absmax)` in f32 and takes the code whose midpoint
//!   interval holds it, a value exactly on a midpoint going to the lower code;
//! - an odd element count is padded with one 0 whose code (7, the zero) fills the low
//!   nibble of the last byte; a last block shorter than `blocksize` is its own block.
//!
//! Our input is f32. bitsandbytes normally quantizes a bf16 (or f16) weight, whose values
//! it widens to f32 exactly as we receive them, so quantizing the f32 widening of a bf16
//! weight gives bnb's bytes; the fixtures feed exactly the values bnb saw.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The bitsandbytes NF4 codebook (`get_4bit_type("nf4")`, QLoRA's NormalFloat4): quantiles
/// of N(0, 1) scaled to [-1, 1], with an exact zero at index 7. Literals as in bnb's source.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' default NF4 block size (`Params4bit.blocksize`).
pub const BLOCKSIZE: usize = 64;
/// Block size of the 8-bit double quantization of absmax (`quantize_4bit` hard-codes 256).
pub const BLOCKSIZE2: usize = 256;
/// Index of the exact zero in [`NF4_CODE`]; what an all-zero block and the pad nibble hold.
const ZERO_CODE: u8 = 7;
/// Tensor-name suffix under which bitsandbytes packs the non-tensor quant state as JSON.
const QUANT_STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";

/// Per-block scales of an [`Nf4Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`compress_statistics=False`).
    F32(Vec<f32>),
    /// Double quantization: block `b`'s absmax is
    /// `code[quantized[b]] * absmax2[b / blocksize2] + offset`, in f32 as bnb computes it.
    Double {
        quantized: Vec<u8>,
        /// 256-entry signed dynamic map (`create_dynamic_map()`), sorted.
        code: Vec<f32>,
        absmax2: Vec<f32>,
        offset: f32,
        blocksize2: usize,
    },
}

/// An NF4 weight of a Linear layer, shape `[rows, cols]` = `[out_features, in_features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    pub rows: usize,
    pub cols: usize,
    /// Two codes per byte, element `2k` in the high nibble of byte `k` (bnb order).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub blocksize: usize,
}

/// Decision thresholds between neighbouring NF4 codes: the literals of bnb's CUDA
/// `dQuantizeNF4` decision tree (csrc/kernels.cu), with which published checkpoints were
/// made. Each is the exact midpoint of two codes written as a decimal and rounded to f32 by
/// the compiler. Four exact midpoints fall halfway between two f32 values; there these
/// literals round up where bnb's CPU backend (`(c[i] + c[i+1]) / 2` in f32, ties to even)
/// rounds down, so the two backends disagree only for a scaled value equal to that one f32.
#[allow(clippy::excessive_precision)]
const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The NF4 code of a value already divided by its block's absmax: the number of thresholds
/// strictly below it (a tie stays on the lower code, as `x > threshold` does in CUDA).
#[inline]
fn nf4_index(scaled: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&m| m < scaled).count() as u8
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`,
/// the code of the 8-bit double quantization, reproduced bit for bit. It is built with f32
/// torch ops, so each step below mirrors one of them: `torch.linspace(0.1, 1, n)` (ATen's
/// vectorised CPU kernel, which computes `start + step * i` for the first half and
/// `end - step * (n - 1 - i)` for the second with fused multiply-adds), the means of
/// neighbours, and a multiplication by the power of ten rounded to f32. ATen's scalar
/// fallback (no AVX2/NEON) rounds a few entries differently by one ulp; checkpoints carry
/// their own map (`nested_quant_map`), which is what we dequantize with.
pub fn create_dynamic_map() -> Vec<f32> {
    const MAX_EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..MAX_EXPONENT_BITS {
        let steps = (1usize << i) + 1;
        let start = 0.1f32;
        let end = 1.0f32;
        let step = (end - start) / (steps - 1) as f32;
        let half = steps / 2;
        let boundaries: Vec<f32> = (0..steps)
            .map(|k| {
                if k < half {
                    step.mul_add(k as f32, start)
                } else {
                    (-step).mul_add((steps - 1 - k) as f32, end)
                }
            })
            .collect();
        let scale = 10f64.powi(i - (MAX_EXPONENT_BITS - 1)) as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// Index of the nearest entry of a sorted code (bnb's CUDA `dQuantize<0>` binary search and
/// its torch backend's `bucketize` on the midpoints agree on this), a tie going lower.
fn nearest_code_index(midpoints: &[f32], scaled: f32) -> u8 {
    midpoints.partition_point(|&m| m < scaled) as u8
}

/// The 8-bit double quantization of the f32 absmax (bnb `quantize_4bit` with
/// `compress_statistics=True`): `quantize_blockwise(absmax - absmax.mean(), blocksize=256)`.
/// The mean is taken in f64 and rounded once; torch sums in f32 (pairwise on CPU, a tree
/// on CUDA), so bnb's own offset depends on the device and can differ from ours by an ulp.
fn double_quantize_absmax(absmax: &[f32]) -> Absmax {
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64;
    double_quantize_absmax_with_offset(absmax, mean as f32)
}

fn double_quantize_absmax_with_offset(absmax: &[f32], offset: f32) -> Absmax {
    let code = create_dynamic_map();
    let midpoints: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut quantized = Vec::with_capacity(centred.len());
    let mut absmax2 = Vec::with_capacity(centred.len().div_ceil(BLOCKSIZE2));
    for block in centred.chunks(BLOCKSIZE2) {
        let amax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
        absmax2.push(amax);
        // Like the torch backend's clamp(min=1e-38): an all-zero block maps to code 0.0.
        let inv = 1.0 / amax.max(1e-38);
        quantized.extend(
            block
                .iter()
                .map(|&v| nearest_code_index(&midpoints, (v * inv).clamp(-1.0, 1.0))),
        );
    }
    Absmax::Double {
        quantized,
        code,
        absmax2,
        offset,
        blocksize2: BLOCKSIZE2,
    }
}

impl Absmax {
    /// The f32 absmax of NF4 block `b`, computed exactly as bnb's dequantization does.
    #[inline]
    fn block(&self, b: usize) -> f32 {
        match self {
            Absmax::F32(v) => v[b],
            Absmax::Double {
                quantized,
                code,
                absmax2,
                offset,
                blocksize2,
            } => code[quantized[b] as usize] * absmax2[b / blocksize2] + offset,
        }
    }
}

impl Nf4Tensor {
    /// Quantizes a row-major `[rows, cols]` f32 weight with blocksize 64, as bitsandbytes
    /// `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, double_quant: bool) -> Result<Self> {
        let n = rows * cols;
        if w.len() != n || n == 0 {
            return Err(Error::Msg(format!(
                "NF4 quantize: got {} values for a {rows}x{cols} weight (needs a non-empty weight)",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Msg(format!(
                "NF4 quantize: value {} at row {}, column {} is not finite",
                w[i],
                i / cols,
                i % cols
            )));
        }
        let mut codes = Vec::with_capacity(n + 1);
        let mut absmax = Vec::with_capacity(n.div_ceil(BLOCKSIZE));
        for block in w.chunks(BLOCKSIZE) {
            let amax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
            absmax.push(amax);
            if amax == 0.0 {
                // bnb's torch backend gives the zero code here; its CUDA kernel computes
                // 0 * (1/0) = NaN and stores code 0. Both dequantize to 0.
                codes.extend(std::iter::repeat_n(ZERO_CODE, block.len()));
                continue;
            }
            // Multiply by the reciprocal, not divide: that is what the CUDA kernel rounds.
            let inv = 1.0 / amax;
            codes.extend(block.iter().map(|&v| nf4_index(v * inv)));
        }
        if n % 2 == 1 {
            codes.push(ZERO_CODE);
        }
        let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            double_quantize_absmax(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Ok(Nf4Tensor {
            rows,
            cols,
            packed,
            absmax,
            blocksize: BLOCKSIZE,
        })
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes held in memory: packed codes plus the scales (and, with double quantization,
    /// the 8-bit absmax codes, their f32 scales, the 256-entry map and the offset).
    pub fn memory_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::F32(v) => 4 * v.len(),
            Absmax::Double {
                quantized,
                code,
                absmax2,
                ..
            } => quantized.len() + 4 * code.len() + 4 * absmax2.len() + 4,
        };
        self.packed.len() + scales
    }

    /// The whole weight in f32, row-major `[rows, cols]`; bitwise what bnb's
    /// `dequantize_4bit` returns with an f32 output dtype.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_flat_into(0, &mut out);
        out
    }

    /// Dequantizes rows `row_start .. row_start + n_rows` into `out` (`n_rows * cols`
    /// values), so a GEMM can walk the weight tile by tile through one reused scratch buffer
    /// instead of holding a full-precision copy. Blocks may straddle rows; any row range is fine.
    pub fn dequantize_rows_into(
        &self,
        row_start: usize,
        n_rows: usize,
        out: &mut [f32],
    ) -> Result<()> {
        if row_start + n_rows > self.rows || out.len() != n_rows * self.cols {
            return Err(Error::Msg(format!(
                "NF4 dequantize_rows_into: rows {row_start}..{} with a {}-value buffer on a {}x{} weight \
                 (needs rows within 0..{} and {} values)",
                row_start + n_rows,
                out.len(),
                self.rows,
                self.cols,
                self.rows,
                n_rows * self.cols
            )));
        }
        self.dequantize_flat_into(row_start * self.cols, out);
        Ok(())
    }

    /// Dequantizes flat elements `start .. start + out.len()`, one block's scale at a time.
    fn dequantize_flat_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        let mut i = start;
        while i < end {
            let b = i / self.blocksize;
            let block_end = ((b + 1) * self.blocksize).min(end);
            let scale = self.absmax.block(b);
            let mut dst = &mut out[i - start..block_end - start];
            let mut j = i;
            // A segment may start or end mid-byte (odd row widths, odd row starts); whole
            // bytes in between decode two values at once.
            if j % 2 == 1 {
                dst[0] = NF4_CODE[(self.packed[j / 2] & 0x0f) as usize] * scale;
                dst = &mut dst[1..];
                j += 1;
            }
            let mut pairs = dst.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(&self.packed[j / 2..]) {
                pair[0] = NF4_CODE[(byte >> 4) as usize] * scale;
                pair[1] = NF4_CODE[(byte & 0x0f) as usize] * scale;
            }
            if let [last] = pairs.into_remainder() {
                *last = NF4_CODE[(self.packed[(block_end - 1) / 2] >> 4) as usize] * scale;
            }
            i = block_end;
        }
    }

    /// The dequantized weight as an f32 `[rows, cols]` tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.dequantize(),
            (self.rows, self.cols),
            device,
        )?)
    }

    /// Rebuilds a weight from a pre-quantized bitsandbytes checkpoint, i.e. the tensors that
    /// `Linear4bit._save_to_state_dict` writes under `weight_name` (e.g.
    /// `model.layers.0.mlp.down_proj.weight`): `{w}` (packed u8 `[(n+1)/2, 1]`, or the same
    /// bytes viewed as another dtype when saved with a non-u8 `quant_storage`), `{w}.absmax`,
    /// `{w}.quant_map`, `{w}.quant_state.bitsandbytes__nf4` (JSON as u8) and, with double
    /// quantization, `{w}.nested_absmax` and `{w}.nested_quant_map`. `get` looks a tensor up
    /// by its full name; `path` only names the checkpoint in errors.
    pub fn from_bnb_tensors(
        path: &Path,
        weight_name: &str,
        get: impl Fn(&str) -> Option<Tensor>,
    ) -> Result<Self> {
        let fetch = |suffix: &str| -> Result<(String, Tensor)> {
            let name = if suffix.is_empty() {
                weight_name.to_string()
            } else {
                format!("{weight_name}.{suffix}")
            };
            match get(&name) {
                Some(t) => Ok((name, t)),
                None => Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    name,
                }),
            }
        };
        let shape_err = |name: &str, t: &Tensor, expected: usize| Error::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: vec![expected],
            got: t.dims().to_vec(),
        };
        let format_err =
            |name: &str, msg: String| Error::format(path, format!("tensor `{name}`: {msg}"));

        let (qs_name, qs_tensor) = fetch(QUANT_STATE_SUFFIX)?;
        let qs =
            parse_quant_state(&le_bytes(&qs_tensor)?).map_err(|msg| format_err(&qs_name, msg))?;
        let n = qs.rows * qs.cols;
        let blocks = n.div_ceil(qs.blocksize);

        let (w_name, w) = fetch("")?;
        let packed = le_bytes(&w)?;
        if packed.len() != n.div_ceil(2) {
            let expected = n.div_ceil(2) / w.dtype().size_in_bytes();
            return Err(shape_err(&w_name, &w, expected));
        }

        let (map_name, quant_map) = fetch("quant_map")?;
        let quant_map = f32_values(path, &map_name, &quant_map, 16)?;
        // Our dequantization uses NF4_CODE; an FP4 or custom map would be read wrongly.
        if quant_map
            .iter()
            .zip(NF4_CODE)
            .any(|(a, b)| (a - b).abs() > 1e-6)
        {
            return Err(format_err(
                &map_name,
                format!("is {quant_map:?}, not the NF4 codebook"),
            ));
        }

        let (absmax_name, absmax) = fetch("absmax")?;
        let absmax = match qs.nested {
            None => Absmax::F32(f32_values(path, &absmax_name, &absmax, blocks)?),
            Some(nested) => {
                if absmax.dtype() != DType::U8 {
                    return Err(format_err(
                        &absmax_name,
                        format!(
                            "is {:?}, but a double-quantized absmax is u8",
                            absmax.dtype()
                        ),
                    ));
                }
                let quantized = absmax.flatten_all()?.to_vec1::<u8>()?;
                if quantized.len() != blocks {
                    return Err(shape_err(&absmax_name, &absmax, blocks));
                }
                let (a2_name, a2) = fetch("nested_absmax")?;
                let blocks2 = blocks.div_ceil(nested.blocksize);
                let absmax2 = f32_values(path, &a2_name, &a2, blocks2)?;
                let (code_name, code) = fetch("nested_quant_map")?;
                let code = f32_values(path, &code_name, &code, 256)?;
                Absmax::Double {
                    quantized,
                    code,
                    absmax2,
                    offset: nested.offset,
                    blocksize2: nested.blocksize,
                }
            }
        };
        Ok(Nf4Tensor {
            rows: qs.rows,
            cols: qs.cols,
            packed,
            absmax,
            blocksize: qs.blocksize,
        })
    }

    /// The tensors bitsandbytes' `Linear4bit` saves for this weight (names prefixed with
    /// `weight_name`), uint8 quant storage. `dtype` is the compute dtype recorded in the quant
    /// state (what bnb dequantizes to): F32, BF16 or F16. For a weight loaded with
    /// [`Nf4Tensor::from_bnb_tensors`] from a uint8-storage checkpoint this gives back the
    /// same bytes, the JSON included.
    pub fn to_bnb_tensors(&self, weight_name: &str, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let dtype_name = match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            other => {
                return Err(Error::Msg(format!(
                "NF4 export of `{weight_name}`: bitsandbytes has no {other:?} quant state dtype"
            )))
            }
        };
        let cpu = Device::Cpu;
        let mut json = format!(
            r#"{{"quant_type": "nf4", "blocksize": {}, "dtype": "{dtype_name}", "shape": [{}, {}]"#,
            self.blocksize, self.rows, self.cols
        );
        let mut out = vec![(
            weight_name.to_string(),
            Tensor::from_vec(self.packed.clone(), (self.packed.len(), 1), &cpu)?,
        )];
        match &self.absmax {
            Absmax::F32(v) => out.push((
                format!("{weight_name}.absmax"),
                Tensor::from_vec(v.clone(), v.len(), &cpu)?,
            )),
            Absmax::Double {
                quantized,
                code,
                absmax2,
                offset,
                blocksize2,
            } => {
                out.push((
                    format!("{weight_name}.absmax"),
                    Tensor::from_vec(quantized.clone(), quantized.len(), &cpu)?,
                ));
                out.push((
                    format!("{weight_name}.nested_absmax"),
                    Tensor::from_vec(absmax2.clone(), absmax2.len(), &cpu)?,
                ));
                out.push((
                    format!("{weight_name}.nested_quant_map"),
                    Tensor::from_vec(code.clone(), code.len(), &cpu)?,
                ));
                json += &format!(
                    r#", "nested_blocksize": {blocksize2}, "nested_dtype": "float32", "nested_offset": {}"#,
                    python_float_repr(*offset as f64)
                );
            }
        }
        json.push('}');
        out.insert(
            1,
            (
                format!("{weight_name}.quant_map"),
                Tensor::from_vec(NF4_CODE.to_vec(), 16, &cpu)?,
            ),
        );
        let json = json.into_bytes();
        out.push((
            format!("{weight_name}.{QUANT_STATE_SUFFIX}"),
            Tensor::from_vec(json.clone(), json.len(), &cpu)?,
        ));
        Ok(out)
    }
}

/// The parts of bnb's packed quant-state JSON we need.
struct QuantStateJson {
    rows: usize,
    cols: usize,
    blocksize: usize,
    nested: Option<NestedJson>,
}

struct NestedJson {
    blocksize: usize,
    offset: f32,
}

fn parse_quant_state(bytes: &[u8]) -> std::result::Result<QuantStateJson, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("quant state is not JSON: {e}"))?;
    let field = |k: &str| v.get(k).ok_or_else(|| format!("quant state has no `{k}`"));
    let positive = |k: &str| -> std::result::Result<usize, String> {
        match field(k)?.as_u64() {
            Some(x) if x > 0 => Ok(x as usize),
            _ => Err(format!(
                "quant state `{k}` is {}, expected a positive integer",
                v[k]
            )),
        }
    };
    let quant_type = field("quant_type")?;
    if quant_type != "nf4" {
        return Err(format!(
            "quant_type is {quant_type}, only \"nf4\" is supported"
        ));
    }
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| {
            format!(
                "quant state `shape` is {}, expected a list of integers",
                v["shape"]
            )
        })?;
    let [rows, cols] = shape[..] else {
        return Err(format!(
            "quant state `shape` is {shape:?}, expected the 2-D [out, in] of a Linear weight"
        ));
    };
    let blocksize = positive("blocksize")?;
    let nested = if v.get("nested_offset").is_some() {
        let offset = field("nested_offset")?.as_f64().ok_or_else(|| {
            format!(
                "quant state `nested_offset` is {}, expected a number",
                v["nested_offset"]
            )
        })?;
        Some(NestedJson {
            blocksize: positive("nested_blocksize")?,
            offset: offset as f32,
        })
    } else {
        None
    };
    Ok(QuantStateJson {
        rows,
        cols,
        blocksize,
        nested,
    })
}

/// A tensor's raw little-endian bytes; bnb's non-u8 `quant_storage` saves the packed codes
/// as a view of the same bytes in another dtype.
fn le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        other => {
            return Err(Error::Msg(format!(
                "NF4: cannot read packed bytes from a {other:?} tensor"
            )))
        }
    })
}

/// `len` floats from a float tensor, widened to f32 (lossless from bf16/f16).
fn f32_values(path: &Path, name: &str, t: &Tensor, len: usize) -> Result<Vec<f32>> {
    if !t.dtype().is_float() {
        return Err(Error::format(
            path,
            format!("tensor `{name}` is {:?}, expected floats", t.dtype()),
        ));
    }
    if t.elem_count() != len {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: vec![len],
            got: t.dims().to_vec(),
        });
    }
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Python's `repr(float)`, which `json.dumps` uses: shortest round-trip digits, exponent
/// form below 1e-4 and from 1e16 on, written `1e-05` / `1e+16`. Rust's `{:?}` picks the
/// same digits and thresholds but writes the exponent as `e-5` / `e16`.
fn python_float_repr(x: f64) -> String {
    let s = format!("{x:?}");
    match s
        .split_once('e')
        .and_then(|(m, e)| Some((m, e.parse::<i32>().ok()?)))
    {
        Some((mantissa, exp)) => format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        ),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    //! References: tensors written by the real bitsandbytes 0.50.2
    //! (scripts/fixtures/make_nf4_fixtures.py), the threshold literals of bnb's CUDA
    //! `dQuantizeNF4`, and naive nearest-code checks written out here.

    use std::collections::HashMap;
    use std::path::PathBuf;

    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;

    const CASES: [&str; 4] = [
        "w64x128_bf16",
        "w96x200_bf16",
        "w33x65_f32",
        "w32x256_outliers_bf16",
    ];

    fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/nf4")
            .join(name)
    }

    fn load(name: &str) -> HashMap<String, Tensor> {
        let path = fixture_path(&format!("{name}.safetensors"));
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn f32s(t: &HashMap<String, Tensor>, k: &str) -> Vec<f32> {
        t[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn u8s(t: &HashMap<String, Tensor>, k: &str) -> Vec<u8> {
        t[k].flatten_all().unwrap().to_vec1::<u8>().unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn shape(t: &HashMap<String, Tensor>) -> (usize, usize) {
        t["input"].dims2().unwrap()
    }

    /// Half the widest gap between neighbouring codes: the worst rounding of a scaled value.
    fn max_half_gap(code: &[f32]) -> f32 {
        code.windows(2)
            .map(|w| (w[1] - w[0]) / 2.0)
            .fold(0.0, f32::max)
    }

    #[test]
    fn codebook_and_thresholds_match_bitsandbytes() {
        let ckpt = load("linear4bit_state_dict");
        assert_eq!(
            bits(&f32s(&ckpt, "model.down_proj.weight.quant_map")),
            bits(&NF4_CODE)
        );
        // Each threshold is an f32 nearest to the exact midpoint of its two codes.
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            let exact = (NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0;
            let ulp = (t.abs().next_up() - t.abs()) as f64;
            assert!(
                (t as f64 - exact).abs() <= ulp / 2.0,
                "threshold {i}: {t} vs {exact}"
            );
            assert!(NF4_CODE[i] < t && t < NF4_CODE[i + 1]);
        }
    }

    #[test]
    fn dynamic_map_matches_bitsandbytes() {
        let ours = bits(&create_dynamic_map());
        for case in CASES {
            assert_eq!(
                ours,
                bits(&f32s(&load(case), "nested.nested_quant_map")),
                "{case}"
            );
        }
        let ckpt = load("linear4bit_state_dict");
        assert_eq!(
            ours,
            bits(&f32s(&ckpt, "model.down_proj.weight.nested_quant_map"))
        );
    }

    #[test]
    fn quantize_matches_bitsandbytes_bytes() {
        for case in CASES {
            let t = load(case);
            let (rows, cols) = shape(&t);
            let q = Nf4Tensor::quantize(&f32s(&t, "input"), rows, cols, false).unwrap();
            assert_eq!(q.packed, u8s(&t, "plain.packed"), "{case}: packed codes");
            let Absmax::F32(absmax) = &q.absmax else {
                panic!("{case}: expected f32 absmax")
            };
            assert_eq!(
                bits(absmax),
                bits(&f32s(&t, "plain.absmax")),
                "{case}: absmax"
            );
            assert_eq!(
                bits(&q.dequantize()),
                bits(&f32s(&t, "plain.dequant")),
                "{case}: dequant"
            );
            let tensor = q.to_tensor(&Device::Cpu).unwrap();
            assert_eq!(tensor.dims2().unwrap(), (rows, cols));
            let flat = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                bits(&flat),
                bits(&f32s(&t, "plain.dequant")),
                "{case}: to_tensor"
            );
        }
    }

    #[test]
    fn double_quant_matches_bitsandbytes() {
        for case in CASES {
            let t = load(case);
            let (rows, cols) = shape(&t);
            let bnb_offset = f32s(&t, "nested.offset")[0];
            let bnb_quantized = u8s(&t, "nested.absmax");
            let bnb_absmax2 = f32s(&t, "nested.nested_absmax");

            // Given bnb's offset (its f32 mean is device dependent), the 8-bit stage is exact.
            let Absmax::Double {
                quantized,
                absmax2,
                code,
                ..
            } = double_quantize_absmax_with_offset(&f32s(&t, "plain.absmax"), bnb_offset)
            else {
                panic!("{case}: expected double absmax")
            };
            assert_eq!(quantized, bnb_quantized, "{case}: 8-bit absmax codes");
            assert_eq!(bits(&absmax2), bits(&bnb_absmax2), "{case}: nested absmax");

            // bnb's stored state dequantizes to bnb's values, bit for bit.
            let from_bnb = Nf4Tensor {
                rows,
                cols,
                packed: u8s(&t, "nested.packed"),
                absmax: Absmax::Double {
                    quantized: bnb_quantized.clone(),
                    code,
                    absmax2: bnb_absmax2.clone(),
                    offset: bnb_offset,
                    blocksize2: BLOCKSIZE2,
                },
                blocksize: BLOCKSIZE,
            };
            assert_eq!(
                bits(&from_bnb.dequantize()),
                bits(&f32s(&t, "nested.dequant")),
                "{case}: dequant"
            );

            // End to end: same 4-bit codes; our offset is the correctly rounded mean, which
            // torch's f32 sum misses by up to an ulp, and that may move a code by one step.
            let q = Nf4Tensor::quantize(&f32s(&t, "input"), rows, cols, true).unwrap();
            assert_eq!(q.packed, u8s(&t, "nested.packed"), "{case}: packed codes");
            let Absmax::Double {
                quantized, offset, ..
            } = &q.absmax
            else {
                panic!()
            };
            let ulps = (offset.to_bits() as i64 - bnb_offset.to_bits() as i64).abs();
            assert!(ulps <= 1, "{case}: offset {offset} vs bnb {bnb_offset}");
            for (b, (&ours, &theirs)) in quantized.iter().zip(&bnb_quantized).enumerate() {
                let step = (ours as i32 - theirs as i32).abs();
                assert!(
                    step == 0 || (ulps == 1 && step == 1),
                    "{case}: absmax code {b}: {ours} vs {theirs}"
                );
            }
        }
    }

    #[test]
    fn dequantize_rows_into_matches_bitsandbytes_slices() {
        for case in ["w96x200_bf16", "w33x65_f32"] {
            let t = load(case);
            let (rows, cols) = shape(&t);
            let q = Nf4Tensor::quantize(&f32s(&t, "input"), rows, cols, false).unwrap();
            let reference = f32s(&t, "plain.dequant");
            // Odd row starts put a tile on a low nibble (33x65) and mid-block (96x200).
            let mut scratch = vec![0f32; 7 * cols];
            for (start, n) in [(0, 1), (1, 3), (5, 7), (rows - 7, 7), (rows - 1, 1)] {
                let out = &mut scratch[..n * cols];
                q.dequantize_rows_into(start, n, out).unwrap();
                assert_eq!(
                    bits(out),
                    bits(&reference[start * cols..(start + n) * cols]),
                    "{case} rows {start}+{n}"
                );
            }
            assert!(q
                .dequantize_rows_into(rows - 1, 2, &mut vec![0.0; 2 * cols])
                .is_err());
            assert!(q
                .dequantize_rows_into(0, 2, &mut vec![0.0; 2 * cols + 1])
                .is_err());
        }
    }

    #[test]
    fn zero_block_dequantizes_to_zero() {
        let mut w: Vec<f32> = (0..192)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        w[64..128].fill(0.0);
        for double in [false, true] {
            let q = Nf4Tensor::quantize(&w, 3, 64, double).unwrap();
            assert!(q.dequantize()[64..128].iter().all(|&v| v == 0.0));
            assert!(q.packed[32..64].iter().all(|&b| b == 0x77));
        }
    }

    #[test]
    fn quantize_rejects_bad_input() {
        assert!(Nf4Tensor::quantize(&[0.0; 5], 2, 3, false).is_err());
        assert!(Nf4Tensor::quantize(&[], 0, 3, false).is_err());
        let err = Nf4Tensor::quantize(&[0.0, f32::NAN, 1.0, 2.0], 2, 2, false).unwrap_err();
        assert!(err.to_string().contains("row 0, column 1"), "{err}");
    }

    fn checkpoint() -> (PathBuf, HashMap<String, Tensor>) {
        let path = fixture_path("linear4bit_state_dict.safetensors");
        (path, load("linear4bit_state_dict"))
    }

    #[test]
    fn from_bnb_checkpoint_matches_bitsandbytes() {
        let (path, sd) = checkpoint();
        let reference = load("linear4bit_reference");
        for (layer, shape, nested) in [
            ("down_proj", (96, 200), true),
            ("up_proj", (33, 65), false),
            ("gate_proj", (64, 128), true),
        ] {
            let name = format!("model.{layer}.weight");
            let q = Nf4Tensor::from_bnb_tensors(&path, &name, |k| sd.get(k).cloned()).unwrap();
            assert_eq!((q.rows, q.cols), shape, "{layer}");
            assert_eq!(matches!(q.absmax, Absmax::Double { .. }), nested, "{layer}");
            let deq = bits(&q.dequantize());
            assert_eq!(
                deq,
                bits(&f32s(&reference, &format!("model.{layer}.dequant"))),
                "{layer}: dequant"
            );
            // Our quantizer reproduces the checkpoint's 4-bit codes from the same weight.
            let ours = Nf4Tensor::quantize(
                &f32s(&reference, &format!("model.{layer}.input")),
                shape.0,
                shape.1,
                nested,
            )
            .unwrap();
            assert_eq!(
                ours.packed,
                le_bytes(&sd[&name]).unwrap(),
                "{layer}: packed codes"
            );

            // Export gives back bnb's tensors byte for byte (gate_proj was saved with bf16
            // quant storage, so there only the bytes of the packed weight can agree).
            let exported = q.to_bnb_tensors(&name, DType::BF16).unwrap();
            let expected_keys = sd
                .keys()
                .filter(|k| k.starts_with(&format!("{name}")))
                .count();
            assert_eq!(exported.len(), expected_keys, "{layer}: exported tensors");
            for (k, t) in exported {
                let theirs = &sd[&k];
                assert_eq!(
                    le_bytes(&t).unwrap(),
                    le_bytes(theirs).unwrap(),
                    "{layer}: bytes of {k}"
                );
                if layer != "gate_proj" || k != name {
                    assert_eq!(
                        (t.dtype(), t.dims()),
                        (theirs.dtype(), theirs.dims()),
                        "{layer}: {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn from_bnb_errors_name_the_tensor() {
        let (path, sd) = checkpoint();
        let w = "model.down_proj.weight";
        let load_without = |drop: &str| {
            Nf4Tensor::from_bnb_tensors(
                &path,
                w,
                |k| if k == drop { None } else { sd.get(k).cloned() },
            )
            .unwrap_err()
        };
        for suffix in [
            "",
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
            ".quant_state.bitsandbytes__nf4",
        ] {
            let missing = format!("{w}{suffix}");
            match load_without(&missing) {
                Error::MissingTensor { name, .. } => assert_eq!(name, missing),
                other => panic!("dropping {missing}: {other}"),
            }
        }
        let load_with = |key: &str, t: Tensor| {
            let k = format!("{w}{key}");
            Nf4Tensor::from_bnb_tensors(&path, w, |name| {
                if name == k {
                    Some(t.clone())
                } else {
                    sd.get(name).cloned()
                }
            })
            .unwrap_err()
        };
        let short = sd[&format!("{w}.nested_absmax")].narrow(0, 0, 1).unwrap();
        match load_with(".nested_absmax", short) {
            Error::Shape {
                name,
                expected,
                got,
                ..
            } => {
                assert_eq!(
                    (name.as_str(), expected, got),
                    ("model.down_proj.weight.nested_absmax", vec![2], vec![1])
                )
            }
            other => panic!("{other}"),
        }
        let short = sd[w].narrow(0, 0, 100).unwrap();
        assert!(matches!(load_with("", short), Error::Shape { name, .. } if name == w));
        let f32_absmax = Tensor::zeros(300, DType::F32, &Device::Cpu).unwrap();
        let err = load_with(".absmax", f32_absmax).to_string();
        assert!(
            err.contains("model.down_proj.weight.absmax") && err.contains("u8"),
            "{err}"
        );
        for (json, what) in [
            (&b"{not json"[..], "not JSON"),
            (
                br#"{"quant_type": "fp4", "blocksize": 64, "shape": [96, 200]}"#,
                "fp4",
            ),
            (
                br#"{"quant_type": "nf4", "blocksize": 64, "shape": [19200]}"#,
                "2-D",
            ),
            (
                br#"{"quant_type": "nf4", "blocksize": 0, "shape": [96, 200]}"#,
                "blocksize",
            ),
        ] {
            let t = Tensor::from_vec(json.to_vec(), json.len(), &Device::Cpu).unwrap();
            let err = load_with(".quant_state.bitsandbytes__nf4", t).to_string();
            assert!(
                err.contains("model.down_proj.weight.quant_state.bitsandbytes__nf4")
                    && err.contains(what),
                "{err}"
            );
        }
    }

    #[test]
    fn python_float_repr_matches_json_dumps() {
        // Strings as CPython's repr() prints them.
        for (x, py) in [
            (0.05151204392313957, "0.05151204392313957"),
            (1.0, "1.0"),
            (1e-05, "1e-05"),
            (1.5e-07, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (-0.25, "-0.25"),
        ] {
            assert_eq!(python_float_repr(x), py);
        }
    }

    /// Weights of random shape and scale, with whole zero blocks now and then.
    fn weights() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
        (1usize..12, 1usize..150, -8i32..4, any::<u64>()).prop_map(|(rows, cols, exp, seed)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let scale = 2f32.powi(exp);
            let zero_block = rng
                .random_bool(0.2)
                .then(|| rng.random_range(0..(rows * cols).div_ceil(BLOCKSIZE)));
            let w = (0..rows * cols)
                .map(|i| {
                    if Some(i / BLOCKSIZE) == zero_block {
                        0.0
                    } else {
                        (rng.random::<f32>() * 2.0 - 1.0) * scale
                    }
                })
                .collect();
            (rows, cols, w)
        })
    }

    proptest! {
        #[test]
        fn codes_are_nearest_and_error_is_bounded((rows, cols, w) in weights()) {
            let q = Nf4Tensor::quantize(&w, rows, cols, false).unwrap();
            let deq = q.dequantize();
            let half_gap = max_half_gap(&NF4_CODE);
            for (b, block) in w.chunks(BLOCKSIZE).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (j, &x) in block.iter().enumerate() {
                    let i = b * BLOCKSIZE + j;
                    let code = (q.packed[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0x0f;
                    if amax > 0.0 {
                        // Nearest code, up to the f32 rounding of the scaled value and midpoints.
                        let s = (x / amax) as f64;
                        let d = (s - NF4_CODE[code as usize] as f64).abs();
                        let best = NF4_CODE.iter().map(|&c| (s - c as f64).abs()).fold(f64::MAX, f64::min);
                        prop_assert!(d <= best + 1e-6, "x={x} code={code}");
                    }
                    prop_assert!((deq[i] - x).abs() <= amax * half_gap * (1.0 + 1e-5), "i={i}");
                }
            }
            if rows * cols % 2 == 1 {
                prop_assert_eq!(q.packed.last().unwrap() & 0x0f, ZERO_CODE);
            }

            // Double quantization adds the absmax error: at most half the dynamic map's
            // widest step times the block group's scale, plus f32 rounding.
            let dq = Nf4Tensor::quantize(&w, rows, cols, true).unwrap();
            prop_assert_eq!(&dq.packed, &q.packed);
            let Absmax::Double { absmax2, code, blocksize2, .. } = &dq.absmax else { panic!() };
            let deq2 = dq.dequantize();
            for (b, block) in w.chunks(BLOCKSIZE).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let tol = absmax2[b / blocksize2] * max_half_gap(code) * 1.0001 + 4.0 * f32::EPSILON * amax;
                prop_assert!((dq.absmax.block(b) - amax).abs() <= tol, "block {b}");
                for (j, &x) in block.iter().enumerate() {
                    let i = b * BLOCKSIZE + j;
                    prop_assert!((deq2[i] - x).abs() <= amax * half_gap * 1.0001 + tol, "i={i}");
                }
            }
        }
    }

    #[test]
    fn gaussian_weights_relative_error() {
        let (rows, cols) = (256, 1024);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Box-Muller: N(0, 0.02), the usual init scale of LLM weights.
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                (0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect();
        for double in [false, true] {
            let q = Nf4Tensor::quantize(&w, rows, cols, double).unwrap();
            let deq = q.dequantize();
            let (mut err2, mut norm2, mut rel_sum) = (0f64, 0f64, 0f64);
            for (&x, &y) in w.iter().zip(&deq) {
                err2 += ((x - y) as f64).powi(2);
                norm2 += (x as f64).powi(2);
                rel_sum += ((x - y) as f64).abs() / (x as f64).abs().max(1e-12);
            }
            let rel_rms = (err2 / norm2).sqrt();
            println!(
                "NF4 double_quant={double}: relative RMS error {rel_rms:.4}, mean of |dw|/|w| {:.4}, {} bytes ({:.3} bits/weight)",
                rel_sum / w.len() as f64,
                q.memory_bytes(),
                8.0 * q.memory_bytes() as f64 / w.len() as f64
            );
            // NF4 with blocks of 64 keeps about 10% relative RMS error on Gaussian weights.
            assert!(rel_rms < 0.12, "relative RMS error {rel_rms}");
        }
    }
}
