//! Operational errors of the broker (rejections are data, bugs are panics).

use crate::{config::ConfigError, raft::RaftError};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(String),
}
