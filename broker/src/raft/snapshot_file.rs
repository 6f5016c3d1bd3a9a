//! The shard's snapshot file, and a snapshot's state bytes as openraft hands
//! them around (built, sent, received, installed). From format 1 those bytes
//! stay in a file and are read piece by piece: no step holds a shard's whole
//! encoded state in memory beside the state itself (with a million queued
//! jobs that copy, and the copies around it, were most of the broker's
//! memory after a snapshot).
//!
//! The file: a magic, the payload's length (u64 LE) and CRC32 (u32 LE),
//! then the payload: from storage format 1 `snapshot-v3.bin` (`GSNAP3`, a
//! `gantry.storage.v1.SnapshotFile`), at format 0 `snapshot-v2.bin`
//! (`GSNAP2`, postcard of [`SnapshotFileV1`]). A bit flipped anywhere is
//! found when the file is opened, never decoded into a wrong state.

use std::{
    fs, io,
    io::{Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use openraft::type_config::alias::SnapshotMetaOf;

use super::payload_spill::PayloadSpill;
use super::types::TypeConfig;
use crate::queue::{
    PayloadReadError, QueueState,
    snapshot::{decode_snapshot_v1, encode_snapshot_v1},
};

type C = TypeConfig;

pub const SNAPSHOT_FILE_V3: &str = "snapshot-v3.bin";
const SNAPSHOT_MAGIC_V3: &[u8; 8] = b"GSNAP3\0\0";
pub const SNAPSHOT_FILE: &str = "snapshot-v2.bin";
const SNAPSHOT_MAGIC: &[u8; 8] = b"GSNAP2\0\0";
pub const SNAPSHOT_HEADER_LEN: usize = 20;
/// Written by versions before the checksum: the bare payload.
pub const SNAPSHOT_FILE_V1: &str = "snapshot-v1.bin";
/// `SnapshotFile.data`'s field number.
const FILE_DATA_FIELD: u32 = 3;
/// What is read or written at a time while streaming a file.
const STREAM_CHUNK: usize = 1 << 20;

/// Before `ShardState` bytes of format 1 on; format 0's data starts with
/// `GNTSNAP1` (queue::snapshot).
pub const STATE_MAGIC_V2: &[u8; 8] = b"GNTSTAT2";

/// A snapshot's state bytes (`SnapshotFile.data`).
#[derive(Debug)]
pub enum SnapshotData {
    /// A format-0 state (postcard, which is encoded and decoded whole).
    Memory(Vec<u8>),
    /// `len` bytes from `start` of an open file: the shard's snapshot file
    /// (a newer snapshot replacing it by rename does not change what this
    /// reads) or one being received from the leader (unlinked, gone when
    /// dropped).
    File { file: Arc<fs::File>, start: u64, len: u64 },
}

impl SnapshotData {
    pub fn len(&self) -> u64 {
        match self {
            SnapshotData::Memory(bytes) => bytes.len() as u64,
            SnapshotData::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from `at` (fewer only at the end).
    pub fn read_chunk(&self, at: u64, max: usize) -> io::Result<Vec<u8>> {
        let want = self.len().saturating_sub(at).min(max as u64) as usize;
        match self {
            SnapshotData::Memory(bytes) => Ok(bytes[at as usize..at as usize + want].to_vec()),
            SnapshotData::File { file, start, .. } => {
                let mut chunk = vec![0; want];
                file.read_exact_at(&mut chunk, start + at)?;
                Ok(chunk)
            }
        }
    }

    /// Reads the bytes from the start, buffered.
    pub fn reader(&self) -> impl Read + '_ {
        let inner: Box<dyn Read + Send + '_> = match self {
            SnapshotData::Memory(bytes) => Box::new(bytes.as_slice()),
            SnapshotData::File { file, start, len } => {
                Box::new(FileRange { file: file.as_ref(), at: *start, end: start + len })
            }
        };
        io::BufReader::with_capacity(256 << 10, inner)
    }

    /// The lowest storage format that can hold these bytes: 0 for postcard,
    /// 1 for the `ShardState` encoding (its own format field may be higher).
    pub fn format(&self) -> io::Result<u32> {
        Ok(data_format_of(&self.read_chunk(0, STATE_MAGIC_V2.len())?))
    }

    /// The shard state these bytes hold, decoded as they are read.
    pub fn decode(&self) -> Result<QueueState, String> {
        match self {
            SnapshotData::Memory(bytes) => decode_state_data(bytes),
            SnapshotData::File { .. } if self.format().map_err(|e| e.to_string())? == 0 => {
                decode_state_data(&self.to_vec().map_err(|e| e.to_string())?)
            }
            SnapshotData::File { .. } => self.decode_streaming(),
        }
    }

    /// [`Self::decode`], the payloads of a state at format 1 or more written
    /// to `spill`'s files as they are decoded (never all in memory).
    pub fn decode_to(&self, spill: &PayloadSpill) -> Result<QueueState, String> {
        if self.format().map_err(|e| e.to_string())? == 0 {
            return self.decode();
        }
        let mut reader = self.reader();
        reader.read_exact(&mut [0; STATE_MAGIC_V2.len()]).map_err(|e| e.to_string())?;
        let len = self.len() - STATE_MAGIC_V2.len() as u64;
        spill
            .restoring(|to_disk| crate::format::storage::decode_state_spilling(reader, len, to_disk))
            .map_err(|e| format!("writing its payloads to disk: {e}"))?
            .map_err(|e| format!("shard state: {e}"))
    }

    fn decode_streaming(&self) -> Result<QueueState, String> {
        let mut reader = self.reader();
        reader.read_exact(&mut [0; STATE_MAGIC_V2.len()]).map_err(|e| e.to_string())?;
        crate::format::storage::decode_state_from(reader, self.len() - STATE_MAGIC_V2.len() as u64)
            .map_err(|e| format!("shard state: {e}"))
    }

    fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(self.len() as usize);
        self.reader().read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// A file's bytes in `at..end`, read with positioned reads (the file is
/// shared; nobody moves its cursor).
struct FileRange<'a> {
    file: &'a fs::File,
    at: u64,
    end: u64,
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.at).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let read = self.file.read_at(&mut buf[..want], self.at)?;
        if read == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the snapshot file is shorter than it was"));
        }
        self.at += read as u64;
        Ok(read)
    }
}

/// A snapshot received from the leader, written to an unlinked file in the
/// shard's snapshot directory as its chunks arrive.
pub struct Incoming {
    file: fs::File,
    len: u64,
}

impl Incoming {
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Incoming { file: tempfile::tempfile_in(dir)?, len: 0 })
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.len
    }

    pub fn append(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.file.write_all(chunk)?;
        self.len += chunk.len() as u64;
        Ok(())
    }

    pub fn finish(self) -> SnapshotData {
        SnapshotData::File { file: Arc::new(self.file), start: 0, len: self.len }
    }
}

/// A shard's state as a snapshot carries it (on disk and to followers), in
/// the encoding of the shard's format: postcard at 0, so that binaries
/// before format gates can install it. Whole in memory: for tests and
/// tools; snapshots stream ([`write_snapshot_file`]).
pub fn encode_state_data(queue: &QueueState) -> Result<Vec<u8>, PayloadReadError> {
    if queue.format() == 0 {
        return Ok(encode_snapshot_v1(queue));
    }
    let mut data = STATE_MAGIC_V2.to_vec();
    crate::format::storage::encode_state(queue, &mut |bytes| data.extend_from_slice(bytes))?;
    Ok(data)
}

/// Decodes state bytes held in memory (either encoding).
pub fn decode_state_data(data: &[u8]) -> Result<QueueState, String> {
    match data.strip_prefix(STATE_MAGIC_V2.as_slice()) {
        Some(body) => crate::format::storage::decode_state(body).map_err(|e| format!("shard state: {e}")),
        None => decode_snapshot_v1(data).map_err(|e| e.to_string()),
    }
}

/// What a snapshot file holds.
pub struct StoredSnapshot {
    pub meta: SnapshotMetaOf<C>,
    pub data: SnapshotData,
}

/// `SnapshotFile` as postcard (the format-0 container).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotFileV1 {
    pub meta: SnapshotMetaOf<C>,
    /// As bytes, not a sequence of u8: the same postcard encoding, written
    /// and read in one piece instead of a call per byte.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// What a new snapshot file is written from.
pub enum Source<'a> {
    /// A state copied from the state machine, encoded as it is written.
    State(&'a QueueState),
    /// Bytes received from the leader.
    Data(&'a SnapshotData),
}

pub fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot {}: {why}", path.display()))
}

/// The lowest storage format that can hold `data`: 0 for postcard, 1 for
/// the `ShardState` encoding.
pub fn data_format_of(data: &[u8]) -> u32 {
    u32::from(data.starts_with(STATE_MAGIC_V2.as_slice()))
}

pub fn read_snapshot_file(dir: &Path) -> io::Result<Option<StoredSnapshot>> {
    let path = dir.join(SNAPSHOT_FILE_V3);
    match fs::File::open(&path) {
        Ok(file) => return read_v3(&path, file).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let path = dir.join(SNAPSHOT_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let payload = checked_payload(&path, &bytes, SNAPSHOT_MAGIC)?;
            let file: SnapshotFileV1 = postcard::from_bytes(payload).map_err(|e| invalid(&path, e))?;
            return Ok(Some(StoredSnapshot { meta: file.meta, data: SnapshotData::Memory(file.data) }));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let path = dir.join(SNAPSHOT_FILE_V1);
    match fs::read(&path) {
        Ok(bytes) => {
            let file: SnapshotFileV1 = postcard::from_bytes(&bytes).map_err(|e| invalid(&path, e))?;
            Ok(Some(StoredSnapshot { meta: file.meta, data: SnapshotData::Memory(file.data) }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Checks the whole file's checksum reading it in chunks, then finds the
/// state bytes in it without reading them.
fn read_v3(path: &Path, file: fs::File) -> io::Result<StoredSnapshot> {
    let size = file.metadata()?.len();
    let mut header = [0u8; SNAPSHOT_HEADER_LEN];
    if size < SNAPSHOT_HEADER_LEN as u64 {
        return Err(invalid(path, format!("{size} bytes, shorter than its header")));
    }
    file.read_exact_at(&mut header, 0)?;
    let (len, crc) = parse_header(path, &header, SNAPSHOT_MAGIC_V3)?;
    let payload_len = size - SNAPSHOT_HEADER_LEN as u64;
    if len != payload_len {
        return Err(invalid(path, format!("holds {payload_len} payload bytes, its header says {len}")));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut chunk = vec![0u8; STREAM_CHUNK];
    let mut at = SNAPSHOT_HEADER_LEN as u64;
    while at < size {
        let want = (size - at).min(STREAM_CHUNK as u64) as usize;
        file.read_exact_at(&mut chunk[..want], at)?;
        hasher.update(&chunk[..want]);
        at += want as u64;
    }
    let actual = hasher.finalize();
    if actual != crc {
        return Err(invalid(path, format!("checksum {actual:08x}, its header says {crc:08x}")));
    }
    // The small fields are gathered and decoded together; the data field's
    // place is only noted.
    let payload = FileRange { file: &file, at: SNAPSHOT_HEADER_LEN as u64, end: size };
    let mut fields = crate::format::storage::FieldReader::new(io::BufReader::new(payload), payload_len);
    let mut head = Vec::new();
    let mut data = None;
    let bad = |e: crate::format::storage::DecodeError| invalid(path, e);
    while let Some((tag, wire_type)) = fields.next_key().map_err(bad)? {
        if tag == FILE_DATA_FIELD && wire_type == prost::encoding::WireType::LengthDelimited {
            let len = fields.length().map_err(bad)?;
            let start = size - fields.remaining();
            data = Some((start, len));
            fields.skip(len).map_err(bad)?;
        } else {
            fields.copy_field(tag, wire_type, &mut head).map_err(bad)?;
        }
    }
    let mut decoded = <gantry_proto::storage::SnapshotFile as prost::Message>::decode(head.as_slice())
        .map_err(|e| invalid(path, e))?;
    decoded.data.clear();
    let (meta, _) = crate::format::storage::snapshot_file_from_pb(decoded).map_err(|e| invalid(path, e))?;
    let data = match data {
        Some((start, len)) => SnapshotData::File { file: Arc::new(file), start, len },
        None => SnapshotData::Memory(Vec::new()),
    };
    Ok(StoredSnapshot { meta, data })
}

fn parse_header(path: &Path, header: &[u8; SNAPSHOT_HEADER_LEN], magic: &[u8; 8]) -> io::Result<(u64, u32)> {
    if &header[..8] != magic {
        return Err(invalid(path, "not a Gantry snapshot (bad magic)"));
    }
    let len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    Ok((len, crc))
}

fn checked_payload<'a>(path: &Path, bytes: &'a [u8], magic: &[u8; 8]) -> io::Result<&'a [u8]> {
    let Some((header, payload)) = bytes.split_first_chunk::<SNAPSHOT_HEADER_LEN>() else {
        return Err(invalid(path, format!("{} bytes, shorter than its header", bytes.len())));
    };
    let (len, crc) = parse_header(path, header, magic)?;
    if len != payload.len() as u64 {
        return Err(invalid(path, format!("holds {} payload bytes, its header says {len}", payload.len())));
    }
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Err(invalid(path, format!("checksum {actual:08x}, its header says {crc:08x}")));
    }
    Ok(payload)
}

/// Durable replace: a crash leaves the old snapshot or the new one, never a
/// torn file, because the log behind a snapshot is purged. `container`: the
/// data directory's storage format (the file's encoding). Returns the state
/// bytes as they now stand in the file.
pub fn write_snapshot_file(
    dir: &Path,
    meta: &SnapshotMetaOf<C>,
    source: Source<'_>,
    container: u32,
) -> io::Result<SnapshotData> {
    // A format-0 state is postcard, which is encoded whole anyway.
    let encoded_v1;
    let source = match source {
        Source::State(queue) if queue.format() == 0 => {
            encoded_v1 = SnapshotData::Memory(encode_snapshot_v1(queue));
            Source::Data(&encoded_v1)
        }
        source => source,
    };
    let (name, data) = if container >= 1 {
        (SNAPSHOT_FILE_V3, write_v3(dir, meta, source)?)
    } else {
        let data = match source {
            Source::State(_) => unreachable!("a state of format 1 or more in a format-0 data directory"),
            Source::Data(SnapshotData::Memory(bytes)) => bytes.clone(),
            Source::Data(data) => data.to_vec()?,
        };
        let file = SnapshotFileV1 { meta: meta.clone(), data };
        let payload = postcard::to_stdvec(&file).map_err(io::Error::other)?;
        let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let mut f = io::BufWriter::new(fs::File::create(&tmp)?);
        f.write_all(SNAPSHOT_MAGIC)?;
        f.write_all(&(payload.len() as u64).to_le_bytes())?;
        f.write_all(&crc32fast::hash(&payload).to_le_bytes())?;
        f.write_all(&payload)?;
        f.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
        fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
        (SNAPSHOT_FILE, SnapshotData::Memory(file.data))
    };
    for older in [SNAPSHOT_FILE_V3, SNAPSHOT_FILE, SNAPSHOT_FILE_V1].into_iter().filter(|n| *n != name) {
        match fs::remove_file(dir.join(older)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fs::File::open(dir)?.sync_all()?;
    Ok(data)
}

/// Writes `snapshot-v3.bin` streaming: the protobuf `SnapshotFile` with its
/// small fields first and the state bytes last (the order prost writes, so
/// the bytes equal an in-memory encoding's), the header's length and
/// checksum filled in at the end.
fn write_v3(dir: &Path, meta: &SnapshotMetaOf<C>, source: Source<'_>) -> io::Result<SnapshotData> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let data_len = match &source {
        Source::State(queue) => STATE_MAGIC_V2.len() as u64 + crate::format::storage::encoded_state_len(queue),
        Source::Data(data) => data.len(),
    };
    let mut head = prost::Message::encode_to_vec(&crate::format::storage::snapshot_file_to_pb(meta, Vec::new()));
    if data_len > 0 {
        encode_key(FILE_DATA_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(data_len, &mut head);
    }
    let tmp_path = dir.join(format!("{SNAPSHOT_FILE_V3}.tmp"));
    let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp_path)?;
    let mut out = io::BufWriter::with_capacity(STREAM_CHUNK, &file);
    let mut hasher = crc32fast::Hasher::new();
    let mut written = 0u64;
    let mut failed = None;
    out.write_all(&[0; SNAPSHOT_HEADER_LEN])?;
    let mut sink = |bytes: &[u8]| {
        if failed.is_none() {
            hasher.update(bytes);
            written += bytes.len() as u64;
            if let Err(e) = out.write_all(bytes) {
                failed = Some(e);
            }
        }
    };
    sink(&head);
    let mut unreadable = None;
    match source {
        Source::State(queue) => {
            sink(STATE_MAGIC_V2);
            unreadable = crate::format::storage::encode_state(queue, &mut sink).err();
        }
        Source::Data(data) => {
            let mut reader = data.reader();
            let mut chunk = vec![0u8; STREAM_CHUNK];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(e) = unreadable {
        return Err(io::Error::other(format!("snapshot {}: {e}", tmp_path.display())));
    }
    let payload_len = head.len() as u64 + data_len;
    if written != payload_len {
        return Err(io::Error::other(format!(
            "snapshot {}: wrote {written} payload bytes, meant {payload_len} (the state changed while encoded?)",
            tmp_path.display()
        )));
    }
    out.flush()?;
    drop(out);
    let mut header = [0u8; SNAPSHOT_HEADER_LEN];
    header[..8].copy_from_slice(SNAPSHOT_MAGIC_V3);
    header[8..16].copy_from_slice(&payload_len.to_le_bytes());
    header[16..20].copy_from_slice(&hasher.finalize().to_le_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_all()?;
    fs::rename(&tmp_path, dir.join(SNAPSHOT_FILE_V3))?;
    let start = SNAPSHOT_HEADER_LEN as u64 + head.len() as u64;
    Ok(SnapshotData::File { file: Arc::new(file), start, len: data_len })
}

/// Moves the shard's snapshot file (found corrupt) out of the way, kept for
/// a post-mortem; returns where it went.
pub fn set_snapshot_aside(dir: &Path) -> io::Result<Option<PathBuf>> {
    let Some(name) =
        [SNAPSHOT_FILE_V3, SNAPSHOT_FILE, SNAPSHOT_FILE_V1].into_iter().find(|name| dir.join(name).exists())
    else {
        return Ok(None);
    };
    let aside = (0..).map(|n| dir.join(format!("{name}.corrupt-{n}"))).find(|p| !p.exists()).expect("an unused name");
    fs::rename(dir.join(name), &aside)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Batch, Command, NewJob, ShardId};

    fn meta_at(index: u64) -> SnapshotMetaOf<C> {
        SnapshotMetaOf::<C> { last_log_id: Some(openraft::testing::log_id::<C>(3, 2, index)), ..Default::default() }
    }

    /// A shard at `format` holding `jobs` jobs of varied sizes.
    fn state(format: u32, jobs: usize) -> QueueState {
        let mut queue = QueueState::new(ShardId(0));
        let mut index = 0;
        let mut apply = |commands: Vec<Command>| {
            index += 1;
            queue.apply(index, &Batch { proposed_at_ms: 1_000 + index, commands: commands.into() });
        };
        if format > 0 {
            apply(vec![Command::SetFormat { format }]);
        }
        apply(
            (0..jobs)
                .map(|i| Command::Enqueue(NewJob::new(format!("q{}", i % 3), vec![i as u8; (i % 50) * 37])))
                .collect(),
        );
        queue
    }

    fn in_memory_v3(meta: &SnapshotMetaOf<C>, data: Vec<u8>) -> Vec<u8> {
        let payload = prost::Message::encode_to_vec(&crate::format::storage::snapshot_file_to_pb(meta, data));
        let mut file = SNAPSHOT_MAGIC_V3.to_vec();
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        file.extend_from_slice(&payload);
        file
    }

    /// The streamed file is byte for byte the in-memory encoding earlier
    /// versions wrote (and read), from a state and from received bytes
    /// alike; what it returns, and what is read back, decode to the state.
    #[test]
    fn a_streamed_snapshot_file_equals_the_in_memory_encoding() {
        for (format, jobs) in [(1, 0), (1, 1), (2, 200), (2, 5_000)] {
            let queue = state(format, jobs);
            let meta = meta_at(90 + jobs as u64);
            let expected = in_memory_v3(&meta, encode_state_data(&queue).unwrap());
            let dir = tempfile::tempdir().unwrap();
            let written = write_snapshot_file(dir.path(), &meta, Source::State(&queue), format).unwrap();
            assert!(matches!(written, SnapshotData::File { .. }));
            assert!(fs::read(dir.path().join(SNAPSHOT_FILE_V3)).unwrap() == expected, "{jobs} jobs");
            assert_eq!(written.decode().unwrap(), queue);
            let read = read_snapshot_file(dir.path()).unwrap().unwrap();
            assert_eq!(read.meta, meta);
            assert_eq!(read.data.format().unwrap(), 1);
            assert_eq!(read.data.decode().unwrap(), queue);

            // As a follower writes what it received: from a file, chunked.
            let mut incoming = Incoming::create(dir.path()).unwrap();
            let mut at = 0;
            while at < read.data.len() {
                let chunk = read.data.read_chunk(at, 4096).unwrap();
                at += chunk.len() as u64;
                incoming.append(&chunk).unwrap();
            }
            let received = incoming.finish();
            let other = tempfile::tempdir().unwrap();
            write_snapshot_file(other.path(), &meta, Source::Data(&received), format).unwrap();
            assert!(fs::read(other.path().join(SNAPSHOT_FILE_V3)).unwrap() == expected);
        }
    }

    /// Snapshot files written before `data` was marked as bytes, and
    /// before the checksummed container (`snapshot-v1.bin`), still read;
    /// the container's payload is the same postcard bytes.
    #[test]
    fn snapshot_payload_is_unchanged_and_older_files_still_read() {
        #[derive(serde::Serialize)]
        struct AsSequence {
            meta: SnapshotMetaOf<C>,
            data: Vec<u8>,
        }
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let meta = SnapshotMetaOf::<C>::default();
        let old = postcard::to_allocvec(&AsSequence { meta: meta.clone(), data: data.clone() }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_snapshot_file(dir.path(), &meta, Source::Data(&SnapshotData::Memory(data.clone())), 0).unwrap();
        assert_eq!(fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap()[SNAPSHOT_HEADER_LEN..], old);
        let read = |dir: &Path| match read_snapshot_file(dir).unwrap().unwrap().data {
            SnapshotData::Memory(bytes) => bytes,
            other => panic!("a format-0 file read as {other:?}"),
        };
        assert_eq!(read(dir.path()), data);

        let older = tempfile::tempdir().unwrap();
        fs::write(older.path().join(SNAPSHOT_FILE_V1), &old).unwrap();
        assert_eq!(read(older.path()), data);
        // The next snapshot replaces it with the checksummed file.
        write_snapshot_file(older.path(), &meta, Source::Data(&SnapshotData::Memory(vec![1])), 0).unwrap();
        assert!(!older.path().join(SNAPSHOT_FILE_V1).exists());
    }

    /// From storage format 1 the file is `snapshot-v3.bin` (protobuf), the
    /// older files go, and a bit flipped anywhere is found and named.
    #[test]
    fn a_format_1_snapshot_file_replaces_the_older_ones_and_a_flipped_bit_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let meta = meta_at(90);
        write_snapshot_file(dir.path(), &meta, Source::Data(&SnapshotData::Memory(vec![1; 10])), 0).unwrap();
        let queue = state(1, 20);
        write_snapshot_file(dir.path(), &meta, Source::State(&queue), 1).unwrap();
        assert!(!dir.path().join(SNAPSHOT_FILE).exists() && dir.path().join(SNAPSHOT_FILE_V3).exists());
        let path = dir.path().join(SNAPSHOT_FILE_V3);
        let good = assert_every_flipped_bit_found(dir.path(), &path, 5);
        for cut in [0, SNAPSHOT_HEADER_LEN - 1, SNAPSHOT_HEADER_LEN, good.len() / 2, good.len() - 1] {
            fs::write(&path, &good[..cut]).unwrap();
            let error = read_snapshot_file(dir.path()).map(|_| ()).expect_err("a cut snapshot was read");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "cut at {cut}: {error}");
        }
    }

    /// Flips one bit in every `step`th byte of the snapshot file at `path`
    /// in turn: each is refused as invalid data naming the file. Returns the
    /// file's good bytes (and leaves them in place).
    fn assert_every_flipped_bit_found(dir: &Path, path: &Path, step: usize) -> Vec<u8> {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let good = fs::read(path).unwrap();
        for at in (0..good.len()).step_by(step) {
            let mut bad = good.clone();
            bad[at] ^= 1 << (at % 8);
            fs::write(path, &bad).unwrap();
            let error = read_snapshot_file(dir).map(|_| ()).expect_err("a flipped bit went unnoticed");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "byte {at}: {error}");
            assert!(error.to_string().contains(&name), "{error}");
        }
        fs::write(path, &good).unwrap();
        good
    }

    /// Any flipped bit of a format-0 file, header or payload, is found
    /// when it is read, and named; the file set aside is kept.
    #[test]
    fn a_flipped_bit_anywhere_in_a_format_0_snapshot_is_found() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot_file(dir.path(), &meta_at(77), Source::Data(&SnapshotData::Memory(vec![9; 300])), 0).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = assert_every_flipped_bit_found(dir.path(), &path, 7);
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(read_snapshot_file(dir.path()).is_err(), "a cut snapshot was read");
        let aside = set_snapshot_aside(dir.path()).unwrap().expect("a snapshot to set aside");
        assert!(aside.exists() && !path.exists());
        assert!(set_snapshot_aside(dir.path()).unwrap().is_none());
        assert!(read_snapshot_file(dir.path()).unwrap().is_none());
    }

    /// Received bytes cut anywhere, or with a byte changed, decode to an
    /// error or to some state, never a panic or an allocation of a damaged
    /// length (a received snapshot has no checksum of its own: the
    /// transport's and the follower's digest checks cover it).
    #[test]
    fn damaged_state_bytes_never_panic() {
        let queue = state(2, 40);
        let bytes = encode_state_data(&queue).unwrap();
        for cut in (0..bytes.len()).step_by(11) {
            let _ = SnapshotData::Memory(bytes[..cut].to_vec()).decode();
        }
        for at in (8..bytes.len()).step_by(13) {
            let mut bad = bytes.clone();
            bad[at] = 0xff;
            let _ = SnapshotData::Memory(bad).decode();
        }
    }
}
