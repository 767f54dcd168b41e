//! Token embedding lookup, optionally scaled (Gemma multiplies by `sqrt(hidden_size)`).
//!
//! The backward is a scatter-add of the output gradient into the rows of the table; it is
//! only needed when the embedding itself is trained.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Rejects ids outside the table here, with the offending id, instead of letting the
/// device gather read out of bounds. Costs one small host read of the maximum id.
fn check_ids(op: &str, ids: &Tensor, vocab_size: usize) -> Result<()> {
    if ids.rank() != 2 {
        return Err(Error::Msg(format!(
            "{op}: token ids must be [batch, seq], got shape {:?}",
            ids.dims()
        )));
    }
    if ids.dtype() != DType::U32 {
        return Err(Error::Msg(format!(
            "{op}: token ids must be u32, got {:?}",
            ids.dtype()
        )));
    }
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let max = ids.max_all()?.to_scalar::<u32>()? as usize;
    if max >= vocab_size {
        return Err(Error::Msg(format!(
            "{op}: token id {max} is out of range for a vocabulary of {vocab_size}"
        )));
    }
    Ok(())
}

/// `ids`: `[B, T]` u32, `weight`: `[V, d]`. Returns `weight[ids] * scale`, `[B, T, d]`.
pub fn embedding_fwd(ids: &Tensor, weight: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    if weight.rank() != 2 {
        return Err(Error::Msg(format!(
            "embedding_fwd: embedding weight must be [vocab, hidden], got shape {:?}",
            weight.dims()
        )));
    }
    let (vocab_size, hidden) = weight.dims2()?;
    check_ids("embedding_fwd", ids, vocab_size)?;
    let (b, t) = ids.dims2()?;
    let rows = weight.index_select(&ids.flatten_all()?, 0)?;
    let rows = match scale {
        // HF Gemma builds the normaliser as a tensor in the activation dtype, so the
        // product happens in that dtype; candle's affine does the same.
        Some(s) => rows.affine(s, 0.0)?,
        None => rows,
    };
    Ok(rows.reshape((b, t, hidden))?)
}

/// `dy`: `[B, T, d]`, `ids`: `[B, T]` u32. Returns `dW`, `[vocab_size, d]`; rows of ids
/// that occur several times accumulate.
pub fn embedding_bwd(
    dy: &Tensor,
    ids: &Tensor,
    vocab_size: usize,
    scale: Option<f64>,
) -> Result<Tensor> {
    check_ids("embedding_bwd", ids, vocab_size)?;
    let (b, t) = ids.dims2()?;
    let hidden = match dy.dims() {
        &[db, dt, d] if (db, dt) == (b, t) => d,
        d => {
            return Err(Error::Msg(format!(
                "embedding_bwd: dy has shape {d:?}, expected [{b}, {t}, hidden] to match the ids"
            )))
        }
    };
    let src = dy.reshape((b * t, hidden))?;
    let src = match scale {
        Some(s) => src.affine(s, 0.0)?,
        None => src,
    };
    let zeros = Tensor::zeros((vocab_size, hidden), dy.dtype(), dy.device())?;
    Ok(zeros.index_add(&ids.flatten_all()?, &src, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, assert_close_vec, fd_grad, rand_tensor, to_f64_vec};
    use candle_core::{Device, Var};

    fn ids() -> Tensor {
        // Repeated ids (3 and 0) check that gradients accumulate rather than overwrite.
        Tensor::new(&[[3u32, 0, 5, 3], [1, 0, 3, 6]], &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_matches_row_lookup() {
        let (v, d) = (7, 5);
        let w = rand_tensor(1, (v, d), DType::F32);
        let wv = to_f64_vec(&w);
        for scale in [None, Some((d as f64).sqrt())] {
            let y = embedding_fwd(&ids(), &w, scale).unwrap();
            assert_eq!(y.dims(), &[2, 4, d]);
            let mut want = Vec::new();
            for id in ids().flatten_all().unwrap().to_vec1::<u32>().unwrap() {
                let row = &wv[id as usize * d..(id as usize + 1) * d];
                want.extend(row.iter().map(|x| x * scale.unwrap_or(1.0)));
            }
            assert_close_vec(&to_f64_vec(&y), &want, 1e-6, 1e-6, "embedding forward");
        }
    }

    #[test]
    fn backward_matches_candle_autograd() {
        let (v, d) = (7, 5);
        let w = Var::from_tensor(&rand_tensor(2, (v, d), DType::F32)).unwrap();
        let dy = rand_tensor(3, (2, 4, d), DType::F32);
        for scale in [None, Some(2.5)] {
            let rows = w
                .as_tensor()
                .index_select(&ids().flatten_all().unwrap(), 0)
                .unwrap();
            let y = (rows.reshape((2, 4, d)).unwrap() * scale.unwrap_or(1.0)).unwrap();
            let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let got = embedding_bwd(&dy, &ids(), v, scale).unwrap();
            assert_close(
                &got,
                grads.get(&w).unwrap(),
                1e-6,
                1e-5,
                "embedding dW vs autograd",
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences_f64() {
        let (v, d) = (7, 3);
        let w = rand_tensor(4, (v, d), DType::F64);
        let dy = rand_tensor(5, (2, 4, d), DType::F64);
        let scale = Some(1.7);
        let got = embedding_bwd(&dy, &ids(), v, scale).unwrap();
        let want = fd_grad(|w| embedding_fwd(&ids(), w, scale), &w, &dy, 1e-5);
        assert_close(
            &got,
            &want,
            1e-8,
            1e-7,
            "embedding dW vs finite differences",
        );
    }

    #[test]
    fn out_of_range_id_is_a_typed_error() {
        let w = rand_tensor(6, (4, 2), DType::F32);
        let bad = Tensor::new(&[[0u32, 4]], &Device::Cpu).unwrap();
        let err = embedding_fwd(&bad, &w, None).unwrap_err().to_string();
        assert!(
            err.contains("token id 4 is out of range for a vocabulary of 4"),
            "{err}"
        );
        let dy = rand_tensor(7, (1, 2, 2), DType::F32);
        let err = embedding_bwd(&dy, &bad, 4, None).unwrap_err().to_string();
        assert!(err.contains("token id 4"), "{err}");
        let err = embedding_bwd(&dy, &ids(), 7, None).unwrap_err().to_string();
        assert!(
            err.contains("dy has shape [1, 2, 2], expected [2, 4, hidden]"),
            "{err}"
        );
    }
}
