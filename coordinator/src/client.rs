//! Calling the coordinator: connecting with bounded retries, the job token on every call,
//! and `qdistill status`.

use std::path::PathBuf;
use std::time::Duration;

use qdistill_proto::v1 as pb;
use qdistill_proto::v1::coordinator_client::CoordinatorClient;
use qdistill_proto::TOKEN_METADATA_KEY;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::CoordError;

/// Adds `x-qdistill-token` to every call.
#[derive(Clone)]
pub struct AddToken(MetadataValue<Ascii>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(TOKEN_METADATA_KEY, self.0.clone());
        Ok(req)
    }
}

/// How hard to try reaching the coordinator.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Per-call deadline. Generous: it covers a whole checkpoint upload; liveness is the
    /// heartbeat's business, not this.
    pub timeout: Duration,
    /// How long a call keeps retrying a coordinator that does not answer (it may be
    /// restarting), after the first `attempts` tries.
    pub retry_for: Duration,
    /// PEM file of the CA that signed the coordinator's certificate; required for
    /// `https://` URLs.
    pub tls_ca: Option<PathBuf>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            attempts: 8,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(900),
            retry_for: Duration::from_secs(120),
            tls_ca: None,
        }
    }
}

/// Delay before attempt `n` (0-based) with exponential backoff: initial · 2ⁿ, capped.
pub fn backoff(opts: &ConnectOptions, n: u32) -> Duration {
    opts.initial_backoff.saturating_mul(1u32 << n.min(20)).min(opts.max_backoff)
}

pub type Raw = CoordinatorClient<InterceptedService<Channel, AddToken>>;

/// A connection to the coordinator at `url`.
#[derive(Clone)]
pub struct Client {
    url: String,
    raw: Raw,
}

impl Client {
    /// Connects, retrying `opts.attempts` times with exponential backoff. The error names
    /// the URL and the last cause.
    pub async fn connect(url: &str, token: &str, opts: &ConnectOptions) -> Result<Self, CoordError> {
        let err = |msg: String| CoordError::Rpc { url: url.to_string(), msg };
        let token: MetadataValue<Ascii> =
            token.parse().map_err(|_| err("the job token must be printable ASCII".into()))?;
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| err(format!("not a valid URL ({e}); expected e.g. http://host:50051")))?
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.timeout)
            .tcp_nodelay(true);
        let endpoint = with_tls(endpoint, url, opts).map_err(err)?;
        let attempts = opts.attempts.max(1);
        let mut last = String::new();
        for n in 0..attempts {
            match endpoint.connect().await {
                Ok(channel) => {
                    let raw = CoordinatorClient::with_interceptor(channel, AddToken(token))
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20);
                    return Ok(Self { url: url.to_string(), raw });
                }
                Err(e) => {
                    last = source_chain(&e);
                    // A certificate the CA does not vouch for stays so: say what failed
                    // at once instead of retrying it.
                    if is_tls_failure(&last) {
                        return Err(err(format!("TLS handshake failed: {last}")));
                    }
                    if n + 1 < attempts {
                        let d = backoff(opts, n);
                        tracing::warn!(url, attempt = n + 1, "coordinator unreachable ({last}); retrying in {d:?}");
                        tokio::time::sleep(d).await;
                    }
                }
            }
        }
        Err(err(format!("unreachable after {attempts} attempt(s): {last}")))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The generated client, for calls this type does not wrap.
    pub fn raw(&mut self) -> &mut Raw {
        &mut self.raw
    }

    /// Wraps a failed call into an error naming the coordinator.
    pub fn error(&self, s: Status) -> CoordError {
        let mut msg = format!("{}: {}", code_name(s.code()), s.message());
        // A TLS server answers a plaintext HTTP/2 preface with bytes that break the
        // connection, which reaches the caller as nothing more than a protocol error.
        // Depending on timing the same shows as a cancelled call, a reset connection, or
        // (after retries, cancelled calls being retried) a bare transport error: any
        // status the client's transport made (it carries the cause as its source; the
        // coordinator's own answers do not), and the messages seen for it.
        let broken = ["h2 protocol error", "operation was canceled", "connection reset", "connection closed", "transport error"];
        let transport = std::error::Error::source(&s).is_some() || broken.iter().any(|b| s.message().contains(b));
        if self.url.starts_with("http://") && transport {
            msg.push_str(" (if the coordinator serves TLS, use an https:// URL and --tls-ca)");
        }
        CoordError::Rpc { url: self.url.clone(), msg }
    }

    pub async fn job_status(&mut self) -> Result<pb::JobStatusResponse, CoordError> {
        match self.raw.job_status(pb::JobStatusRequest {}).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.error(s)),
        }
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid argument",
        DeadlineExceeded => "deadline exceeded",
        NotFound => "not found",
        AlreadyExists => "already exists",
        PermissionDenied => "permission denied",
        ResourceExhausted => "resource exhausted",
        FailedPrecondition => "refused",
        Aborted => "aborted",
        OutOfRange => "out of range",
        Unimplemented => "unimplemented",
        Internal => "internal error",
        Unavailable => "unavailable",
        DataLoss => "data loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Configures TLS for `https://` URLs with the CA of `opts.tls_ca`.
fn with_tls(endpoint: Endpoint, url: &str, opts: &ConnectOptions) -> Result<Endpoint, String> {
    let https = url.starts_with("https://");
    match (&opts.tls_ca, https) {
        (None, false) => Ok(endpoint),
        (Some(ca), false) => Err(format!("a TLS CA ({}) was given, but the URL is not https://", ca.display())),
        (None, true) => Err("https:// needs the CA that signed the coordinator's certificate (--tls-ca FILE.pem)".into()),
        (Some(ca), true) => {
            let pem = std::fs::read(ca).map_err(|e| format!("reading the TLS CA {}: {e}", ca.display()))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!("the TLS CA {} holds no PEM certificate", ca.display()));
            }
            endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))).map_err(|e| format!("TLS CA {}: {}", ca.display(), source_chain(&e)))
        }
    }
}

/// Whether a connection error is the TLS handshake failing (rather than the coordinator
/// being away): rustls names certificate problems, and a plaintext server answers a
/// ClientHello with bytes that are no TLS record.
fn is_tls_failure(chain: &str) -> bool {
    ["invalid peer certificate", "InvalidCertificate", "received corrupt message", "InvalidContentType", "HTTP/2 was not negotiated"]
        .iter()
        .any(|m| chain.contains(m))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Wrappers often repeat their source's text; say it once.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// `qdistill status`: the job's state, one line per worker, over a connection made with
/// `opts` (a TLS CA, retries). Blocks.
pub fn status_with(url: &str, token: &str, opts: &ConnectOptions) -> Result<String, CoordError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CoordError::Io { what: "tokio runtime".into(), source: e })?;
    rt.block_on(async {
        let mut c = Client::connect(url, token, opts).await?;
        Ok(format_status(&c.job_status().await?))
    })
}

pub fn format_status(s: &pb::JobStatusResponse) -> String {
    let state = pb::JobState::try_from(s.state).map_or("?", |st| st.as_str_name());
    let mut out = format!(
        "job {} · {} · generation {} · {}/{} steps committed · last checkpoint {}\n{}\n",
        s.job_id,
        state.trim_start_matches("JOB_STATE_").to_lowercase(),
        s.generation,
        s.committed_steps,
        s.total_steps,
        s.last_checkpoint_step.map_or("none".to_string(), |c| format!("checkpoint-{c}")),
        s.message
    );
    for (g, why) in s.ended_generations.iter().enumerate() {
        out.push_str(&format!("  generation {} ended: {why}\n", g + 1));
    }
    for w in &s.workers {
        let role = pb::Role::try_from(w.role).map_or("?", |r| r.as_str_name()).trim_start_matches("ROLE_").to_lowercase();
        let role = if role == "unspecified" { "waiting".to_string() } else { format!("{role} rank {}", w.rank) };
        out.push_str(&format!("  {:<24} {:<16} step {:<6} seen {} ms ago\n", w.worker_name, role, w.step, w.last_seen_ms_ago));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = ConnectOptions { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(700), ..Default::default() };
        let d: Vec<u128> = (0..6).map(|n| backoff(&o, n).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 700, 700, 700]);
        assert_eq!(backoff(&o, 1000), Duration::from_millis(700), "huge attempt counts do not overflow");
    }
}
