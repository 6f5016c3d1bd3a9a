use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
enum Op {
    /// Send a request of this many bytes, if there is room.
    Send(usize),
    /// The follower answers the `n`-th (mod count) request still unanswered:
    /// answers arrive in any order.
    Answer(usize),
    /// An answer to a request that was never sent, or was answered already.
    Bogus(u64),
    /// The stream breaks: everything in flight is lost and a new stream
    /// starts (openraft resends from what the follower confirmed).
    Drop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..400).prop_map(Op::Send),
        4 => (0usize..64).prop_map(Op::Answer),
        1 => (0u64..80).prop_map(Op::Bogus),
        1 => Just(Op::Drop),
    ]
}

proptest! {
    /// Whatever order the answers arrive in, they leave in the order the
    /// requests were sent, each once; a bogus answer is refused without
    /// disturbing the rest; the bounds hold (one oversized request alone
    /// excepted); and after a broken stream the new one starts clean.
    #[test]
    fn answers_leave_in_order_once_and_within_bounds(ops in prop::collection::vec(op(), 1..200)) {
        let (max_requests, max_bytes) = (4, 1000);
        let t0 = Instant::now();
        let mut pipeline: Pipeline<u64> = Pipeline::new(max_requests, max_bytes);
        // This stream's requests not answered yet, and those answered but held back.
        let mut unanswered: Vec<u64> = Vec::new();
        let mut released: Vec<u64> = Vec::new();
        let mut sent: Vec<u64> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(step as u64);
            match op {
                Op::Send(bytes) => {
                    if !pipeline.has_room(bytes) {
                        prop_assert!(pipeline.unanswered() > 0, "an idle stream always has room");
                        continue;
                    }
                    let seq = pipeline.sent(bytes, now);
                    prop_assert_eq!(seq, sent.len() as u64 + 1, "sequence numbers are consecutive from 1");
                    sent.push(seq);
                    unanswered.push(seq);
                    prop_assert!(pipeline.unanswered() <= max_requests);
                    prop_assert!(pipeline.bytes_in_flight() <= max_bytes || pipeline.unanswered() == 1);
                }
                Op::Answer(n) => {
                    if unanswered.is_empty() {
                        continue;
                    }
                    let seq = unanswered.remove(n % unanswered.len());
                    // The answer carries its own seq, so order is checkable.
                    let due = pipeline.answered(seq, seq, now).expect("an answer to a request in flight");
                    for answer in due {
                        prop_assert_eq!(answer, released.len() as u64 + 1, "answers leave in the order sent");
                        released.push(answer);
                    }
                    prop_assert!(pipeline.deadline(Duration::from_secs(1)).is_none() == (pipeline.unanswered() == 0));
                }
                Op::Bogus(seq) => {
                    let in_flight = unanswered.contains(&seq);
                    if in_flight {
                        continue;
                    }
                    let before = (pipeline.unanswered(), pipeline.bytes_in_flight());
                    prop_assert!(pipeline.answered(seq, seq, now).is_err(), "seq {} is not in flight", seq);
                    prop_assert_eq!(before, (pipeline.unanswered(), pipeline.bytes_in_flight()));
                }
                Op::Drop => {
                    pipeline = Pipeline::new(max_requests, max_bytes);
                    unanswered.clear();
                    released.clear();
                    sent.clear();
                }
            }
            // Nothing is released past a request still unanswered.
            if let Some(first_gap) = sent.iter().find(|s| unanswered.contains(s)) {
                prop_assert!(released.iter().all(|r| r < first_gap));
            } else {
                prop_assert_eq!(&released, &sent, "every answered request was released");
            }
        }
    }
}

#[test]
fn a_stalled_stream_has_a_deadline_from_its_last_progress() {
    let t0 = Instant::now();
    let ttl = Duration::from_millis(100);
    let mut pipeline: Pipeline<()> = Pipeline::new(8, 1 << 20);
    assert_eq!(pipeline.deadline(ttl), None, "an idle stream never stalls");
    pipeline.sent(10, t0);
    pipeline.sent(10, t0 + Duration::from_millis(50));
    assert_eq!(pipeline.deadline(ttl), Some(t0 + ttl), "counted from the oldest request");
    pipeline.answered(1, (), t0 + Duration::from_millis(70)).unwrap();
    assert_eq!(pipeline.deadline(ttl), Some(t0 + Duration::from_millis(170)), "an answer is progress");
    // An answer held back behind an earlier one is no progress.
    pipeline.sent(10, t0 + Duration::from_millis(80));
    pipeline.answered(3, (), t0 + Duration::from_millis(90)).unwrap();
    assert_eq!(pipeline.deadline(ttl), Some(t0 + Duration::from_millis(170)));
    assert_eq!(pipeline.answered(2, (), t0 + Duration::from_millis(95)).unwrap().len(), 2);
    assert_eq!(pipeline.deadline(ttl), None);
}

#[test]
fn a_request_bigger_than_the_byte_bound_goes_alone() {
    let mut pipeline: Pipeline<()> = Pipeline::new(8, 100);
    let now = Instant::now();
    assert!(pipeline.has_room(500));
    pipeline.sent(500, now);
    assert!(!pipeline.has_room(1), "nothing joins an oversized request");
    pipeline.answered(1, (), now).unwrap();
    assert!(pipeline.has_room(60));
    pipeline.sent(60, now);
    assert!(!pipeline.has_room(60), "over the byte bound");
    assert!(pipeline.has_room(40));
}

#[test]
fn answers_are_converted_both_ways() {
    use openraft::vote::leader_id_adv::LeaderId;
    let log_id = openraft::LogId::new(LeaderId { term: 4, node_id: 2 }, 17);
    let answers: Vec<Answer> = vec![
        Ok(Some(log_id)),
        Ok(None),
        Err(StreamAppendError::Conflict(log_id)),
        Err(StreamAppendError::HigherVote(openraft::Vote::new(5, 3))),
    ];
    for answer in answers {
        let pb = answer_to_pb(9, &answer);
        assert_eq!(pb.seq, 9);
        assert_eq!(format!("{:?}", answer_from_pb(pb.result).unwrap()), format!("{answer:?}"));
    }
    assert_eq!(
        answer_from_pb(Some(pb::append_stream_response::Result::Refused("fenced".into()))).unwrap_err(),
        "fenced"
    );
    assert!(answer_from_pb(None).is_err());
}
