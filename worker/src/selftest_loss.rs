//! GPU checks of the fused LM-head loss kernel path (common/kernels/loss.cu through
//! `kernels::loss::fused_linear_distill_cuda`, called directly so it is certain the
//! kernels ran) against the CPU f32 implementation (`fused_linear_distill` on the CPU,
//! itself tested against candle autograd and TRL/torch fixtures).
//!
//! Inputs are random, drawn on the host, rounded to the dtype under test and handed to
//! the CPU reference as the very same values in f32. Each table row is one teacher form ×
//! divergence × temperature × dtype and runs every combination of: student softcap
//! on/off (with a `Hidden` teacher, the teacher's softcap too), three vocabulary pairs
//! (Vs = Vt; Vt < Vs; odd Vs < Vt, which takes the kernel's scalar path), and fully
//! supervised or partly masked rows (masked rows leave some chunks non-consecutive, which
//! takes the gather/scatter path). Compared: CE and KD sums (relative error) and dh
//! (‖Δ‖/‖ref‖ over all elements, masked rows exactly 0, no NaN: the per-row outputs are
//! NaN until the kernel writes them). For bf16 the candle path run on the GPU in bf16 is
//! measured the same way and printed for scale: it has the same precision model (bf16
//! logits and dlogits, f32 loss math), so the kernel's error should be about its size.
//!
//! Tolerances. f32: 1e-4, against errors of order 1e-6 (cuBLAS' and the CPU's summation
//! orders over d ≤ 64, fast exp/log intrinsics); any wrong term of the formulas moves the
//! sums or dh by 1e-2 or more. bf16: the logits are rounded to bf16 (relative 2⁻⁹) after
//! the GEMM, an error of up to |z|·2⁻⁹ ≈ 0.015 on the largest logits, which carry most of
//! the softmax mass; dz and dh are rounded once more. That precision model (bf16 logits,
//! f32 loss math, bf16 dz and dh) emulated in torch on the CPU over these very cases (same
//! shapes, scales, caps, vocabularies and masks, three seeds) errs by at most 8.4e-4 on
//! the sums and 7.4e-3 on dh; the bounds are 3e-3 and 2.5e-2, about 3.5× that, far
//! below the O(1) error of a wrong term, a missing softcap derivative or a misplaced row.

use anyhow::{anyhow, bail};
use candle_core::{DType, Device, Tensor};
use qdistill_common::kernels::loss::fused_linear_distill_cuda;
use qdistill_common::loss::{fused_linear_distill, fused_linear_distill_reference, KdLoss, LossConfig, LossOutput, TeacherOutput, IGNORE_INDEX};

/// One row of the self-test table: name and (pass, detail), or the error that stopped it.
pub type LossCheck = (String, anyhow::Result<(bool, String)>);

const N: usize = 48;
const D: usize = 64;
const D_TEACHER: usize = 40;
const CHUNK: usize = 16;
/// (Vs, Vt): equal and multiples of 8 (vectors of 8); Vt < Vs; odd Vs < Vt (vectors of 1).
const VOCABS: [(usize, usize); 3] = [(1024, 1024), (1024, 1000), (1001, 1003)];
const STUDENT_CAP: f64 = 5.0;
const TEACHER_CAP: f64 = 6.0;
const GRAD_SCALE: f64 = 1.0 / 37.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    None,
    Logits,
    Hidden,
}

struct Tol {
    sums: f64,
    dh: f64,
}

fn tol(dtype: DType) -> Tol {
    if dtype == DType::F32 {
        Tol { sums: 1e-4, dh: 1e-4 }
    } else {
        Tol { sums: 3e-3, dh: 2.5e-2 }
    }
}

fn dt_name(dtype: DType) -> &'static str {
    if dtype == DType::F32 {
        "f32"
    } else {
        "bf16"
    }
}

/// Deterministic normal values (a sum of four uniforms), so a failing case reproduces.
fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let k = std / (4.0f32 / 3.0).sqrt();
    (0..n).map(|_| k * (0..4).map(|_| rng.random::<f32>() * 2.0 - 1.0).sum::<f32>()).collect()
}

/// The same values as a `dtype` tensor on `device` and as f32 on the CPU (rounded to
/// `dtype` first, so both sides see identical inputs).
fn pair(rows: usize, cols: usize, std: f32, seed: u64, dtype: DType, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let cpu = Tensor::from_vec(normal(rows * cols, std, seed), (rows, cols), &Device::Cpu)?.to_dtype(dtype)?;
    Ok((cpu.to_device(device)?, cpu.to_dtype(DType::F32)?))
}

/// `n` labels in [0, vs); with `masked`, a prompt-like run of masked rows at the start
/// and a few scattered ones, so chunks of labelled rows are both consecutive and not.
fn labels(n: usize, vs: usize, masked: bool, seed: u64) -> Vec<i64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let l = rng.random_range(0..vs as i64);
            if masked && (i < 6 || [20, 33, 34, n - 1].contains(&i)) {
                IGNORE_INDEX
            } else {
                l
            }
        })
        .collect()
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-12)
}

/// ‖got − want‖ / ‖want‖ over all elements, the count of non-finite elements of `got`,
/// and the largest |element| of `got` in rows whose label is masked (must be exactly 0).
fn dh_err(got: &Tensor, want: &Tensor, labels: &[i64]) -> anyhow::Result<(f64, usize, f64)> {
    if got.dims() != want.dims() {
        bail!("dh has shape {:?}, the reference {:?}", got.dims(), want.dims());
    }
    let g = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let w = want.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let (mut num, mut den, mut nonfinite, mut masked_max) = (0f64, 0f64, 0usize, 0f64);
    for (i, (gr, wr)) in g.iter().zip(&w).enumerate() {
        for (a, b) in gr.iter().zip(wr) {
            if !a.is_finite() {
                nonfinite += 1;
            }
            num += (a - b).powi(2);
            den += b * b;
            if labels[i] == IGNORE_INDEX {
                masked_max = masked_max.max(a.abs());
            }
        }
    }
    Ok(((num / den.max(f64::MIN_POSITIVE)).sqrt(), nonfinite, masked_max))
}

/// Errors of one output against the reference: (ce rel, kd rel, dh rel, description of
/// any hard failure: token count, NaN, non-zero masked rows).
fn compare(got: &LossOutput, want: &LossOutput, labels: &[i64], with_kd: bool) -> anyhow::Result<(f64, f64, f64, Option<String>)> {
    let (dh, nonfinite, masked_max) = dh_err(&got.dh, &want.dh, labels)?;
    let mut hard = Vec::new();
    if got.n_tokens != want.n_tokens {
        hard.push(format!("n_tokens {} != {}", got.n_tokens, want.n_tokens));
    }
    if nonfinite > 0 {
        hard.push(format!("{nonfinite} dh elements NaN/inf"));
    }
    if masked_max != 0.0 {
        hard.push(format!("masked rows of dh reach {masked_max:.2e}, not 0"));
    }
    if !got.ce_sum.is_finite() || !got.kd_sum.is_finite() {
        hard.push(format!("ce_sum {} kd_sum {} (a row left unwritten is NaN)", got.ce_sum, got.kd_sum));
    }
    let kd = if with_kd { rel(got.kd_sum, want.kd_sum) } else { got.kd_sum.abs() };
    Ok((rel(got.ce_sum, want.ce_sum), kd, dh, (!hard.is_empty()).then(|| hard.join(", "))))
}

struct Worst {
    ce: (f64, String),
    kd: (f64, String),
    dh: (f64, String),
    candle: [f64; 3],
    failures: Vec<String>,
    cases: usize,
}

impl Worst {
    fn new() -> Self {
        let z = || (0f64, String::new());
        Worst { ce: z(), kd: z(), dh: z(), candle: [0.0; 3], failures: Vec::new(), cases: 0 }
    }

    fn note(slot: &mut (f64, String), v: f64, case: &str) {
        if v >= slot.0 {
            *slot = (v, case.to_string());
        }
    }
}

/// One teacher form × divergence × temperature × dtype over every softcap, vocabulary and
/// masking combination.
fn loss_case(device: &Device, form: Form, kd: KdLoss, temperature: f64, dtype: DType, teacher_dtype: DType) -> LossCheck {
    let div = match (form, kd) {
        (Form::None, _) => "CE only".to_string(),
        (_, KdLoss::ForwardKl) => "forward KL".into(),
        (_, KdLoss::ReverseKl) => "reverse KL".into(),
        (_, KdLoss::Jsd { beta }) => format!("JSD beta={beta}"),
    };
    let teacher_note = if teacher_dtype != dtype { format!(" ({} teacher)", dt_name(teacher_dtype)) } else { String::new() };
    let name = format!("fused loss {} {form:?}{teacher_note} {div} T={temperature} vs CPU f32", dt_name(dtype));
    // A bf16 operand on either side sets the precision the comparison can expect.
    let low = if dtype == DType::F32 && teacher_dtype == DType::F32 { None } else { Some(DType::BF16) };
    let run = || -> anyhow::Result<(bool, String)> {
        let t = tol(low.unwrap_or(DType::F32));
        let mut w = Worst::new();
        let mut seed = 1000u64;
        let vocabs: &[(usize, usize)] = if form == Form::None { &VOCABS[..1] } else { &VOCABS };
        for &cap in &[false, true] {
            for &(vs, vt) in vocabs {
                for &masked in &[false, true] {
                    seed += 10;
                    let case = format!("cap={cap} Vs={vs} Vt={vt} masked={masked}");
                    // Logits of std ≈ 2 (student) and 3 (teacher): d·std(h)²·std(W)².
                    let (h, h32) = pair(N, D, 1.0, seed, dtype, device)?;
                    let (ws, ws32) = pair(vs, D, 0.25, seed + 1, dtype, device)?;
                    let lab = labels(N, vs, masked, seed + 2);
                    let (th, th32) = pair(N, D_TEACHER, 1.0, seed + 3, teacher_dtype, device)?;
                    let (tw, tw32) = pair(vt, D_TEACHER, 3.0 / (D_TEACHER as f32).sqrt(), seed + 4, teacher_dtype, device)?;
                    let (zt, zt32) = pair(N, vt, 3.0, seed + 5, teacher_dtype, device)?;
                    let t_cap = cap.then_some(TEACHER_CAP);
                    let (teacher, teacher32) = match form {
                        Form::None => (TeacherOutput::None, TeacherOutput::None),
                        Form::Logits => (TeacherOutput::Logits(&zt), TeacherOutput::Logits(&zt32)),
                        Form::Hidden => (
                            TeacherOutput::Hidden { h: &th, lm_head: &tw, softcap: t_cap },
                            TeacherOutput::Hidden { h: &th32, lm_head: &tw32, softcap: t_cap },
                        ),
                    };
                    let cfg = LossConfig {
                        ce_weight: 0.7,
                        kd_weight: 1.3,
                        kd,
                        temperature,
                        chunk_tokens: CHUNK,
                        student_softcap: cap.then_some(STUDENT_CAP),
                    };
                    let got = fused_linear_distill_cuda(&h, &ws, &lab, teacher, &cfg, GRAD_SCALE)?;
                    let want = fused_linear_distill(&h32, &ws32, &lab, teacher32, &cfg, GRAD_SCALE)?;
                    let with_kd = form != Form::None;
                    let (ce, kde, dh, hard) = compare(&got, &want, &lab, with_kd)?;
                    w.cases += 1;
                    Worst::note(&mut w.ce, ce, &case);
                    Worst::note(&mut w.kd, kde, &case);
                    Worst::note(&mut w.dh, dh, &case);
                    let mut bad = Vec::new();
                    if ce > t.sums {
                        bad.push(format!("ce_sum {} vs {} (rel {ce:.2e})", got.ce_sum, want.ce_sum));
                    }
                    if (with_kd && kde > t.sums) || (!with_kd && kde != 0.0) {
                        bad.push(format!("kd_sum {} vs {} (rel {kde:.2e})", got.kd_sum, want.kd_sum));
                    }
                    if dh > t.dh {
                        bad.push(format!("dh rel {dh:.2e}"));
                    }
                    bad.extend(hard);
                    if !bad.is_empty() {
                        w.failures.push(format!("[{case}: {}]", bad.join(", ")));
                    }
                    if low.is_some() {
                        let teacher = match form {
                            Form::None => TeacherOutput::None,
                            Form::Logits => TeacherOutput::Logits(&zt),
                            Form::Hidden => TeacherOutput::Hidden { h: &th, lm_head: &tw, softcap: t_cap },
                        };
                        let low = fused_linear_distill_reference(&h, &ws, &lab, teacher, &cfg, GRAD_SCALE)?;
                        let (c, k, d, _) = compare(&low, &want, &lab, with_kd)?;
                        w.candle = [w.candle[0].max(c), w.candle[1].max(k), w.candle[2].max(d)];
                    }
                }
            }
        }
        let pass = w.failures.is_empty();
        let mut detail = format!(
            "{} cases; worst ce_sum rel {:.2e} ({}), kd_sum {} {:.2e} ({}), dh rel {:.2e} ({}); tol sums {:.1e}, dh {:.1e}",
            w.cases,
            w.ce.0,
            w.ce.1,
            if form == Form::None { "abs" } else { "rel" },
            w.kd.0,
            w.kd.1,
            w.dh.0,
            w.dh.1,
            t.sums,
            t.dh
        );
        if low.is_some() {
            detail.push_str(&format!(
                "; candle path on the GPU, same dtypes: ce {:.2e}, kd {:.2e}, dh {:.2e}",
                w.candle[0],
                w.candle[1],
                w.candle[2]
            ));
        }
        if !pass {
            detail.push_str(&format!("; FAILED: {}", w.failures.join(" ")));
        }
        Ok((pass, detail))
    };
    (name, run())
}

/// Llama-3's vocabulary (128,256 = 8·16,032: vectors of 8, rows longer than one block
/// pass) with a `Hidden` teacher, forward KL at T = 1 and CE, bf16: the benchmark's
/// setting at 64 tokens and a hidden size of 128.
fn llama_vocab_case(device: &Device) -> LossCheck {
    let name = "fused loss bf16 Hidden forward KL T=1 V=128256 (Llama-3 vocabulary) vs CPU f32".to_string();
    let run = || -> anyhow::Result<(bool, String)> {
        let (n, d, v) = (64usize, 128usize, 128_256usize);
        let dt = DType::BF16;
        let (h, h32) = pair(n, d, 1.0, 1, dt, device)?;
        let (ws, ws32) = pair(v, d, 2.0 / (d as f32).sqrt(), 2, dt, device)?;
        let (th, th32) = pair(n, d, 1.0, 3, dt, device)?;
        let (tw, tw32) = pair(v, d, 3.0 / (d as f32).sqrt(), 4, dt, device)?;
        let lab = labels(n, v, true, 5);
        let cfg = LossConfig { ce_weight: 1.0, kd_weight: 1.0, kd: KdLoss::ForwardKl, temperature: 1.0, chunk_tokens: 24, student_softcap: None };
        let got = fused_linear_distill_cuda(&h, &ws, &lab, TeacherOutput::Hidden { h: &th, lm_head: &tw, softcap: None }, &cfg, 1.0 / n as f64)?;
        let want = fused_linear_distill(&h32, &ws32, &lab, TeacherOutput::Hidden { h: &th32, lm_head: &tw32, softcap: None }, &cfg, 1.0 / n as f64)?;
        let (ce, kd, dh, hard) = compare(&got, &want, &lab, true)?;
        let t = tol(dt);
        let pass = hard.is_none() && ce <= t.sums && kd <= t.sums && dh <= t.dh;
        let mut detail = format!(
            "ce_sum {:.6} vs {:.6} (rel {ce:.2e}), kd_sum {:.6} vs {:.6} (rel {kd:.2e}), dh rel {dh:.2e}; tol sums {:.1e}, dh {:.1e}",
            got.ce_sum, want.ce_sum, got.kd_sum, want.kd_sum, t.sums, t.dh
        );
        if let Some(h) = hard {
            detail.push_str(&format!("; FAILED: {h}"));
        }
        Ok((pass, detail))
    };
    (name, run())
}

/// `loss::fused_linear_distill` on CUDA takes the kernel path (bit-equal dh to a direct
/// call), and top-k teachers the candle path (bit-equal to the reference).
fn dispatch_check(device: &Device) -> anyhow::Result<(bool, String)> {
    let dt = DType::BF16;
    let (h, _) = pair(N, D, 1.0, 7, dt, device)?;
    let (ws, _) = pair(1024, D, 0.25, 8, dt, device)?;
    let (zt, _) = pair(N, 1024, 3.0, 9, dt, device)?;
    let lab = labels(N, 1024, true, 10);
    let cfg = LossConfig { ce_weight: 1.0, kd_weight: 1.0, kd: KdLoss::ForwardKl, temperature: 2.0, chunk_tokens: CHUNK, student_softcap: None };
    let bits = |t: &Tensor| -> anyhow::Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
    };
    let via = fused_linear_distill(&h, &ws, &lab, TeacherOutput::Logits(&zt), &cfg, 1.0)?;
    let on = qdistill_common::kernels::fused::enabled();
    let direct = if on {
        fused_linear_distill_cuda(&h, &ws, &lab, TeacherOutput::Logits(&zt), &cfg, 1.0)?
    } else {
        fused_linear_distill_reference(&h, &ws, &lab, TeacherOutput::Logits(&zt), &cfg, 1.0)?
    };
    let full_ok = bits(&via.dh)? == bits(&direct.dh)? && via.kd_sum == direct.kd_sum;
    let k = 5;
    let lp = Tensor::full(-3f32, (N, k), device)?;
    let ix: Vec<u32> = (0..N).flat_map(|r| (0..k as u32).map(move |j| (r as u32 * 7 + j * 13) % 1024)).collect();
    let ix = Tensor::from_vec(ix, (N, k), device)?;
    let topk = || TeacherOutput::TopK { logprobs: &lp, indices: &ix };
    let via_k = fused_linear_distill(&h, &ws, &lab, topk(), &cfg, 1.0)?;
    let ref_k = fused_linear_distill_reference(&h, &ws, &lab, topk(), &cfg, 1.0)?;
    let topk_ok = bits(&via_k.dh)? == bits(&ref_k.dh)?;
    if full_ok && topk_ok {
        let path = if on { "the kernel path" } else { "the candle path (QDISTILL_FUSED_KERNELS=0)" };
        Ok((true, format!("logits teacher: {path}, bit for bit; top-k teacher: the candle path, bit for bit")))
    } else {
        Err(anyhow!("dispatch differs from the expected path: logits teacher {}, top-k teacher {}", if full_ok { "ok" } else { "WRONG" }, if topk_ok { "ok" } else { "WRONG" }))
    }
}

/// Every teacher form × divergence × temperature in f32 and bf16, a bf16 student with an
/// f32 teacher, the Llama-3 vocabulary, and the dispatch.
pub fn loss_checks(device: &Device) -> Vec<LossCheck> {
    let (bf16, f32) = (DType::BF16, DType::F32);
    let mut rows = Vec::new();
    for dtype in [f32, bf16] {
        rows.push(loss_case(device, Form::None, KdLoss::ForwardKl, 1.0, dtype, dtype));
        for form in [Form::Logits, Form::Hidden] {
            for kd in [KdLoss::ForwardKl, KdLoss::ReverseKl, KdLoss::Jsd { beta: 0.5 }] {
                for temperature in [1.0, 2.0] {
                    rows.push(loss_case(device, form, kd, temperature, dtype, dtype));
                }
            }
        }
    }
    rows.push(loss_case(device, Form::Logits, KdLoss::Jsd { beta: 0.3 }, 2.0, bf16, f32));
    rows.push(loss_case(device, Form::Hidden, KdLoss::ReverseKl, 1.5, f32, bf16));
    rows.push(llama_vocab_case(device));
    rows.push(("fused loss: dispatch on CUDA".into(), dispatch_check(device)));
    rows
}
