//! Load for history-checked process tests: producers that enqueue through
//! the SDK client and record every answer, and the recording workers'
//! handler.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{History, worker::Outcome};
use crate::v1 as proto;

/// An SDK client over every endpoint.
pub async fn client(endpoints: &[String]) -> gantry_worker::Client {
    gantry_worker::Client::connect(endpoints.to_vec()).await.expect("client connects")
}

/// Producer tasks enqueueing through the SDK client (all endpoints) until
/// stopped, each at most `max_each` jobs; every answer goes to the history.
pub struct Producers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Producers {
    pub fn spawn(history: &History, endpoints: &[String], queue: &str, count: usize, max_each: usize) -> Self {
        let (stop, stopped) = watch::channel(false);
        let tasks = (0..count)
            .map(|p| {
                let (history, endpoints, queue, stopped) =
                    (history.clone(), endpoints.to_vec(), queue.to_owned(), stopped.clone());
                tokio::spawn(async move {
                    let client = client(&endpoints).await;
                    let deadline = Instant::now() + Duration::from_secs(90);
                    for i in 0..max_each {
                        if *stopped.borrow() || Instant::now() > deadline {
                            break;
                        }
                        let payload = format!("{queue} producer {p} job {i}");
                        match tokio::time::timeout(Duration::from_secs(10), client.enqueue(&queue, payload).send())
                            .await
                        {
                            Ok(Ok(enqueued)) => history.enqueued(&enqueued.job_id),
                            Ok(Err(e)) => {
                                history.enqueue_unacknowledged(&queue, e);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(_) => history.enqueue_unacknowledged(&queue, "no answer within 10s"),
                        }
                        // Pacing, so producers do not starve the nodes on 2 cores.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Producers { stop, tasks }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("producer stops").expect("producer");
        }
    }
}

/// A handler for recording workers: a few milliseconds of work, then the
/// payload back.
pub async fn echo(assign: proto::Assign) -> Outcome {
    let job = assign.job.unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(2 + job.payload.len() as u64 % 10)).await;
    Outcome::Complete(job.payload)
}
