//! A worker that answers every job with its own payload.
//!
//! ```sh
//! GANTRY_ADDR=127.0.0.1:50051 cargo run -p gantry-worker --example echo_worker -- emails
//! ```
//!
//! The queue comes from the first argument, else `GANTRY_QUEUE`, else
//! `default`. `GANTRY_ADDR` may list several nodes, comma-separated;
//! `GANTRY_WORKER_ID` names the worker; `ECHO_DELAY_MS` slows every job.
//! Brokers with TLS and tokens: `GANTRY_TLS_CA` (PEM CA of the brokers'
//! certificates), `GANTRY_TLS_CLIENT_CERT`/`GANTRY_TLS_CLIENT_KEY` (a client
//! certificate, if they require one) and `GANTRY_TOKEN` (a `worker` token).
//! Ctrl-C or SIGTERM shuts down gracefully: running jobs finish, the rest go back.

use bytes::Bytes;
use gantry_worker::{JobContext, JobError, Tls, Worker};

/// `ECHO_DELAY_MS` makes every job take that long (a slow job to watch, or
/// to kill the worker in the middle of).
async fn echo(ctx: JobContext) -> Result<Bytes, JobError> {
    let delay_ms: u64 = std::env::var("ECHO_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    if delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
    }
    tracing::info!(
        job_id = ctx.job_id(),
        attempt = ctx.attempt(),
        fencing_token = ctx.fencing_token(),
        bytes = ctx.payload().len(),
        "echoing"
    );
    Ok(ctx.payload().clone())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    let addrs = std::env::var("GANTRY_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let queue =
        std::env::args().nth(1).or_else(|| std::env::var("GANTRY_QUEUE").ok()).unwrap_or_else(|| "default".to_owned());

    let mut builder = Worker::builder(addrs.split(',').map(str::trim).filter(|a| !a.is_empty())).queue(&queue);
    if let Ok(id) = std::env::var("GANTRY_WORKER_ID") {
        builder = builder.worker_id(id);
    }
    if let Ok(ca) = std::env::var("GANTRY_TLS_CA") {
        let mut tls = Tls::ca_file(ca)?;
        if let (Ok(cert), Ok(key)) = (std::env::var("GANTRY_TLS_CLIENT_CERT"), std::env::var("GANTRY_TLS_CLIENT_KEY")) {
            tls = tls.identity_files(cert, key)?;
        }
        builder = builder.tls(tls);
    }
    if let Ok(token) = std::env::var("GANTRY_TOKEN") {
        builder = builder.token(token);
    }
    let worker = builder.build()?;
    tracing::info!(worker_id = worker.worker_id(), %queue, "echo worker starting");

    // Ctrl-C, or SIGTERM (how Kubernetes and systemd stop a process).
    let shutdown = async {
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this worker");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => {
                if let Err(e) = interrupted {
                    tracing::error!(error = %e, "cannot listen for Ctrl-C; stopping");
                }
                tracing::info!("Ctrl-C: shutting down");
            }
            () = terminate => tracing::info!("SIGTERM: shutting down"),
        }
    };
    worker.run(echo, shutdown).await?;
    Ok(())
}
