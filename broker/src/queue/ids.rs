//! Identifier newtypes. Job ids carry their shard so that any node can route a
//! job id to the Raft group that owns it.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A shard is one Raft group; its id is also the group id in storage keys.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `<shard>-<sequence>`: the sequence is allocated by the shard's state machine.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId {
    pub shard: ShardId,
    pub seq: u64,
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.shard.0, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job_id {0:?} is not a Gantry job id (expected <shard>-<sequence>, e.g. \"0-42\")")]
pub struct ParseJobIdError(pub String);

impl FromStr for JobId {
    type Err = ParseJobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseJobIdError(s.chars().take(64).collect());
        let (shard, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(shard) || !digits(seq) {
            return Err(bad());
        }
        Ok(JobId { shard: ShardId(shard.parse().map_err(|_| bad())?), seq: seq.parse().map_err(|_| bad())? })
    }
}

/// A worker session, named by the leader that opened it. Shared, not
/// copied: every lease, attempt record and event of the session holds it.
/// Encoded as the string it is (snapshots and log entries unchanged).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub std::sync::Arc<str>);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Made from the Raft log index of the entry that granted the lease and the
/// assignment's position inside that entry, so every assignment of a shard
/// gets a larger token than all earlier ones, on every replica.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// Positions inside one log entry; a batch never holds more assignments.
    pub const POSITION_BITS: u32 = 20;
    pub const MAX_POSITIONS: u64 = 1 << Self::POSITION_BITS;

    pub fn new(log_index: u64, position: u64) -> Self {
        assert!(position < Self::MAX_POSITIONS, "assignment position {position} overflows a fencing token");
        assert!(log_index < (1 << (64 - Self::POSITION_BITS)), "log index {log_index} overflows a fencing token");
        FencingToken((log_index << Self::POSITION_BITS) | position)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_and_rejects_garbage() {
        let id = JobId { shard: ShardId(3), seq: 17 };
        assert_eq!(id.to_string(), "3-17");
        assert_eq!("3-17".parse::<JobId>(), Ok(id));
        for bad in ["", "3", "-1", "3-", "a-1", "3-1-2", "3-+1", "99999999999-1"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn tokens_order_by_index_then_position() {
        assert!(FencingToken::new(5, 9) < FencingToken::new(6, 0));
        assert!(FencingToken::new(6, 0) < FencingToken::new(6, 1));
    }
}
