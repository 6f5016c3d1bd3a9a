//! What a handler sees of its job, and its line back to the session loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::LeaseLost;
use crate::proto;

/// Requests from handlers to the session loop, which owns the stream.
pub(crate) enum Command {
    Progress { key: JobKey, message: String, extend: Option<Duration>, reply: oneshot::Sender<Result<(), LeaseLost>> },
}

/// A lease is one job id under one fencing token: the same job may come back
/// under a newer token after its lease was lost.
pub(crate) type JobKey = (String, u64);

/// The job a handler is running, under one lease. Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<Inner>,
}

struct Inner {
    job: proto::Job,
    payload: Bytes,
    fencing_token: u64,
    attempt: u32,
    lease_deadline: Mutex<Option<SystemTime>>,
    lost: watch::Sender<bool>,
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("job_id", &self.job_id())
            .field("queue", &self.queue())
            .field("attempt", &self.attempt())
            .field("fencing_token", &self.fencing_token())
            .field("lease_lost", &self.is_lease_lost())
            .finish_non_exhaustive()
    }
}

impl JobContext {
    pub(crate) fn new(
        job: proto::Job,
        fencing_token: u64,
        attempt: u32,
        lease_deadline: Option<SystemTime>,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        // Copy the payload out once so `payload()` can hand out `&Bytes`
        // (cheap clones for handlers) while `job()` stays complete.
        let payload = Bytes::from(job.payload.clone());
        JobContext {
            inner: Arc::new(Inner {
                job,
                payload,
                fencing_token,
                attempt,
                lease_deadline: Mutex::new(lease_deadline),
                lost: watch::Sender::new(false),
                commands,
            }),
        }
    }

    pub fn job_id(&self) -> &str {
        &self.inner.job.id
    }

    pub fn queue(&self) -> &str {
        &self.inner.job.queue
    }

    pub fn payload(&self) -> &Bytes {
        &self.inner.payload
    }

    pub fn headers(&self) -> &HashMap<String, String> {
        &self.inner.job.headers
    }

    /// 1 on the first attempt.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// This lease's fencing token: larger than every earlier token of the
    /// job's shard. Pass it to downstream systems so they can refuse writes
    /// from an attempt that has since lost its lease.
    pub fn fencing_token(&self) -> u64 {
        self.inner.fencing_token
    }

    /// The job as it was assigned (state, priority, history, ...).
    pub fn job(&self) -> &proto::Job {
        &self.inner.job
    }

    /// When the lease ends unless progress extends it; updated by accepted
    /// [`progress`](Self::progress) calls.
    pub fn lease_deadline(&self) -> Option<SystemTime> {
        *self.inner.lease_deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports progress (shown by `GetJob`) and, with `extend`, moves the
    /// lease deadline to now + `extend`. Waits for the broker's answer; if the
    /// stream is down meanwhile, the report is sent again after reconnecting.
    ///
    /// `Err(LeaseLost)` means the job now belongs to someone else: stop, and
    /// expect the result of this attempt to be refused.
    pub async fn progress(&self, message: impl Into<String>, extend: Option<Duration>) -> Result<(), LeaseLost> {
        if self.is_lease_lost() {
            return Err(self.lease_lost_error());
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Progress { key: self.key(), message: message.into(), extend, reply };
        if self.inner.commands.send(cmd).is_err() {
            // The worker has stopped: nothing holds the lease any more.
            return Err(self.lease_lost_error());
        }
        answer.await.unwrap_or_else(|_| Err(self.lease_lost_error()))
    }

    /// Resolves once the lease is lost (revoked, refused as stale, or the
    /// session expired). Meant for `tokio::select!` next to the work.
    pub async fn lease_lost(&self) {
        let mut rx = self.inner.lost.subscribe();
        // `wait_for` fails only when the sender is gone, and `self` owns it.
        let _ = rx.wait_for(|lost| *lost).await;
    }

    pub fn is_lease_lost(&self) -> bool {
        *self.inner.lost.borrow()
    }

    pub(crate) fn key(&self) -> JobKey {
        (self.inner.job.id.clone(), self.inner.fencing_token)
    }

    /// Fires the lease-lost signal; `true` the first time only, so callers
    /// count and log each lost lease once.
    pub(crate) fn mark_lease_lost(&self) -> bool {
        self.inner.lost.send_if_modified(|lost| !std::mem::replace(lost, true))
    }

    pub(crate) fn set_lease_deadline(&self, deadline: SystemTime) {
        *self.inner.lease_deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
    }

    fn lease_lost_error(&self) -> LeaseLost {
        LeaseLost { job_id: self.inner.job.id.clone(), fencing_token: self.inner.fencing_token }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> (JobContext, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = proto::Job { id: "j1".into(), queue: "q".into(), payload: b"data".to_vec(), ..Default::default() };
        (JobContext::new(job, 42, 1, None, tx), rx)
    }

    #[tokio::test]
    async fn lease_lost_fires_once_and_wakes_waiters() {
        let (ctx, _rx) = ctx();
        assert_eq!(ctx.payload().as_ref(), b"data");
        assert_eq!(ctx.key(), ("j1".to_owned(), 42));
        let waiter = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.lease_lost().await }
        });
        assert!(!ctx.is_lease_lost());
        assert!(ctx.mark_lease_lost());
        assert!(!ctx.mark_lease_lost());
        waiter.await.expect("waiter finished");
        assert!(ctx.is_lease_lost());
        // Already lost: progress refuses without asking the broker.
        assert!(ctx.progress("x", None).await.is_err());
    }

    #[tokio::test]
    async fn progress_without_a_worker_is_lease_lost() {
        let (ctx, rx) = ctx();
        drop(rx);
        let err = ctx.progress("half way", None).await.expect_err("no worker");
        assert_eq!(err.fencing_token, 42);
    }
}
