//! Compiles `gantry/v1/*.proto` (and the internal `gantry/peer/v1`) with protox (pure Rust, so no `protoc` has to
//! be installed) and writes the descriptor set that server reflection serves.
use std::{env, path::PathBuf};

use protox::prost::Message as _;

const PROTOS: &[&str] =
    &["gantry/v1/job.proto", "gantry/v1/jobs.proto", "gantry/v1/worker.proto", "gantry/v1/admin.proto"];
/// Broker-to-broker only: compiled, but not advertised by client-port reflection.
const INTERNAL_PROTOS: &[&str] = &["gantry/peer/v1/peer.proto", "gantry/storage/v1/storage.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let public = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("gantry_descriptor.bin"), public.encode_to_vec())?;
    let descriptors = protox::compile(PROTOS.iter().chain(INTERNAL_PROTOS), ["."])?;
    // `Worker.Connect` is part of the contract, and tonic's generated
    // `XClient::connect(endpoint)` constructor would clash with the RPC method:
    // clients are built with `XClient::new(channel)` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .build_client(true)
        .build_server(true)
        // Stored bytes must not depend on a hash map's order: replicas digest
        // their state's encoding and compare.
        .btree_map(".gantry.storage")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=gantry");
    Ok(())
}
