//! The edge: tonic services for `Jobs`, `Worker` and `Admin`, the only
//! module that knows protobuf types. Validation and the mapping of errors to
//! `tonic::Status` happen here, once.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod forward;
pub mod jobs;
pub mod status;
pub mod validate;
pub mod worker;
