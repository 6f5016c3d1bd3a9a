//! `gantry dev --nodes 3`: a local cluster of real processes that forms,
//! prints its addresses, serves, and stops with its parent.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gantry_tests::{cluster::cluster_status, free_port, gantry_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_a_three_node_cluster_and_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port();
    let mut dev = Command::new(gantry_binary())
        .args(["dev", "--nodes", "3", "--base-port", &base.to_string(), "--data-dir"])
        .arg(dir.path())
        .args(["--", "--session-ttl", "2s", "--election-timeout", "300ms", "--raft-heartbeat-interval", "50ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gantry dev");
    // Read what it prints until it names the leader (bounded by its own
    // 60 s start-up limit: it exits with an error after that).
    let stdout = dev.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.starts_with("leader:");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    })
    .await
    .unwrap();
    let text = printed.join("\n");
    assert!(text.contains("leader: node"), "gantry dev did not report a leader:\n{text}");
    for i in 0..3u16 {
        assert!(text.contains(&format!("127.0.0.1:{}", base + 10 * i)), "node {} missing:\n{text}", i + 1);
    }

    let status = cluster_status(format!("127.0.0.1:{base}").parse().unwrap()).await.expect("cluster status");
    assert_eq!(status.shards[0].voters.len(), 3, "{status:?}");
    assert!(dir.path().join("node-1.log").exists());

    // SIGTERM: every node stops, the ports close.
    let pid = dev.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "gantry dev did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its node processes are gone too. (Not checked by connecting to their
    // ports: a test running beside this one may have bound a freed port.)
    let pids: Vec<&str> = printed
        .iter()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 5 && ["1", "2", "3"].contains(&fields[0])).then(|| fields[4])
        })
        .collect();
    assert_eq!(pids.len(), 3, "node pids not printed:\n{text}");
    for pid in pids {
        // Gone, or a zombie (dead; this sandbox's init may not reap).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
        assert!(!running, "node process {pid} still running: {stat}");
    }
}
