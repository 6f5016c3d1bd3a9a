//! `gantry`: the broker (`gantry serve`) and its command-line client.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gantry_broker::{cli, config::Config, server};

// The broker allocates per request and per job; glibc malloc showed up as a
// fifth of its CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc marks its arenas `MADV_HUGEPAGE` and gives freed memory back to
/// the kernel in small pieces; every fault into such a range then has the
/// kernel zero a whole 2 MiB page. Under load that zeroing took a third of a
/// node's CPU (perf: `clear_page_erms` below `mi_page_fresh_alloc`), more in
/// a VM. Turning transparent huge pages off for this process is what
/// `MIMALLOC_ALLOW_THP=0` does; setting that variable (to anything) leaves
/// the choice to mimalloc.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

/// mimalloc's `purge_delay` option (`mi_option_purge_delay`, which
/// libmimalloc-sys does not name): the one before `use_numa_nodes` in both
/// of its versions.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// mimalloc gives memory a thread freed back to the kernel only after a
/// delay, and only when that thread calls into it again: memory freed by a
/// thread that then sits idle stayed resident, 200 MB after restoring a
/// million jobs at start-up. So while the broker starts (the restore),
/// freed memory is purged at once; then the delay is mimalloc's again:
/// purging at once while serving cost a fifth of an enqueue burst's
/// throughput (docs/benchmarks.md, fifteenth session). Returns the delay to
/// go back to; `MIMALLOC_PURGE_DELAY` (milliseconds) leaves it all alone.
fn purge_at_once_while_starting() -> Option<std::ffi::c_long> {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return None;
    }
    // SAFETY: reads and sets an integer option; touches no memory of ours.
    unsafe {
        let delay = libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        Some(delay)
    }
}

fn purge_as_usual(delay: Option<std::ffi::c_long>) {
    if let Some(delay) = delay {
        // SAFETY: sets an integer option; touches no memory of ours.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay) };
    }
}

#[derive(Parser)]
#[command(name = "gantry", version, about = "Gantry: a replicated job broker that never loses an acknowledged job")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "GANTRY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker node. With no flags: a single-node cluster, data in
    /// ./gantry-data, clients on 127.0.0.1:50051.
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Client(cli::Command),
}

/// Every flag is also an env var `GANTRY_<NAME>` and a key of the `--config` TOML file.
#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// TOML file with any of the keys below (kebab-case); flags and env win over it.
    #[arg(long, env = "GANTRY_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "GANTRY_NODE_ID")]
    node_id: Option<u64>,
    #[arg(long, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Client gRPC address, e.g. 127.0.0.1:50051.
    #[arg(long, env = "GANTRY_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Client address others should use to reach this node (default: --listen).
    #[arg(long, env = "GANTRY_ADVERTISE")]
    advertise: Option<String>,
    /// Peer gRPC address (Raft, forwarded calls), e.g. 127.0.0.1:50052.
    #[arg(long, env = "GANTRY_PEER_LISTEN")]
    peer_listen: Option<std::net::SocketAddr>,
    /// Peer address others should use to reach this node (default: --peer-listen).
    #[arg(long, env = "GANTRY_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// Voters of a new cluster by peer address: 1=host-a:50052,2=host-b:50052,3=host-c:50052.
    #[arg(long, env = "GANTRY_INITIAL_CLUSTER")]
    initial_cluster: Option<gantry_broker::config::InitialCluster>,
    /// Client addresses of a running cluster to join with AddNode (comma-separated).
    #[arg(long, env = "GANTRY_JOIN", value_delimiter = ',')]
    join: Option<Vec<String>>,
    #[arg(long, env = "GANTRY_SHARDS")]
    shards: Option<u32>,
    /// e.g. 1s, 200ms.
    #[arg(long, env = "GANTRY_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// e.g. 10s.
    #[arg(long, env = "GANTRY_SESSION_TTL", value_parser = humantime::parse_duration)]
    session_ttl: Option<Duration>,
    #[arg(long, env = "GANTRY_ELECTION_TIMEOUT", value_parser = humantime::parse_duration)]
    election_timeout: Option<Duration>,
    /// How often a Raft leader heartbeats its followers, e.g. 100ms.
    #[arg(long, env = "GANTRY_RAFT_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    raft_heartbeat_interval: Option<Duration>,
    #[arg(long, env = "GANTRY_MAX_PAYLOAD_BYTES")]
    max_payload_bytes: Option<usize>,
    /// Bytes of job payloads kept in memory, over all shards (default 67108864,
    /// 64 MiB); payloads of older waiting jobs wait on disk. 0 keeps none.
    #[arg(long, env = "GANTRY_PAYLOAD_MEMORY_BYTES")]
    payload_memory_bytes: Option<u64>,
    /// Snapshot after this many applied commands (default 1000000), or after
    /// as many as the last snapshot held jobs when that is more.
    #[arg(long, env = "GANTRY_SNAPSHOT_EVERY")]
    snapshot_every: Option<u64>,
    /// How often replicas compare digests of each shard's state (default 60s).
    #[arg(long, env = "GANTRY_DIGEST_EVERY", value_parser = humantime::parse_duration)]
    digest_every: Option<Duration>,
    /// Plain-HTTP address of /metrics, /healthz and /readyz (default
    /// 127.0.0.1:9464), or `off`.
    #[arg(long, env = "GANTRY_METRICS_LISTEN")]
    metrics_listen: Option<gantry_broker::config::MetricsListen>,
    /// PEM certificate (chain) of the client port; with --tls-key the client port speaks TLS.
    #[arg(long, env = "GANTRY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "GANTRY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA: the client port then requires client certificates it signed (mutual TLS).
    #[arg(long, env = "GANTRY_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// PEM certificate this node serves on the peer port and presents to other nodes.
    #[arg(long, env = "GANTRY_PEER_TLS_CERT")]
    peer_tls_cert: Option<PathBuf>,
    /// PEM private key of --peer-tls-cert.
    #[arg(long, env = "GANTRY_PEER_TLS_KEY")]
    peer_tls_key: Option<PathBuf>,
    /// PEM CA that signed every node's peer certificate (the peer port requires one).
    #[arg(long, env = "GANTRY_PEER_TLS_CA")]
    peer_tls_ca: Option<PathBuf>,
    /// Bearer tokens and their roles (producer, worker, admin): one `<token> <role>` per line, # comments.
    #[arg(long, env = "GANTRY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// How often the token file is re-read, so rotated tokens take effect without a restart (default 5s).
    #[arg(long, env = "GANTRY_TOKEN_RELOAD_INTERVAL", value_parser = humantime::parse_duration)]
    token_reload_interval: Option<Duration>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_toml_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { config.$field = v; } )* };
        }
        set!(
            node_id,
            data_dir,
            listen,
            shards,
            heartbeat_interval,
            session_ttl,
            election_timeout,
            raft_heartbeat_interval,
            max_payload_bytes,
            payload_memory_bytes,
            snapshot_every,
            digest_every,
            peer_listen,
            initial_cluster,
            join,
            token_reload_interval
        );
        if self.advertise.is_some() {
            config.advertise = self.advertise;
        }
        if self.peer_advertise.is_some() {
            config.peer_advertise = self.peer_advertise;
        }
        if let Some(metrics_listen) = self.metrics_listen {
            config.metrics_listen = metrics_listen.0;
        }
        for (flag, field) in [
            (self.tls_cert, &mut config.tls_cert),
            (self.tls_key, &mut config.tls_key),
            (self.tls_client_ca, &mut config.tls_client_ca),
            (self.peer_tls_cert, &mut config.peer_tls_cert),
            (self.peer_tls_key, &mut config.peer_tls_key),
            (self.peer_tls_ca, &mut config.peer_tls_ca),
            (self.token_file, &mut config.token_file),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
        config.validate()?;
        Ok(config)
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,raft_engine=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    no_transparent_huge_pages();
    let purge_delay = purge_at_once_while_starting();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(&cli.log_format);
            let config = (*args).into_config().context("invalid configuration")?;
            let server = server::start(config).await.context("gantry serve")?;
            purge_as_usual(purge_delay);
            shutdown_signal().await;
            server.shutdown().await.context("gantry serve")?;
            Ok(())
        }
        Command::Client(command) => {
            init_tracing(&cli.log_format);
            cli::run(command).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option's number is mimalloc's own: it reads as purge_delay's
    /// default in mimalloc v3 (1000 ms, the one libmimalloc-sys builds).
    #[test]
    fn the_purge_delay_option_is_mimallocs() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads an integer option.
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        }
    }
}
