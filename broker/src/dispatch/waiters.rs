//! WaitJob waiters: woken when the state machine reports a job finished.

use std::{collections::HashMap, sync::Mutex};

use tokio::sync::oneshot;

use crate::queue::JobId;

#[derive(Default)]
pub struct Waiters {
    by_job: Mutex<HashMap<JobId, Vec<oneshot::Sender<()>>>>,
}

impl Waiters {
    /// Register before reading the job's state, so a finish that lands in
    /// between is not missed.
    pub fn register(&self, job_id: JobId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut by_job = self.by_job.lock().unwrap_or_else(|p| p.into_inner());
        let waiters = by_job.entry(job_id).or_default();
        // Drop waiters that gave up (timed out) so the list stays bounded.
        waiters.retain(|w| !w.is_closed());
        waiters.push(tx);
        rx
    }

    /// Drops the waiters of `job_id` that gave up, and the job's entry with
    /// them if none is left: a job that never finishes must not pin memory.
    pub fn forget_abandoned(&self, job_id: JobId) {
        let mut by_job = self.by_job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiters) = by_job.get_mut(&job_id) {
            waiters.retain(|w| !w.is_closed());
            if waiters.is_empty() {
                by_job.remove(&job_id);
            }
        }
    }

    pub fn notify(&self, job_id: JobId) {
        let waiters = self.by_job.lock().unwrap_or_else(|p| p.into_inner()).remove(&job_id);
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ShardId;

    #[tokio::test]
    async fn notify_wakes_and_abandoned_waiters_are_forgotten() {
        let waiters = Waiters::default();
        let job = JobId { shard: ShardId(0), seq: 1 };
        let woken = waiters.register(job);
        waiters.notify(job);
        assert!(woken.await.is_ok());
        drop(waiters.register(job));
        waiters.forget_abandoned(job);
        assert!(waiters.by_job.lock().unwrap().is_empty());
    }
}
