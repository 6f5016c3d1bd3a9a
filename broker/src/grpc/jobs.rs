//! `gantry.v1.Jobs`: what producers call.

use std::{collections::BTreeMap, sync::Arc};

use gantry_proto::v1::{self as proto, jobs_server::Jobs};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::{convert, status, validate};
use crate::{
    dispatch::{Node, ShardNode},
    queue::{Applied, Command, JobId},
    raft::ProposeError,
};

pub struct JobsService {
    node: Arc<Node>,
    limits: validate::Limits,
}

impl JobsService {
    pub fn new(node: Arc<Node>, limits: validate::Limits) -> Self {
        JobsService { node, limits }
    }
}

/// The shard of a job id, or NOT_FOUND: an id of a shard this cluster does
/// not have cannot name one of its jobs.
pub(super) fn shard_of(node: &Node, job_id: JobId) -> Result<&Arc<ShardNode>, Status> {
    node.shard_for_job(job_id).ok_or_else(|| Status::not_found(format!("job {job_id} not found")))
}

/// Reads after this see every write acknowledged before the call, even
/// across a leader change: a deposed leader finds out here instead of
/// answering from a stale state, a follower waits until it has applied what
/// the leader confirmed.
pub(super) async fn linearizable(shard: &ShardNode) -> Result<(), Status> {
    shard.linearizable().await.map_err(status::propose_error)
}

pub(super) fn read_job(shard: &ShardNode, job_id: JobId) -> Result<proto::Job, Status> {
    let now = shard.clock.now_ms();
    let applied = shard.raft.state().read();
    let view = applied.queue.view(job_id, now).ok_or_else(|| Status::not_found(format!("job {job_id} not found")))?;
    convert::job_to_proto(&view, true).map_err(|e| status::payload_unreadable(job_id, &e))
}

/// Answers a command that yields a job (cancel, retry).
pub(super) async fn propose_for_job(shard: &ShardNode, command: Command, what: &str) -> Result<proto::Job, Status> {
    match shard.propose(command).await.map_err(status::propose_error)? {
        Applied::Job(view) => {
            convert::job_to_proto(&view, true).map_err(|e| status::payload_unreadable(view.job.id, &e))
        }
        Applied::Rejected(rejection) => Err(status::rejection(rejection)),
        other => Err(status::unexpected(what, &other)),
    }
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn enqueue(
        &self,
        request: Request<proto::EnqueueRequest>,
    ) -> Result<Response<proto::EnqueueResponse>, Status> {
        let new = validate::enqueue(request.get_ref(), &self.limits, self.node.clock.now_ms())?;
        let shard = self.node.shard_for_queue(&new.queue);
        let span = tracing::debug_span!("enqueue", queue = %new.queue, shard = %shard.raft.shard(), job_id = tracing::field::Empty);
        async move {
            match shard.propose(Command::Enqueue(new)).await.map_err(status::propose_error)? {
                Applied::Enqueued { job_id, created, state } => {
                    tracing::Span::current().record("job_id", tracing::field::display(job_id));
                    tracing::debug!(created, ?state, "enqueued");
                    let response = proto::EnqueueResponse {
                        job_id: job_id.to_string(),
                        created,
                        state: convert::job_state_to_proto(state) as i32,
                    };
                    Ok(status::hint_leader(shard, Response::new(response)))
                }
                Applied::Rejected(rejection) => Err(status::rejection(rejection)),
                other => Err(status::unexpected("enqueue", &other)),
            }
        }
        .instrument(span)
        .await
    }

    async fn enqueue_batch(
        &self,
        request: Request<proto::EnqueueBatchRequest>,
    ) -> Result<Response<proto::EnqueueBatchResponse>, Status> {
        let now = self.node.clock.now_ms();
        let jobs = validate::enqueue_batch(request.get_ref(), &self.limits, now)?;
        let total = jobs.len();
        let first_shard = jobs.first().map(|job| self.node.shard_for_queue(&job.queue).clone());
        // One log entry per shard, so each shard's part commits together.
        let mut by_shard: BTreeMap<usize, (Vec<usize>, Vec<Command>)> = BTreeMap::new();
        for (i, job) in jobs.into_iter().enumerate() {
            let shard = self.node.shard_for_queue(&job.queue);
            let slot = self.node.shards.iter().position(|s| Arc::ptr_eq(s, shard)).expect("shard of this node");
            let (indexes, commands) = by_shard.entry(slot).or_default();
            indexes.push(i);
            commands.push(Command::Enqueue(job));
        }
        let proposals = by_shard.into_iter().map(|(slot, (indexes, commands))| {
            let shard = self.node.shards[slot].clone();
            async move {
                match shard.propose_all(commands).await {
                    Ok(applied) => Ok((indexes, applied)),
                    Err(e) => Err((indexes, e)),
                }
            }
        });
        let outcomes = futures::future::join_all(proposals).await;
        let results = batch_results(total, outcomes)?;
        let response = Response::new(proto::EnqueueBatchResponse { results });
        Ok(match &first_shard {
            Some(shard) => status::hint_leader(shard, response),
            None => response,
        })
    }

    async fn get_job(&self, request: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let job_id = validate::job_id("job_id", &request.get_ref().job_id)?;
        let shard = shard_of(&self.node, job_id)?;
        linearizable(shard).await?;
        read_job(shard, job_id).map(|job| status::hint_leader(shard, Response::new(job)))
    }

    async fn wait_job(&self, request: Request<proto::WaitJobRequest>) -> Result<Response<proto::Job>, Status> {
        let request = request.into_inner();
        let job_id = validate::job_id("job_id", &request.job_id)?;
        let timeout = validate::wait_timeout(request.timeout.as_ref())?;
        let shard = shard_of(&self.node, job_id)?;
        // Register first: a finish between the read and the wait still wakes us.
        let finished = shard.waiters.register(job_id);
        linearizable(shard).await?;
        let job = read_job(shard, job_id)?;
        if is_terminal(&job) {
            return Ok(status::hint_leader(shard, Response::new(job)));
        }
        let woken = tokio::time::timeout(timeout, finished).await;
        if woken.is_err() {
            shard.waiters.forget_abandoned(job_id);
        }
        read_job(shard, job_id).map(|job| status::hint_leader(shard, Response::new(job)))
    }

    async fn cancel_job(&self, request: Request<proto::CancelJobRequest>) -> Result<Response<proto::Job>, Status> {
        let command = validate::cancel(request.get_ref(), &self.limits)?;
        let Command::Cancel { job_id, .. } = &command else { unreachable!("validate::cancel builds a Cancel") };
        let shard = shard_of(&self.node, *job_id)?;
        let span = tracing::info_span!("cancel", job_id = %job_id, shard = %shard.raft.shard());
        let job = propose_for_job(shard, command, "cancel").instrument(span.clone()).await?;
        span.in_scope(|| tracing::info!(queue = %job.queue, "job cancelled"));
        Ok(status::hint_leader(shard, Response::new(job)))
    }
}

/// Each shard's part of a batch, in its jobs' request order: their indexes
/// in the request and the part's outcome.
type BatchPart = Result<(Vec<usize>, Vec<Applied>), (Vec<usize>, ProposeError)>;

/// Answers a batch from its parts' outcomes. A call failing as a whole
/// tells the client to send it all again, which would enqueue twice what
/// other shards already committed: only when no part committed; else the
/// failed part's jobs carry the error in their results.
fn batch_results(total: usize, outcomes: Vec<BatchPart>) -> Result<Vec<proto::EnqueueBatchResult>, Status> {
    if outcomes.iter().all(Result::is_err) {
        // One part of unknown outcome makes the whole call's unknown: the
        // client must not be invited to send the others again with it.
        let mut errors: Vec<ProposeError> = outcomes.into_iter().filter_map(Result::err).map(|(_, e)| e).collect();
        let unknown = errors.iter().position(|e| matches!(e, ProposeError::OutcomeUnknown { .. })).unwrap_or(0);
        return Err(status::propose_error(errors.swap_remove(unknown)));
    }
    let mut results = vec![proto::EnqueueBatchResult::default(); total];
    for outcome in outcomes {
        let (indexes, applied) = match outcome {
            Ok(done) => done,
            Err((indexes, e)) => {
                let message = status::propose_error(e).message().to_owned();
                for i in indexes {
                    results[i].error = format!("not enqueued, or outcome unknown: {message}");
                }
                continue;
            }
        };
        for (i, applied) in indexes.into_iter().zip(applied) {
            results[i] = match applied {
                Applied::Enqueued { job_id, created, state } => proto::EnqueueBatchResult {
                    job_id: job_id.to_string(),
                    created,
                    state: convert::job_state_to_proto(state) as i32,
                    error: String::new(),
                },
                Applied::Rejected(rejection) => {
                    proto::EnqueueBatchResult { error: rejection.to_string(), ..Default::default() }
                }
                other => return Err(status::unexpected("enqueue", &other)),
            };
        }
    }
    Ok(results)
}

fn is_terminal(job: &proto::Job) -> bool {
    use proto::JobState::*;
    matches!(proto::JobState::try_from(job.state), Ok(Succeeded | Failed | Cancelled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{JobState, Rejection, ShardId};

    fn enqueued(shard: u32, seq: u64) -> Applied {
        Applied::Enqueued { job_id: JobId { shard: ShardId(shard), seq }, created: true, state: JobState::Ready }
    }

    #[test]
    fn a_batch_answers_per_job_when_some_shards_committed_and_fails_only_when_none_did() {
        let lost = ProposeError::OutcomeUnknown { shard: ShardId(1), leader: 2, message: "reset".into() };
        let parts = vec![
            Ok((
                vec![0, 3],
                vec![enqueued(0, 7), Applied::Rejected(Rejection::JobNotFound(JobId { shard: ShardId(0), seq: 9 }))],
            )),
            Err((vec![1, 2], lost.clone())),
        ];
        let results = batch_results(4, parts).expect("a part committed: answered per job");
        assert_eq!(results[0].job_id, "0-7");
        assert!(results[0].error.is_empty());
        for i in [1, 2] {
            assert!(results[i].job_id.is_empty(), "{results:?}");
            assert!(results[i].error.starts_with("not enqueued, or outcome unknown: shard 1: node 2"), "{results:?}");
        }
        assert!(results[3].error.contains("not found"), "{results:?}");

        let unreachable = ProposeError::LeaderUnreachable { shard: ShardId(0), leader: 3, message: "refused".into() };
        let failed = batch_results(2, vec![Err((vec![0], unreachable.clone())), Err((vec![1], lost))])
            .expect_err("nothing known to be committed: the call fails");
        assert_eq!(failed.code(), tonic::Code::Unknown, "one part may be in: never UNAVAILABLE: {failed:?}");
        assert_eq!(failed.metadata().get("gantry-outcome").map(|v| v.to_str().unwrap()), Some("unknown"));
        let failed = batch_results(2, vec![Err((vec![0], unreachable.clone())), Err((vec![1], unreachable))])
            .expect_err("nothing committed: the call fails");
        assert_eq!(failed.code(), tonic::Code::Unavailable, "safe to send again: {failed:?}");
    }
}
