//! The data directory's header: which storage format its files may be in,
//! checked before Raft starts, and raised (durably, before anything of the
//! new format is written) when a shard's format is.
//!
//! Two files say it. `HEADER` is the real one (a checksummed
//! `gantry.storage.v1.DataDirHeader`). `FORMAT` is the line builds before
//! the header read: `gantry-data 2` while everything here is format 0, so
//! such a build may still start (a downgrade before the upgrade is
//! finalized); anything else once the format was raised, which those builds
//! refuse to start on, printing the line, which says what to do instead.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
    sync::atomic::{AtomicU32, Ordering},
};

use gantry_proto::storage::DataDirHeader;
use prost::Message;

use super::table::{BINARY_VERSION, FORMAT_MAX, FORMAT_MIN_SUPPORTED};

const HEADER_FILE: &str = "HEADER";
const HEADER_MAGIC: &[u8; 4] = b"GHD1";
const LEGACY_FILE: &str = "FORMAT";
/// What builds before the header wrote and read (format 0).
const LEGACY_FORMAT_0: &str = "gantry-data 2";
const SHARDS_FILE: &str = "SHARDS";
const SHARDS_PREFIX: &str = "gantry-shards ";

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{dir} was written in storage format {format} by gantry {written_by}; this gantry ({BINARY_VERSION}) reads \
         formats {FORMAT_MIN_SUPPORTED} to {FORMAT_MAX}. A downgrade after the cluster's format was raised is \
         refused (nothing here was changed): run gantry {written_by} or newer on this directory, or restore a backup \
         taken before the upgrade"
    )]
    TooNew { dir: String, format: u32, written_by: String },
    #[error(
        "{dir} holds storage format {format}, which this gantry ({BINARY_VERSION}) no longer reads (oldest: \
         {FORMAT_MIN_SUPPORTED}): upgrade through a release that reads both first (docs/compatibility.md)"
    )]
    TooOld { dir: String, format: u32 },
    #[error("{path} is damaged ({why}); nothing was changed. {hint}")]
    Damaged { path: PathBuf, why: String, hint: &'static str },
    #[error(
        "{dir} holds data of an unknown layout ({what}); this gantry reads {LEGACY_FORMAT_0:?} and {HEADER_FILE}. Start with an empty --data-dir for a new node"
    )]
    Unknown { dir: String, what: String },
    #[error(
        "{dir} belongs to a cluster of {recorded} shard(s), but --shards is {shards}; the shard count is fixed when a \
         cluster is created (start with --shards {recorded}, or with an empty --data-dir for a new cluster)"
    )]
    ShardCount { dir: String, recorded: u32, shards: u32 },
}

const HEADER_HINT: &str = "If the rest of the directory is intact, write it again with the format it holds \
                           (docs/compatibility.md) or move the directory aside: the node is then rebuilt from its peers";

/// This node's data directory format, shared by everything that writes in
/// it (log store, snapshots): they write in the newest encoding it allows.
#[derive(Debug)]
pub struct DataDirFormat {
    dir: PathBuf,
    shards: u32,
    format: AtomicU32,
    /// Held while raising: one writer of the files at a time.
    raising: Mutex<()>,
}

impl DataDirFormat {
    /// Checks (or creates) the header of `dir`, before anything else reads
    /// the directory. `is_new`: nothing was ever written there.
    pub fn open(dir: &Path, shards: u32) -> Result<DataDirFormat, HeaderError> {
        let io_at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HeaderError::Io { path: path.clone(), source }
        };
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let shown = dir.display().to_string();
        let header = read_header(dir)?;
        let legacy = match fs::read_to_string(dir.join(LEGACY_FILE)) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(HeaderError::Io { path: dir.join(LEGACY_FILE), source: e }),
        };
        let has_raft = dir.join("raft").exists();
        let recorded_shards = read_shards(dir)?;
        let header = match (header, legacy.as_deref()) {
            (Some(header), _) => header,
            (None, Some(LEGACY_FORMAT_0)) => DataDirHeader {
                format: 0,
                min_reader: 0,
                written_by: "an earlier gantry (format 0)".into(),
                // Written before shard counts were recorded: they ran exactly one.
                shards: recorded_shards.unwrap_or(1),
            },
            (None, Some(other)) => return Err(HeaderError::Unknown { dir: shown, what: format!("FORMAT {other:?}") }),
            (None, None) if has_raft => {
                return Err(HeaderError::Unknown { dir: shown, what: "a raft directory but no FORMAT file".into() });
            }
            (None, None) => DataDirHeader { format: 0, min_reader: 0, written_by: BINARY_VERSION.into(), shards },
        };
        if header.min_reader > FORMAT_MAX {
            return Err(HeaderError::TooNew { dir: shown, format: header.format, written_by: header.written_by });
        }
        if below_min_supported(header.format) {
            return Err(HeaderError::TooOld { dir: shown, format: header.format });
        }
        let recorded = recorded_shards.unwrap_or(if header.shards == 0 { shards } else { header.shards });
        if recorded != shards {
            return Err(HeaderError::ShardCount { dir: shown, recorded, shards });
        }
        let opened = DataDirFormat {
            dir: dir.to_path_buf(),
            shards,
            format: AtomicU32::new(header.format),
            raising: Mutex::new(()),
        };
        // Writes whatever is missing (a new directory, one an older build
        // wrote, a crash between the two files of a raise).
        opened.write_files(header.format)?;
        Ok(opened)
    }

    /// The newest format anything in the directory may be written in.
    pub fn current(&self) -> u32 {
        self.format.load(Ordering::Acquire)
    }

    /// Makes sure the directory may hold data of `format`, raising its
    /// header durably first if needed. After this returns, builds that do
    /// not read `format` refuse to start here.
    pub fn ensure(&self, format: u32) -> io::Result<()> {
        if self.current() >= format {
            return Ok(());
        }
        if format > FORMAT_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("storage format {format} is newer than this gantry ({BINARY_VERSION}) writes ({FORMAT_MAX})"),
            ));
        }
        let _raising = self.raising.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.current() >= format {
            return Ok(());
        }
        self.write_files(format).map_err(|e| io::Error::other(e.to_string()))?;
        self.format.store(format, Ordering::Release);
        tracing::info!(dir = %self.dir.display(), format, "data directory raised to a new storage format");
        Ok(())
    }

    fn write_files(&self, format: u32) -> Result<(), HeaderError> {
        let header =
            DataDirHeader { format, min_reader: format, written_by: BINARY_VERSION.into(), shards: self.shards };
        let unchanged =
            read_header(&self.dir).ok().flatten().is_some_and(|h| h.format == format && h.shards == self.shards);
        if !unchanged {
            write_durably(&self.dir, HEADER_FILE, &encode_header(&header))?;
        }
        // After the header: a crash in between leaves the header raised and
        // FORMAT behind, which the next start repairs (nothing of the new
        // format is written before both are).
        let line = legacy_line(format);
        if fs::read_to_string(self.dir.join(LEGACY_FILE)).ok().as_deref() != Some(line.as_str()) {
            write_durably(&self.dir, LEGACY_FILE, line.as_bytes())?;
        }
        if read_shards(&self.dir)?.is_none() {
            write_durably(&self.dir, SHARDS_FILE, format!("{SHARDS_PREFIX}{}\n", self.shards).as_bytes())?;
        }
        Ok(())
    }
}

/// Always false while the oldest supported format is 0; kept so that
/// raising [`FORMAT_MIN_SUPPORTED`] is all a release that drops one needs.
#[allow(clippy::absurd_extreme_comparisons)]
fn below_min_supported(format: u32) -> bool {
    format < FORMAT_MIN_SUPPORTED
}

/// The FORMAT line for builds before the header: the one they accept while
/// the directory is format 0, and a refusal that says what to do after.
fn legacy_line(format: u32) -> String {
    if format == 0 {
        format!("{LEGACY_FORMAT_0}\n")
    } else {
        format!(
            "gantry-data 3 (storage format {format}, written by gantry {BINARY_VERSION}: this directory's cluster \
             was upgraded; run gantry {BINARY_VERSION} or newer here, a downgrade is refused: docs/compatibility.md)\n"
        )
    }
}

/// The HEADER file's bytes: a magic, the payload's length (u32 LE) and
/// CRC32 (u32 LE), then the `DataDirHeader`.
pub fn encode_header(header: &DataDirHeader) -> Vec<u8> {
    let payload = header.encode_to_vec();
    let mut bytes = Vec::with_capacity(12 + payload.len());
    bytes.extend_from_slice(HEADER_MAGIC);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes
}

/// Reads HEADER bytes; why not, in words.
pub fn decode_header(bytes: &[u8]) -> Result<DataDirHeader, String> {
    let Some((head, payload)) = bytes.split_first_chunk::<12>() else {
        return Err(format!("{} bytes, shorter than its header", bytes.len()));
    };
    if &head[..4] != HEADER_MAGIC {
        return Err("not a gantry header (bad magic)".into());
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if len != payload.len() || crc32fast::hash(payload) != crc {
        return Err("length or checksum does not match".into());
    }
    DataDirHeader::decode(payload).map_err(|e| e.to_string())
}

/// The FORMAT line a directory of storage format 0 holds: what every build
/// before the header accepts.
pub fn legacy_format_0_line() -> &'static str {
    LEGACY_FORMAT_0
}

fn read_header(dir: &Path) -> Result<Option<DataDirHeader>, HeaderError> {
    let path = dir.join(HEADER_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(HeaderError::Io { path, source }),
    };
    decode_header(&bytes).map(Some).map_err(|why| HeaderError::Damaged { path, why, hint: HEADER_HINT })
}

fn read_shards(dir: &Path) -> Result<Option<u32>, HeaderError> {
    let path = dir.join(SHARDS_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().strip_prefix(SHARDS_PREFIX).and_then(|n| n.parse().ok()).map(Some).ok_or_else(|| {
            HeaderError::Damaged { path, why: format!("unreadable shard count {:?}", text.trim()), hint: HEADER_HINT }
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HeaderError::Io { path, source }),
    }
}

/// Replaces `name` in `dir` so that a crash leaves the old file or the new
/// one, and the new one survives it once this returns.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), HeaderError> {
    let path = dir.join(name);
    let io_err = |source| HeaderError::Io { path: path.clone(), source };
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = fs::File::create(&temp).map_err(io_err)?;
    io::Write::write_all(&mut file, bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&temp, &path).map_err(io_err)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_starts_at_format_0_and_older_builds_may_still_start() {
        let dir = tempfile::tempdir().unwrap();
        let opened = DataDirFormat::open(dir.path(), 4).unwrap();
        assert_eq!(opened.current(), 0);
        assert_eq!(fs::read_to_string(dir.path().join(LEGACY_FILE)).unwrap().trim(), LEGACY_FORMAT_0);
        assert_eq!(read_shards(dir.path()).unwrap(), Some(4));
        assert_eq!(DataDirFormat::open(dir.path(), 4).unwrap().current(), 0);
    }

    #[test]
    fn raising_is_durable_and_turns_older_builds_away() {
        let dir = tempfile::tempdir().unwrap();
        let opened = DataDirFormat::open(dir.path(), 1).unwrap();
        opened.ensure(1).unwrap();
        assert_eq!(opened.current(), 1);
        let legacy = fs::read_to_string(dir.path().join(LEGACY_FILE)).unwrap();
        assert_ne!(legacy.trim(), LEGACY_FORMAT_0, "a build before the header would start on format-1 data");
        assert!(legacy.contains("downgrade is refused"), "{legacy}");
        assert_eq!(DataDirFormat::open(dir.path(), 1).unwrap().current(), 1);
        assert!(opened.ensure(FORMAT_MAX + 1).is_err());
    }

    #[test]
    fn a_directory_of_a_newer_format_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let opened = DataDirFormat::open(dir.path(), 1).unwrap();
        let newer =
            DataDirHeader { format: FORMAT_MAX + 1, min_reader: FORMAT_MAX + 1, written_by: "9.9.9".into(), shards: 1 };
        opened.format.store(0, Ordering::Release);
        write_durably(dir.path(), HEADER_FILE, &encode_header(&newer)).unwrap();
        let refused = DataDirFormat::open(dir.path(), 1).unwrap_err().to_string();
        let written = format!("storage format {} by gantry 9.9.9", FORMAT_MAX + 1);
        assert!(refused.contains(&written) && refused.contains(BINARY_VERSION), "{refused}");
        assert!(refused.contains("run gantry 9.9.9 or newer"), "{refused}");
    }

    #[test]
    fn a_directory_of_an_older_build_is_format_0_and_keeps_its_shard_count() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("raft")).unwrap();
        fs::write(dir.path().join(LEGACY_FILE), "gantry-data 2\n").unwrap();
        // Before shard counts were recorded: one shard.
        let refused = DataDirFormat::open(dir.path(), 3).unwrap_err().to_string();
        assert!(refused.contains("1 shard(s)") && refused.contains("--shards is 3"), "{refused}");
        assert_eq!(DataDirFormat::open(dir.path(), 1).unwrap().current(), 0);
        assert!(dir.path().join(HEADER_FILE).exists());
    }

    #[test]
    fn unknown_layouts_and_damaged_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("raft")).unwrap();
        assert!(matches!(DataDirFormat::open(dir.path(), 1), Err(HeaderError::Unknown { .. })));
        fs::write(dir.path().join(LEGACY_FILE), "gantry-data 1\n").unwrap();
        assert!(matches!(DataDirFormat::open(dir.path(), 1), Err(HeaderError::Unknown { .. })));
        fs::write(dir.path().join(LEGACY_FILE), "gantry-data 2\n").unwrap();
        DataDirFormat::open(dir.path(), 1).unwrap();
        let path = dir.path().join(HEADER_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let refused = DataDirFormat::open(dir.path(), 1).unwrap_err().to_string();
        assert!(refused.contains("HEADER is damaged"), "{refused}");
    }

    #[test]
    fn the_shard_count_is_fixed_by_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        DataDirFormat::open(dir.path(), 4).unwrap();
        let refused = DataDirFormat::open(dir.path(), 2).unwrap_err().to_string();
        assert!(refused.contains("4 shard(s)") && refused.contains("--shards is 2"), "{refused}");
    }
}
