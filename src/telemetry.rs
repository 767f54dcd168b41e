//! Logs and traces. Logs go to stderr (RUST_LOG). When OTEL_EXPORTER_OTLP_ENDPOINT is set,
//! the per-step phase spans (target [`PHASE_TARGET`]) are also exported over OTLP/gRPC;
//! when it is not, no exporter exists and the phase spans are disabled where they are
//! created, since no layer asks for them.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use qdistill_worker::metrics::PHASE_TARGET;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

/// The variable that switches trace export on (the OpenTelemetry SDKs' standard one).
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The OTLP/gRPC endpoint to export to, if the environment names one.
pub fn otlp_endpoint() -> Option<String> {
    std::env::var(OTLP_ENDPOINT_VAR).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// A trace exporter and what it needs to keep running. Dropping it flushes the spans
/// not sent yet.
pub struct Exporter {
    provider: SdkTracerProvider,
    endpoint: String,
    /// The tonic channel's connection runs here: the SDK's batch thread drives exports
    /// with a plain executor, which cannot do network I/O itself.
    _runtime: tokio::runtime::Runtime,
}

impl Exporter {
    fn new(endpoint: &str, service_name: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("qdistill-otlp")
            .enable_all()
            .build()
            .context("starting the OTLP exporter's runtime")?;
        let exporter = {
            let _in_runtime = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("building the OTLP span exporter for {OTLP_ENDPOINT_VAR}={endpoint}"))?
        };
        // OTEL_SERVICE_NAME, when set, names the service; the resource builder reads it.
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.to_string());
        }
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
        Ok(Self { provider, endpoint: endpoint.to_string(), _runtime: runtime })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: flushing traces to {}: {e}", self.endpoint);
        }
    }
}

/// The log filter: RUST_LOG (default info), never the phase spans, which are for the
/// trace exporter and would otherwise prefix every log line inside a step.
fn log_filter() -> EnvFilter {
    let base = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    base.add_directive(format!("{PHASE_TARGET}=off").parse().expect("a static directive"))
}

/// The subscriber: stderr logs, plus the OTLP layer for the phase spans when `endpoint`
/// is given. Without it the subscriber has no second layer at all: an absent (`None`)
/// layer would declare interest in every call site and so keep the phase spans alive.
pub fn subscriber(endpoint: Option<&str>, service_name: &str) -> anyhow::Result<(Box<dyn tracing::Subscriber + Send + Sync>, Option<Exporter>)> {
    // Colours only on a terminal: container logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_target(false).with_filter(log_filter());
    let exporter = endpoint.map(|e| Exporter::new(e, service_name)).transpose()?;
    let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match &exporter {
        Some(x) => {
            let traces = tracing_opentelemetry::layer()
                .with_tracer(x.provider.tracer("qdistill"))
                .with_filter(Targets::new().with_target(PHASE_TARGET, tracing::Level::INFO));
            Box::new(Registry::default().with(logs).with(traces))
        }
        None => Box::new(Registry::default().with(logs)),
    };
    Ok((subscriber, exporter))
}

/// Installs the process's subscriber; keep the returned exporter alive until exit.
pub fn init(service_name: &str) -> anyhow::Result<Option<Exporter>> {
    let (subscriber, exporter) = subscriber(otlp_endpoint().as_deref(), service_name)?;
    subscriber.try_init().context("installing the log subscriber")?;
    if let Some(x) = &exporter {
        tracing::info!(endpoint = x.endpoint(), "exporting step-phase traces over OTLP");
    }
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase_span_enabled(endpoint: Option<&str>) -> bool {
        let (subscriber, exporter) = subscriber(endpoint, "test").unwrap();
        assert_eq!(exporter.is_some(), endpoint.is_some());
        let enabled = tracing::subscriber::with_default(subscriber, || !tracing::info_span!(target: PHASE_TARGET, "data").is_disabled());
        drop(exporter);
        enabled
    }

    /// Without an endpoint nothing subscribes to the phase spans, so creating one is a
    /// disabled no-op; with one, the OTLP layer takes them (the channel connects lazily,
    /// so no collector is needed for this).
    #[test]
    fn phase_spans_exist_only_with_an_exporter() {
        assert!(!phase_span_enabled(None));
        assert!(phase_span_enabled(Some("http://127.0.0.1:9")));
    }
}
