//! GPU checks of the NCCL collective (feature `cuda`, two or more GPUs), for `qdistill
//! selftest`: the conformance suite the CPU transports pass, run over NCCL on two GPUs; the
//! device all-reduce of an 8B-sized LoRA gradient buffer over every GPU against a host sum;
//! teacher-output tensors sent device to device, several in flight, bit for bit; and an
//! abort that frees a rank stuck waiting for a peer that never sends.

use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use candle_core::{DType, Device, Tensor};
use qdistill_common::collective::nccl::NcclCollective;
use qdistill_common::collective::{conformance, Collective};
use qdistill_common::kernels::cuda_device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::selftest_optim::{Check, LLAMA3_8B_R16_PARAMS};

/// Every NCCL check over all visible GPUs; empty with fewer than two.
pub fn nccl_checks() -> Vec<Check> {
    let n = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    if n < 2 {
        println!("(NCCL checks need two GPUs; this machine has {n})");
        return Vec::new();
    }
    let devices: Vec<Device> = match (0..n).map(Device::new_cuda).collect::<candle_core::Result<_>>() {
        Ok(d) => d,
        Err(e) => return vec![("nccl: open the GPUs".into(), Err(anyhow!("{e}")))],
    };
    let mut out: Vec<Check> = Vec::new();
    // NCCL's point-to-point calls are rendezvous: a send completes only once its peer posts
    // the matching receive. The conformance suite's pattern (every rank sends to every other
    // rank before it receives) is the buffered semantics of the CPU transports and deadlocks
    // NCCL beyond two ranks, so it and the tensor checks run on the first two GPUs; the
    // gradient all-reduce, the collective the training path uses across all students, runs
    // on every GPU.
    let pair = &devices[..2];
    let ranks = match form(pair) {
        Ok(r) => r,
        Err(e) => return vec![("nccl: communicator over 2 GPUs".into(), Err(e))],
    };
    out.push((
        "nccl conformance suite, 2 ranks".into(),
        with_deadline(&ranks, || on_every_rank(&ranks, |c, arrived| conformance::run(c, arrived, false).map(|_| String::new()))),
    ));
    out.push(("nccl bf16 tensors rank 0 -> 1, 4 in flight, bit-exact".into(), with_deadline(&ranks, || send_check(&ranks))));
    let all = if n == 2 { Ok(ranks) } else { form(&devices) };
    match all {
        Ok(all) => {
            out.push((
                format!("nccl device all-reduce {LLAMA3_8B_R16_PARAMS} f32, {n} ranks vs host sum"),
                with_deadline(&all, || all_reduce_check(&all, &devices)),
            ));
            // Last: it aborts rank 1's communicator.
            out.push(("nccl abort frees a rank waiting for a silent peer".into(), abort_check(&all)));
        }
        Err(e) => out.push((format!("nccl: communicator over {n} GPUs"), Err(e))),
    }
    out
}

/// One communicator over `devices`, formed on a thread of its own: one that never forms
/// fails the check instead of hanging the self-test (the thread is left behind and ends with
/// the process).
fn form(devices: &[Device]) -> anyhow::Result<Vec<NcclCollective>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let init_devices = devices.to_vec();
    std::thread::spawn(move || {
        let _ = tx.send(NcclCollective::group(&init_devices));
    });
    match rx.recv_timeout(CHECK_DEADLINE) {
        Ok(r) => Ok(r?),
        Err(_) => Err(anyhow!("a communicator over {} GPUs did not form within {} s", devices.len(), CHECK_DEADLINE.as_secs())),
    }
}

/// How long one NCCL check may take before its communicators are aborted.
const CHECK_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `f`; if it has not returned within [`CHECK_DEADLINE`], aborts every rank's
/// communicator (which ends any NCCL call still waiting) and reports the check as timed out.
fn with_deadline(ranks: &[NcclCollective], f: impl FnOnce() -> anyhow::Result<(bool, String)>) -> anyhow::Result<(bool, String)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::RecvTimeoutError;
    let handles: Vec<_> = ranks.iter().map(|c| c.abort_handle()).collect();
    let fired = AtomicBool::new(false);
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let result = std::thread::scope(|s| {
        let (fired, handles) = (&fired, &handles);
        s.spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(CHECK_DEADLINE) {
                fired.store(true, Ordering::SeqCst);
                handles.iter().for_each(|h| h.abort());
            }
        });
        let r = f();
        drop(done);
        r
    });
    if fired.load(Ordering::SeqCst) {
        let detail = match &result {
            Ok((_, d)) => d.clone(),
            Err(e) => e.to_string(),
        };
        return Ok((false, format!("did not finish within {} s; communicators aborted ({detail})", CHECK_DEADLINE.as_secs())));
    }
    result
}

/// Runs `f` on one thread per rank; passes when every rank does.
fn on_every_rank(ranks: &[NcclCollective], f: impl Fn(&NcclCollective, &AtomicUsize) -> Result<String, String> + Sync) -> anyhow::Result<(bool, String)> {
    let arrived = AtomicUsize::new(0);
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks.iter().map(|c| s.spawn(|| f(c, &arrived))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("panicked".into()))).collect()
    });
    let failed: Vec<String> = results.iter().enumerate().filter_map(|(r, x)| x.as_ref().err().map(|e| format!("rank {r}: {e}"))).collect();
    if failed.is_empty() {
        Ok((true, results.into_iter().flatten().find(|d| !d.is_empty()).unwrap_or_else(|| "every rank passed".into())))
    } else {
        Ok((false, failed.join("; ")))
    }
}

fn all_reduce_check(ranks: &[NcclCollective], devices: &[Device]) -> anyhow::Result<(bool, String)> {
    let len = LLAMA3_8B_R16_PARAMS;
    let parts: Vec<Vec<f32>> = (0..ranks.len())
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(100 + r as u64);
            (0..len).map(|_| rng.random_range(-1.0f32..1.0) * 1e-3).collect()
        })
        .collect();
    // The reference: f64 sum, then the bound any f32 summation order stays within.
    let world = ranks.len();
    let results: Vec<anyhow::Result<(Vec<f32>, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(devices)
            .zip(&parts)
            .map(|((c, d), p)| {
                s.spawn(move || -> anyhow::Result<(Vec<f32>, f64)> {
                    let dev = cuda_device(d)?;
                    let mut buf = dev.clone_htod(p)?;
                    c.all_reduce_device(&mut buf)?; // warm-up and the checked result
                    let got = dev.clone_dtoh(&buf)?;
                    let mut buf2 = dev.clone_htod(p)?;
                    dev.cuda_stream().synchronize()?;
                    // Start the clock together on every rank, not when this rank's upload ended.
                    c.barrier()?;
                    let t = Instant::now();
                    c.all_reduce_device(&mut buf2)?;
                    dev.cuda_stream().synchronize()?;
                    Ok((got, t.elapsed().as_secs_f64() * 1e3))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().map_err(|_| anyhow!("a rank panicked"))?).collect()
    });
    let mut worst = 0f64;
    let mut ms = 0f64;
    let first = results[0].as_ref().map_err(|e| anyhow!("rank 0: {e}"))?.0.clone();
    for (r, res) in results.into_iter().enumerate() {
        let (got, t) = res.map_err(|e| anyhow!("rank {r}: {e}"))?;
        ms = ms.max(t);
        if got != first {
            return Ok((false, format!("rank {r}'s sum differs from rank 0's (NCCL promises the same bits on every rank)")));
        }
    }
    for i in 0..len {
        let want: f64 = parts.iter().map(|p| p[i] as f64).sum();
        let mag: f64 = parts.iter().map(|p| p[i].abs() as f64).sum();
        let err = (first[i] as f64 - want).abs() / (world as f64 * f32::EPSILON as f64 * mag).max(f64::MIN_POSITIVE);
        worst = worst.max(err);
    }
    // Ring all-reduce moves 2(n-1)/n of the buffer through each link.
    let bus_gbs = 2.0 * (world - 1) as f64 / world as f64 * (len * 4) as f64 / (ms * 1e-3) / 1e9;
    Ok((worst <= 1.0, format!("max error {worst:.3} of the f32 rounding bound; identical on every rank; {ms:.2} ms, bus {bus_gbs:.0} GB/s")))
}

fn send_check(ranks: &[NcclCollective]) -> anyhow::Result<(bool, String)> {
    let shape = [8192usize, 4096];
    let sent: Vec<Tensor> = (0..4)
        .map(|k| Tensor::randn(0f32, 1.0, &shape[..], &Device::Cpu).and_then(|t| (t + k as f64)?.to_dtype(DType::BF16)))
        .collect::<candle_core::Result<_>>()?;
    let (c0, c1) = (&ranks[0], &ranks[1]);
    let d0 = c0.device();
    let t = Instant::now();
    let got: anyhow::Result<Vec<Tensor>> = std::thread::scope(|s| {
        let tx = s.spawn(|| -> anyhow::Result<()> {
            // All four are queued before the receiver posts anything: sends must not block
            // the sender's host thread.
            for x in &sent {
                c0.send_tensor(1, &x.to_device(&d0)?)?;
            }
            Ok(())
        });
        let rx = s.spawn(|| -> anyhow::Result<Vec<Tensor>> {
            std::thread::sleep(Duration::from_millis(200));
            (0..4).map(|_| Ok(c1.recv_tensor(0, &shape, DType::BF16)?.to_device(&Device::Cpu)?)).collect()
        });
        tx.join().map_err(|_| anyhow!("sender panicked"))??;
        rx.join().map_err(|_| anyhow!("receiver panicked"))?
    });
    let got = got?;
    for (k, (a, b)) in sent.iter().zip(&got).enumerate() {
        let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if diff != 0.0 {
            return Ok((false, format!("tensor {k} arrived changed (max |Δ| {diff})")));
        }
    }
    Ok((true, format!("4 × [8192, 4096] bf16 identical; {:.1} ms incl. host copies", t.elapsed().as_secs_f64() * 1e3)))
}

fn abort_check(ranks: &[NcclCollective]) -> anyhow::Result<(bool, String)> {
    let c1 = &ranks[1];
    let handle = c1.abort_handle();
    let t = Instant::now();
    let res = std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            handle.abort();
        });
        // Rank 0 never sends this: only the abort can end the wait.
        c1.recv(0)
    });
    let waited = t.elapsed().as_secs_f64();
    Ok(match res {
        Err(e) if waited < 30.0 => (true, format!("returned after {waited:.1} s: {e}")),
        Err(e) => (false, format!("returned only after {waited:.1} s: {e}")),
        Ok(m) => (false, format!("received {} bytes nobody sent", m.len())),
    })
}
