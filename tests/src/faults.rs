//! Storage faults for process tests, applied to a stopped node's data dir,
//! chosen by a seeded PRNG so that a failing run can be replayed.
//!
//! A test takes its seed from [`seed_from_env`] (`GANTRY_FAULT_SEED`, or
//! one derived from the clock), prints [`replay_command`], and draws every
//! choice (when to kill, how many bytes to cut, which bits to flip) from
//! one [`Rng`] in a fixed order. Replaying a seed repeats those choices;
//! what they hit (the files' sizes and contents) still depends on how far
//! the load got, so a replay is the same experiment, not the same bytes.
//!
//! The data dir's layout (`ARCHITECTURE.md`, Storage): `raft/` is the
//! raft-engine directory (`<seq>.raftlog` append files, `.rewrite` files
//! ignored here), `snapshots/<shard>/snapshot-v*.bin`, `raft-guard/<shard>`
//! (and the older `raft-watermark/<shard>`): the redundant record of a
//! group's vote and acknowledged index.
//!
//! raft-engine grows its active file with `fallocate` 2 MiB at a time and
//! trims the zeros only on a clean close, so after a SIGKILL the newest
//! `.raftlog` ends in up to 2 MiB of zeros that hold nothing. The log
//! faults therefore measure from the end of the data (the last non-zero
//! byte), not from the end of the file: cutting or flipping zeros would
//! damage nothing.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail, ensure};

/// The environment variable that fixes the seed of a run.
pub const SEED_ENV: &str = "GANTRY_FAULT_SEED";

/// What the log faults leave alone at the start of a file (raft-engine's
/// file header is far smaller).
const HEADER: u64 = 4096;
/// `FlipBits` flips bits in the last this many bytes of the data.
const FLIP_WINDOW: u64 = 64 * 1024;

/// splitmix64: tiny, seedable, good enough to pick offsets.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "Rng::below(0)");
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Uniform in `range` (inclusive).
    pub fn range(&mut self, range: RangeInclusive<u64>) -> u64 {
        let (low, high) = range.into_inner();
        assert!(low <= high, "empty range {low}..={high}");
        match (high - low).checked_add(1) {
            Some(span) => low + self.below(span),
            None => self.next_u64(),
        }
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// splitmix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of this run: `GANTRY_FAULT_SEED` when set (decimal, or hex
/// with `0x`), else one derived from the clock and `salt` (a per-test
/// value, so tests started in the same instant still differ). Printed
/// either way. Panics on a malformed `GANTRY_FAULT_SEED`.
pub fn seed_from_env(salt: u64) -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            let seed = parsed.unwrap_or_else(|e| panic!("{SEED_ENV}={text:?} is not a u64: {e}"));
            eprintln!("fault seed {seed} (from {SEED_ENV})");
            seed
        }
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let seed = mix(now.as_nanos() as u64 ^ mix(salt) ^ u64::from(std::process::id()));
            eprintln!("fault seed {seed} (from the clock; set {SEED_ENV}={seed} to replay)");
            seed
        }
    }
}

/// The command that runs `test_name` (its nextest name, e.g.
/// `storage_faults::leader_tail_cut_back_before_election_three_shards`)
/// again with `seed`, ignored or not.
pub fn replay_command(test_name: &str, seed: u64) -> String {
    format!("{SEED_ENV}={seed} cargo nextest run -p gantry-tests --run-ignored all -E 'test(={test_name})'")
}

/// What to damage; [`choose`](FaultKind::choose) draws its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// Cut the tail of the newest raft log file.
    CutTail,
    /// Flip bits near the end of the newest raft log file.
    FlipBits,
    /// Delete the guard records (vote and acknowledged index).
    LoseVoteRecord,
    /// Flip bits in every shard's snapshot file.
    DamageSnapshot,
    /// Remove the whole data dir.
    LoseDataDir,
}

impl FaultKind {
    /// The fault with its size drawn from `rng`: 4..=32 KiB cut, 1..=8 bits.
    pub fn choose(self, rng: &mut Rng) -> Fault {
        match self {
            FaultKind::CutTail => Fault::CutTail { bytes: rng.range(4 * 1024..=32 * 1024) },
            FaultKind::FlipBits => Fault::FlipBits { count: rng.range(1..=8) as u32 },
            FaultKind::LoseVoteRecord => Fault::LoseVoteRecord,
            FaultKind::DamageSnapshot => Fault::DamageSnapshot { bits: rng.range(1..=8) as u32 },
            FaultKind::LoseDataDir => Fault::LoseDataDir,
        }
    }
}

/// A fault with its size; [`apply`](Fault::apply) draws where it lands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Truncate the newest `*.raftlog` by `bytes` from the end of its data.
    CutTail { bytes: u64 },
    /// Flip `count` distinct bits in the last 64 KiB of the newest
    /// `*.raftlog`'s data, past its first 4 KiB.
    FlipBits { count: u32 },
    /// Delete `raft-guard/` and `raft-watermark/`.
    LoseVoteRecord,
    /// Flip `bits` distinct bits in each `snapshots/<shard>/snapshot-*.bin`.
    DamageSnapshot { bits: u32 },
    /// Remove the data dir.
    LoseDataDir,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::CutTail { bytes } => write!(f, "cut {bytes} bytes off the raft log's tail"),
            Fault::FlipBits { count } => write!(f, "flip {count} bit(s) near the raft log's tail"),
            Fault::LoseVoteRecord => f.write_str("lose the vote/acknowledged-index records"),
            Fault::DamageSnapshot { bits } => write!(f, "flip {bits} bit(s) in each snapshot"),
            Fault::LoseDataDir => f.write_str("lose the whole data dir"),
        }
    }
}

impl Fault {
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::CutTail { .. } => FaultKind::CutTail,
            Fault::FlipBits { .. } => FaultKind::FlipBits,
            Fault::LoseVoteRecord => FaultKind::LoseVoteRecord,
            Fault::DamageSnapshot { .. } => FaultKind::DamageSnapshot,
            Fault::LoseDataDir => FaultKind::LoseDataDir,
        }
    }

    /// Damages the data dir of a stopped node; says what it did (files,
    /// offsets, bytes), for the test's output and its history timeline.
    pub fn apply(&self, data_dir: &Path, rng: &mut Rng) -> anyhow::Result<String> {
        match *self {
            Fault::CutTail { bytes } => cut_tail(data_dir, bytes),
            Fault::FlipBits { count } => {
                let path = newest_raftlog(data_dir)?;
                let (len, end) = (file_len(&path)?, data_end(&path)?);
                ensure!(end > 0, "{} holds no data", path.display());
                let (window, note) = if end > HEADER {
                    (end.saturating_sub(FLIP_WINDOW).max(HEADER)..end, String::new())
                } else {
                    (end / 2..end, format!(" (the data is only {end} bytes, within the header's 4 KiB: second half)"))
                };
                let flipped = flip_bits(&path, window.clone(), count, rng)?;
                Ok(format!(
                    "flipped {} bit(s) in {} ({len} bytes on disk, data ends at {end}) within {window:?}{note}: {}",
                    flipped.len(),
                    path.display(),
                    describe_flips(&flipped)
                ))
            }
            Fault::LoseVoteRecord => {
                let mut removed = Vec::new();
                for dir in ["raft-guard", "raft-watermark"] {
                    let dir = data_dir.join(dir);
                    if !dir.exists() {
                        continue;
                    }
                    let mut files: Vec<String> = fs::read_dir(&dir)
                        .with_context(|| format!("list {}", dir.display()))?
                        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect();
                    files.sort();
                    fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
                    removed.push(format!("{} ({})", dir.display(), files.join(", ")));
                }
                Ok(if removed.is_empty() {
                    format!("no raft-guard/ or raft-watermark/ in {}: nothing removed", data_dir.display())
                } else {
                    format!("removed {}", removed.join(" and "))
                })
            }
            Fault::DamageSnapshot { bits } => {
                let files = snapshot_files(data_dir)?;
                let mut done = Vec::new();
                for path in &files {
                    let len = file_len(path)?;
                    if len == 0 {
                        done.push(format!("{} is empty: untouched", path.display()));
                        continue;
                    }
                    let flipped = flip_bits(path, 0..len, bits, rng)?;
                    done.push(format!("{} ({len} bytes): {}", path.display(), describe_flips(&flipped)));
                }
                Ok(if done.is_empty() {
                    format!("no snapshot file under {}: nothing damaged", data_dir.join("snapshots").display())
                } else {
                    format!("flipped bits in {} snapshot(s): {}", done.len(), done.join("; "))
                })
            }
            Fault::LoseDataDir => {
                let (files, bytes) = tree_size(data_dir)?;
                fs::remove_dir_all(data_dir).with_context(|| format!("remove {}", data_dir.display()))?;
                Ok(format!("removed the data dir {} ({files} files, {bytes} bytes)", data_dir.display()))
            }
        }
    }
}

/// Applies `faults` in order; one description per fault.
pub fn apply_all(faults: &[Fault], data_dir: &Path, rng: &mut Rng) -> anyhow::Result<Vec<String>> {
    faults.iter().map(|f| f.apply(data_dir, rng).with_context(|| format!("apply {f:?}"))).collect()
}

fn cut_tail(data_dir: &Path, bytes: u64) -> anyhow::Result<String> {
    let path = newest_raftlog(data_dir)?;
    let (len, end) = (file_len(&path)?, data_end(&path)?);
    // Never below a header-sized remainder (or half the data when the
    // data is smaller than two of those).
    let floor = HEADER.min(end / 2);
    let new_len = end.saturating_sub(bytes).max(floor);
    let file = OpenOptions::new().write(true).open(&path).with_context(|| format!("open {}", path.display()))?;
    file.set_len(new_len).with_context(|| format!("truncate {}", path.display()))?;
    file.sync_all()?;
    let mut text = format!(
        "cut {} from {len} bytes on disk (data ends at {end}) to {new_len}: {} bytes of data cut",
        path.display(),
        end - new_len.min(end)
    );
    if new_len > end.saturating_sub(bytes) {
        text.push_str(&format!(
            " (asked {bytes}, but the data is only {end} bytes: kept {new_len}, {})",
            if floor == HEADER { "a header-sized 4 KiB" } else { "half of it" }
        ));
    }
    if len > end {
        text.push_str(&format!(", and {} preallocated zero bytes after it", len - end));
    }
    Ok(text)
}

/// The `*.raftlog` file with the highest sequence number under `<data>/raft/`.
pub fn newest_raftlog(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("raft");
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(seq) = name.strip_suffix(".raftlog").and_then(|s| s.parse::<u64>().ok()) else { continue };
        if newest.as_ref().is_none_or(|(best, _)| seq > *best) {
            newest = Some((seq, path));
        }
    }
    match newest {
        Some((_, path)) => Ok(path),
        None => bail!("no *.raftlog file in {}", dir.display()),
    }
}

/// Every `<data>/snapshots/<shard>/snapshot-*.bin`, sorted.
pub fn snapshot_files(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let root = data_dir.join("snapshots");
    let mut files = Vec::new();
    if !root.exists() {
        return Ok(files);
    }
    for shard in fs::read_dir(&root).with_context(|| format!("list {}", root.display()))? {
        let shard = shard?.path();
        if !shard.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&shard).with_context(|| format!("list {}", shard.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("snapshot-") && name.ends_with(".bin") && path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn file_len(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len())
}

/// The offset just past the last non-zero byte (0 for an all-zero file):
/// where the data of a file raft-engine preallocated ends.
pub fn data_end(path: &Path) -> anyhow::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(block).with_context(|| format!("read {}", path.display()))?;
        if let Some(last) = block.iter().rposition(|b| *b != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Flips `count` distinct bits at offsets drawn in `window`; returns
/// (offset, bit, byte before, byte after), by offset.
fn flip_bits(path: &Path, window: Range<u64>, count: u32, rng: &mut Rng) -> anyhow::Result<Vec<(u64, u8, u8, u8)>> {
    ensure!(!window.is_empty(), "nothing to flip in {} ({window:?})", path.display());
    let bits_available = (window.end - window.start).saturating_mul(8);
    let count = u64::from(count).min(bits_available);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        let offset = window.start + rng.below(window.end - window.start);
        chosen.insert((offset, rng.below(8) as u8));
    }
    let mut file =
        OpenOptions::new().read(true).write(true).open(path).with_context(|| format!("open {}", path.display()))?;
    let mut flipped = Vec::new();
    for (offset, bit) in chosen {
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut byte)?;
        let before = byte[0];
        byte[0] ^= 1 << bit;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&byte)?;
        flipped.push((offset, bit, before, byte[0]));
    }
    file.sync_all()?;
    Ok(flipped)
}

fn describe_flips(flipped: &[(u64, u8, u8, u8)]) -> String {
    flipped
        .iter()
        .map(|(offset, bit, before, after)| format!("@{offset} bit {bit} ({before:#04x}->{after:#04x})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Files and bytes under `dir`.
fn tree_size(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    if !dir.exists() {
        return Ok((0, 0));
    }
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (f, b) = tree_size(&entry.path())?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_replayable_and_in_range() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..1000 {
            let x = a.range(100..=300);
            assert_eq!(x, b.range(100..=300));
            assert!((100..=300).contains(&x));
        }
        // splitmix64's first output for seed 0.
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn log_faults_measure_from_the_end_of_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        fs::create_dir_all(&raft).unwrap();
        fs::write(raft.join("0000000000000001.raftlog"), vec![1u8; 10_000]).unwrap();
        fs::write(raft.join("0000000000000001.rewrite"), vec![1u8; 10]).unwrap();
        // The newest, with 50 000 bytes of data and preallocated zeros after.
        let mut newest = vec![7u8; 50_000];
        newest.extend(vec![0u8; 100_000]);
        let path = raft.join("0000000000000002.raftlog");
        fs::write(&path, &newest).unwrap();
        assert_eq!(newest_raftlog(dir.path()).unwrap(), path);
        assert_eq!(data_end(&path).unwrap(), 50_000);

        let mut rng = Rng::new(7);
        let text = Fault::FlipBits { count: 8 }.apply(dir.path(), &mut rng).unwrap();
        let after = fs::read(&path).unwrap();
        let changed: Vec<usize> = (0..after.len()).filter(|i| after[*i] != newest[*i]).collect();
        assert!(!changed.is_empty() && changed.len() <= 8, "{text}");
        assert!(changed.iter().all(|i| (4096..50_000).contains(i)), "{text}");

        let text = Fault::CutTail { bytes: 8192 }.apply(dir.path(), &mut rng).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 50_000 - 8192, "{text}");
        // Shorter than the cut: a header-sized remainder.
        let text = Fault::CutTail { bytes: 1 << 20 }.apply(dir.path(), &mut rng).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 4096, "{text}");
    }

    #[test]
    fn guard_snapshot_and_dir_faults() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node-1");
        for sub in ["raft-guard", "raft-watermark", "snapshots/0", "snapshots/1"] {
            fs::create_dir_all(data.join(sub)).unwrap();
        }
        fs::write(data.join("raft-guard/0"), b"guard").unwrap();
        fs::write(data.join("snapshots/0/snapshot-v2.bin"), vec![0u8; 100]).unwrap();
        fs::write(data.join("snapshots/1/snapshot-v1.bin"), vec![0u8; 100]).unwrap();
        fs::write(data.join("snapshots/1/snapshot-v2.bin.tmp"), vec![0u8; 100]).unwrap();
        let mut rng = Rng::new(1);
        Fault::LoseVoteRecord.apply(&data, &mut rng).unwrap();
        assert!(!data.join("raft-guard").exists() && !data.join("raft-watermark").exists());
        assert_eq!(snapshot_files(&data).unwrap().len(), 2);
        Fault::DamageSnapshot { bits: 3 }.apply(&data, &mut rng).unwrap();
        for file in snapshot_files(&data).unwrap() {
            let ones: u32 = fs::read(&file).unwrap().iter().map(|b| b.count_ones()).sum();
            assert_eq!(ones, 3, "{}", file.display());
        }
        assert!(fs::read(data.join("snapshots/1/snapshot-v2.bin.tmp")).unwrap().iter().all(|b| *b == 0));
        Fault::LoseDataDir.apply(&data, &mut rng).unwrap();
        assert!(!data.exists());
    }
}
