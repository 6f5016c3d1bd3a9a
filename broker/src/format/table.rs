//! The storage formats, oldest first. A format is one monotonic number per
//! shard (its gate, in the replicated state): everything a shard writes or
//! sends, and every command it accepts, is allowed by it. A new command kind
//! or replicated field gets a new format here and declares it
//! ([`crate::queue::Command::min_format`]); nothing uses it before the
//! shard's format is raised, which happens only once every member runs a
//! binary that supports it. Rules: docs/compatibility.md.

/// One format: its number, and what it introduced (shown to operators).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatInfo {
    pub format: u32,
    pub introduced: &'static str,
}

/// Every format this binary knows, oldest first. Only ever appended to.
pub const FORMATS: &[FormatInfo] = &[
    FormatInfo {
        format: 0,
        introduced: "postcard encodings of log entries, snapshots and peer messages (before format gates existed)",
    },
    FormatInfo {
        format: 1,
        introduced: "protobuf encodings (gantry.storage.v1) on disk and between brokers; the format gate \
                     (SetFormat); Admin.DeleteQueue",
    },
    FormatInfo {
        format: 2,
        introduced: "pipelined replication: AppendEntries over one long-lived stream per follower and shard \
                     (PeerService.AppendStream)",
    },
];

/// The newest format this binary reads and writes.
pub const FORMAT_MAX: u32 = FORMATS[FORMATS.len() - 1].format;

/// The oldest format this binary still reads: a data directory or a peer
/// older than this must be upgraded through an intermediate release first.
pub const FORMAT_MIN_SUPPORTED: u32 = 0;

/// The release that introduced [`FORMAT_MAX`]; data of a newer format needs
/// a newer binary than this one.
pub const BINARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A feature whose commands are refused until the shard's format allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub format: u32,
}

pub const DELETE_QUEUE: Feature = Feature { name: "DeleteQueue", format: 1 };
/// Not a command: which peer protocol a shard's leader replicates with.
pub const APPEND_STREAM: Feature = Feature { name: "AppendStream", format: 2 };

pub fn describe(format: u32) -> &'static str {
    FORMATS.iter().find(|f| f.format == format).map_or("unknown to this gantry", |f| f.introduced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_numbered_in_order_from_zero() {
        for (n, info) in FORMATS.iter().enumerate() {
            assert_eq!(info.format, n as u32, "formats are only appended, never renumbered");
        }
        assert!(FORMATS.iter().any(|f| f.format == FORMAT_MIN_SUPPORTED));
    }
}
