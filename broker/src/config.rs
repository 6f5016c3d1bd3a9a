//! Node configuration: one `Config`, filled from defaults, an optional TOML
//! file (`--config`), environment variables `GANTRY_<NAME>` and flags, in
//! rising precedence. Keys are kebab-case, the same as the flags.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

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
    /// Address clients are told to use for this node (default: `listen`).
    pub advertise: Option<String>,
    /// Peer gRPC address: Raft traffic and calls forwarded to the leader
    /// (default `127.0.0.1:50052`).
    pub peer_listen: SocketAddr,
    /// Address other nodes use to reach this node's peer port (default:
    /// `peer-listen`).
    pub peer_advertise: Option<String>,
    /// The voters of a new cluster, `id=peer-host:port,...` (their peer
    /// addresses). Empty: a single-node cluster of this node. Read only
    /// when the cluster is created; later changes go through AddNode.
    #[serde(with = "initial_cluster_text")]
    pub initial_cluster: InitialCluster,
    /// Client addresses of a running cluster this node should join (with
    /// AddNode) if it is not a member yet, e.g. after a scale-up.
    pub join: Vec<String>,
    /// Number of shards (Raft groups) of a new cluster (default 1). Fixed
    /// when the cluster is created: the data directory records it, and a
    /// start with another count is refused.
    pub shards: u32,
    /// How often workers must send something (default 1s).
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// A worker silent this long loses its jobs (default 10s).
    #[serde(with = "humantime_serde_compat")]
    pub session_ttl: Duration,
    /// Raft election timeout (default 1s): a follower that hears nothing
    /// from the leader for 1 to 1.25 of these campaigns, and followers
    /// refuse votes for 1.25 of them after the last heartbeat (the leader
    /// lease), so a dead leader is replaced after about 2 to 2.5 of them.
    #[serde(with = "humantime_serde_compat")]
    pub election_timeout: Duration,
    /// How often a Raft leader sends heartbeats to followers (default 100ms).
    #[serde(with = "humantime_serde_compat")]
    pub raft_heartbeat_interval: Duration,
    /// Largest job payload in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Bytes of job payloads this node keeps in memory, split evenly over
    /// its shards (default 64 MiB); the payloads of older waiting jobs are
    /// kept in files under the data directory and read back when a job is
    /// handed out. 0 keeps none in memory.
    pub payload_memory_bytes: u64,
    /// Take a Raft snapshot after this many applied commands (default 1000000),
    /// or after as many as the last snapshot held jobs when that is more; the log
    /// behind it is purged. Fewer means faster restarts and more CPU spent
    /// writing the state out.
    pub snapshot_every: u64,
    /// How often replicas compare their state: every replica computes a
    /// digest of a shard's state at the first entry the leader stamped in
    /// each window of this length (the same entries on every replica), and
    /// the leader compares them (default 60s).
    #[serde(with = "humantime_serde_compat")]
    pub digest_every: Duration,
    /// Plain-HTTP address of `/metrics` (Prometheus), `/healthz` and
    /// `/readyz` (default `127.0.0.1:9464`); `off` (or empty) serves none.
    #[serde(with = "metrics_listen_text")]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate (chain) and key of the client port: TLS when set
    /// (default: none, plaintext).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: the client port then requires client certificates
    /// signed by it (mutual TLS). Needs `tls-cert`.
    pub tls_client_ca: Option<PathBuf>,
    /// PEM certificate and key this node serves on the peer port and
    /// presents when it dials other nodes, and the CA both sides' peer
    /// certificates must be signed by (mutual TLS). All three or none.
    pub peer_tls_cert: Option<PathBuf>,
    pub peer_tls_key: Option<PathBuf>,
    pub peer_tls_ca: Option<PathBuf>,
    /// Bearer tokens and their roles (see `security::tokens` for the
    /// format). Default: none, every client may call everything.
    pub token_file: Option<PathBuf>,
    /// How often the token file is re-read to pick up rotated tokens
    /// (default 5s).
    #[serde(with = "humantime_serde_compat")]
    pub token_reload_interval: Duration,
    /// Spread the shards' leaders over the nodes (`cluster::balance_leaders`).
    /// Not a flag: tests turn it off to place leaders themselves.
    #[serde(skip)]
    pub balance_leaders: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./gantry-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            advertise: None,
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            peer_advertise: None,
            initial_cluster: InitialCluster::default(),
            join: Vec::new(),
            shards: 1,
            heartbeat_interval: Duration::from_secs(1),
            session_ttl: Duration::from_secs(10),
            election_timeout: Duration::from_secs(1),
            raft_heartbeat_interval: Duration::from_millis(100),
            max_payload_bytes: 1 << 20,
            payload_memory_bytes: 64 << 20,
            snapshot_every: 1_000_000,
            digest_every: Duration::from_secs(60),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            peer_tls_cert: None,
            peer_tls_key: None,
            peer_tls_ca: None,
            token_file: None,
            token_reload_interval: Duration::from_secs(5),
            balance_leaders: true,
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

/// Each shard is a Raft group with its own log writer threads and timers on
/// every node; more than this costs more than it spreads.
pub const MAX_SHARDS: u32 = 64;

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
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(invalid(
                "shards",
                format!("{} requested; a cluster has 1 to {MAX_SHARDS} shards", self.shards),
            ));
        }
        if self.token_reload_interval < Duration::from_millis(10) {
            return Err(invalid("token-reload-interval", "must be at least 10ms"));
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
        if self.raft_heartbeat_interval < Duration::from_millis(5)
            || self.raft_heartbeat_interval * 3 > self.election_timeout
        {
            return Err(invalid(
                "raft-heartbeat-interval",
                format!(
                    "{:?} must be at least 5ms and at most a third of election-timeout ({:?}), or followers start elections against a live leader",
                    self.raft_heartbeat_interval, self.election_timeout
                ),
            ));
        }
        // A new leader grants every session a full ttl from its election;
        // workers then need time to find it, which is about one more
        // election timeout when a follower still points at the old leader.
        if self.session_ttl < self.election_timeout * 2 {
            return Err(invalid(
                "session-ttl",
                format!(
                    "{:?} must be at least twice election-timeout ({:?}), so a leader change does not expire live workers",
                    self.session_ttl, self.election_timeout
                ),
            ));
        }
        if self.listen == self.peer_listen && self.listen.port() != 0 {
            return Err(invalid("peer-listen", format!("{} is also the client address (listen)", self.peer_listen)));
        }
        if !self.initial_cluster.0.is_empty() {
            if !self.initial_cluster.0.contains_key(&self.node_id) {
                return Err(invalid(
                    "initial-cluster",
                    format!("does not list this node (node-id {}): {}", self.node_id, self.initial_cluster),
                ));
            }
            if self.initial_cluster.0.contains_key(&0) {
                return Err(invalid("initial-cluster", "node ids start at 1"));
            }
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 64 << 20 {
            return Err(invalid("max-payload-bytes", "must be between 1 byte and 64 MiB"));
        }
        if self.snapshot_every == 0 {
            return Err(invalid("snapshot-every", "must be at least 1"));
        }
        if self.digest_every < Duration::from_millis(100) {
            return Err(invalid("digest-every", "must be at least 100ms"));
        }
        if let Some(metrics) = self.metrics_listen
            && metrics.port() != 0
            && (metrics == self.listen || metrics == self.peer_listen)
        {
            return Err(invalid("metrics-listen", format!("{metrics} is also the client or peer address")));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(invalid("tls-key", "missing: tls-cert needs its key")),
            (None, Some(_)) => return Err(invalid("tls-cert", "missing: tls-key needs its certificate")),
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(invalid(
                "tls-client-ca",
                "client certificates need TLS on the client port: set tls-cert and tls-key",
            ));
        }
        let peer_tls = [&self.peer_tls_cert, &self.peer_tls_key, &self.peer_tls_ca];
        if peer_tls.iter().any(|f| f.is_some()) && !peer_tls.iter().all(|f| f.is_some()) {
            let missing: Vec<&str> = ["peer-tls-cert", "peer-tls-key", "peer-tls-ca"]
                .into_iter()
                .zip(peer_tls)
                .filter(|(_, f)| f.is_none())
                .map(|(name, _)| name)
                .collect();
            return Err(invalid(
                "peer-tls-cert",
                format!(
                    "the peer port's mutual TLS needs peer-tls-cert, peer-tls-key and peer-tls-ca; missing {}",
                    missing.join(", ")
                ),
            ));
        }
        Ok(())
    }

    pub fn advertise_address(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

/// Node id → peer address of the voters of a new cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitialCluster(pub BTreeMap<u64, String>);

impl std::fmt::Display for InitialCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(id, address)| format!("{id}={address}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl std::str::FromStr for InitialCluster {
    type Err = String;

    /// `1=host-a:50052,2=host-b:50052,3=host-c:50052`; empty means none.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut members = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, address) =
                part.split_once('=').ok_or_else(|| format!("{part:?} is not id=host:port (e.g. 1=10.0.0.1:50052)"))?;
            let id: u64 = id.trim().parse().map_err(|_| format!("{part:?}: node id {id:?} is not a number"))?;
            let address = address.trim();
            let Some((host, port)) = address.rsplit_once(':') else {
                return Err(format!("{part:?}: address {address:?} has no :port"));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("{part:?}: address {address:?} is not host:port"));
            }
            if members.insert(id, address.to_string()).is_some() {
                return Err(format!("node id {id} appears twice"));
            }
        }
        Ok(InitialCluster(members))
    }
}

mod initial_cluster_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::InitialCluster;

    pub fn serialize<S: Serializer>(cluster: &InitialCluster, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&cluster.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<InitialCluster, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `--metrics-listen`: an address, or `off` (or empty) for no metrics port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(MetricsListen(None));
        }
        text.parse()
            .map(|address| MetricsListen(Some(address)))
            .map_err(|_| format!("{text:?} is not ip:port (e.g. 127.0.0.1:9464) or `off`"))
    }
}

mod metrics_listen_text {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::MetricsListen;

    pub fn serialize<S: Serializer>(address: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => s.serialize_str(&address.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<MetricsListen>().map(|m| m.0).map_err(serde::de::Error::custom)
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
    fn shards_are_bounded() {
        for shards in [0, MAX_SHARDS + 1] {
            let c = Config { shards, ..Default::default() };
            let error = c.validate().expect_err("out of range").to_string();
            assert!(error.contains("shards") && error.contains(&shards.to_string()), "{error}");
        }
        assert!(Config { shards: MAX_SHARDS, ..Default::default() }.validate().is_ok());
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
    fn initial_cluster_parses_and_names_its_errors() {
        let c: InitialCluster = "1=a:50052, 2=10.0.0.2:50052,3=[::1]:7".parse().unwrap();
        assert_eq!(c.0.len(), 3);
        assert_eq!(c.to_string(), "1=a:50052,2=10.0.0.2:50052,3=[::1]:7");
        assert!("1=a".parse::<InitialCluster>().unwrap_err().contains("no :port"));
        assert!("x=a:1".parse::<InitialCluster>().unwrap_err().contains("not a number"));
        assert!("1=a:1,1=b:2".parse::<InitialCluster>().unwrap_err().contains("twice"));
        assert_eq!("".parse::<InitialCluster>().unwrap(), InitialCluster::default());
    }

    #[test]
    fn cluster_timing_is_checked_against_session_ttl() {
        let c = Config { election_timeout: Duration::from_secs(6), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "session-ttl", .. })));
        let c = Config { raft_heartbeat_interval: Duration::from_millis(400), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "raft-heartbeat-interval", .. })));
        let c = Config { node_id: 4, initial_cluster: "1=a:1,2=b:1,3=c:1".parse().unwrap(), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "initial-cluster", .. })));
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

    #[test]
    fn metrics_listen_takes_an_address_or_off() {
        assert_eq!(Config::default().metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let c: Config = toml::from_str("metrics-listen = \"0.0.0.0:9000\"").unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9000".parse().unwrap()));
        for off in ["off", "OFF", ""] {
            assert_eq!(off.parse::<MetricsListen>().unwrap(), MetricsListen(None));
        }
        assert!("nowhere".parse::<MetricsListen>().unwrap_err().contains("ip:port"));
        let c = Config { metrics_listen: Some(Config::default().listen), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "metrics-listen", .. })));
    }

    #[test]
    fn tls_files_come_in_sets() {
        let file = || Some(PathBuf::from("x.pem"));
        let c = Config { tls_cert: file(), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "tls-key", .. })));
        let c = Config { tls_client_ca: file(), ..Default::default() };
        assert!(matches!(c.validate(), Err(ConfigError::Invalid { field: "tls-client-ca", .. })));
        let c = Config { peer_tls_cert: file(), peer_tls_key: file(), ..Default::default() };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("missing peer-tls-ca"), "{err}");
        let c = Config {
            tls_cert: file(),
            tls_key: file(),
            tls_client_ca: file(),
            peer_tls_cert: file(),
            peer_tls_key: file(),
            peer_tls_ca: file(),
            token_file: file(),
            ..Default::default()
        };
        c.validate().unwrap();
        let c: Config = toml::from_str("tls-cert = \"a.pem\"\ntls-key = \"b.pem\"\ntoken-file = \"t\"\n").unwrap();
        assert_eq!(c.token_file, Some(PathBuf::from("t")));
    }
}
