//! The edge: tonic services for `Jobs`, `Worker` and `Admin`, the only
//! module that knows protobuf types. Validation and the mapping of errors to
//! `tonic::Status` happen here, once.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod forward;
pub mod jobs;
mod relay;
pub mod status;
pub mod validate;
pub mod worker;

/// Largest gRPC message accepted: a full batch of maximal payloads is refused
/// by validation with a clear message, not by the transport.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
