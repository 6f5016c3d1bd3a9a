//! `gantry enqueue` and `gantry job get|wait|cancel`.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_worker::{Client, proto};
use serde::Serialize;

use super::ClientArgs;
use super::output::{JobJson, print_json, render_job};

#[derive(Args, Debug, Clone)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue name ([A-Za-z0-9._-]{1,128}).
    pub queue: String,
    /// Payload text; `-` reads it from stdin. Empty when omitted.
    #[arg(conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from this file (any bytes).
    #[arg(long, value_name = "PATH")]
    pub payload_file: Option<PathBuf>,
    /// Higher goes out first (default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Run no sooner than this from now, e.g. 5s, 10m, "1h 30m".
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
    /// Run no sooner than this instant (RFC 3339, e.g. 2030-01-01T00:00:00Z).
    #[arg(long, value_parser = parse_time, conflicts_with = "delay")]
    pub run_at: Option<SystemTime>,
    /// Attempts before the job is FAILED (default: the queue's).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// How long one attempt may hold the job without progress (default: the queue's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lease_timeout: Option<Duration>,
    /// A second enqueue with the same key returns the first job (created=false).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A header `key=value`; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum JobCommand {
    /// Show a job: state, attempts, times, holder, result, history.
    Get { id: String },
    /// Wait until the job is terminal, then show it. Exits 2 (after showing
    /// it) when the timeout passes first.
    Wait {
        id: String,
        /// At most this long (the broker caps it at 1h).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Cancel a job that is not terminal, then show it.
    Cancel {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `key=value`; the value may itself contain `=`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        Some(_) => Err(format!("header {s:?} has an empty key")),
        None => Err(format!("header {s:?} must be KEY=VALUE")),
    }
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s).map_err(|e| format!("{e} (want RFC 3339, e.g. 2030-01-01T00:00:00Z)"))
}

/// Where the payload comes from, in the order the flags are checked.
#[derive(Debug, PartialEq, Eq)]
pub enum PayloadSource<'a> {
    Empty,
    Inline(&'a str),
    Stdin,
    File(&'a std::path::Path),
}

impl EnqueueArgs {
    pub fn payload_source(&self) -> PayloadSource<'_> {
        match (&self.payload_file, self.payload.as_deref()) {
            (Some(path), _) => PayloadSource::File(path),
            (None, Some("-")) => PayloadSource::Stdin,
            (None, Some(text)) => PayloadSource::Inline(text),
            (None, None) => PayloadSource::Empty,
        }
    }

    fn read_payload(&self) -> anyhow::Result<Vec<u8>> {
        Ok(match self.payload_source() {
            PayloadSource::Empty => Vec::new(),
            PayloadSource::Inline(text) => text.as_bytes().to_vec(),
            PayloadSource::Stdin => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).context("reading the payload from stdin")?;
                buf
            }
            PayloadSource::File(path) => {
                std::fs::read(path).with_context(|| format!("reading the payload from {}", path.display()))?
            }
        })
    }
}

#[derive(Serialize)]
struct EnqueuedJson<'a> {
    job_id: &'a str,
    created: bool,
}

pub async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let payload = args.read_payload()?;
    let client = args.client.connect().await?;
    let mut b = client.enqueue(args.queue.clone(), payload);
    if let Some(p) = args.priority {
        b = b.priority(p);
    }
    if let Some(d) = args.delay {
        b = b.delay(d);
    }
    if let Some(t) = args.run_at {
        b = b.run_at(t);
    }
    if let Some(n) = args.max_attempts {
        b = b.max_attempts(n);
    }
    if let Some(t) = args.lease_timeout {
        b = b.lease_timeout(t);
    }
    if let Some(k) = &args.idempotency_key {
        b = b.idempotency_key(k.clone());
    }
    for (k, v) in &args.headers {
        b = b.header(k.clone(), v.clone());
    }
    let done = b.send().await?;
    if args.client.json {
        print_json(&EnqueuedJson { job_id: &done.job_id, created: done.created })?;
    } else {
        println!("{}", done.job_id);
        if !done.created {
            println!("created=false (an earlier job with this idempotency key was returned)");
        }
    }
    Ok(())
}

/// `gantry job wait` ran out of time: the job is not finished. The binary
/// exits with status 2 for it, so scripts can tell a wait that timed out
/// from one that saw the job end (0) or failed (1).
#[derive(Debug, thiserror::Error)]
#[error("job {job_id} is still {state} after waiting {waited:?}")]
pub struct StillRunning {
    pub job_id: String,
    pub state: String,
    pub waited: Duration,
}

pub async fn run(client_args: ClientArgs, command: JobCommand) -> anyhow::Result<()> {
    let client: Client = client_args.connect().await?;
    let job: proto::Job = match &command {
        JobCommand::Get { id } => client.get(id).await?,
        JobCommand::Wait { id, timeout } => client.wait(id, *timeout).await?,
        JobCommand::Cancel { id, reason } => client.cancel(id, reason).await?,
    };
    if client_args.json {
        print_json(&JobJson::new(&job))?;
    } else {
        print!("{}", render_job(&job, SystemTime::now()));
    }
    if let JobCommand::Wait { timeout, .. } = command
        && !is_terminal(job.state())
    {
        let state = job.state().as_str_name().to_owned();
        return Err(StillRunning { job_id: job.id, state, waited: timeout }.into());
    }
    Ok(())
}

fn is_terminal(state: proto::JobState) -> bool {
    matches!(state, proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        assert_eq!(parse_header("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_header("trace=x=1"), Ok(("trace".into(), "x=1".into())));
        assert_eq!(parse_header("empty="), Ok(("empty".into(), "".into())));
        assert!(parse_header("nokey").is_err());
        assert!(parse_header("=v").is_err());
        assert!(parse_header(" =v").is_err());
    }

    fn args(payload: Option<&str>, file: Option<&str>) -> EnqueueArgs {
        EnqueueArgs {
            client: ClientArgs { addr: "x:1".into(), ..ClientArgs::default() },
            queue: "q".into(),
            payload: payload.map(str::to_owned),
            payload_file: file.map(PathBuf::from),
            priority: None,
            delay: None,
            run_at: None,
            max_attempts: None,
            lease_timeout: None,
            idempotency_key: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn payload_sources() {
        assert_eq!(args(None, None).payload_source(), PayloadSource::Empty);
        assert_eq!(args(Some("hi"), None).payload_source(), PayloadSource::Inline("hi"));
        assert_eq!(args(Some("-"), None).payload_source(), PayloadSource::Stdin);
        let a = args(None, Some("/tmp/p"));
        assert_eq!(a.payload_source(), PayloadSource::File(std::path::Path::new("/tmp/p")));
        assert_eq!(args(Some("hi"), None).read_payload().unwrap(), b"hi");
        assert!(args(None, None).read_payload().unwrap().is_empty());
    }

    #[test]
    fn payload_files_are_read_as_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.bin");
        std::fs::write(&path, [0u8, 1, 2, 255]).expect("write");
        let a = args(None, path.to_str());
        assert_eq!(a.read_payload().unwrap(), vec![0, 1, 2, 255]);
        let missing = args(None, dir.path().join("nope").to_str());
        let err = missing.read_payload().expect_err("missing file");
        assert!(format!("{err:#}").contains("reading the payload from"), "{err:#}");
    }

    #[test]
    fn run_at_parses_rfc3339() {
        let t = parse_time("2030-01-01T00:00:00Z").expect("valid");
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_893_456_000);
        assert!(parse_time("tomorrow").is_err());
    }
}
