//! The `gantry` subcommands that talk to a running broker over the public
//! gRPC API (through the `gantry-worker` SDK), and `gantry bench`.
//!
//! Output contract (scripts and tests rely on it):
//! - `gantry enqueue` prints exactly the job id on its first stdout line.
//! - `--json` prints one JSON document on stdout.
//! - A failed call prints `error: <GRPC_CODE>: <message>` on stderr and the
//!   process exits with status 1.

mod admin;
mod bench;
mod dev;
mod jobs;
mod output;

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_worker::{Client, ClientBuilder, Tls, WorkerBuilder};

pub use admin::{ClusterCommand, QueuesArgs, QueuesCommand, WorkersArgs};
pub use bench::{BenchArgs, Scenario};
pub use dev::DevArgs;
use jobs::StillRunning;
pub use jobs::{EnqueueArgs, JobCommand};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enqueue a job and print its id.
    Enqueue(Box<EnqueueArgs>),
    /// Show, wait for or cancel a job.
    Job {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: JobCommand,
    },
    /// List queues (counts per state), or show, pause or resume one.
    Queues(QueuesArgs),
    /// List worker sessions.
    Workers(WorkersArgs),
    /// Cluster membership and Raft status.
    Cluster {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Load generator over the public API: enqueue throughput, end-to-end
    /// throughput, and latency under a fixed offered rate.
    Bench(Box<BenchArgs>),
    /// Start a local cluster (`--nodes 3`) for demos; prints its addresses.
    Dev(DevArgs),
}

/// Flags shared by every client subcommand.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientArgs {
    /// Broker address(es), comma-separated: host:port or http://host:port.
    /// Any node of the cluster will do; the others are tried when it fails.
    #[arg(long, global = true, env = "GANTRY_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Boxed: `Command` holds client flags inline and must stay small.
    #[command(flatten)]
    pub security: Box<SecurityArgs>,
}

/// TLS and token flags of every client subcommand.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityArgs {
    /// Bearer token sent with every call (brokers started with --token-file).
    #[arg(long, global = true, env = "GANTRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA that signed the brokers' certificates: talk TLS (https://) to them.
    #[arg(long, global = true, env = "GANTRY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for brokers started with --tls-client-ca (with --tls-key).
    #[arg(long, global = true, env = "GANTRY_TLS_CLIENT_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "GANTRY_TLS_CLIENT_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The addresses of `--addr`, trimmed, empty entries dropped.
    pub fn endpoints(&self) -> anyhow::Result<Vec<String>> {
        let eps: Vec<String> =
            self.addr.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        if eps.is_empty() {
            anyhow::bail!("--addr: no broker address given");
        }
        Ok(eps)
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        let eps = self.endpoints()?;
        self.client_builder()?.connect().await.with_context(|| format!("cannot connect to {}", eps.join(",")))
    }

    /// `--tls-ca`, `--tls-cert`, `--tls-key` as SDK settings; `None` without TLS.
    pub fn tls(&self) -> anyhow::Result<Option<Tls>> {
        let security = &self.security;
        let Some(ca) = &security.tls_ca else {
            if security.tls_cert.is_some() || security.tls_key.is_some() {
                anyhow::bail!("--tls-cert/--tls-key need --tls-ca (the CA that signed the brokers' certificates)");
            }
            return Ok(None);
        };
        let tls = Tls::ca_file(ca)?;
        Ok(Some(match (&security.tls_cert, &security.tls_key) {
            (Some(cert), Some(key)) => tls.identity_files(cert, key)?,
            (None, None) => tls,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }))
    }

    /// A client builder with these flags' addresses, TLS and token.
    pub fn client_builder(&self) -> anyhow::Result<ClientBuilder> {
        let mut builder = Client::builder(self.endpoints()?);
        if let Some(tls) = self.tls()? {
            builder = builder.tls(tls);
        }
        if let Some(token) = &self.security.token {
            builder = builder.token(token.clone());
        }
        Ok(builder)
    }

    /// A worker builder with these flags' addresses, TLS and token.
    pub fn worker_builder(&self) -> anyhow::Result<WorkerBuilder> {
        let mut builder = gantry_worker::Worker::builder(self.endpoints()?);
        if let Some(tls) = self.tls()? {
            builder = builder.tls(tls);
        }
        if let Some(token) = &self.security.token {
            builder = builder.token(token.clone());
        }
        Ok(builder)
    }
}

/// Runs a client subcommand. On failure prints `error: ...` on stderr and
/// exits with status 1 (so the message format is ours, not `main`'s).
pub async fn run(command: Command) -> anyhow::Result<()> {
    let result = match command {
        Command::Enqueue(args) => jobs::enqueue(*args).await,
        Command::Job { client, command } => jobs::run(client, command).await,
        Command::Queues(args) => admin::queues(args).await,
        Command::Workers(args) => admin::workers(args).await,
        Command::Cluster { client, command } => admin::cluster(client, command).await,
        Command::Bench(args) => bench::run(*args).await,
        Command::Dev(args) => dev::run(args).await,
    };
    if let Err(e) = result {
        let _ = std::io::stdout().flush();
        // A wait that ran out is not a failure of the command: scripts
        // tell it apart by the exit status.
        if let Some(still) = e.downcast_ref::<StillRunning>() {
            eprintln!("{still}");
            std::process::exit(2);
        }
        eprintln!("error: {}", render_error(&e));
        std::process::exit(1);
    }
    Ok(())
}

/// The canonical gRPC name of a status code, as grpcurl and the docs print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `CODE: message`, plus the leader the node named, if any.
pub fn render_status(status: &tonic::Status) -> String {
    let mut out = code_name(status.code()).to_owned();
    if !status.message().is_empty() {
        out.push_str(": ");
        out.push_str(status.message());
    }
    if let Some(leader) = status.metadata().get("gantry-leader").and_then(|v| v.to_str().ok())
        && !leader.is_empty()
    {
        out.push_str(&format!(" (leader: {leader})"));
    }
    out
}

/// One line for an error chain: our context first, a gRPC status as
/// `CODE: message`, causes joined with `: ` and repeats dropped.
pub fn render_error(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let part = if let Some(e) = cause.downcast_ref::<gantry_worker::Error>() {
            match e {
                gantry_worker::Error::Status(s) => {
                    parts.push(render_status(s));
                    break;
                }
                // Its own text repeats its source's; the source says more.
                gantry_worker::Error::Transport(_) => continue,
                other => other.to_string(),
            }
        } else if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            parts.push(render_status(s));
            break;
        } else {
            cause.to_string()
        };
        if part.is_empty() || parts.last().is_some_and(|p| p.contains(&part)) {
            continue;
        }
        parts.push(part);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, Parser};

    use super::*;

    /// Stands in for `main`'s parser, which flattens [`Command`].
    #[derive(Parser, Debug)]
    #[command(name = "gantry")]
    struct TestCli {
        #[command(subcommand)]
        command: Command,
    }

    fn parse(args: &[&str]) -> Command {
        let mut argv = vec!["gantry"];
        argv.extend_from_slice(args);
        match TestCli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn parse_err(args: &[&str]) -> clap::Error {
        let mut argv = vec!["gantry"];
        argv.extend_from_slice(args);
        TestCli::try_parse_from(argv).expect_err("should not parse")
    }

    #[test]
    fn clap_definition_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn command_stays_small() {
        // `main` holds it in an enum next to a boxed variant; clippy's
        // large_enum_variant fires past ~200 bytes.
        assert!(std::mem::size_of::<Command>() <= 128, "{}", std::mem::size_of::<Command>());
    }

    #[test]
    fn enqueue_flags() {
        let Command::Enqueue(a) = parse(&[
            "enqueue",
            "emails",
            "hello",
            "--priority",
            "-5",
            "--delay",
            "1m 30s",
            "--max-attempts",
            "3",
            "--lease-timeout",
            "2m",
            "--idempotency-key",
            "k1",
            "--header",
            "a=1",
            "--header",
            "b=x=y",
            "--addr",
            "n1:1,n2:2",
        ]) else {
            panic!("not enqueue")
        };
        assert_eq!(a.queue, "emails");
        assert_eq!(a.payload.as_deref(), Some("hello"));
        assert_eq!(a.priority, Some(-5));
        assert_eq!(a.delay, Some(Duration::from_secs(90)));
        assert_eq!(a.max_attempts, Some(3));
        assert_eq!(a.lease_timeout, Some(Duration::from_secs(120)));
        assert_eq!(a.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(a.headers, vec![("a".to_owned(), "1".to_owned()), ("b".to_owned(), "x=y".to_owned())]);
        assert_eq!(a.client.endpoints().unwrap(), vec!["n1:1", "n2:2"]);
        assert!(!a.client.json);
    }

    #[test]
    fn enqueue_defaults_and_bad_input() {
        let Command::Enqueue(a) = parse(&["enqueue", "q"]) else { panic!("not enqueue") };
        assert_eq!(a.payload, None);
        assert_eq!(a.priority, None);
        assert!(a.headers.is_empty());
        parse_err(&["enqueue"]);
        parse_err(&["enqueue", "q", "--header", "novalue"]);
        parse_err(&["enqueue", "q", "--header", "=v"]);
        parse_err(&["enqueue", "q", "--delay", "soon"]);
        parse_err(&["enqueue", "q", "--priority", "high"]);
        parse_err(&["enqueue", "q", "inline", "--payload-file", "/tmp/x"]);
        parse_err(&["enqueue", "q", "--delay", "1s", "--run-at", "2030-01-01T00:00:00Z"]);
    }

    #[test]
    fn job_subcommands_take_client_flags_anywhere() {
        let Command::Job { client, command: JobCommand::Wait { id, timeout } } =
            parse(&["job", "wait", "0-17", "--timeout", "5s", "--addr", "h:9", "--json"])
        else {
            panic!("not job wait")
        };
        assert_eq!(id, "0-17");
        assert_eq!(timeout, Duration::from_secs(5));
        assert_eq!(client.addr, "h:9");
        assert!(client.json);

        let Command::Job { client, command: JobCommand::Get { id } } = parse(&["job", "--addr", "h:8", "get", "x"])
        else {
            panic!("not job get")
        };
        assert_eq!((id.as_str(), client.addr.as_str()), ("x", "h:8"));

        let Command::Job { command: JobCommand::Cancel { id, reason }, .. } =
            parse(&["job", "cancel", "x", "--reason", "no longer needed"])
        else {
            panic!("not job cancel")
        };
        assert_eq!((id.as_str(), reason.as_str()), ("x", "no longer needed"));
        let Command::Job { command: JobCommand::Wait { timeout, .. }, .. } = parse(&["job", "wait", "x"]) else {
            panic!("not job wait")
        };
        assert_eq!(timeout, Duration::from_secs(30));
        parse_err(&["job", "get"]);
        parse_err(&["job", "explode", "x"]);
    }

    #[test]
    fn admin_subcommands() {
        let Command::Queues(q) = parse(&["queues", "--json"]) else { panic!("not queues") };
        assert!(q.command.is_none() && q.client.json);
        let Command::Queues(q) = parse(&["queues", "pause", "emails", "--addr", "h:1"]) else { panic!("not queues") };
        assert!(matches!(q.command, Some(QueuesCommand::Pause { ref queue }) if queue == "emails"));
        assert_eq!(q.client.addr, "h:1");
        let Command::Queues(q) = parse(&["queues", "resume", "emails"]) else { panic!("not queues") };
        assert!(matches!(q.command, Some(QueuesCommand::Resume { .. })));
        let Command::Queues(q) = parse(&["queues", "get", "emails"]) else { panic!("not queues") };
        assert!(matches!(q.command, Some(QueuesCommand::Get { .. })));
        let Command::Workers(w) = parse(&["workers"]) else { panic!("not workers") };
        assert_eq!(w.client.addr, "127.0.0.1:50051");
        let Command::Cluster { command: ClusterCommand::Status { local: false }, client } =
            parse(&["cluster", "status", "--json"])
        else {
            panic!("not cluster status")
        };
        assert!(client.json);
        let Command::Cluster { command: ClusterCommand::Status { local: true }, .. } =
            parse(&["cluster", "status", "--local"])
        else {
            panic!("not cluster status --local")
        };
        let Command::Cluster { command: ClusterCommand::Rebuild { node_id: 3, shard: 1 }, .. } =
            parse(&["cluster", "rebuild", "--node", "3", "--shard", "1"])
        else {
            panic!("not cluster rebuild")
        };
        for (word, expected) in [("status", "Status"), ("hold", "Hold"), ("finalize", "Finalize")] {
            let Command::Cluster { command: ClusterCommand::Upgrade { action }, .. } =
                parse(&["cluster", "upgrade", word])
            else {
                panic!("not cluster upgrade {word}")
            };
            assert_eq!(format!("{action:?}"), expected);
        }
    }

    #[test]
    fn bench_defaults() {
        let Command::Bench(b) = parse(&["bench"]) else { panic!("not bench") };
        assert_eq!(b.scenario, Scenario::All);
        assert_eq!(b.jobs, 100_000);
        assert_eq!(b.in_flight, 256);
        assert_eq!(b.batch, 1);
        assert_eq!(b.workers, 8);
        assert_eq!(b.worker_concurrency, 32);
        assert_eq!(b.rate, 2000.0);
        assert_eq!(b.duration, Duration::from_secs(10));
        assert_eq!(b.connections, 4);
        assert_eq!(b.payload_bytes, 256);
        assert_eq!(b.queue, None);
        assert_eq!(b.drain_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bench_flags_and_bounds() {
        let Command::Bench(b) = parse(&[
            "bench",
            "--scenario",
            "latency",
            "--jobs",
            "500",
            "--in-flight",
            "8",
            "--batch",
            "50",
            "--workers",
            "2",
            "--worker-concurrency",
            "4",
            "--rate",
            "250.5",
            "--duration",
            "3s",
            "--connections",
            "1",
            "--queue",
            "mine",
            "--payload-bytes",
            "0",
            "--json",
        ]) else {
            panic!("not bench")
        };
        assert_eq!(b.scenario, Scenario::Latency);
        assert_eq!((b.jobs, b.in_flight, b.batch), (500, 8, 50));
        assert_eq!((b.workers, b.worker_concurrency, b.connections), (2, 4, 1));
        assert_eq!(b.rate, 250.5);
        assert_eq!(b.duration, Duration::from_secs(3));
        assert_eq!(b.queue.as_deref(), Some("mine"));
        assert!(b.client.json);
        for bad in [
            &["bench", "--scenario", "soak"][..],
            &["bench", "--jobs", "0"],
            &["bench", "--in-flight", "0"],
            &["bench", "--batch", "0"],
            &["bench", "--batch", "10001"],
            &["bench", "--workers", "0"],
            &["bench", "--connections", "0"],
            &["bench", "--rate", "0"],
            &["bench", "--rate", "-3"],
            &["bench", "--rate", "NaN"],
            &["bench", "--duration", "0s"],
            &["bench", "--payload-bytes", "lots"],
        ] {
            parse_err(bad);
        }
    }

    #[test]
    fn tls_and_token_flags() {
        let Command::Queues(q) = parse(&["queues", "--token", "secret-token-0001", "--tls-ca", "/etc/ca.pem"]) else {
            panic!("not queues")
        };
        assert_eq!(q.client.security.token.as_deref(), Some("secret-token-0001"));
        assert_eq!(q.client.security.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        let Command::Job { client, .. } =
            parse(&["job", "get", "0-1", "--tls-ca", "c", "--tls-cert", "crt", "--tls-key", "key"])
        else {
            panic!("not job get")
        };
        assert_eq!(client.security.tls_key, Some(PathBuf::from("key")));
        let half = ClientArgs {
            security: Box::new(SecurityArgs { tls_cert: Some("crt".into()), ..Default::default() }),
            ..ClientArgs::default()
        };
        assert!(half.tls().unwrap_err().to_string().contains("need --tls-ca"));
        assert!(ClientArgs::default().tls().unwrap().is_none());
    }

    #[test]
    fn empty_addr_is_an_error() {
        let c = ClientArgs { addr: " , ".into(), ..ClientArgs::default() };
        assert!(c.endpoints().is_err());
    }

    #[test]
    fn errors_render_with_grpc_code_names() {
        let status = tonic::Status::invalid_argument("queue: must match [A-Za-z0-9._-]{1,128}");
        let err = anyhow::Error::from(gantry_worker::Error::Status(status));
        assert_eq!(render_error(&err), "INVALID_ARGUMENT: queue: must match [A-Za-z0-9._-]{1,128}");

        let err = anyhow::Error::from(gantry_worker::Error::Status(tonic::Status::not_found("job 0-1 not found")))
            .context("job get");
        assert_eq!(render_error(&err), "job get: NOT_FOUND: job 0-1 not found");

        let mut status = tonic::Status::unavailable("no leader");
        status.metadata_mut().insert("gantry-leader", "10.0.0.2:50051".parse().unwrap());
        assert_eq!(render_status(&status), "UNAVAILABLE: no leader (leader: 10.0.0.2:50051)");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");

        let err = anyhow::Error::from(std::io::Error::other("disk on fire")).context("reading payload");
        assert_eq!(render_error(&err), "reading payload: disk on fire");
    }
}
