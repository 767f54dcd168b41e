//! Teacher outputs on the wire: `[ndim: u32][dims: u64 × ndim][values: f32 × n]`, little
//! endian. Values travel as f32 whatever the compute dtype: bf16 → f32 → bf16 is exact,
//! so the student gets the teacher's bits.

use candle_core::{DType, Device, Tensor};
use qdistill_common::{Error, Result};

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
}
