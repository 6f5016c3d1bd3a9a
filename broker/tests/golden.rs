//! Golden bytes of every format (docs/compatibility.md): each command, log
//! entry, shard state, snapshot file and data-directory header, as this
//! build writes it in every format it writes, next to the value it must
//! decode to. The files under `tests/golden/format-N/` are only ever added
//! to, never edited: a change to any of those bytes is a format change
//! (a new format, with its own directory), or a bug.
//!
//! A missing file fails the test; `GANTRY_GOLDEN_WRITE=1 cargo test -p
//! gantry-broker --test golden` writes the missing ones (and only those)
//! for a new format or a new command.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use gantry_broker::{
    format::{
        header::{decode_header, encode_header, legacy_format_0_line},
        storage,
        table::{FORMAT_MAX, FORMATS},
    },
    queue::{
        Batch, Command, ExpiryReason, FencingToken, JobId, JobState, NewJob, PurgeCursor, QueueConfigUpdate,
        QueueState, RetryRequest, SessionId, ShardId,
        snapshot::{decode_snapshot_v1, encode_snapshot_v1},
    },
    raft::{
        GantryNode,
        log_store::{entry_from_stored_bytes, stored_entry_bytes},
        state_machine::{decode_state_data, encode_state_data},
        types::TypeConfig,
    },
};
use gantry_proto::storage::DataDirHeader;
use openraft::{EntryPayload, Membership, entry::RaftEntry};
use prost::Message;

type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;

fn dir(format: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/format-{format}"))
}

/// Compares `bytes` with the golden file; a missing file is written only
/// when asked to (GANTRY_GOLDEN_WRITE=1), else it fails.
fn golden(format: u32, name: &str, bytes: &[u8]) {
    let path = dir(format).join(name);
    match std::fs::read(&path) {
        Ok(stored) => assert!(
            stored == bytes,
            "{} changed: this build writes other bytes for it. Golden files are never edited: a new encoding is a \
             new format (docs/compatibility.md)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("GANTRY_GOLDEN_WRITE").is_some() => {
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("golden dir");
            std::fs::write(&path, bytes).expect("write golden file");
            eprintln!("wrote {}", path.display());
        }
        Err(e) => {
            panic!("{}: {e}: every format needs its golden bytes (GANTRY_GOLDEN_WRITE=1 writes them)", path.display())
        }
    }
}

fn stored(format: u32, name: &str) -> Vec<u8> {
    std::fs::read(dir(format).join(name)).unwrap_or_else(|e| panic!("format-{format}/{name}: {e}"))
}

fn job(seq: u64) -> JobId {
    JobId { shard: ShardId(0), seq }
}

fn session(name: &str) -> SessionId {
    SessionId(name.into())
}

/// One of every command kind, with every field set to something other than
/// its default, named. `min_format` decides which formats write them.
fn commands() -> Vec<(&'static str, Command)> {
    let mut full = NewJob::new("emails", b"payload \x00\xff".to_vec());
    full.headers = BTreeMap::from([("trace".into(), "t-1".into()), ("tenant".into(), "acme".into())]);
    full.priority = -3;
    full.delay_ms = 1500;
    full.run_at_ms = Some(1_700_000_000_000);
    full.max_attempts = Some(4);
    full.lease_timeout_ms = Some(30_000);
    full.idempotency_key = Some("order-17".into());
    vec![
        ("enqueue", Command::Enqueue(full)),
        ("enqueue-minimal", Command::Enqueue(NewJob::new("q", Vec::new()))),
        (
            "open-session",
            Command::OpenSession {
                session_id: session("s-1"),
                worker_id: "w-1".into(),
                queues: vec!["emails".into(), "q".into()],
                max_in_flight: 8,
            },
        ),
        ("dispatch", Command::Dispatch { sessions: vec![session("s-1"), session("s-2")] }),
        ("complete", Command::Complete { job_id: job(7), token: FencingToken(1 << 21 | 3), result: b"ok".to_vec() }),
        (
            "fail-backoff",
            Command::Fail {
                job_id: job(8),
                token: FencingToken(99),
                error: "boom".into(),
                retry: RetryRequest::Backoff { jitter_permille: 1234 },
            },
        ),
        (
            "fail-after",
            Command::Fail {
                job_id: job(8),
                token: FencingToken(99),
                error: "later".into(),
                retry: RetryRequest::After { delay_ms: 60_000 },
            },
        ),
        (
            "fail-never",
            Command::Fail {
                job_id: job(8),
                token: FencingToken(99),
                error: "fatal".into(),
                retry: RetryRequest::Never,
            },
        ),
        ("release", Command::Release { job_id: job(9), token: FencingToken(5) }),
        (
            "progress",
            Command::Progress {
                job_id: job(9),
                token: FencingToken(5),
                message: "50%".into(),
                extend_ms: Some(10_000),
            },
        ),
        ("expire-session", Command::ExpireSession { session_id: session("s-1"), reason: ExpiryReason::Goodbye }),
        ("cancel", Command::Cancel { job_id: job(10), reason: "not needed".into() }),
        ("retry-job", Command::RetryJob { job_id: job(11) }),
        ("purge-queue", Command::PurgeQueue { queue: "emails".into(), state: JobState::Failed }),
        (
            "set-queue-config",
            Command::SetQueueConfig {
                queue: "emails".into(),
                update: QueueConfigUpdate {
                    max_attempts: Some(3),
                    lease_timeout_ms: Some(1000),
                    backoff_base_ms: Some(10),
                    backoff_max_ms: Some(100),
                    retention_ms: Some(5000),
                    concurrency_limit: Some(2),
                    rate_limit: Some(50),
                    max_depth: Some(1_000_000),
                },
            },
        ),
        ("pause-queue", Command::PauseQueue { queue: "emails".into() }),
        ("resume-queue", Command::ResumeQueue { queue: "emails".into() }),
        ("tick", Command::Tick),
        (
            "resume-session",
            Command::ResumeSession {
                session_id: session("s-1"),
                fallback: session("s-9"),
                worker_id: "w-1".into(),
                queues: vec!["emails".into()],
                max_in_flight: 2,
            },
        ),
        ("drain-session", Command::DrainSession { session_id: session("s-1") }),
        (
            "purge-queue-part",
            Command::PurgeQueuePart {
                queue: "emails".into(),
                state: JobState::Scheduled,
                below_seq: Some(100),
                after: Some(PurgeCursor::Pending { neg_priority: -2, run_at_ms: 5, seq: 6 }),
                through: Some(PurgeCursor::Retained { until_ms: 7, job_id: job(8) }),
                limit: 4096,
            },
        ),
        ("set-format", Command::SetFormat { format: 1 }),
        ("delete-queue", Command::DeleteQueue { queue: "emails".into() }),
    ]
}

/// A shard state with jobs in every state, a retained result, idempotency
/// keys, an open lease, an expired session with its lost leases, a paused
/// queue with its own settings: built by applying commands, so it is one a
/// shard can really be in. Raised to `format` by its last entry.
fn sample_state(format: u32) -> QueueState {
    let mut state = QueueState::new(ShardId(0));
    let mut index = 0;
    let mut apply = |state: &mut QueueState, at: u64, commands: Vec<Command>| {
        index += 1;
        state.apply(index, &Batch { proposed_at_ms: at, commands: commands.into() });
    };
    let t0 = 1_700_000_000_000;
    let enqueue = |queue: &str, payload: &str, key: Option<&str>, delay_ms: u64| {
        let mut new = NewJob::new(queue, payload.as_bytes().to_vec());
        new.idempotency_key = key.map(str::to_owned);
        new.delay_ms = delay_ms;
        new.headers.insert("h".into(), payload.into());
        Command::Enqueue(new)
    };
    apply(
        &mut state,
        t0,
        vec![
            enqueue("emails", "succeeds", Some("k-1"), 0),
            enqueue("emails", "fails", None, 0),
            enqueue("emails", "cancelled", None, 0),
            enqueue("emails", "stays-leased", Some("k-2"), 0),
            enqueue("emails", "ready", None, 0),
            enqueue("later", "scheduled", None, 3_600_000),
            enqueue("reports", "lost-lease", None, 0),
            Command::PauseQueue { queue: "paused".into() },
            Command::SetQueueConfig {
                queue: "paused".into(),
                update: QueueConfigUpdate { max_attempts: Some(2), retention_ms: Some(60_000), ..Default::default() },
            },
        ],
    );
    let open = |id: &str, queues: &[&str], max: u32| Command::OpenSession {
        session_id: session(id),
        worker_id: format!("worker-{id}"),
        queues: queues.iter().map(|q| q.to_string()).collect(),
        max_in_flight: max,
    };
    apply(&mut state, t0 + 10, vec![open("s-a", &["emails"], 4), open("s-b", &["reports"], 1)]);
    apply(&mut state, t0 + 20, vec![Command::Dispatch { sessions: vec![session("s-a"), session("s-b")] }]);
    let token =
        |state: &QueueState, seq: u64| state.job(job(seq)).and_then(|j| j.lease()).map(|l| l.token).expect("leased");
    let (t1, t2, t4) = (token(&state, 1), token(&state, 2), token(&state, 4));
    apply(
        &mut state,
        t0 + 30,
        vec![
            Command::Complete { job_id: job(1), token: t1, result: b"result bytes".to_vec() },
            Command::Fail { job_id: job(2), token: t2, error: "bad input".into(), retry: RetryRequest::Never },
            Command::Cancel { job_id: job(3), reason: "operator".into() },
            Command::Progress { job_id: job(4), token: t4, message: "half".into(), extend_ms: Some(5000) },
        ],
    );
    apply(
        &mut state,
        t0 + 40,
        vec![Command::ExpireSession { session_id: session("s-b"), reason: ExpiryReason::Silent }],
    );
    if format >= 1 {
        apply(&mut state, t0 + 50, vec![Command::SetFormat { format }]);
    }
    state
}

fn sample_entries() -> Vec<(&'static str, Entry)> {
    let leader = openraft::vote::leader_id_adv::LeaderId { term: 3, node_id: 2 };
    let log_id = |index| openraft::LogId::new(leader, index);
    let members = BTreeMap::from([
        (1, GantryNode { client: "10.0.0.1:50051".into(), peer: "10.0.0.1:50052".into() }),
        (2, GantryNode { client: "10.0.0.2:50051".into(), peer: "10.0.0.2:50052".into() }),
        (3, GantryNode { client: "10.0.0.3:50051".into(), peer: "10.0.0.3:50052".into() }),
    ]);
    let joint = Membership::new(vec![[1, 2].into_iter().collect(), [1, 2, 3].into_iter().collect()], members.clone())
        .expect("membership");
    vec![
        ("entry-blank", Entry::new(log_id(1), EntryPayload::Blank)),
        ("entry-membership", Entry::new(log_id(2), EntryPayload::Membership(joint))),
        (
            "entry-batch",
            Entry::new(
                log_id(3),
                EntryPayload::Normal(Batch {
                    proposed_at_ms: 1_700_000_000_123,
                    commands: vec![
                        Command::Enqueue(NewJob::new("emails", b"x".to_vec())),
                        Command::Tick,
                        Command::Dispatch { sessions: vec![session("s-1")] },
                    ]
                    .into(),
                }),
            ),
        ),
    ]
}

/// Format 0 (postcard): what every build before format gates wrote.
#[test]
fn format_0_golden_bytes() {
    for (name, command) in commands() {
        if command.min_format() > 0 {
            continue;
        }
        let bytes = postcard::to_allocvec(&Batch { proposed_at_ms: 42, commands: vec![command.clone()].into() })
            .expect("postcard");
        golden(0, &format!("batch-{name}.bin"), &bytes);
        let decoded: Batch = postcard::from_bytes(&stored(0, &format!("batch-{name}.bin"))).expect("decodes");
        assert_eq!(decoded.commands[0], command, "{name}");
    }
    for (name, entry) in sample_entries() {
        let bytes = stored_entry_bytes::<TypeConfig>(&entry, 0).expect("encodes");
        golden(0, &format!("{name}.bin"), &bytes);
        let decoded =
            entry_from_stored_bytes::<TypeConfig>(entry.index(), stored(0, &format!("{name}.bin"))).expect("decodes");
        assert_eq!(decoded, entry, "{name}");
    }
    let state = sample_state(0);
    golden(0, "state.bin", &encode_state_data(&state).unwrap());
    assert_eq!(encode_state_data(&state).unwrap(), encode_snapshot_v1(&state), "format 0's state is snapshot_v1");
    assert_eq!(decode_snapshot_v1(&stored(0, "state.bin")).expect("decodes"), state);
    golden(0, "FORMAT", format!("{}\n", legacy_format_0_line()).as_bytes());
}

/// Format 1 (gantry.storage.v1, protobuf).
#[test]
fn format_1_golden_bytes() {
    for (name, command) in commands() {
        let bytes = storage::command_to_pb(&command).encode_to_vec();
        golden(1, &format!("command-{name}.bin"), &bytes);
        let decoded = storage::command_from_pb(
            gantry_proto::storage::Command::decode(stored(1, &format!("command-{name}.bin")).as_slice()).expect("pb"),
        )
        .expect("decodes");
        assert_eq!(decoded, command, "{name}");
    }
    for (name, entry) in sample_entries() {
        let bytes = stored_entry_bytes::<TypeConfig>(&entry, 1).expect("encodes");
        golden(1, &format!("{name}.bin"), &bytes);
        let decoded =
            entry_from_stored_bytes::<TypeConfig>(entry.index(), stored(1, &format!("{name}.bin"))).expect("decodes");
        assert_eq!(decoded, entry, "{name}");
    }
    let state = sample_state(1);
    golden(1, "state.bin", &encode_state_data(&state).unwrap());
    assert_eq!(decode_state_data(&stored(1, "state.bin")).expect("decodes"), state);
    let meta = openraft::type_config::alias::SnapshotMetaOf::<TypeConfig> {
        last_log_id: Some(openraft::LogId::new(openraft::vote::leader_id_adv::LeaderId { term: 3, node_id: 2 }, 77)),
        last_membership: Default::default(),
    };
    let file = storage::snapshot_file_to_pb(&meta, encode_state_data(&state).unwrap()).encode_to_vec();
    golden(1, "snapshot-file.bin", &file);
    let (read_meta, data) = storage::snapshot_file_from_pb(
        gantry_proto::storage::SnapshotFile::decode(stored(1, "snapshot-file.bin").as_slice()).expect("pb"),
    )
    .expect("decodes");
    assert_eq!((read_meta, decode_state_data(&data).expect("state")), (meta, state));
    let header = DataDirHeader { format: 1, min_reader: 1, written_by: "0.2.0".into(), shards: 4 };
    golden(1, "HEADER", &encode_header(&header));
    assert_eq!(decode_header(&stored(1, "HEADER")).expect("decodes"), header);
}

/// Format 2: the pipelined replication stream's messages (the state and
/// files are format 1's, at format 2).
#[test]
fn format_2_golden_bytes() {
    use gantry_broker::raft::{append_stream::answer_to_pb, wire::append_to_pb};
    use gantry_proto::peer as pb;
    let leader = openraft::vote::leader_id_adv::LeaderId { term: 3, node_id: 2 };
    let entries: Vec<Entry> = sample_entries().into_iter().map(|(_, e)| e).collect();
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: openraft::Vote::new_committed(3, 2),
        prev_log_id: Some(openraft::LogId::new(leader, 0)),
        entries,
        leader_commit: Some(openraft::LogId::new(leader, 1)),
    };
    let request = pb::AppendStreamRequest { shard: 3, seq: 41, append: Some(append_to_pb(&append)) };
    golden(2, "append-stream-request.bin", &request.encode_to_vec());
    let read = pb::AppendStreamRequest::decode(stored(2, "append-stream-request.bin").as_slice()).expect("pb");
    let decoded = gantry_broker::raft::wire::append_from_pb(read.append.expect("append")).expect("decodes");
    assert_eq!((read.shard, read.seq, decoded.entries, decoded.vote), (3, 41, append.entries.clone(), append.vote));
    let answers: Vec<(&str, openraft::raft::StreamAppendResult<TypeConfig>)> = vec![
        ("matched", Ok(Some(openraft::LogId::new(leader, 3)))),
        ("matched-nothing", Ok(None)),
        ("conflict", Err(openraft::raft::StreamAppendError::Conflict(openraft::LogId::new(leader, 2)))),
        ("higher-vote", Err(openraft::raft::StreamAppendError::HigherVote(openraft::Vote::new(4, 1)))),
    ];
    for (name, answer) in answers {
        golden(2, &format!("append-stream-response-{name}.bin"), &answer_to_pb(41, &answer).encode_to_vec());
    }
    let refused = pb::AppendStreamResponse {
        seq: 41,
        result: Some(pb::append_stream_response::Result::Refused("shard 3: its Raft stopped".into())),
    };
    golden(2, "append-stream-response-refused.bin", &refused.encode_to_vec());
    let state = sample_state(2);
    golden(2, "state.bin", &encode_state_data(&state).unwrap());
    assert_eq!(decode_state_data(&stored(2, "state.bin")).expect("decodes"), state);
    let header = DataDirHeader { format: 2, min_reader: 2, written_by: "0.3.0".into(), shards: 4 };
    golden(2, "HEADER", &encode_header(&header));
    assert_eq!(decode_header(&stored(2, "HEADER")).expect("decodes"), header);
}

/// Every format this build knows has its golden files; a new format
/// without them fails here.
#[test]
fn every_format_has_golden_bytes() {
    for info in FORMATS {
        let dir = dir(info.format);
        let files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert!(files > 0, "format {} has no golden bytes in {}", info.format, dir.display());
    }
    assert_eq!(FORMAT_MAX, 2, "a new format: add its golden test (format_{}_golden_bytes)", FORMAT_MAX);
}
