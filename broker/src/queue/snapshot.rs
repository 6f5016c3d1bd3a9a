//! The persisted form of a `QueueState`. The format name carries its version;
//! a reader refuses any other version instead of guessing.

use super::state::QueueState;

const MAGIC_V1: &[u8; 8] = b"GNTSNAP1";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a Gantry snapshot_v1 (bad magic)")]
    BadMagic,
    #[error("corrupt snapshot_v1: {0}")]
    Corrupt(#[from] postcard::Error),
}

pub fn encode_snapshot_v1(state: &QueueState) -> Vec<u8> {
    postcard::to_extend(state, MAGIC_V1.to_vec()).expect("serializing the queue state into memory cannot fail")
}

pub fn decode_snapshot_v1(bytes: &[u8]) -> Result<QueueState, SnapshotError> {
    let body = bytes.strip_prefix(MAGIC_V1.as_slice()).ok_or(SnapshotError::BadMagic)?;
    Ok(postcard::from_bytes(body)?)
}
