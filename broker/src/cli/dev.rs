//! `gantry dev --nodes 3`: a local cluster for demos and experiments, one
//! `gantry serve` process per node, data under `./gantry-dev/`.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use gantry_worker::proto;
use tokio::process::{Child, Command};

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Number of nodes (1 to 7).
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Where the nodes keep their data (`node-<id>/`) and logs (`node-<id>.log`).
    #[arg(long, default_value = "./gantry-dev")]
    pub data_dir: PathBuf,
    /// Client port of node 1. Node i listens on base + 10*(i-1) for clients,
    /// one above for peers, two above for metrics.
    #[arg(long, default_value_t = 50051)]
    pub base_port: u16,
    /// More flags for every `gantry serve`, after `--`, e.g. `-- --session-ttl 5s`.
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

#[derive(Debug)]
struct DevNode {
    id: u16,
    client: String,
    peer: String,
    metrics: String,
    log: PathBuf,
}

fn plan(args: &DevArgs) -> anyhow::Result<Vec<DevNode>> {
    if !(1..=7).contains(&args.nodes) {
        bail!("--nodes: must be between 1 and 7, got {}", args.nodes);
    }
    let last_port = u32::from(args.base_port) + 10 * u32::from(args.nodes - 1) + 2;
    if last_port > u32::from(u16::MAX) || args.base_port == 0 {
        bail!("--base-port: {} leaves no room for {} nodes", args.base_port, args.nodes);
    }
    Ok((1..=args.nodes)
        .map(|id| {
            let client_port = args.base_port + 10 * (id - 1);
            DevNode {
                id,
                client: format!("127.0.0.1:{client_port}"),
                peer: format!("127.0.0.1:{}", client_port + 1),
                metrics: format!("127.0.0.1:{}", client_port + 2),
                log: args.data_dir.join(format!("node-{id}.log")),
            }
        })
        .collect())
}

/// Prints a line for the user. A closed stdout (whoever read it went away)
/// must not take the supervisor down with a panic and leave its nodes
/// running: the line is dropped instead.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let nodes = plan(&args)?;
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the gantry binary")?;
    let initial: Vec<String> = nodes.iter().map(|n| format!("{}={}", n.id, n.peer)).collect();
    let initial = initial.join(",");
    let mut children: Vec<(u16, Child)> = Vec::new();
    for node in &nodes {
        let log = std::fs::File::create(&node.log).with_context(|| format!("cannot create {}", node.log.display()))?;
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .args(["--node-id", &node.id.to_string()])
            .arg("--data-dir")
            .arg(args.data_dir.join(format!("node-{}", node.id)))
            .args(["--listen", &node.client, "--peer-listen", &node.peer, "--metrics-listen", &node.metrics]);
        if nodes.len() > 1 {
            command.args(["--initial-cluster", &initial]);
        }
        let child = command
            .args(&args.serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {}", node.id))?;
        children.push((node.id, child));
    }

    say!("gantry dev: {} node(s), data in {}", nodes.len(), args.data_dir.display());
    say!("{:>4}  {:<18} {:<18} {:<18} {:>7}  log", "node", "client", "peer", "metrics", "pid");
    for (node, (_, child)) in nodes.iter().zip(&children) {
        let pid = child.id().map_or_else(|| "-".to_owned(), |p| p.to_string());
        say!(
            "{:>4}  {:<18} {:<18} {:<18} {:>7}  {}",
            node.id,
            node.client,
            node.peer,
            node.metrics,
            pid,
            node.log.display()
        );
    }
    let endpoints: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    match wait_for_leader(&endpoints, &mut children).await {
        Ok(leader) => {
            say!("leader: node {leader}");
            say!("try:    gantry cluster status --addr {}", endpoints.join(","));
            say!("        gantry enqueue --addr {} --queue demo hello", endpoints[0]);
        }
        Err(e) => {
            stop(&mut children).await;
            return Err(e);
        }
    }
    say!("Ctrl-C stops every node.");

    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        (id, status) = first_exit(&mut children) => Err(anyhow::anyhow!(
            "node {id} exited ({status}); see {}",
            args.data_dir.join(format!("node-{id}.log")).display()
        )),
    };
    stop(&mut children).await;
    outcome
}

async fn wait_for_leader(endpoints: &[String], children: &mut [(u16, Child)]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (id, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("node {id} exited during start-up ({status}); see its log");
            }
        }
        for endpoint in endpoints {
            if let Ok(client) = gantry_worker::Client::connect([endpoint.clone()]).await
                && let Ok(status) = client.admin().cluster_status(proto::ClusterStatusRequest::default()).await
                && let Some(leader) = status.into_inner().shards.first().map(|s| s.leader_id).filter(|l| *l != 0)
            {
                return Ok(leader);
            }
        }
        if Instant::now() > deadline {
            bail!("no leader after 60s; see the node logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn first_exit(children: &mut [(u16, Child)]) -> (u16, String) {
    loop {
        for (id, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return (*id, status.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM (a clean shutdown of each node), then SIGKILL after a grace.
async fn stop(children: &mut [(u16, Child)]) {
    for (_, child) in children.iter() {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on a pid this process spawned and has not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for (id, child) in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
            eprintln!("node {id} did not stop in 10s; killing it");
            let _ = child.kill().await;
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(nodes: u16, base_port: u16) -> DevArgs {
        DevArgs { nodes, data_dir: "./gantry-dev".into(), base_port, serve_args: Vec::new() }
    }

    #[test]
    fn ports_are_spaced_and_checked() {
        let nodes = plan(&args(3, 50051)).unwrap();
        let clients: Vec<&str> = nodes.iter().map(|n| n.client.as_str()).collect();
        assert_eq!(clients, ["127.0.0.1:50051", "127.0.0.1:50061", "127.0.0.1:50071"]);
        assert_eq!(nodes[2].peer, "127.0.0.1:50072");
        assert!(plan(&args(0, 50051)).is_err());
        assert!(plan(&args(8, 50051)).is_err());
        assert!(plan(&args(3, 65530)).unwrap_err().to_string().contains("--base-port"));
    }
}
