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

    pub fn notify(&self, job_id: JobId) {
        let waiters = self.by_job.lock().unwrap_or_else(|p| p.into_inner()).remove(&job_id);
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(());
        }
    }
}
