//! End-to-end tests of Gantry over its public gRPC API: brokers in-process
//! or as the real binary, the Rust SDK, raw streams, grpcurl and the CLI.

mod catastrophes;
mod durability;
mod inputs;
mod interop;
mod lifecycle;
mod logs;
mod metrics;
mod protocol;
mod python;
mod security;
