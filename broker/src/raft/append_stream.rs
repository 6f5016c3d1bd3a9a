//! Pipelined replication (shard format 2 on): a leader's AppendEntries to
//! one follower's copy of a shard travel over one `PeerService.AppendStream`
//! call, each sent as soon as openraft hands it over instead of after the
//! answer to the one before. openraft produces the requests (its pipeline
//! mode sends entries once they are submitted to the local log, so the
//! leader's fsync and the followers' overlap) and needs the answers in the
//! order it sent them; this module carries them, bounds what is in flight,
//! and turns a stalled or broken stream into `Unreachable`, after which
//! openraft opens a new stream from the last entry the follower confirmed.
//!
//! Before format 2 the same requests go one at a time as unary `Raft` calls
//! ([`sequential`]): a peer that predates the stream never receives one.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt, stream::BoxStream};
use gantry_proto::peer::{self as pb, peer_service_client::PeerServiceClient};
use openraft::{
    entry::RaftEntry,
    errors::{Fatal, RPCError, Unreachable},
    raft::{AppendEntriesRequest, AppendEntriesResponse, StreamAppendError, StreamAppendResult},
    type_config::alias::LogIdOf,
};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tonic::{Status, transport::Channel};

use super::{ShardRaft, timings::Timings, types::TypeConfig, wire};
use crate::format::storage::{log_id_from_pb, log_id_to_pb, vote_from_pb, vote_to_pb};

type C = TypeConfig;
type Answer = StreamAppendResult<C>;
type AnswerStream<'s> = BoxStream<'s, Result<Answer, RPCError<C>>>;

/// The request header naming the stream's shard.
pub const SHARD_HEADER: &str = "gantry-shard";

/// Requests sent on one stream and not answered yet. With 16 entries per
/// request this is a few hundred entries ahead of the follower: enough to
/// keep its disk busy, little to resend after a broken stream.
pub const STREAM_MAX_REQUESTS_IN_FLIGHT: usize = 32;
/// Bytes of requests in flight on one stream (one request alone may be
/// larger: it then goes alone).
pub const STREAM_MAX_BYTES_IN_FLIGHT: usize = 16 << 20;

/// What went wrong with a stream's answers: the follower answered a
/// request that was never sent on it, or answered one twice.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PipelineError {
    #[error("answer to request {seq}, which is not in flight on this stream (in flight: {oldest}..{next})")]
    NotInFlight { seq: u64, oldest: u64, next: u64 },
}

/// The pure bookkeeping of one stream: which requests are in flight, how
/// many bytes they hold, and the answers that arrived ahead of an earlier
/// one (held back until the earlier one is answered, so answers leave in
/// the order the requests were sent).
#[derive(Debug)]
pub struct Pipeline<T> {
    max_requests: usize,
    max_bytes: usize,
    next_seq: u64,
    /// (seq, bytes), oldest first.
    in_flight: VecDeque<(u64, usize)>,
    bytes: usize,
    early: BTreeMap<u64, T>,
    /// When the stream last made progress: its oldest request was sent (on
    /// an idle stream), or an answer released requests.
    progress_at: Option<Instant>,
}

impl<T> Pipeline<T> {
    pub fn new(max_requests: usize, max_bytes: usize) -> Self {
        Pipeline {
            max_requests: max_requests.max(1),
            max_bytes,
            next_seq: 1,
            in_flight: VecDeque::new(),
            bytes: 0,
            early: BTreeMap::new(),
            progress_at: None,
        }
    }

    /// Whether a request of `bytes` may be sent now. A request larger than
    /// the byte bound goes once nothing else is in flight.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.in_flight.is_empty()
            || (self.in_flight.len() < self.max_requests && self.bytes.saturating_add(bytes) <= self.max_bytes)
    }

    /// Records a request sent; its sequence number.
    pub fn sent(&mut self, bytes: usize, now: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.in_flight.is_empty() {
            self.progress_at = Some(now);
        }
        self.in_flight.push_back((seq, bytes));
        self.bytes += bytes;
        seq
    }

    /// Takes the answer to request `seq`; the answers now due, in the order
    /// their requests were sent.
    pub fn answered(&mut self, seq: u64, answer: T, now: Instant) -> Result<Vec<T>, PipelineError> {
        let known = self.in_flight.iter().any(|(s, _)| *s == seq) && !self.early.contains_key(&seq);
        if !known {
            let oldest = self.in_flight.front().map_or(self.next_seq, |(s, _)| *s);
            return Err(PipelineError::NotInFlight { seq, oldest, next: self.next_seq });
        }
        self.early.insert(seq, answer);
        let mut due = Vec::new();
        while let Some((oldest, bytes)) = self.in_flight.front().copied() {
            let Some(answer) = self.early.remove(&oldest) else { break };
            self.in_flight.pop_front();
            self.bytes -= bytes;
            due.push(answer);
        }
        if !due.is_empty() {
            self.progress_at = Some(now);
        }
        Ok(due)
    }

    pub fn unanswered(&self) -> usize {
        self.in_flight.len()
    }

    #[cfg(test)]
    pub fn bytes_in_flight(&self) -> usize {
        self.bytes
    }

    /// When the stream counts as stalled if no answer came: `ttl` after its
    /// last progress, while anything is in flight.
    pub fn deadline(&self, ttl: Duration) -> Option<Instant> {
        if self.in_flight.is_empty() { None } else { self.progress_at.map(|at| at + ttl) }
    }
}

/// A stream's state shared by the task that sends and the one that reads.
struct Window {
    pipeline: Mutex<Pipeline<Answer>>,
    /// An answer freed room.
    freed: Notify,
    /// A request was sent (the reader starts its stall clock).
    sent: Notify,
}

impl Window {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pipeline<Answer>> {
        self.pipeline.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Aborts the sending task once the answer stream is dropped: openraft's
/// request stream holds its replication state locked while it waits for
/// new entries, and the next stream needs it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn last_log_id(request: &AppendEntriesRequest<C>) -> Option<LogIdOf<C>> {
    request.entries.last().map(|e| e.log_id()).or(request.prev_log_id)
}

/// Opens the stream to `peer` (for errors: "node N at address") and carries
/// `input` over it: openraft's `RaftNetworkV2::stream_append` contract.
/// `ttl` bounds opening the stream and how long requests in flight may go
/// unanswered.
pub async fn open<S>(
    mut client: PeerServiceClient<Channel>,
    shard: u32,
    peer: String,
    input: S,
    ttl: Duration,
    timings: Arc<Timings>,
) -> Result<AnswerStream<'static>, RPCError<C>>
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
{
    let unreachable = {
        let peer = peer.clone();
        move |why: String| RPCError::<C>::Unreachable(Unreachable::from_string(format!("{peer}: {why}")))
    };
    let window = Arc::new(Window {
        pipeline: Mutex::new(Pipeline::new(STREAM_MAX_REQUESTS_IN_FLIGHT, STREAM_MAX_BYTES_IN_FLIGHT)),
        freed: Notify::new(),
        sent: Notify::new(),
    });
    // Room is bounded by the pipeline; the channel only hands over.
    let (tx, rx) = mpsc::channel(1);
    let sender = AbortOnDrop(tokio::spawn(feed(input, tx, window.clone(), shard, timings.clone())));
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(SHARD_HEADER, shard.into());
    let opened = tokio::time::timeout(ttl, client.append_stream(request)).await;
    let incoming = match opened {
        Err(_) => return Err(unreachable(format!("no answer to opening the replication stream within {ttl:?}"))),
        Ok(Err(status)) => return Err(unreachable(status.message().to_owned())),
        Ok(Ok(response)) => response.into_inner(),
    };
    timings.stream_opened();
    let reader = Reader { incoming, window, ttl, due: VecDeque::new(), ended: false, _sender: sender };
    Ok(futures::stream::unfold(reader, move |mut reader| {
        let unreachable = unreachable.clone();
        let timings = timings.clone();
        async move {
            let next = reader.next().await.map_err(unreachable);
            match next {
                Ok(Some(answer)) => Some((Ok(answer), reader)),
                Ok(None) => None,
                Err(e) => {
                    timings.stream_broken();
                    reader.ended = true;
                    Some((Err(e), reader))
                }
            }
        }
    })
    .boxed())
}

/// Sends openraft's requests as room allows, numbering them.
async fn feed<S>(
    mut input: S,
    tx: mpsc::Sender<pb::AppendStreamRequest>,
    window: Arc<Window>,
    shard: u32,
    timings: Arc<Timings>,
) where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
{
    while let Some(request) = input.next().await {
        let append = wire::append_to_pb(&request);
        let bytes = append.encoded_len();
        loop {
            let freed = window.freed.notified();
            if window.lock().has_room(bytes) {
                break;
            }
            freed.await;
        }
        let seq = window.lock().sent(bytes, Instant::now());
        window.sent.notify_one();
        if tx.send(pb::AppendStreamRequest { shard, seq, append: Some(append) }).await.is_err() {
            return;
        }
        timings.streamed_request();
    }
}

struct Reader {
    incoming: tonic::Streaming<pb::AppendStreamResponse>,
    window: Arc<Window>,
    ttl: Duration,
    due: VecDeque<Answer>,
    ended: bool,
    _sender: AbortOnDrop,
}

impl Reader {
    /// The next answer in order; `None` once the follower answered every
    /// request and the input ended.
    async fn next(&mut self) -> Result<Option<Answer>, String> {
        loop {
            if let Some(answer) = self.due.pop_front() {
                return Ok(Some(answer));
            }
            if self.ended {
                return Ok(None);
            }
            let deadline = self.window.lock().deadline(self.ttl);
            let message = tokio::select! {
                message = self.incoming.next() => message,
                // Nothing was in flight: a request sent since starts the clock.
                _ = self.window.sent.notified(), if deadline.is_none() => continue,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                    let waiting = self.window.lock().unanswered();
                    return Err(format!("{waiting} replication requests unanswered for {:?}", self.ttl));
                }
            };
            let response = match message {
                None => {
                    let waiting = self.window.lock().unanswered();
                    if waiting > 0 {
                        return Err(format!("the replication stream ended with {waiting} requests unanswered"));
                    }
                    self.ended = true;
                    continue;
                }
                Some(Err(status)) => return Err(status.message().to_owned()),
                Some(Ok(response)) => response,
            };
            let answer = answer_from_pb(response.result)?;
            let due = self.window.lock().answered(response.seq, answer, Instant::now()).map_err(|e| e.to_string())?;
            self.window.freed.notify_one();
            self.due.extend(due);
        }
    }
}

fn answer_from_pb(result: Option<pb::append_stream_response::Result>) -> Result<Answer, String> {
    use pb::append_stream_response::Result as R;
    match result {
        Some(R::Matched(m)) => Ok(Ok(m.log_id.map(log_id_from_pb))),
        Some(R::Conflict(log_id)) => Ok(Err(StreamAppendError::Conflict(log_id_from_pb(log_id)))),
        Some(R::HigherVote(vote)) => Ok(Err(StreamAppendError::HigherVote(vote_from_pb(vote)))),
        Some(R::Refused(why)) => Err(why),
        None => Err("an answer without a result".to_owned()),
    }
}

pub fn answer_to_pb(seq: u64, answer: &Answer) -> pb::AppendStreamResponse {
    use pb::append_stream_response::Result as R;
    let result = match answer {
        Ok(matched) => R::Matched(pb::AppendMatched { log_id: matched.as_ref().map(log_id_to_pb) }),
        Err(StreamAppendError::Conflict(log_id)) => R::Conflict(log_id_to_pb(log_id)),
        Err(StreamAppendError::HigherVote(vote)) => R::HigherVote(vote_to_pb(vote)),
    };
    pb::AppendStreamResponse { seq, result: Some(result) }
}

/// Before format 2: the requests one at a time, each a unary call made by
/// `append`, until the input ends, an answer is not a full success, a call
/// fails, or `stop` says so before the next request is taken (nothing taken
/// from `input` is then left unsent).
pub fn sequential<'s, S, P, F, Fut>(input: S, stop: P, append: F) -> AnswerStream<'s>
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 's,
    P: Fn() -> bool + Send + 's,
    F: FnMut(AppendEntriesRequest<C>) -> Fut + Send + 's,
    Fut: std::future::Future<Output = Result<AppendEntriesResponse<C>, RPCError<C>>> + Send + 's,
{
    futures::stream::unfold(Some((input, stop, append)), |state| async move {
        let (mut input, stop, mut append) = state?;
        if stop() {
            return None;
        }
        let request = input.next().await?;
        let (prev, last) = (request.prev_log_id, last_log_id(&request));
        match append(request).await {
            Err(e) => Some((Err(e), None)),
            Ok(response) => {
                // A partial success leaves the rest for a new stream (from
                // what matched); so does any refusal.
                let full = matches!(response, AppendEntriesResponse::Success)
                    || matches!(&response, AppendEntriesResponse::PartialSuccess(m) if *m == last);
                let answer = response.into_stream_result(prev, last);
                let go_on = full && answer.is_ok();
                Some((Ok(answer), go_on.then_some((input, stop, append))))
            }
        }
    })
    .boxed()
}

/// The follower's half: feeds a stream's requests to the shard's group and
/// answers each, in order, with the request's `seq`. A request that does not
/// decode, or names another shard, ends the stream with an error after the
/// requests before it were answered.
pub fn serve(
    shard: Arc<ShardRaft>,
    incoming: tonic::Streaming<pb::AppendStreamRequest>,
) -> BoxStream<'static, Result<pb::AppendStreamResponse, Status>> {
    let id = shard.shard().0;
    let seqs: Arc<Mutex<VecDeque<u64>>> = Default::default();
    let failure: Arc<Mutex<Option<Status>>> = Default::default();
    let requests = {
        let (seqs, failure) = (seqs.clone(), failure.clone());
        incoming.scan((), move |_, message| {
            let decoded = message.and_then(|m: pb::AppendStreamRequest| {
                if m.shard != id {
                    return Err(Status::invalid_argument(format!(
                        "append stream: a request for shard {} on a stream of shard {id}",
                        m.shard
                    )));
                }
                let append =
                    m.append.ok_or_else(|| Status::invalid_argument("append stream: a request without append"))?;
                let request = wire::append_from_pb(append)
                    .map_err(|e| Status::invalid_argument(format!("append stream: request {}: {e}", m.seq)))?;
                Ok((m.seq, request))
            });
            let next = match decoded {
                Ok((seq, request)) => {
                    seqs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back(seq);
                    Some(request)
                }
                Err(status) => {
                    *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
                    None
                }
            };
            std::future::ready(next)
        })
    };
    let answers = shard.raft().stream_append(requests);
    let replies = answers.map(move |outcome: Result<Answer, Fatal<C>>| {
        let seq = seqs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front().unwrap_or_default();
        match outcome {
            Ok(answer) => {
                if !matches!(answer, Err(StreamAppendError::HigherVote(_))) {
                    shard.heard_from_leader();
                }
                Ok(answer_to_pb(seq, &answer))
            }
            Err(fatal) => Ok(pb::AppendStreamResponse {
                seq,
                result: Some(pb::append_stream_response::Result::Refused(format!(
                    "shard {}: its Raft stopped: {fatal}",
                    shard.shard()
                ))),
            }),
        }
    });
    let failed =
        futures::stream::once(async move { failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() })
            .filter_map(|f| std::future::ready(f.map(Err)));
    replies.chain(failed).boxed()
}

#[cfg(test)]
#[path = "append_stream_test.rs"]
mod tests;
