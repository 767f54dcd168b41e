//! The qdistill cluster protocol: gRPC service `distill.v1.Coordinator` and its messages,
//! generated from proto/distill/v1/coordinator.proto.

pub mod v1 {
    tonic::include_proto!("distill.v1");
}

/// The protocol version this build speaks. Register refuses a worker that speaks another.
/// Bump it whenever a change makes old workers and new coordinators (or the reverse)
/// misunderstand each other, even if the wire format still parses.
pub const PROTOCOL_VERSION: u32 = 1;

/// gRPC metadata key that carries the job's shared secret on every Coordinator call.
pub const TOKEN_METADATA_KEY: &str = "x-qdistill-token";
