//! Gantry's public gRPC API, generated from `proto/gantry/v1/*.proto`.
//!
//! The `.proto` files are the contract shared with clients in every language;
//! this crate only compiles them for Rust (the broker and the worker SDK).

#![allow(clippy::all, clippy::pedantic)]

/// Package `gantry.v1`: services `Jobs`, `Worker`, `Admin` and their messages.
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

/// The internal packages, nested as their names are: generated code of one
/// refers to the other's types by relative paths.
pub mod internal {
    pub mod gantry {
        pub mod peer {
            pub mod v1 {
                tonic::include_proto!("gantry.peer.v1");
            }
        }
        pub mod storage {
            pub mod v1 {
                tonic::include_proto!("gantry.storage.v1");
            }
        }
    }
}

/// Package `gantry.peer.v1`: broker-to-broker Raft transport. Internal.
pub use internal::gantry::peer::v1 as peer;
/// Package `gantry.storage.v1`: what a broker writes to its data directory
/// (log entries, snapshots, the data-directory header). Internal.
pub use internal::gantry::storage::v1 as storage;

/// Encoded `FileDescriptorSet` of every Gantry proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gantry_descriptor");

pub use prost_types;
