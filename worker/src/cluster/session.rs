//! A worker's registration with the coordinator: calls with bounded retries, the
//! heartbeat task that renews the lease, and the flags it raises for the role loop.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use qdistill_common::collective::AbortHandle;
use qdistill_coordinator::client::{backoff, Client, ConnectOptions, Raw};
use qdistill_coordinator::convert;
use qdistill_coordinator::plan::Resources;
use qdistill_coordinator::service::REFUSAL_METADATA_KEY;
use qdistill_coordinator::state::Assignment;
use qdistill_proto::v1 as pb;
use qdistill_proto::PROTOCOL_VERSION;
use tonic::{Code, Response, Status};

/// The RPC runtime and connection. Training runs on the caller's thread; calls block it
/// on this runtime, whose own threads keep the heartbeat going meanwhile.
pub(crate) struct Rpc {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    pub connect: ConnectOptions,
}

/// Codes worth retrying: the coordinator is restarting or the network blinked. The
/// coordinator never cancels a call itself, so a Cancelled status is the transport's: a
/// call cut by a coordinator that died mid-call ("operation was canceled", or a connection
/// error), which its restarted successor answers.
pub(crate) fn transient(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
}

impl Rpc {
    /// A unary call, retried with backoff while the coordinator is unreachable: at least
    /// `attempts` tries, and on for `retry_for` (a coordinator restart takes seconds;
    /// the restarted one then answers with an unknown session, and the worker registers
    /// again).
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(Raw) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut n = 0;
        let started = Instant::now();
        loop {
            let mut c = self.client.clone();
            match self.rt.block_on(f(c.raw().clone())) {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if transient(&s) && (n + 1 < self.connect.attempts || started.elapsed() < self.connect.retry_for) => {
                    let d = backoff(&self.connect, n);
                    tracing::warn!("coordinator {}: {}; retrying in {d:?}", self.client.url(), s.message());
                    std::thread::sleep(d);
                    n += 1;
                }
                Err(s) => return Err(s),
            }
        }
    }

    pub fn error(&self, s: Status) -> anyhow::Error {
        self.client.error(s).into()
    }
}

/// What the heartbeat task tells the role loop, and what the role loop tells it.
pub(crate) struct Shared {
    pub generation: AtomicU64,
    pub step: AtomicU64,
    /// The generation is over for this worker: register again.
    pub reregister: AtomicBool,
    /// The job is over.
    pub stop: AtomicBool,
    /// SIGTERM or Ctrl-C arrived.
    pub term: Arc<AtomicBool>,
    abort: Mutex<Option<AbortHandle>>,
    /// More ways to unblock the role (NCCL communicators), alongside `abort`.
    more_aborts: Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>,
    message: Mutex<String>,
}

impl Shared {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn message(&self) -> String {
        Self::lock(&self.message).clone()
    }
    fn set_message(&self, m: String) {
        *Self::lock(&self.message) = m;
    }
    /// Lets the heartbeat task unblock the role's collective calls.
    pub fn set_abort(&self, h: AbortHandle) {
        let aborted = self.reregister.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst);
        if aborted {
            h.abort();
        }
        *Self::lock(&self.abort) = Some(h);
    }
    /// Like [`Shared::set_abort`], for anything else the role may block on.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn add_abort(&self, f: impl Fn() + Send + Sync + 'static) {
        if self.reregister.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
            f();
        }
        Self::lock(&self.more_aborts).push(Arc::new(f));
    }
    pub fn clear_abort(&self) {
        *Self::lock(&self.abort) = None;
        Self::lock(&self.more_aborts).clear();
    }
    fn abort_now(&self) {
        if let Some(h) = Self::lock(&self.abort).as_ref() {
            h.abort();
        }
        // Each on a thread of its own: aborting one NCCL communicator can wait for the
        // device, which another communicator's hung kernel keeps busy until it is aborted.
        for f in Self::lock(&self.more_aborts).iter() {
            let f = f.clone();
            std::thread::spawn(move || f());
        }
    }
}

pub(crate) enum RegisterError {
    JobOver(String),
    Other(anyhow::Error),
}

pub(crate) enum Next {
    Assigned(Assignment, String),
    Stop(String),
    Reregister,
    Terminated,
}

/// One registration: its id, lease, and heartbeat task.
pub(crate) struct Session {
    pub id: String,
    pub shared: Arc<Shared>,
    pub heartbeat_interval: Duration,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// A flag raised by SIGTERM / Ctrl-C.
pub(crate) fn install_signal_flag(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    rt.spawn(async move {
        qdistill_coordinator::shutdown_signal().await;
        tracing::warn!("signal received: finishing the current step, saving, and leaving");
        f.store(true, Ordering::SeqCst);
    });
    flag
}

impl Session {
    pub fn register(
        rpc: &Rpc,
        name: &str,
        resources: &Resources,
        advertise: &str,
        previous: Option<String>,
        term: Arc<AtomicBool>,
    ) -> Result<Self, RegisterError> {
        let req = pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            worker_name: name.to_string(),
            resources: Some(convert::resources(resources)),
            collective_addr: advertise.to_string(),
            previous_session_id: previous.unwrap_or_default(),
        };
        let r = match rpc.call(|mut c| {
            let req = req.clone();
            async move { c.register(req).await }
        }) {
            Ok(r) => r,
            Err(s) if s.metadata().get(REFUSAL_METADATA_KEY).is_some_and(|v| v == "job-over") => {
                return Err(RegisterError::JobOver(s.message().to_string()))
            }
            Err(s) => return Err(RegisterError::Other(rpc.error(s))),
        };
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(RegisterError::Other(anyhow!(
                "coordinator {} speaks protocol version {}, this worker {PROTOCOL_VERSION}",
                rpc.client.url(),
                r.protocol_version
            )));
        }
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            step: AtomicU64::new(0),
            reregister: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            term,
            abort: Mutex::new(None),
            more_aborts: Mutex::new(Vec::new()),
            message: Mutex::new(String::new()),
        });
        let heartbeat_interval = Duration::from_millis(r.heartbeat_interval_ms.max(10) as u64);
        let lease = Duration::from_millis(r.lease_ms.max(10) as u64);
        let heartbeat = rpc.rt.spawn(heartbeat_loop(rpc.client.clone(), r.session_id.clone(), heartbeat_interval, lease, shared.clone()));
        Ok(Self { id: r.session_id, shared, heartbeat_interval, heartbeat })
    }

    /// Polls GetWork until there is an assignment (or a reason to stop).
    pub fn wait_for_work(&self, rpc: &Rpc) -> anyhow::Result<Next> {
        loop {
            if self.shared.term.load(Ordering::SeqCst) {
                return Ok(Next::Terminated);
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                return Ok(Next::Stop(self.shared.message()));
            }
            if self.shared.reregister.load(Ordering::SeqCst) {
                return Ok(Next::Reregister);
            }
            let req = pb::GetWorkRequest { session_id: self.id.clone() };
            let w = match rpc.call(|mut c| {
                let req = req.clone();
                async move { c.get_work(req).await }
            }) {
                Ok(w) => w,
                Err(s) if s.code() == Code::NotFound => return Ok(Next::Reregister),
                Err(s) => return Err(rpc.error(s)),
            };
            match w.work {
                Some(pb::get_work_response::Work::Assignment(a)) => {
                    let (a, cfg) = convert::assignment_from(a).map_err(|e| anyhow!("coordinator {}: malformed assignment: {e}", rpc.client.url()))?;
                    return Ok(Next::Assigned(a, cfg));
                }
                Some(pb::get_work_response::Work::Stop(s)) => return Ok(Next::Stop(s.reason)),
                Some(pb::get_work_response::Work::Wait(w)) => {
                    tracing::debug!("waiting: {}", w.reason);
                    std::thread::sleep(Duration::from_millis(w.retry_after_ms.clamp(10, 5000) as u64));
                }
                None => return Err(anyhow!("coordinator {}: GetWork answered nothing", rpc.client.url())),
            }
        }
    }

    /// After this worker's part is done: wait until the coordinator says the job is over
    /// (or that the generation broke first).
    pub fn wait_for_end(&self) -> Next {
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Next::Stop(self.shared.message());
            }
            if self.shared.reregister.load(Ordering::SeqCst) {
                return Next::Reregister;
            }
            if self.shared.term.load(Ordering::SeqCst) {
                return Next::Terminated;
            }
            std::thread::sleep(self.heartbeat_interval.min(Duration::from_millis(200)));
        }
    }
}

async fn heartbeat_loop(client: Client, session_id: String, interval: Duration, lease: Duration, shared: Arc<Shared>) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        let req = pb::HeartbeatRequest {
            session_id: session_id.clone(),
            generation: shared.generation.load(Ordering::SeqCst),
            step: shared.step.load(Ordering::SeqCst),
        };
        let mut c = client.clone();
        match tokio::time::timeout(lease, c.raw().heartbeat(req)).await {
            Ok(Ok(r)) => {
                last_ok = Instant::now();
                let r = r.into_inner();
                match pb::HeartbeatAction::try_from(r.action) {
                    Ok(pb::HeartbeatAction::Reregister) => {
                        shared.set_message(r.message);
                        shared.reregister.store(true, Ordering::SeqCst);
                        shared.abort_now();
                        return;
                    }
                    Ok(pb::HeartbeatAction::Stop) => {
                        shared.set_message(r.message);
                        shared.stop.store(true, Ordering::SeqCst);
                        shared.abort_now();
                        return;
                    }
                    _ => {}
                }
            }
            Ok(Err(s)) if s.code() == Code::NotFound => {
                shared.set_message(s.message().to_string());
                shared.reregister.store(true, Ordering::SeqCst);
                shared.abort_now();
                return;
            }
            failed => {
                if last_ok.elapsed() > lease {
                    let why = match failed {
                        Ok(Err(s)) => s.message().to_string(),
                        _ => "no answer".to_string(),
                    };
                    shared.set_message(format!("coordinator {} unreachable for {:?} ({why})", client.url(), last_ok.elapsed()));
                    shared.reregister.store(true, Ordering::SeqCst);
                    shared.abort_now();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_cut_by_the_transport_are_retried_and_refusals_are_not() {
        for s in [
            Status::unavailable("tcp connect error: Connection refused"),
            Status::unknown("h2 protocol error"),
            Status::cancelled("operation was canceled"),
            Status::cancelled("connection reset"),
        ] {
            assert!(transient(&s), "{s:?} should be retried");
        }
        for s in [
            Status::unauthenticated("bad token"),
            Status::failed_precondition("the job is over"),
            Status::invalid_argument("protocol version"),
            Status::not_found("unknown session"),
        ] {
            assert!(!transient(&s), "{s:?} should not be retried");
        }
    }
}
