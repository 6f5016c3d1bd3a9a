//! Node configuration: one `Config`, filled from defaults, an optional TOML
//! file (`--config`), environment variables `GANTRY_<NAME>` and flags, in
//! rising precedence. Keys are kebab-case, the same as the flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// This node's Raft id (default 1).
    pub node_id: u64,
    /// Raft log (`raft/`) and snapshots (`snapshots/<shard>/`); default `./gantry-data`.
    pub data_dir: PathBuf,
    /// Client gRPC address (default `127.0.0.1:50051`).
    pub listen: SocketAddr,
    /// Address clients and peers are told to use for this node (default: `listen`).
    pub advertise: Option<String>,
    /// Number of shards (Raft groups) of a new cluster (default 1).
    pub shards: u32,
    /// How often workers must send something (default 1s).
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// A worker silent this long loses its jobs (default 10s).
    #[serde(with = "humantime_serde_compat")]
    pub session_ttl: Duration,
    /// Raft election timeout (default 1s); Raft heartbeats go every tenth of it.
    #[serde(with = "humantime_serde_compat")]
    pub election_timeout: Duration,
    /// Largest job payload in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Take a Raft snapshot after this many applied commands (default 1000000);
    /// the log behind it is purged. Fewer means faster restarts and more
    /// frequent pauses while the state is written out.
    pub snapshot_every: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./gantry-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            advertise: None,
            shards: 1,
            heartbeat_interval: Duration::from_secs(1),
            session_ttl: Duration::from_secs(10),
            election_timeout: Duration::from_secs(1),
            max_payload_bytes: 1 << 20,
            snapshot_every: 1_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

impl Config {
    pub fn from_toml_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let file_error = |message: String| ConfigError::File { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        toml::from_str(&text).map_err(|e| file_error(e.to_string()))
    }

    /// Checks fields against each other; the broker refuses to start otherwise.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node-id", "must be at least 1"));
        }
        if self.shards != 1 {
            return Err(invalid(
                "shards",
                format!("{} requested, but this version runs exactly 1 shard per cluster", self.shards),
            ));
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return Err(invalid("heartbeat-interval", "must be at least 10ms"));
        }
        if self.session_ttl < self.heartbeat_interval * 2 {
            return Err(invalid(
                "session-ttl",
                format!(
                    "{:?} must be at least twice heartbeat-interval ({:?}), or one late heartbeat kills a session",
                    self.session_ttl, self.heartbeat_interval
                ),
            ));
        }
        if self.election_timeout < Duration::from_millis(50) {
            return Err(invalid("election-timeout", "must be at least 50ms"));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 64 << 20 {
            return Err(invalid("max-payload-bytes", "must be between 1 byte and 64 MiB"));
        }
        if self.snapshot_every == 0 {
            return Err(invalid("snapshot-every", "must be at least 1"));
        }
        Ok(())
    }

    pub fn advertise_address(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

/// Durations in config files are written like flags: `500ms`, `10s`, `5m`.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.session_ttl, Duration::from_secs(10));
    }

    #[test]
    fn ttl_must_outlast_two_heartbeats() {
        let c = Config {
            heartbeat_interval: Duration::from_secs(1),
            session_ttl: Duration::from_millis(1500),
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "session-ttl", .. })));
    }

    #[test]
    fn toml_uses_kebab_case_and_human_durations() {
        let c: Config = toml::from_str("node-id = 3\nsession-ttl = \"2s\"\nheartbeat-interval = \"200ms\"\n").unwrap();
        assert_eq!(
            (c.node_id, c.session_ttl, c.heartbeat_interval),
            (3, Duration::from_secs(2), Duration::from_millis(200))
        );
        assert!(toml::from_str::<Config>("sesion-ttl = \"2s\"").is_err(), "typos are refused");
    }
}
