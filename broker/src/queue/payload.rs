//! A job's payload: in memory, or in a file on this node's disk.
//!
//! The state machine only stores and moves payloads; it never reads one. The
//! node's glue (`raft::payload_spill`) moves the payloads of jobs that wait
//! to a file, replacing each with a [`Payload::stored`] of the same bytes, so
//! a backlog is bounded by disk rather than memory. Where a payload lives is
//! this node's business: it is not part of a job's content (replicas compare
//! and encode the bytes) and never leaves the process.

use std::{borrow::Cow, fmt, fs::File, io, os::unix::fs::FileExt, sync::Arc};

/// The bytes of a job as the client enqueued them.
#[derive(Clone)]
pub struct Payload(Repr);

#[derive(Clone)]
enum Repr {
    /// Shared: a job copied for a snapshot does not copy its payload.
    Inline(Arc<[u8]>),
    /// `crc`: CRC32 of the bytes, checked on every read (a disk that
    /// flipped a bit must not hand a worker other bytes than enqueued).
    Stored { file: Arc<PayloadFile>, offset: u64, len: u32, crc: u32 },
}

/// A file payloads were written to. Unlinked once created: it goes away
/// with the last payload that refers to it, also after a crash.
pub struct PayloadFile {
    file: File,
}

impl PayloadFile {
    pub fn new(file: File) -> Self {
        PayloadFile { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// A payload that was on disk could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("reading {len} bytes at offset {offset} of this node's payload file: {source}")]
pub struct PayloadReadError {
    pub offset: u64,
    pub len: u32,
    #[source]
    pub source: io::Error,
}

impl Payload {
    /// `bytes`, which the caller wrote to `file` at `offset`.
    pub fn stored(file: Arc<PayloadFile>, offset: u64, bytes: &[u8]) -> Self {
        Payload(Repr::Stored { file, offset, len: bytes.len() as u32, crc: crc32fast::hash(bytes) })
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Inline(bytes) => bytes.len(),
            Repr::Stored { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `other` is this very payload (the same bytes in memory, or
    /// the same place in the same file), not only equal bytes.
    pub fn same_as(&self, other: &Payload) -> bool {
        match (&self.0, &other.0) {
            (Repr::Inline(a), Repr::Inline(b)) => Arc::ptr_eq(a, b),
            (Repr::Stored { file: a, offset: at_a, .. }, Repr::Stored { file: b, offset: at_b, .. }) => {
                Arc::ptr_eq(a, b) && at_a == at_b
            }
            _ => false,
        }
    }

    /// Whether the bytes are in `file`.
    pub fn is_in(&self, file: &Arc<PayloadFile>) -> bool {
        matches!(&self.0, Repr::Stored { file: held, .. } if Arc::ptr_eq(held, file))
    }

    /// The bytes, if they are in memory.
    pub fn in_memory(&self) -> Option<&[u8]> {
        match &self.0 {
            Repr::Inline(bytes) => Some(bytes),
            Repr::Stored { .. } => None,
        }
    }

    /// The bytes, read from disk if they are there.
    pub fn read(&self) -> Result<Cow<'_, [u8]>, PayloadReadError> {
        match &self.0 {
            Repr::Inline(bytes) => Ok(Cow::Borrowed(bytes)),
            Repr::Stored { file, offset, len, crc } => {
                let mut bytes = vec![0; *len as usize];
                file.file.read_exact_at(&mut bytes, *offset).map_err(|source| PayloadReadError {
                    offset: *offset,
                    len: *len,
                    source,
                })?;
                checked(*offset, *crc, &bytes)?;
                Ok(Cow::Owned(bytes))
            }
        }
    }

    pub fn to_vec(&self) -> Result<Vec<u8>, PayloadReadError> {
        self.read().map(Cow::into_owned)
    }

    /// [`Self::read`] for one of many payloads read in turn (a snapshot, a
    /// digest): payloads written one after the other are read a window at a
    /// time, not one call each.
    pub fn read_through<'a>(&'a self, window: &'a mut ReadWindow) -> Result<Cow<'a, [u8]>, PayloadReadError> {
        let Repr::Stored { file, offset, len, crc } = &self.0 else { return self.read() };
        let (offset, len, crc) = (*offset, *len as usize, *crc);
        let held = window.file.as_ref().is_some_and(|held| Arc::ptr_eq(held, file))
            && offset >= window.start
            && offset + len as u64 <= window.start + window.bytes.len() as u64;
        if !held {
            if len > ReadWindow::SIZE {
                return self.read();
            }
            window.bytes.resize(ReadWindow::SIZE, 0);
            let mut filled = 0;
            // Short at the file's end: what is there is enough if it holds this payload.
            while filled < len {
                match file.file.read_at(&mut window.bytes[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        window.file = None;
                        return Err(PayloadReadError { offset, len: len as u32, source });
                    }
                }
            }
            window.bytes.truncate(filled);
            if filled < len {
                window.file = None;
                let source = io::Error::from(io::ErrorKind::UnexpectedEof);
                return Err(PayloadReadError { offset, len: len as u32, source });
            }
            window.file = Some(file.clone());
            window.start = offset;
        }
        let at = (offset - window.start) as usize;
        let bytes = &window.bytes[at..at + len];
        checked(offset, crc, bytes)?;
        Ok(Cow::Borrowed(bytes))
    }
}

/// `bytes` read at `offset` are the ones written there.
fn checked(offset: u64, crc: u32, bytes: &[u8]) -> Result<(), PayloadReadError> {
    if crc32fast::hash(bytes) == crc {
        return Ok(());
    }
    let source = io::Error::new(io::ErrorKind::InvalidData, "checksum mismatch: the payload file is damaged");
    Err(PayloadReadError { offset, len: bytes.len() as u32, source })
}

/// The part of a payload file read last (see [`Payload::read_through`]).
#[derive(Default)]
pub struct ReadWindow {
    file: Option<Arc<PayloadFile>>,
    start: u64,
    bytes: Vec<u8>,
}

impl ReadWindow {
    const SIZE: usize = 1 << 20;
}

impl Default for Payload {
    fn default() -> Self {
        Payload(Repr::Inline(Arc::from(&[][..])))
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload(Repr::Inline(Arc::from(bytes)))
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Self {
        Payload(Repr::Inline(bytes.into()))
    }
}

/// Payloads are equal when their bytes are, wherever they are. One that
/// cannot be read equals only itself.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        if self.len() != other.len() {
            return false;
        }
        if let (Repr::Stored { file: a, offset: at_a, .. }, Repr::Stored { file: b, offset: at_b, .. }) =
            (&self.0, &other.0)
            && Arc::ptr_eq(a, b)
            && at_a == at_b
        {
            return true;
        }
        match (self.read(), other.read()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Payload {}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        self.len() == other.len() && self.read().is_ok_and(|bytes| *bytes == *other)
    }
}

impl PartialEq<&[u8]> for Payload {
    fn eq(&self, other: &&[u8]) -> bool {
        *self == **other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Payload {
    fn eq(&self, other: &&[u8; N]) -> bool {
        *self == other[..]
    }
}

impl PartialEq<Vec<u8>> for Payload {
    fn eq(&self, other: &Vec<u8>) -> bool {
        *self == other[..]
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Inline(bytes) => write!(f, "Payload({:?})", bytes.escape_ascii().to_string()),
            Repr::Stored { offset, len, .. } => write!(f, "Payload({len} bytes on disk at {offset})"),
        }
    }
}

/// The format-0 (postcard) encoding: the bytes, as `serde_bytes` wrote a
/// `Vec<u8>`. Format-0 shards never spill, so reading cannot fail there;
/// if it did, the encoding fails rather than writing other bytes.
pub mod as_bytes {
    use serde::{Deserialize, Deserializer, Serializer, ser::Error};

    use super::Payload;

    pub fn serialize<S: Serializer>(payload: &Payload, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes = payload.read().map_err(S::Error::custom)?;
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        serde_bytes::ByteBuf::deserialize(deserializer).map(|bytes| Payload::from(bytes.into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_payload_reads_and_compares_as_its_bytes() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"xxhello", 0).unwrap();
        let file = Arc::new(PayloadFile::new(file));
        let stored = Payload::stored(file.clone(), 2, b"hello");
        assert_eq!(stored.len(), 5);
        assert_eq!(&*stored.read().unwrap(), b"hello");
        assert_eq!(stored, Payload::from(b"hello".to_vec()));
        assert_eq!(stored, b"hello");
        assert_ne!(stored, Payload::from(b"hellO".to_vec()));
        assert!(stored.in_memory().is_none());
        // Past the file's end: an error naming where, and equal only to itself.
        let lost = Payload::stored(file.clone(), 6, b"hello");
        let err = lost.read().unwrap_err();
        assert!(err.to_string().contains("5 bytes at offset 6"), "{err}");
        assert_eq!(lost, lost.clone());
        assert_ne!(lost, Payload::from(b"hello".to_vec()));
        // A flipped bit in the file: refused, never other bytes.
        file.file().write_all_at(b"J", 3).unwrap();
        let err = stored.read().unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(stored.read_through(&mut ReadWindow::default()).is_err());
        assert_ne!(stored, Payload::from(b"hello".to_vec()));
    }

    #[test]
    fn payloads_read_through_a_window_are_the_same_bytes() {
        let file = tempfile::tempfile().unwrap();
        let big = vec![7u8; ReadWindow::SIZE + 3];
        file.write_all_at(b"abcdef", 0).unwrap();
        file.write_all_at(&big, 6).unwrap();
        let file = Arc::new(PayloadFile::new(file));
        let other = Arc::new(PayloadFile::new(tempfile::tempfile().unwrap()));
        other.file().write_all_at(b"xyz", 0).unwrap();
        let mut window = ReadWindow::default();
        let cases = [
            (Payload::stored(file.clone(), 0, b"abc"), &b"abc"[..]),
            (Payload::stored(file.clone(), 3, b"def"), b"def"),
            (Payload::stored(other.clone(), 1, b"yz"), b"yz"),
            (Payload::stored(file.clone(), 1, b"bc"), b"bc"),
            (Payload::from(b"inline".to_vec()), b"inline"),
            (Payload::stored(file.clone(), 6, &big), &big),
            (Payload::stored(file.clone(), 2, b"cd"), b"cd"),
        ];
        for (payload, bytes) in &cases {
            assert_eq!(&*payload.read_through(&mut window).unwrap(), *bytes);
        }
        let past_end = Payload::stored(other, 2, b"zzzzz");
        assert!(past_end.read_through(&mut window).is_err());
        assert_eq!(&*cases[0].0.read_through(&mut window).unwrap(), b"abc", "a failed read leaves no stale window");
    }
}
