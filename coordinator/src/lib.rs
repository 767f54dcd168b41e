//! qdistill-coordinator: decides who does what in a cluster run. The pure logic (topology,
//! shard plan, job state machine with leases and generations, checkpoint store) lives in
//! plain types that tests drive without a network; the gRPC service wraps them.

pub mod client;
pub mod convert;
pub mod metrics;
pub mod plan;
pub mod service;
pub mod state;
pub mod store;

pub use client::{status_with, Client};
pub use service::{generate_token, job_spec, serve, start, CoordinatorHandle, Outcome, RunningCoordinator, ServeOptions};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("gRPC server: {0}")]
    Transport(String),
    /// A call to the coordinator at `url` failed.
    #[error("coordinator {url}: {msg}")]
    Rpc { url: String, msg: String },
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
