//! `gantry.v1.Worker.Connect`: one bidirectional stream per worker process.
//! Hello opens (or resumes) a session in every shard that owns one of its
//! queues; assignments are pushed as the dispatcher commits them; every
//! result is proposed and answered with an `ack`. Shards this node does not
//! lead are served by their leaders, over one stream part per leader
//! (`relay.rs`).

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{FutureExt as _, Stream};
use gantry_proto::v1::{self as proto, broker_message::Kind as Out, worker_message::Kind as In, worker_server::Worker};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    convert,
    forward::FORWARDED_METADATA,
    relay::{Part, PartHello},
    status, validate,
};
use crate::{
    dispatch::{Node, Outbound, ShardNode},
    queue::{Applied, Command, ExpiryReason, FencingToken, JobId, Rejection, SessionId},
    raft::ProposeError,
};

type OutTx = mpsc::UnboundedSender<Result<proto::BrokerMessage, Status>>;

pub struct WorkerService {
    node: Arc<Node>,
    limits: validate::Limits,
}

impl WorkerService {
    pub fn new(node: Arc<Node>, limits: validate::Limits) -> Self {
        WorkerService { node, limits }
    }
}

fn message(kind: Out) -> Result<proto::BrokerMessage, Status> {
    Ok(proto::BrokerMessage { kind: Some(kind) })
}

/// A stream that is set up, as the rest of the connection sees it.
struct Connection {
    node: Arc<Node>,
    limits: validate::Limits,
    session_id: SessionId,
    /// The shards of the stream this node leads (and pushes assignments of).
    shards: Vec<Arc<ShardNode>>,
    /// Every shard of the stream's queues, wherever it is led.
    stream_shards: Vec<Arc<ShardNode>>,
    out: OutTx,
    /// Set once the worker said goodbye, so the end of its session closes
    /// the stream cleanly instead of as an error.
    goodbye: Arc<AtomicBool>,
    /// Read-held by every batch of results being proposed; a goodbye takes
    /// it to wait for them all.
    answering: Arc<tokio::sync::RwLock<()>>,
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<proto::BrokerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<proto::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // A part of a stream another node set up: this node serves it
        // itself or refuses, it never sends it on again.
        let forwarded = request.metadata().contains_key(FORWARDED_METADATA);
        let mut inbound = request.into_inner();
        let ttl = self.node.settings.session_ttl;
        let first = tokio::time::timeout(ttl, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("hello: no hello within session_ttl"))??
            .ok_or_else(|| Status::invalid_argument("hello: the stream ended before hello"))?;
        let Some(In::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument("hello: the first message on Worker.Connect must be hello"));
        };
        let hello = validate::hello(&hello, &self.limits)?;

        let mut shards: Vec<Arc<ShardNode>> = Vec::new();
        for queue in &hello.queues {
            let shard = self.node.shard_for_queue(queue);
            if !shards.iter().any(|s| Arc::ptr_eq(s, shard)) {
                shards.push(shard.clone());
            }
        }
        let (local, remote) = self.by_leader(&shards, hello.max_in_flight, forwarded)?;
        // A worker that is reconnecting is not silent; an expiry already
        // decided is let through first, so the resume sees its outcome.
        // (On other leaders the session is resumed from here first, then
        // by the part, which waits there: a verdict that lands between the
        // two makes the part's answer name another session, and the
        // connect fails for the worker to try again.)
        if let Some(old) = &hello.resume_session_id {
            for shard in &local {
                // Bounded: an expiry stuck in a leader change must not keep
                // the worker out; the state machine decides either way.
                let _ = tokio::time::timeout(ttl, shard.registry.reconnecting(old)).await;
            }
        }
        let fresh = SessionId(format!("{}-{:016x}", self.node.node_id, rand::random::<u64>()).into());
        let opened = self.open_sessions(&hello, &shards, &fresh).await?;
        let session_id = opened.session_id;
        let resumed = opened.resumed;

        let (out, out_rx) = mpsc::unbounded_channel();
        // Queued first: the parts may relay assignments as soon as they open.
        let _ = out.send(message(Out::Welcome(proto::Welcome {
            session_id: session_id.to_string(),
            heartbeat_interval: Some(convert::duration(self.node.settings.heartbeat_interval.as_millis() as u64)),
            session_ttl: Some(convert::duration(ttl.as_millis() as u64)),
            node_id: self.node.node_id,
            resumed,
        })));
        let mut parts = Vec::with_capacity(remote.len());
        for (leader, (peer, group)) in remote {
            let part = PartHello {
                leader,
                peer,
                shards: group.iter().map(|(shard, _)| shard.raft.shard()).collect(),
                hello: proto::Hello {
                    worker_id: hello.worker_id.clone(),
                    queues: group.iter().flat_map(|(shard, _)| self.queues_of(&hello, shard)).collect(),
                    max_in_flight: group.iter().map(|(_, slots)| slots).sum(),
                    resume_session_id: session_id.to_string(),
                },
            };
            let leader = part.leader;
            // Bounded: a leader that hangs (stopped, cut off) must not hold
            // the worker here; it reconnects and the shards regroup.
            let open = Part::open(&self.node.channels, self.node.node_id, part, out.clone());
            let opened = tokio::time::timeout(ttl, open).await.unwrap_or_else(|_| {
                Err(Status::unavailable(format!(
                    "node {leader}, a leader of this stream's shards, did not answer within session_ttl; reconnect"
                )))
            });
            match opened {
                Ok(part) => parts.push(part),
                Err(status) => {
                    if !resumed {
                        // The worker never hears of this session: it must not
                        // hold jobs (pushed by the parts already open) until
                        // its ttl runs out.
                        tokio::spawn(end_unused_session(shards.clone(), session_id.clone()));
                    }
                    return Err(status);
                }
            }
        }
        let connection = Arc::new(Connection {
            node: self.node.clone(),
            limits: self.limits.clone(),
            session_id: session_id.clone(),
            shards: local.clone(),
            stream_shards: shards.clone(),
            out,
            goodbye: Arc::new(AtomicBool::new(false)),
            answering: Arc::default(),
        });
        if let Some(old) = &hello.resume_session_id {
            connection.revoke_lost_leases(old, &opened.lost);
        }
        let mut generations = Vec::with_capacity(local.len());
        for shard in &local {
            let (tx, rx) = mpsc::unbounded_channel();
            if resumed {
                // An assignment committed just before a leader change or a
                // broken stream must not wait for its lease to run out.
                for assignment in held_assignments(shard, &session_id) {
                    let _ = tx.send(Outbound::Assign(assignment));
                }
            }
            generations.push(shard.registry.attach(&session_id, tx));
            tokio::spawn(connection.clone().forward(shard.clone(), rx));
            // The session may have expired after it was opened and before
            // the stream attached (its end was handled with no stream to
            // close): end the stream now, or it would wait for work forever.
            if shard.raft.state().read().queue.session(&session_id).is_none() {
                shard.registry.remove(&session_id);
            }
            shard.wake_dispatcher();
        }
        let leaders: Vec<u64> = parts.iter().map(Part::leader).collect();
        tracing::info!(session = %session_id, worker = %hello.worker_id, queues = ?hello.queues, max_in_flight = hello.max_in_flight, resumed, other_leaders = ?leaders, "worker connected");
        tokio::spawn(connection.serve(inbound, generations, parts));
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(out_rx))))
    }
}

/// What opening the stream's session did, over all of its shards.
struct Opened {
    session_id: SessionId,
    resumed: bool,
    /// Leases the worker's previous session lost before it reconnected.
    lost: Vec<(JobId, FencingToken)>,
}

/// Shards by who leads them: this node, or others (per leader: its peer
/// address and its shards, each with the slots of `max_in_flight` it gets).
type ByLeader = (Vec<Arc<ShardNode>>, BTreeMap<u64, (String, Vec<(Arc<ShardNode>, u32)>)>);

impl WorkerService {
    /// Groups a stream's shards by their leaders. A part another node
    /// forwarded here must be led here: it is refused (with the leader's
    /// address) rather than sent on again.
    fn by_leader(&self, shards: &[Arc<ShardNode>], max_in_flight: u32, forwarded: bool) -> Result<ByLeader, Status> {
        let (mut local, mut remote) = (Vec::new(), BTreeMap::new());
        for (position, shard) in shards.iter().enumerate() {
            if shard.raft.is_leader() {
                local.push(shard.clone());
                continue;
            }
            match shard.raft.leader().filter(|(id, _)| *id != self.node.node_id) {
                Some((id, leader)) if !forwarded => {
                    let slots = slots_in_shard(max_in_flight, shards.len(), position);
                    let (_, group): &mut (String, Vec<_>) =
                        remote.entry(id).or_insert_with(|| (leader.peer, Vec::new()));
                    group.push((shard.clone(), slots));
                }
                leader => {
                    return Err(status::propose_error(ProposeError::NotLeader {
                        shard: shard.raft.shard(),
                        leader: leader.map(|(id, node)| (id, node.client)),
                    }));
                }
            }
        }
        Ok((local, remote))
    }

    /// The worker's queues that `shard` owns.
    fn queues_of(&self, hello: &validate::ValidHello, shard: &Arc<ShardNode>) -> Vec<String> {
        hello.queues.iter().filter(|q| Arc::ptr_eq(self.node.shard_for_queue(q), shard)).cloned().collect()
    }

    /// Opens (or resumes) the session in every shard of the worker's queues,
    /// replicated before the worker hears of it so every replica knows the
    /// session that will hold jobs. Whether a resume succeeds is decided by
    /// the state machine as the entry applies.
    async fn open_sessions(
        &self,
        hello: &validate::ValidHello,
        shards: &[Arc<ShardNode>],
        fresh: &SessionId,
    ) -> Result<Opened, Status> {
        let mut outcomes = Vec::with_capacity(shards.len());
        for (position, shard) in shards.iter().enumerate() {
            let queues = self.queues_of(hello, shard);
            let worker_id = hello.worker_id.clone();
            let max_in_flight = slots_in_shard(hello.max_in_flight, shards.len(), position);
            let command = match &hello.resume_session_id {
                Some(old) => Command::ResumeSession {
                    session_id: old.clone(),
                    fallback: fresh.clone(),
                    worker_id,
                    queues,
                    max_in_flight,
                },
                None => Command::OpenSession { session_id: fresh.clone(), worker_id, queues, max_in_flight },
            };
            // On the shard's leader, wherever that is: a part opened on
            // another leader then resumes this very session.
            match shard.propose(command).await.map_err(status::propose_error)? {
                Applied::SessionOpened { resumed, lost, .. } => outcomes.push((shard, resumed, lost)),
                other => return Err(status::unexpected("open session", &other)),
            }
        }
        let resumed = hello.resume_session_id.is_some() && outcomes.iter().all(|(_, resumed, _)| *resumed);
        let mut lost: Vec<_> = outcomes.iter().flat_map(|(_, _, lost)| lost.iter().copied()).collect();
        if resumed || hello.resume_session_id.is_none() {
            let session_id = hello.resume_session_id.clone().filter(|_| resumed).unwrap_or_else(|| fresh.clone());
            return Ok(Opened { session_id, resumed, lost });
        }
        // One id names the session in every shard, so a resume that came
        // too late in one shard cannot keep the old session in the others:
        // end it there too and use the fresh session everywhere.
        let old = hello.resume_session_id.clone().expect("a resume");
        for (position, (shard, _, _)) in outcomes.iter().enumerate().filter(|(_, (_, resumed, _))| *resumed) {
            let expire = Command::ExpireSession { session_id: old.clone(), reason: ExpiryReason::Superseded };
            let committed = shard.commit(vec![expire]).await.map_err(status::propose_error)?;
            if !shard.applied_through(committed.index).await {
                let lagging = ProposeError::Lagging { shard: shard.raft.shard(), index: committed.index };
                return Err(status::propose_error(lagging));
            }
            if let Some(expired) = shard.raft.state().read().queue.expired_session(&old) {
                lost.extend(expired.lost.iter().copied());
            }
            let queues = self.queues_of(hello, shard);
            let open = Command::OpenSession {
                session_id: fresh.clone(),
                worker_id: hello.worker_id.clone(),
                queues,
                max_in_flight: slots_in_shard(hello.max_in_flight, shards.len(), position),
            };
            shard.propose(open).await.map_err(status::propose_error)?;
        }
        Ok(Opened { session_id: fresh.clone(), resumed: false, lost })
    }
}

/// Ends a session opened for a stream that failed before its worker heard
/// of it; jobs pushed to it meanwhile go back to their queues at once.
async fn end_unused_session(shards: Vec<Arc<ShardNode>>, session_id: SessionId) {
    for shard in shards {
        let command = Command::ExpireSession { session_id: session_id.clone(), reason: ExpiryReason::Goodbye };
        if let Err(e) = shard.propose(command).await {
            tracing::debug!(shard = %shard.raft.shard(), session = %session_id, error = %e, "unused session left to expire");
        }
    }
}

/// A worker's `max_in_flight` split over the shards its stream spans: each
/// shard fills its own session, so giving every shard the whole limit would
/// hand the worker up to shards × max_in_flight jobs. At least one each
/// (a limit below the shard count is exceeded by that much).
fn slots_in_shard(max_in_flight: u32, shards: usize, position: usize) -> u32 {
    let shards = shards.max(1) as u32;
    let extra = u32::from((position as u32) < max_in_flight % shards);
    (max_in_flight / shards + extra).max(1)
}

/// The assignments a session holds now, to send again on resume.
fn held_assignments(shard: &ShardNode, session_id: &SessionId) -> Vec<crate::queue::Assignment> {
    let applied = shard.raft.state().read();
    let Some(session) = applied.queue.session(session_id) else { return Vec::new() };
    session
        .held
        .iter()
        .filter_map(|job_id| {
            let job = applied.queue.job(*job_id)?;
            let lease = job.lease()?;
            Some(crate::queue::Assignment {
                session_id: session_id.clone(),
                job_id: *job_id,
                token: lease.token,
                attempt: job.attempt,
                lease_deadline_ms: lease.deadline_ms,
            })
        })
        .collect()
}

impl Connection {
    /// A worker resuming a session that expired meanwhile is told of every
    /// job it thought it held: those now belong to someone else.
    fn revoke_lost_leases(&self, old: &SessionId, lost: &[(JobId, FencingToken)]) {
        for (job_id, token) in lost {
            let _ = self.out.send(message(Out::Revoke(proto::Revoke {
                job_id: job_id.to_string(),
                fencing_token: token.0,
                reason: format!("session {old} expired before this worker reconnected; the job went back to the queue"),
            })));
        }
    }

    /// Turns the dispatcher's pushes into protobuf messages. Ends when the
    /// registry drops the sender: the session ended, or another stream of
    /// the same session took over.
    async fn forward(self: Arc<Self>, shard: Arc<ShardNode>, mut rx: mpsc::UnboundedReceiver<Outbound>) {
        let mut shutdown = self.node.shutdown.clone();
        loop {
            let outbound = tokio::select! {
                outbound = rx.recv() => match outbound {
                    Some(outbound) => outbound,
                    None => break,
                },
                _ = shutdown.wait_for(|stop| *stop) => {
                    let _ = self.out.send(Err(Status::unavailable("broker shutting down; reconnect to another node or retry")));
                    return;
                }
            };
            let kind = match outbound {
                Outbound::Assign(a) => {
                    let now = self.node.clock.now_ms();
                    // The job is shared, not copied: converted after the lock
                    // is released, so apply never waits for the conversion.
                    let Some(view) = shard.raft.state().read().queue.view(a.job_id, now) else { continue };
                    // Lost or finished since it was assigned: nothing to run.
                    if view.job.lease().is_none_or(|l| l.token != a.token) {
                        continue;
                    }
                    // Unreadable (a disk fault): not sent; the lease runs out
                    // and the job is offered again, by then maybe by a
                    // leader whose disk reads.
                    let job = match convert::job_to_proto(&view, true) {
                        Ok(job) => job,
                        Err(e) => {
                            tracing::error!(job = %a.job_id, error = %e, "the payload of an assigned job cannot be read: not sent");
                            continue;
                        }
                    };
                    Out::Assign(proto::Assign {
                        job: Some(job),
                        fencing_token: a.token.0,
                        attempt: a.attempt,
                        lease_deadline: Some(convert::timestamp(a.lease_deadline_ms)),
                    })
                }
                Outbound::Revoke { job_id, token, reason } => {
                    Out::Revoke(proto::Revoke { job_id: job_id.to_string(), fencing_token: token.0, reason })
                }
                Outbound::LeaderLost { leader } => {
                    let shard = shard.raft.shard();
                    let status = status::propose_error(crate::raft::ProposeError::NotLeader { shard, leader });
                    let _ = self.out.send(Err(status));
                    return;
                }
            };
            if self.out.send(message(kind)).is_err() {
                return;
            }
        }
        if !self.goodbye.load(Ordering::Acquire) {
            let still_open = shard.raft.state().read().queue.session(&self.session_id).is_some();
            let status = if still_open {
                Status::aborted(format!("session {} was taken over by a newer stream", self.session_id))
            } else {
                Status::aborted(format!(
                    "session {} has ended (expired: no heartbeat within session_ttl, or expired by an admin); reconnect to open a new one",
                    self.session_id
                ))
            };
            let _ = self.out.send(Err(status));
        }
    }

    /// Reads the worker's messages until the stream ends.
    async fn serve(
        self: Arc<Self>,
        mut inbound: Streaming<proto::WorkerMessage>,
        generations: Vec<u64>,
        mut parts: Vec<Part>,
    ) {
        let mut shutdown = self.node.shutdown.clone();
        let keep_alive = self.node.settings.heartbeat_interval / 2;
        let mut results = Vec::new();
        'stream: loop {
            let received = tokio::select! {
                received = inbound.message() => received,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let mut received = Some(received);
            let mut touched = false;
            // Results already received share one proposal and one task: a
            // busy worker's stream carries many per read.
            while let Some(next) = received.take() {
                let msg = match next {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break 'stream,
                    Err(status) => {
                        tracing::debug!(session = %self.session_id, %status, "worker stream broke");
                        break 'stream;
                    }
                };
                // Any message shows the worker alive; once per read is enough.
                if !std::mem::replace(&mut touched, true) {
                    for shard in &self.shards {
                        shard.registry.touch(&self.session_id);
                    }
                    for part in &mut parts {
                        part.keep_alive(keep_alive);
                    }
                    if let Some(status) = self.moved_leader(&parts) {
                        let _ = self.out.send(Err(status));
                        break 'stream;
                    }
                }
                if matches!(msg.kind, Some(In::Goodbye(_))) {
                    // The leaders end the session when told: every result
                    // read before the goodbye is committed first, or it
                    // would find its lease gone. Bounded: a shard without a
                    // quorum must not keep the others' jobs held.
                    self.goodbye.store(true, Ordering::Release);
                    self.clone().answer(std::mem::take(&mut results));
                    let ttl = self.node.settings.session_ttl;
                    let _settled = tokio::time::timeout(ttl, self.answering.write()).await;
                }
                if !relay(&msg, &mut parts) {
                    // The part's relay task ended the worker's stream with the reason.
                    break 'stream;
                }
                match self.read(msg, &mut results).await {
                    Read::Next if results.len() < RESULTS_PER_PROPOSAL_MAX => {
                        received = inbound.message().now_or_never();
                    }
                    Read::Next => {}
                    Read::End => break 'stream,
                }
            }
            self.clone().answer(std::mem::take(&mut results));
        }
        self.clone().answer(results);
        for (shard, generation) in self.shards.iter().zip(generations) {
            shard.registry.detach(&self.session_id, generation);
        }
    }

    /// A shard whose part no longer goes to its leader: the stream ends
    /// (UNAVAILABLE, the new leader named) so the worker reconnects and its
    /// shards are grouped by their leaders anew.
    fn moved_leader(&self, parts: &[Part]) -> Option<Status> {
        let leader_of = |id| self.node.shard(id)?.raft.leader().map(|(l, _)| l);
        let (part, (shard, now)) = parts.iter().find_map(|part| part.moved(leader_of).map(|m| (part, m)))?;
        let leader = self.node.shard(shard)?.raft.leader().map(|(id, n)| (id, n.client));
        tracing::info!(session = %self.session_id, %shard, from = part.leader(), to = now, "a shard of this stream changed leader: ending the stream for the worker to regroup");
        Some(status::propose_error(ProposeError::NotLeader { shard, leader }))
    }

    /// Handles one message; a result (or progress) joins `results` to be
    /// proposed with the others read with it.
    async fn read(self: &Arc<Self>, msg: proto::WorkerMessage, results: &mut Vec<PendingResult>) -> Read {
        let (command, job_id, token) = match msg.kind {
            Some(In::Heartbeat(_)) => return Read::Next,
            Some(In::Drain(_)) => {
                // Awaited, unlike results: the releases that follow must not
                // free slots the dispatcher refills first.
                self.clone().answer(std::mem::take(results));
                self.drain().await;
                return Read::Next;
            }
            Some(In::Complete(c)) => (validate::complete(&c, &self.limits), c.job_id, c.fencing_token),
            Some(In::Fail(f)) => {
                let jitter = rand::random_range(0..=1000u16);
                (validate::fail(&f, &self.limits, jitter), f.job_id, f.fencing_token)
            }
            Some(In::Release(r)) => (validate::release(&r), r.job_id, r.fencing_token),
            Some(In::Progress(p)) => (validate::progress(&p, &self.limits), p.job_id, p.fencing_token),
            Some(In::Goodbye(_)) => {
                self.clone().answer(std::mem::take(results));
                self.goodbye.store(true, Ordering::Release);
                self.say_goodbye().await;
                return Read::End;
            }
            Some(In::Hello(_)) => {
                let _ = self
                    .out
                    .send(Err(Status::failed_precondition("hello: only the first message of a stream may be hello")));
                return Read::End;
            }
            None => {
                let _ = self.out.send(Err(Status::invalid_argument("kind: empty WorkerMessage")));
                return Read::End;
            }
        };
        let ack = Acker { job_id, token };
        let command = match command {
            Ok(command) => command,
            Err(invalid) if invalid.field == "job_id" => {
                let _ = self.out.send(ack.reply(proto::AckStatus::UnknownJob, invalid.to_string(), None));
                return Read::Next;
            }
            Err(invalid) => {
                // A malformed result is a client bug: say which field, end the stream.
                let _ = self.out.send(Err(invalid.into()));
                return Read::End;
            }
        };
        match command_job(&command).and_then(|id| self.node.shard_for_job(id)).cloned() {
            Some(shard) => results.push(PendingResult { shard, command, ack }),
            None => {
                let message = format!("job {} not found", ack.job_id);
                let _ = self.out.send(ack.reply(proto::AckStatus::UnknownJob, message, None));
            }
        }
        Read::Next
    }

    /// Proposes results (or progress) and acks each, without holding up the
    /// stream: results of many jobs share log entries.
    fn answer(self: Arc<Self>, results: Vec<PendingResult>) {
        if results.is_empty() {
            return;
        }
        // One proposal per shard, in the order the worker sent them; shards
        // apart, so a shard without a quorum holds up only its own results.
        let mut rest = results;
        while !rest.is_empty() {
            let shard = rest[0].shard.clone();
            let (now, later): (Vec<_>, Vec<_>) = rest.into_iter().partition(|r| Arc::ptr_eq(&r.shard, &shard));
            rest = later;
            let (commands, acks): (Vec<_>, Vec<_>) = now.into_iter().map(|r| (r.command, r.ack)).unzip();
            let this = self.clone();
            // Held until answered; only a goodbye waits for it (`answering`).
            let answering = self.answering.clone().try_read_owned().ok();
            tokio::spawn(async move {
                // On the shard's leader, which may be another node.
                let outcomes = shard.propose_all(commands).await;
                this.acknowledge(&shard, acks, outcomes);
                drop(answering);
            });
        }
    }

    fn acknowledge(&self, shard: &ShardNode, acks: Vec<Acker>, outcomes: Result<Vec<Applied>, ProposeError>) {
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let _ = self.out.send(Err(status::propose_error(e)));
                return;
            }
        };
        for (ack, outcome) in acks.into_iter().zip(outcomes) {
            match &outcome {
                Applied::Accepted { .. } => {
                    tracing::debug!(job_id = %ack.job_id, shard = %shard.raft.shard(), session = %self.session_id, token = ack.token, "accepted")
                }
                Applied::Rejected(rejection) => {
                    tracing::info!(job_id = %ack.job_id, shard = %shard.raft.shard(), session = %self.session_id, token = ack.token, %rejection, "result refused")
                }
                _ => {}
            }
            let reply = match outcome {
                Applied::Accepted { lease_deadline_ms } => {
                    ack.reply(proto::AckStatus::Accepted, String::new(), lease_deadline_ms)
                }
                Applied::Rejected(Rejection::StaleLease { job_id, token }) => ack.reply(
                    proto::AckStatus::StaleLease,
                    format!(
                        "job {job_id}: fencing token {token} is stale; the lease was lost (session expired or lease_timeout passed) and the job belongs to another holder now; do not retry"
                    ),
                    None,
                ),
                Applied::Rejected(Rejection::JobNotFound(id)) => {
                    ack.reply(proto::AckStatus::UnknownJob, format!("job {id} not found"), None)
                }
                other => Err(status::unexpected("result", &other)),
            };
            let _ = self.out.send(reply);
        }
    }

    /// Graceful shutdown begins: no new jobs for this session, in any of its
    /// shards (those other leaders serve too: a release after the drain
    /// must find it committed there as well).
    async fn drain(&self) {
        for shard in &self.stream_shards {
            let command = Command::DrainSession { session_id: self.session_id.clone() };
            match shard.propose(command).await {
                Ok(Applied::SessionDrained) => {}
                // Expired meanwhile: the stream is about to end anyway.
                Ok(other) => tracing::debug!(session = %self.session_id, outcome = ?other, "drain not applied"),
                Err(e) => {
                    let _ = self.out.send(Err(status::propose_error(e)));
                }
            }
        }
        tracing::info!(session = %self.session_id, "worker is draining");
    }

    /// Clean shutdown: jobs still held go back to the queue at once (in the
    /// shards led here; other leaders were passed the goodbye).
    async fn say_goodbye(&self) {
        for shard in &self.shards {
            let command = Command::ExpireSession { session_id: self.session_id.clone(), reason: ExpiryReason::Goodbye };
            if let Err(e) = shard.proposer.propose(command).await {
                let _ = self.out.send(Err(status::propose_error(e)));
            }
        }
        tracing::info!(session = %self.session_id, "worker said goodbye");
    }
}

/// Results proposed together at most: bounds one entry's share of a stream.
const RESULTS_PER_PROPOSAL_MAX: usize = 256;

/// What reading a message leaves the stream to do.
enum Read {
    Next,
    End,
}

/// A validated result on its way to the log, with what its ack must name.
struct PendingResult {
    shard: Arc<ShardNode>,
    command: Command,
    ack: Acker,
}

struct Acker {
    job_id: String,
    token: u64,
}

impl Acker {
    fn reply(
        &self,
        status: proto::AckStatus,
        message: String,
        lease_deadline_ms: Option<u64>,
    ) -> Result<proto::BrokerMessage, Status> {
        self::message(Out::Ack(proto::Ack {
            job_id: self.job_id.clone(),
            fencing_token: self.token,
            status: status as i32,
            message,
            lease_deadline: lease_deadline_ms.map(convert::timestamp),
        }))
    }
}

/// Passes heartbeats and the goodbye on to every part of the stream (each
/// leader keeps its own heartbeat table and ends its own part). Results
/// and drains are commands: proposed from here on their shard's leader.
fn relay(msg: &proto::WorkerMessage, parts: &mut [Part]) -> bool {
    match &msg.kind {
        Some(In::Heartbeat(_) | In::Goodbye(_)) => {
            // One part ended is the end of the whole stream: no need to go on.
            parts.iter_mut().all(|part| part.send(msg.clone()))
        }
        _ => true,
    }
}

fn command_job(command: &Command) -> Option<JobId> {
    match command {
        Command::Complete { job_id, .. }
        | Command::Fail { job_id, .. }
        | Command::Release { job_id, .. }
        | Command::Progress { job_id, .. } => Some(*job_id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::slots_in_shard;

    #[test]
    fn max_in_flight_is_split_over_the_shards() {
        assert_eq!(slots_in_shard(8, 1, 0), 8);
        let split: Vec<u32> = (0..3).map(|p| slots_in_shard(8, 3, p)).collect();
        assert_eq!(split, [3, 3, 2]);
        assert_eq!((0..4).map(|p| slots_in_shard(2, 4, p)).collect::<Vec<_>>(), [1, 1, 1, 1]);
    }
}
