//! The peer wire from shard format 1 on: openraft's RPCs as `gantry.peer.v1`
//! messages, their entries, votes and log ids in `gantry.storage.v1`. At
//! format 0 they are postcard (`network::encode`), the only encoding builds
//! before format gates read; a sender picks by its shard's format, so a
//! receiver never gets an encoding it does not read (docs/compatibility.md).

use gantry_proto::peer as pb;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderError, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};

use super::types::TypeConfig;
use crate::format::storage::{
    DecodeError, SnapshotMeta, entry_from_pb, entry_to_pb, log_id_from_pb, log_id_to_pb, stored_membership_from_pb,
    stored_membership_to_pb, vote_from_pb, vote_to_pb,
};

type C = TypeConfig;
type Result<T> = std::result::Result<T, DecodeError>;

fn required<T>(value: Option<T>, what: &'static str) -> Result<T> {
    value.ok_or(DecodeError::Missing(what))
}

pub fn append_to_pb(request: &AppendEntriesRequest<C>) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        vote: Some(vote_to_pb(&request.vote)),
        prev_log_id: request.prev_log_id.as_ref().map(log_id_to_pb),
        entries: request.entries.iter().map(entry_to_pb).collect(),
        leader_commit: request.leader_commit.as_ref().map(log_id_to_pb),
    }
}

pub fn append_from_pb(request: pb::AppendEntriesRequest) -> Result<AppendEntriesRequest<C>> {
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(required(request.vote, "vote")?),
        prev_log_id: request.prev_log_id.map(log_id_from_pb),
        entries: request.entries.into_iter().map(entry_from_pb).collect::<Result<_>>()?,
        leader_commit: request.leader_commit.map(log_id_from_pb),
    })
}

pub fn append_response_to_pb(response: &AppendEntriesResponse<C>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match response {
        AppendEntriesResponse::Success => R::Success(Default::default()),
        AppendEntriesResponse::PartialSuccess(matched) => {
            R::PartialSuccess(pb::PartialSuccess { matched: matched.as_ref().map(log_id_to_pb) })
        }
        AppendEntriesResponse::Conflict => R::Conflict(Default::default()),
        AppendEntriesResponse::HigherVote(vote) => R::HigherVote(vote_to_pb(vote)),
    };
    pb::AppendEntriesResponse { result: Some(result) }
}

pub fn append_response_from_pb(response: pb::AppendEntriesResponse) -> Result<AppendEntriesResponse<C>> {
    use pb::append_entries_response::Result as R;
    Ok(match required(response.result, "append entries result")? {
        R::Success(_) => AppendEntriesResponse::Success,
        R::PartialSuccess(p) => AppendEntriesResponse::PartialSuccess(p.matched.map(log_id_from_pb)),
        R::Conflict(_) => AppendEntriesResponse::Conflict,
        R::HigherVote(vote) => AppendEntriesResponse::HigherVote(vote_from_pb(vote)),
    })
}

pub fn vote_request_to_pb(request: &VoteRequest<C>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to_pb(&request.vote)),
        last_log_id: request.last_log_id.as_ref().map(log_id_to_pb),
        leadership_transfer: request.leadership_transfer,
    }
}

pub fn vote_request_from_pb(request: pb::VoteRequest) -> Result<VoteRequest<C>> {
    let mut decoded =
        VoteRequest::new(vote_from_pb(required(request.vote, "vote")?), request.last_log_id.map(log_id_from_pb));
    decoded.leadership_transfer = request.leadership_transfer;
    Ok(decoded)
}

pub fn vote_response_to_pb(response: &VoteResponse<C>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&response.vote)),
        vote_granted: response.vote_granted,
        last_log_id: response.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_response_from_pb(response: pb::VoteResponse) -> Result<VoteResponse<C>> {
    Ok(VoteResponse {
        vote: vote_from_pb(required(response.vote, "vote")?),
        vote_granted: response.vote_granted,
        last_log_id: response.last_log_id.map(log_id_from_pb),
    })
}

pub fn transfer_to_pb(request: &TransferLeaderRequest<C>) -> pb::TransferLeaderRequest {
    pb::TransferLeaderRequest {
        from_leader: Some(vote_to_pb(request.from_leader())),
        to_node_id: *request.to_node_id(),
        last_log_id: request.last_log_id().map(log_id_to_pb),
    }
}

pub fn transfer_from_pb(request: pb::TransferLeaderRequest) -> Result<TransferLeaderRequest<C>> {
    Ok(TransferLeaderRequest::new(
        vote_from_pb(required(request.from_leader, "from_leader")?),
        request.to_node_id,
        request.last_log_id.map(log_id_from_pb),
    ))
}

pub fn transfer_response_to_pb(response: &TransferLeaderResponse<C>) -> pb::TransferLeaderResponse {
    use pb::transfer_leader_response::Result as R;
    let result = match response {
        Ok(()) => R::Done(Default::default()),
        Err(TransferLeaderError::VoteChanged { expected, actual }) => {
            R::VoteChanged(pb::VoteChanged { expected: Some(vote_to_pb(expected)), actual: Some(vote_to_pb(actual)) })
        }
        Err(TransferLeaderError::LogNotFlushed { expected, actual }) => R::LogNotFlushed(pb::LogNotFlushed {
            expected: expected.as_ref().map(log_id_to_pb),
            actual: actual.as_ref().map(log_id_to_pb),
        }),
    };
    pb::TransferLeaderResponse { result: Some(result) }
}

pub fn transfer_response_from_pb(response: pb::TransferLeaderResponse) -> Result<TransferLeaderResponse<C>> {
    use pb::transfer_leader_response::Result as R;
    Ok(match required(response.result, "transfer leader result (a kind this gantry does not know?)")? {
        R::Done(_) => Ok(()),
        R::VoteChanged(v) => Err(TransferLeaderError::VoteChanged {
            expected: vote_from_pb(required(v.expected, "expected")?),
            actual: vote_from_pb(required(v.actual, "actual")?),
        }),
        R::LogNotFlushed(l) => Err(TransferLeaderError::LogNotFlushed {
            expected: l.expected.map(log_id_from_pb),
            actual: l.actual.map(log_id_from_pb),
        }),
    })
}

pub fn snapshot_header_to_pb(
    vote: &openraft::type_config::alias::VoteOf<C>,
    meta: &SnapshotMeta,
) -> pb::SnapshotHeader {
    pb::SnapshotHeader {
        vote: Some(vote_to_pb(vote)),
        last_log_id: meta.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&meta.last_membership)),
    }
}

pub fn snapshot_header_from_pb(
    header: pb::SnapshotHeader,
) -> Result<(openraft::type_config::alias::VoteOf<C>, SnapshotMeta)> {
    let meta = SnapshotMeta {
        last_log_id: header.last_log_id.map(log_id_from_pb),
        last_membership: match header.last_membership {
            Some(m) => stored_membership_from_pb(m)?,
            None => Default::default(),
        },
    };
    Ok((vote_from_pb(required(header.vote, "vote")?), meta))
}

pub fn snapshot_response_from_pb(vote: gantry_proto::storage::Vote) -> SnapshotResponse<C> {
    SnapshotResponse::new(vote_from_pb(vote))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{EntryPayload, Membership, entry::RaftEntry};

    use super::*;
    use crate::{
        format::storage::{Entry, LogId, Vote},
        queue::{Batch, Command, NewJob},
        raft::GantryNode,
    };

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(openraft::vote::leader_id_adv::LeaderId { term, node_id: node }, index)
    }

    fn vote(term: u64, node: u64, committed: bool) -> Vote {
        vote_from_pb(gantry_proto::storage::Vote { term, node_id: node, committed })
    }

    /// Every RPC survives the format-1 wire unchanged, including the
    /// optional parts left out.
    #[test]
    fn raft_messages_round_trip() {
        let membership = Membership::new(
            vec![[1, 2, 3].into_iter().collect()],
            BTreeMap::from([(1, GantryNode { client: "c".into(), peer: "p".into() })]),
        );
        let entries: Vec<Entry> = vec![
            Entry::new(log_id(2, 1, 5), EntryPayload::Blank),
            Entry::new(
                log_id(2, 1, 6),
                EntryPayload::Normal(Batch {
                    proposed_at_ms: 9,
                    commands: vec![Command::Enqueue(NewJob::new("q", b"x".to_vec())), Command::Tick].into(),
                }),
            ),
        ];
        let mut with_membership = entries.clone();
        if let Ok(m) = membership {
            with_membership.push(Entry::new(log_id(2, 1, 7), EntryPayload::Membership(m)));
        }
        for request in [
            AppendEntriesRequest {
                vote: vote(2, 1, true),
                prev_log_id: Some(log_id(2, 1, 4)),
                entries: with_membership,
                leader_commit: Some(log_id(1, 3, 3)),
            },
            AppendEntriesRequest { vote: vote(1, 1, false), prev_log_id: None, entries: vec![], leader_commit: None },
        ] {
            let back = append_from_pb(append_to_pb(&request)).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{request:?}"));
            assert_eq!(
                back.entries.iter().map(|e| e.index()).collect::<Vec<_>>(),
                request.entries.iter().map(|e| e.index()).collect::<Vec<_>>()
            );
        }
        for response in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 5))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(vote(3, 2, false)),
        ] {
            assert_eq!(append_response_from_pb(append_response_to_pb(&response)).expect("decodes"), response);
        }
        let mut request = VoteRequest::new(vote(4, 2, false), Some(log_id(3, 1, 10)));
        request.leadership_transfer = true;
        let back = vote_request_from_pb(vote_request_to_pb(&request)).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{request:?}"));
        let response = VoteResponse { vote: vote(4, 2, true), vote_granted: true, last_log_id: None };
        assert_eq!(
            format!("{:?}", vote_response_from_pb(vote_response_to_pb(&response)).unwrap()),
            format!("{response:?}")
        );
        let transfer = TransferLeaderRequest::new(vote(4, 2, true), 3, Some(log_id(4, 2, 11)));
        assert_eq!(format!("{:?}", transfer_from_pb(transfer_to_pb(&transfer)).unwrap()), format!("{transfer:?}"));
        for response in [
            Ok(()),
            Err(TransferLeaderError::VoteChanged { expected: vote(4, 2, true), actual: vote(5, 3, false) }),
            Err(TransferLeaderError::LogNotFlushed { expected: Some(log_id(4, 2, 11)), actual: None }),
        ] {
            assert_eq!(transfer_response_from_pb(transfer_response_to_pb(&response)).unwrap(), response);
        }
        let meta = SnapshotMeta { last_log_id: Some(log_id(4, 2, 100)), last_membership: Default::default() };
        let (v, m) = snapshot_header_from_pb(snapshot_header_to_pb(&vote(4, 2, true), &meta)).unwrap();
        assert_eq!((v, m), (vote(4, 2, true), meta));
    }
}
