//! A group's durability record, kept beside raft-engine in a file of its
//! own: the highest log index this node acknowledged as durable and the
//! last vote it saved. Both are also in raft-engine, but raft-engine drops
//! a corrupt or torn tail of its newest file silently when it opens
//! (`TolerateTailCorruption`, see `docs/storage.md`), and with it the
//! newest entries, votes and committed ids of every group. A node that lost
//! entries it acknowledged must not vote or lead as if it still had them,
//! and a node that lost its vote could vote twice in one term; comparing
//! the recovered log and vote with this record at start-up is how it finds
//! out (DESIGN §1.8).
//!
//! Two slots written alternately, each with a sequence number and a CRC,
//! each write fdatasync'd before it counts. A torn write of one slot leaves
//! the other, one write older: for the vote that is the vote before one not
//! yet acknowledged (the engine holds the newer one, and the newer of the
//! two is taken); for the acknowledged index it only makes a restart more
//! cautious. Which slot was torn is reported, never ignored.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
    sync::Mutex,
};

const MAGIC: &[u8; 4] = b"GGD1";
/// magic 4 | seq 8 | acknowledged 8 | vote term 8 | vote node 8 | flags 1 | pad 3 | crc 4
const SLOT: usize = 44;
const CRC_AT: usize = SLOT - 4;
const HAS_VOTE: u8 = 1;
const VOTE_COMMITTED: u8 = 2;

/// The vote as the guard keeps it (openraft's `Vote` with u64 ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardVote {
    pub term: u64,
    pub node_id: u64,
    pub committed: bool,
}

impl GuardVote {
    /// openraft's order of votes with advanced leader ids (its default):
    /// by term, then candidate, then committed over not.
    pub fn order(&self) -> (u64, u64, bool) {
        (self.term, self.node_id, self.committed)
    }
}

impl std::fmt::Display for GuardVote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let committed = if self.committed { "committed" } else { "not committed" };
        write!(f, "term {} for node {} ({committed})", self.term, self.node_id)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardRecord {
    /// The highest log index acknowledged as durable (0: none).
    pub acknowledged: u64,
    pub vote: Option<GuardVote>,
}

/// What opening the record found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardFound {
    /// No record: a group this node never wrote to (or the record was lost:
    /// the caller tells the two apart by what the engine holds).
    Missing,
    /// Both slots read back.
    Whole,
    /// One slot could not be read (a torn write, or corruption): the other,
    /// older one is used. Says which and why.
    OneSlotLost(String),
    /// The file exists but neither slot reads back.
    Unreadable(String),
    /// No record, but the older watermark file of this group (acknowledged
    /// index only) was read.
    LegacyWatermark,
}

struct Slots {
    file: File,
    seq: u64,
    record: GuardRecord,
}

pub struct Guard {
    slots: Mutex<Slots>,
}

fn encode(record: &GuardRecord, seq: u64) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..4].copy_from_slice(MAGIC);
    slot[4..12].copy_from_slice(&seq.to_le_bytes());
    slot[12..20].copy_from_slice(&record.acknowledged.to_le_bytes());
    if let Some(vote) = record.vote {
        slot[20..28].copy_from_slice(&vote.term.to_le_bytes());
        slot[28..36].copy_from_slice(&vote.node_id.to_le_bytes());
        slot[36] = HAS_VOTE | if vote.committed { VOTE_COMMITTED } else { 0 };
    }
    let crc = crc32fast::hash(&slot[..CRC_AT]);
    slot[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn u64_at(slot: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"))
}

fn decode(slot: &[u8]) -> Result<(GuardRecord, u64), &'static str> {
    if slot.iter().all(|b| *b == 0) {
        return Err("never written");
    }
    let crc = u32::from_le_bytes(slot[CRC_AT..].try_into().expect("4 bytes"));
    if crc32fast::hash(&slot[..CRC_AT]) != crc {
        return Err("checksum mismatch");
    }
    if &slot[..4] != MAGIC {
        return Err("unknown format");
    }
    let flags = slot[36];
    let vote = (flags & HAS_VOTE != 0).then(|| GuardVote {
        term: u64_at(slot, 20),
        node_id: u64_at(slot, 28),
        committed: flags & VOTE_COMMITTED != 0,
    });
    Ok((GuardRecord { acknowledged: u64_at(slot, 12), vote }, u64_at(slot, 4)))
}

/// The watermark file of earlier versions: two 24-byte slots of
/// (index, seq, crc32); the acknowledged index only.
fn read_legacy_watermark(path: &Path) -> io::Result<Option<u64>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let slot = |at: usize| -> Option<(u64, u64)> {
        let slot = bytes.get(at..at + 20)?;
        let crc = u32::from_le_bytes(slot[16..20].try_into().ok()?);
        (crc32fast::hash(&slot[..16]) == crc).then(|| (u64_at(slot, 0), u64_at(slot, 8)))
    };
    Ok([slot(0), slot(24)].into_iter().flatten().filter(|(_, seq)| *seq > 0).max_by_key(|(_, seq)| *seq).map(|r| r.0))
}

impl Guard {
    /// Opens (or creates) the record at `path`; `legacy` is the older
    /// watermark file of the same group, read when the record is new.
    pub fn open(path: &Path, legacy: &Path) -> io::Result<(Guard, GuardFound)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut bytes = vec![0u8; 2 * SLOT];
        let len = file.read_at(&mut bytes, 0)?;
        let slots = [decode(&bytes[..SLOT]), decode(&bytes[SLOT..])];
        let best = slots.iter().flatten().max_by_key(|(_, seq)| *seq).copied();
        let (record, seq, found) = match best {
            Some((record, seq)) => {
                let lost = slots.iter().enumerate().find_map(|(i, s)| {
                    s.as_ref().err().filter(|why| **why != "never written" || seq > 1).map(|why| (i, *why))
                });
                let found = match lost {
                    Some((i, why)) => {
                        GuardFound::OneSlotLost(format!("slot {i}: {why}; the other slot (write {seq}) is used"))
                    }
                    None => GuardFound::Whole,
                };
                (record, seq, found)
            }
            None if existed && len > 0 => (
                GuardRecord::default(),
                0,
                GuardFound::Unreadable(format!(
                    "{} ({len} bytes): neither slot reads back ({}; {})",
                    path.display(),
                    slots[0].err().unwrap_or_default(),
                    slots[1].err().unwrap_or_default()
                )),
            ),
            None => match read_legacy_watermark(legacy)? {
                Some(acknowledged) => (GuardRecord { acknowledged, vote: None }, 0, GuardFound::LegacyWatermark),
                None => (GuardRecord::default(), 0, GuardFound::Missing),
            },
        };
        Ok((Guard { slots: Mutex::new(Slots { file, seq, record }) }, found))
    }

    fn write(&self, change: impl FnOnce(&mut GuardRecord)) -> io::Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut record = slots.record;
        change(&mut record);
        if record == slots.record && slots.seq > 0 {
            return Ok(());
        }
        let seq = slots.seq + 1;
        slots.file.write_all_at(&encode(&record, seq), (seq % 2) * SLOT as u64)?;
        slots.file.sync_data()?;
        slots.seq = seq;
        slots.record = record;
        Ok(())
    }

    /// Records `index` as the highest acknowledged (one fdatasync unless
    /// unchanged). Lowered by a truncation. Blocking: off the async threads.
    pub fn record_acknowledged(&self, index: u64) -> io::Result<()> {
        self.write(|record| record.acknowledged = index)
    }

    /// Records the vote just saved in the engine. Blocking.
    pub fn record_vote(&self, vote: GuardVote) -> io::Result<()> {
        self.write(|record| record.vote = Some(vote))
    }

    /// Writes the record as it is (after a slot was found lost, so both
    /// slots hold it again). Blocking.
    pub fn rewrite(&self) -> io::Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let record = slots.record;
        for _ in 0..2 {
            let seq = slots.seq + 1;
            slots.file.write_all_at(&encode(&record, seq), (seq % 2) * SLOT as u64)?;
            slots.seq = seq;
        }
        slots.file.sync_data()
    }

    pub fn current(&self) -> GuardRecord {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).record
    }

    pub fn acknowledged(&self) -> u64 {
        self.current().acknowledged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (Guard, GuardFound) {
        Guard::open(&dir.join("guard"), &dir.join("legacy")).unwrap()
    }

    fn vote(term: u64) -> GuardVote {
        GuardVote { term, node_id: 2, committed: term.is_multiple_of(2) }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (g, found) = open(dir.path());
        assert_eq!((found, g.current()), (GuardFound::Missing, GuardRecord::default()));
        g.record_acknowledged(10).unwrap();
        g.record_vote(vote(3)).unwrap();
        g.record_acknowledged(25).unwrap();
        g.record_acknowledged(7).unwrap(); // a truncation lowers it
        drop(g);
        let (g, found) = open(dir.path());
        assert_eq!(found, GuardFound::Whole);
        assert_eq!(g.current(), GuardRecord { acknowledged: 7, vote: Some(vote(3)) });
    }

    /// Each slot torn in turn: the other one, one write older, is used and
    /// the loss is reported; both torn: unreadable, not "missing".
    #[test]
    fn a_torn_slot_falls_back_one_write_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guard");
        let (g, _) = open(dir.path());
        g.record_acknowledged(7).unwrap();
        g.record_vote(vote(4)).unwrap();
        g.record_acknowledged(30).unwrap();
        drop(g);
        let bytes = std::fs::read(&path).unwrap();
        let newest = if decode(&bytes[..SLOT]).unwrap().0.acknowledged == 30 { 0 } else { SLOT };
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 5], newest as u64 + 13).unwrap();
        let (g, found) = open(dir.path());
        assert!(matches!(found, GuardFound::OneSlotLost(_)), "{found:?}");
        assert_eq!(g.current(), GuardRecord { acknowledged: 7, vote: Some(vote(4)) });
        drop(g);
        file.write_all_at(&[0xff; 5], (SLOT - newest) as u64 + 13).unwrap();
        let (g, found) = open(dir.path());
        assert!(matches!(found, GuardFound::Unreadable(_)), "{found:?}");
        assert_eq!(g.current(), GuardRecord::default());
    }

    #[test]
    fn reads_the_older_watermark_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut slot = [0u8; 24];
        slot[..8].copy_from_slice(&42u64.to_le_bytes());
        slot[8..16].copy_from_slice(&1u64.to_le_bytes());
        let crc = crc32fast::hash(&slot[..16]);
        slot[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut bytes = vec![0u8; 48];
        bytes[24..].copy_from_slice(&slot);
        std::fs::write(dir.path().join("legacy"), bytes).unwrap();
        let (g, found) = open(dir.path());
        assert_eq!(found, GuardFound::LegacyWatermark);
        assert_eq!(g.current(), GuardRecord { acknowledged: 42, vote: None });
    }
}
