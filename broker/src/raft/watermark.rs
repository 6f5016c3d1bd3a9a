//! The highest log index a group has acknowledged as durable, fsynced in a
//! file of its own. raft-engine drops a corrupt log tail silently when it
//! opens (`TolerateTailCorruption`): harmless for a torn write nobody was
//! told about, fatal for entries this node acknowledged — a node that lost
//! them must not vote or lead as if it still had them, or a leader without
//! an acknowledged entry could be elected. Comparing the recovered log with
//! this record at start-up is how a node finds out (DEPENDENCIES.md §9).
//!
//! Two slots, written alternately, each with a sequence number and a CRC:
//! a torn write of one slot leaves the other, one write earlier, which only
//! under-reports (never an acknowledged index higher than the truth).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
    sync::Mutex,
};

const SLOT: u64 = 24;

struct Slots {
    file: File,
    seq: u64,
    index: u64,
}

pub struct Watermark {
    slots: Mutex<Slots>,
}

fn encode(index: u64, seq: u64) -> [u8; SLOT as usize] {
    let mut slot = [0u8; SLOT as usize];
    slot[..8].copy_from_slice(&index.to_le_bytes());
    slot[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&slot[..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode(slot: &[u8]) -> Option<(u64, u64)> {
    let crc = u32::from_le_bytes(slot[16..20].try_into().ok()?);
    if crc32fast::hash(&slot[..16]) != crc {
        return None;
    }
    let index = u64::from_le_bytes(slot[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    (seq > 0).then_some((index, seq))
}

impl Watermark {
    /// Opens (or creates) the record; returns it with the index it holds
    /// (0 when new).
    pub fn open(path: &Path) -> io::Result<(Watermark, u64)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut bytes = vec![0u8; 2 * SLOT as usize];
        let len = file.read_at(&mut bytes, 0)?;
        bytes.truncate(len);
        bytes.resize(2 * SLOT as usize, 0);
        let best = [decode(&bytes[..SLOT as usize]), decode(&bytes[SLOT as usize..])]
            .into_iter()
            .flatten()
            .max_by_key(|(_, seq)| *seq);
        let (index, seq) = best.unwrap_or((0, 0));
        Ok((Watermark { slots: Mutex::new(Slots { file, seq, index }) }, index))
    }

    /// Records `index` durably (one fdatasync). Blocking: call it off the
    /// async threads.
    pub fn record(&self, index: u64) -> io::Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if index == slots.index && slots.seq > 0 {
            return Ok(());
        }
        let seq = slots.seq + 1;
        slots.file.write_all_at(&encode(index, seq), (seq % 2) * SLOT)?;
        slots.file.sync_data()?;
        slots.seq = seq;
        slots.index = index;
        Ok(())
    }

    pub fn recorded(&self) -> u64 {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (w, at) = Watermark::open(&path).unwrap();
        assert_eq!(at, 0);
        w.record(10).unwrap();
        w.record(25).unwrap();
        w.record(7).unwrap(); // a truncation lowers it
        drop(w);
        let (w, at) = Watermark::open(&path).unwrap();
        assert_eq!((at, w.recorded()), (7, 7));
        w.record(30).unwrap();
        drop(w);
        // Tear the newest slot: the older one (7) is what remains.
        let (_, at) = Watermark::open(&path).unwrap();
        assert_eq!(at, 30);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let newest = {
            let bytes = std::fs::read(&path).unwrap();
            if decode(&bytes[..24]).unwrap().0 == 30 { 0 } else { 24 }
        };
        file.write_all_at(&[0xff; 5], newest).unwrap();
        let (_, at) = Watermark::open(&path).unwrap();
        assert_eq!(at, 7);
    }
}
