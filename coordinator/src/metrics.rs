//! Prometheus metrics: the `/metrics` endpoint every qdistill process can serve
//! (coordinator, worker, embedded `train`), and the coordinator's job metrics.
//!
//! The coordinator's numbers are read from the job state when Prometheus scrapes, not
//! pushed from the RPC handlers: the state machine already holds every one of them, so
//! the handlers stay as they are and a scrape can never see a half-updated set.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use crate::CoordError;

/// The content type of the Prometheus text exposition format the endpoint serves.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `registry` in the Prometheus text format (version 0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a metric that breaks
    // the format's rules, which is a bug worth a loud scrape error rather than a panic.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        out = format!("# encoding the metrics failed: {e}\n");
    }
    out
}

/// An HTTP server answering `GET /metrics` on its own thread, so that it serves whatever
/// the process is doing (a blocking training loop, or a tokio runtime of its own).
/// Stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port) and serves `registry` there.
    pub fn start(addr: &str, registry: Registry) -> Result<Self, CoordError> {
        let io = |what: String| move |source| CoordError::Io { what, source };
        let listener = std::net::TcpListener::bind(addr).map_err(io(format!("binding the metrics listener on {addr}")))?;
        listener.set_nonblocking(true).map_err(io("metrics listener".into()))?;
        let local = listener.local_addr().map_err(io("metrics listener".into()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("the metrics server's runtime".into()))?;
        let registry = Arc::new(registry);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("qdistill-metrics".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("metrics server: {e}"),
                    };
                    let app = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(move || {
                            let registry = registry.clone();
                            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)) }
                        }),
                    );
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                        tracing::error!("metrics server: {e}");
                    }
                })
            })
            .map_err(io("the metrics server's thread".into()))?;
        tracing::info!(addr = %local, "serving Prometheus metrics at /metrics");
        Ok(Self { addr: local, stop: Some(stop), thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The coordinator's view of a job at one instant, as the metrics report it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobSnapshot {
    /// Optimizer steps committed by every student.
    pub committed_steps: u64,
    pub total_steps: u64,
    pub generation: u64,
    /// Workers holding a live lease.
    pub workers_alive: usize,
    /// The last committed step's loss and KD term, over all students' target tokens
    /// (None before the first commit).
    pub loss: Option<f64>,
    pub kd_loss: Option<f64>,
    /// Target tokens per second over the last committed steps, all students together.
    pub tokens_per_second: Option<f64>,
    /// Samples trained in committed steps, including steps a failed generation trained
    /// and that were trained again: what was computed, not what was kept.
    pub samples_done: u64,
    /// Seconds since the newest stored checkpoint was written.
    pub checkpoint_age_seconds: Option<f64>,
}

/// Reads a [`JobSnapshot`] at every scrape.
pub struct JobCollector {
    source: Box<dyn Fn() -> JobSnapshot + Send + Sync>,
}

impl JobCollector {
    pub fn new(source: impl Fn() -> JobSnapshot + Send + Sync + 'static) -> Self {
        Self { source: Box::new(source) }
    }
}

impl std::fmt::Debug for JobCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobCollector")
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for JobCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = (self.source)();
        gauge(&mut e, "qdistill_step", "Optimizer steps committed by every student", s.committed_steps as i64)?;
        gauge(&mut e, "qdistill_total_steps", "Optimizer steps the job takes", s.total_steps as i64)?;
        gauge(&mut e, "qdistill_generation", "The current generation (it grows each time the worker group is re-formed)", s.generation as i64)?;
        gauge(&mut e, "qdistill_workers_alive", "Workers registered with a live lease", s.workers_alive as i64)?;
        if let Some(v) = s.loss {
            gauge(&mut e, "qdistill_loss", "Training loss of the last committed step (ce_weight*CE + kd_weight*T^2*KD)", v)?;
        }
        if let Some(v) = s.kd_loss {
            gauge(&mut e, "qdistill_kd_loss", "Distillation term of the last committed step, per target token", v)?;
        }
        if let Some(v) = s.tokens_per_second {
            gauge(&mut e, "qdistill_tokens_per_second", "Target tokens per second over the last committed steps, all students", v)?;
        }
        let c = ConstCounter::new(s.samples_done);
        c.encode(e.encode_descriptor("qdistill_samples_done", "Samples trained in committed steps", None, c.metric_type())?)?;
        if let Some(v) = s.checkpoint_age_seconds {
            gauge(&mut e, "qdistill_checkpoint_age_seconds", "Seconds since the newest checkpoint was stored", v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_values_are_left_out_and_counters_get_the_total_suffix() {
        let mut r = Registry::default();
        r.register_collector(Box::new(JobCollector::new(|| JobSnapshot { committed_steps: 3, samples_done: 12, ..Default::default() })));
        let text = render(&r);
        assert!(text.lines().any(|l| l == "qdistill_step 3"), "{text}");
        assert!(text.lines().any(|l| l == "qdistill_samples_done_total 12"), "{text}");
        assert!(!text.contains("qdistill_loss"), "no loss before the first commit:\n{text}");
        assert!(!text.contains("qdistill_checkpoint_age_seconds"), "{text}");
    }
}
