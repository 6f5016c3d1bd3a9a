//! Client-side batching of enqueues: concurrent `enqueue().send()` calls of
//! one [`Client`](crate::Client) are packed into `EnqueueBatch` RPCs, so a
//! producer with many requests in flight pays one gRPC call (and the broker
//! one log entry) per batch instead of per job. Each caller still gets its
//! own answer, and only once its job is committed.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{Client, Enqueued, Error, proto};

/// Batches in flight at once; later enqueues queue up and batch together.
const MAX_BATCHES_IN_FLIGHT: usize = 16;

struct Pending {
    req: proto::EnqueueRequest,
    reply: oneshot::Sender<Result<Enqueued, Error>>,
}

#[derive(Debug)]
pub(crate) struct Coalescer {
    tx: mpsc::UnboundedSender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("queue", &self.req.queue).finish_non_exhaustive()
    }
}

impl Coalescer {
    /// `client` must not coalesce itself (the task would keep itself alive).
    pub(crate) fn spawn(client: Client, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, max_batch.max(1), rx));
        Coalescer { tx }
    }

    pub(crate) async fn enqueue(&self, req: proto::EnqueueRequest) -> Result<Enqueued, Error> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Protocol("the enqueue batching task stopped".to_owned());
        self.tx.send(Pending { req, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(client: Client, max_batch: usize, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    // A slot first, then drain: while every slot is busy, calls pile up and
    // the next batch is bigger.
    while let Ok(permit) = in_flight.clone().acquire_owned().await {
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            send(&client, batch).await;
            drop(permit);
        });
    }
}

/// Sends one batch and answers every caller. A batch the broker refuses as
/// a whole because of one bad job (`jobs[3].queue: ...`) fails only that
/// job; the others are sent again.
async fn send(client: &Client, mut batch: Vec<Pending>) {
    while !batch.is_empty() {
        let reqs = batch.iter().map(|p| p.req.clone()).collect();
        match client.enqueue_batch(reqs).await {
            Ok(results) => {
                let mut results = results.into_iter();
                for pending in batch {
                    let answer = match results.next() {
                        Some(r) if r.error.is_empty() && !r.job_id.is_empty() => {
                            Ok(Enqueued { job_id: r.job_id, created: r.created })
                        }
                        // The broker refuses single jobs of a batch only for
                        // their queue's depth limit.
                        Some(r) => Err(Error::Status(tonic::Status::resource_exhausted(r.error))),
                        None => Err(Error::Protocol("EnqueueBatch answered fewer results than jobs".to_owned())),
                    };
                    let _ = pending.reply.send(answer);
                }
                return;
            }
            Err(Error::Status(status)) => {
                if let Some((index, message)) = bad_job(&status, batch.len()) {
                    let bad = batch.remove(index);
                    let _ = bad.reply.send(Err(Error::Status(tonic::Status::invalid_argument(message))));
                    continue;
                }
                for pending in batch {
                    let _ = pending.reply.send(Err(Error::Status(status.clone())));
                }
                return;
            }
            Err(other) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(other.duplicate()));
                }
                return;
            }
        }
    }
}

/// `INVALID_ARGUMENT` naming `jobs[i].<field>`: the index and the message as
/// a single enqueue would have had it (`<field>: ...`).
fn bad_job(status: &tonic::Status, len: usize) -> Option<(usize, String)> {
    if status.code() != tonic::Code::InvalidArgument {
        return None;
    }
    let rest = status.message().strip_prefix("jobs[")?;
    let (index, rest) = rest.split_once(']')?;
    let index: usize = index.parse().ok()?;
    let message = rest.strip_prefix('.').unwrap_or(rest).to_owned();
    (index < len).then_some((index, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_job_is_found_by_its_index() {
        let status = tonic::Status::invalid_argument("jobs[3].queue: must match [A-Za-z0-9._-]{1,128}");
        assert_eq!(bad_job(&status, 5), Some((3, "queue: must match [A-Za-z0-9._-]{1,128}".to_owned())));
        assert_eq!(bad_job(&status, 3), None, "index out of the batch");
        assert_eq!(bad_job(&tonic::Status::invalid_argument("jobs: must hold at least one job"), 5), None);
        assert_eq!(bad_job(&tonic::Status::unavailable("jobs[1].queue"), 5), None);
    }
}
