//! Teacher outputs on the wire, little endian. Hidden states: `[ndim: u32][dims: u64 ×
//! ndim][values: f32 × n]`; values travel as f32 whatever the compute dtype: bf16 → f32 →
//! bf16 is exact, so the student gets the teacher's bits. Top-K rows (`teacher.output =
//! "topk:K"`): `[TOPK_TAG: u32][k: u32][rows: u64][log-probs: f32 × rows·k][ids: u32 ×
//! rows·k]`, the supervised tokens' rows only.

use candle_core::{DType, Device, Tensor};
use qdistill_common::teacher_cache::TopKRows;
use qdistill_common::{Error, Result};

/// Marks a top-K message; a hidden-state message starts with its dimension count (≤ 8).
const TOPK_TAG: u32 = 0x4b504f54; // "TOPK"

pub fn encode_topk(rows: &TopKRows) -> Vec<u8> {
    let n = rows.logprobs.len() / rows.k.max(1);
    let mut out = Vec::with_capacity(16 + 8 * rows.logprobs.len());
    out.extend_from_slice(&TOPK_TAG.to_le_bytes());
    out.extend_from_slice(&(rows.k as u32).to_le_bytes());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    for v in &rows.logprobs {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for i in &rows.indices {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out
}

/// Top-K rows as [`encode_topk`] wrote them; `rows` must be the supervised tokens of the
/// micro-batch the student trains, `k` its config's K.
pub fn decode_topk(bytes: &[u8], k: usize, rows: usize, from: usize) -> Result<TopKRows> {
    let bad = |why: String| Error::Msg(format!("teacher rank {from} sent malformed top-K outputs: {why}"));
    let word = |at: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(bytes.get(at..at + 4).ok_or_else(|| bad(format!("{} bytes", bytes.len())))?.try_into().expect("4 bytes")))
    };
    if word(0)? != TOPK_TAG {
        return Err(bad("not a top-K message (is the teacher's `teacher.output` the same?)".into()));
    }
    let got_k = word(4)? as usize;
    let got_rows = u64::from_le_bytes(bytes.get(8..16).ok_or_else(|| bad("truncated header".into()))?.try_into().expect("8 bytes")) as usize;
    if got_k != k || got_rows != rows {
        return Err(bad(format!("{got_rows} rows of K = {got_k}, expected {rows} rows of K = {k}")));
    }
    let n = rows * k;
    if bytes.len() != 16 + 8 * n {
        return Err(bad(format!("{} bytes for {rows} rows of K = {k}", bytes.len())));
    }
    let logprobs = bytes[16..16 + 4 * n].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let indices = bytes[16 + 4 * n..].chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(TopKRows { k, logprobs, indices })
}

pub fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let dims = t.dims();
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(4 + 8 * dims.len() + 4 * values.len());
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&(*d as u64).to_le_bytes());
    }
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

pub fn decode(bytes: &[u8], device: &Device, dtype: DType, from: usize) -> Result<Tensor> {
    let bad = |why: String| Error::Msg(format!("teacher rank {from} sent a malformed tensor: {why}"));
    let take = |at: usize, n: usize| bytes.get(at..at + n).ok_or_else(|| bad(format!("{} bytes, truncated at {at}", bytes.len())));
    let ndim = u32::from_le_bytes(take(0, 4)?.try_into().expect("4 bytes")) as usize;
    if ndim > 8 {
        return Err(bad(format!("{ndim} dimensions")));
    }
    let mut dims = Vec::with_capacity(ndim);
    for i in 0..ndim {
        dims.push(u64::from_le_bytes(take(4 + 8 * i, 8)?.try_into().expect("8 bytes")) as usize);
    }
    let start = 4 + 8 * ndim;
    let n: usize = dims.iter().product();
    if bytes.len() != start + 4 * n {
        return Err(bad(format!("shape {dims:?} needs {} bytes of values, got {}", 4 * n, bytes.len().saturating_sub(start))));
    }
    let values: Vec<f32> = bytes[start..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_bit_exactly_and_garbage_is_refused() {
        let vals: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let t = Tensor::from_vec(vals.clone(), (2, 3, 4), &Device::Cpu).unwrap();
        let back = decode(&encode(&t).unwrap(), &Device::Cpu, DType::F32, 0).unwrap();
        assert_eq!(back.dims(), &[2, 3, 4]);
        let got: Vec<u32> = back.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, vals.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        let bf = t.to_dtype(DType::BF16).unwrap();
        let back = decode(&encode(&bf).unwrap(), &Device::Cpu, DType::BF16, 0).unwrap();
        assert_eq!(back.dtype(), DType::BF16);
        assert_eq!(back.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap(), bf.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap());

        let mut short = encode(&t).unwrap();
        short.pop();
        assert!(decode(&short, &Device::Cpu, DType::F32, 3).unwrap_err().to_string().contains("teacher rank 3"));
        assert!(decode(&[1, 2], &Device::Cpu, DType::F32, 0).is_err());
        assert!(decode(&[99, 0, 0, 0], &Device::Cpu, DType::F32, 0).is_err());
    }

    #[test]
    fn top_k_rows_round_trip_and_mismatches_are_named() {
        let rows = TopKRows { k: 3, logprobs: vec![-0.1, -2.5, -7.0, -0.3, -1.25, f32::MIN_POSITIVE.ln()], indices: vec![5, 0, 255, 1, 2, 3] };
        let bytes = encode_topk(&rows);
        let back = decode_topk(&bytes, 3, 2, 0).unwrap();
        assert_eq!(back.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), rows.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(back.indices, rows.indices);
        let e = decode_topk(&bytes, 4, 2, 1).unwrap_err().to_string();
        assert!(e.contains("teacher rank 1") && e.contains("expected 2 rows of K = 4"), "{e}");
        assert!(decode_topk(&bytes[..bytes.len() - 1], 3, 2, 0).unwrap_err().to_string().contains("bytes for 2 rows"));
        let hidden = encode(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(decode_topk(&hidden, 3, 2, 0).unwrap_err().to_string().contains("not a top-K message"));
    }
}
