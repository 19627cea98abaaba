//! The file header: what a reader needs before the first chunk.
//!
//! The layout is specified in `docs/file-format.md`; this module is its only encoder and
//! parser. A parsed header is not yet authenticated: every chunk carries the header bytes as
//! associated data, so an altered header is caught by the first chunk that is opened.

use std::io::Read;

use kms_core::{KeyId, show_untrusted};

use crate::error::{Damage, Error, Result};

/// The eight bytes every encrypted file starts with: `\x89KMSENC\n`.
///
/// The first byte has its high bit set, so that a transfer that strips it is caught, and the
/// last is a line feed, so that newline translation is caught.
pub const MAGIC: [u8; 8] = *b"\x89KMSENC\n";

/// The format version this crate writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// The chunk size writers use: 2^16 = 64 KiB of plaintext per chunk.
pub const CHUNK_LOG2: u8 = 16;

/// The smallest and the largest chunk size readers accept, as powers of two (4 KiB, 16 MiB).
pub const CHUNK_LOG2_RANGE: std::ops::RangeInclusive<u8> = 12..=24;

/// The length of an AES-GCM tag, appended to every chunk.
pub const TAG_LEN: usize = 16;

/// The length of the random salt from which the file's subkey is derived.
pub const SALT_LEN: usize = 16;

/// The length of the random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;

/// The most chunks a file may have: the chunk counter is 32 bits wide.
pub const MAX_CHUNKS: u64 = 1 << 32;

/// Bytes before the key id: magic, version, chunk size, key id length.
const FIXED_LEN: usize = MAGIC.len() + 2 + 1 + 1;

/// Bytes after the key id: key version, salt, nonce prefix.
const TAIL_LEN: usize = 4 + SALT_LEN + NONCE_PREFIX_LEN;

/// The random values that make a file's subkey and nonces unique.
#[derive(Clone, Copy)]
pub(crate) struct FileNonce {
    pub salt: [u8; SALT_LEN],
    pub prefix: [u8; NONCE_PREFIX_LEN],
}

impl FileNonce {
    /// Fresh values from the operating system's CSPRNG.
    pub fn random() -> Result<FileNonce> {
        let mut bytes = [0u8; SALT_LEN + NONCE_PREFIX_LEN];
        getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
        let mut nonce = FileNonce {
            salt: [0; SALT_LEN],
            prefix: [0; NONCE_PREFIX_LEN],
        };
        nonce.salt.copy_from_slice(&bytes[..SALT_LEN]);
        nonce.prefix.copy_from_slice(&bytes[SALT_LEN..]);
        Ok(nonce)
    }
}

/// A parsed (or newly made) header of an encrypted file.
///
/// It names the key the file is encrypted under; nothing in it is secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    key_id: KeyId,
    key_version: u32,
    chunk_log2: u8,
    salt: [u8; SALT_LEN],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    /// The encoded header, exactly as in the file: the associated data of every chunk.
    bytes: Vec<u8>,
}

impl Header {
    /// A header for a new file under `key_id` version `key_version`.
    pub(crate) fn new(
        key_id: &KeyId,
        key_version: u32,
        chunk_log2: u8,
        nonce: FileNonce,
    ) -> Header {
        let id = key_id.as_str().as_bytes();
        let mut bytes = Vec::with_capacity(FIXED_LEN + id.len() + TAIL_LEN);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        bytes.push(chunk_log2);
        // A key id has 1 to 255 bytes, so its length fits the byte.
        bytes.push(id.len() as u8);
        bytes.extend_from_slice(id);
        bytes.extend_from_slice(&key_version.to_be_bytes());
        bytes.extend_from_slice(&nonce.salt);
        bytes.extend_from_slice(&nonce.prefix);
        Header {
            key_id: key_id.clone(),
            key_version,
            chunk_log2,
            salt: nonce.salt,
            nonce_prefix: nonce.prefix,
            bytes,
        }
    }

    /// Reads a header from the start of `input`, consuming exactly its bytes.
    pub fn read(mut input: impl Read) -> Result<Header> {
        // 1. The fixed part: magic, version, chunk size, key id length.
        let mut fixed = [0u8; FIXED_LEN];
        let got = read_full(&mut input, &mut fixed).map_err(Error::Input)?;
        if got < MAGIC.len() || fixed[..MAGIC.len()] != MAGIC {
            // Too short to hold the magic, or other bytes where it belongs.
            if got < MAGIC.len() && fixed[..got] == MAGIC[..got] && got > 0 {
                return Err(Error::Damaged(Damage::TruncatedHeader));
            }
            return Err(Error::NotEncrypted);
        }
        if got < FIXED_LEN {
            return Err(Error::Damaged(Damage::TruncatedHeader));
        }
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion { found: version });
        }
        let chunk_log2 = fixed[10];
        if !CHUNK_LOG2_RANGE.contains(&chunk_log2) {
            return Err(bad_header(format!(
                "the chunk size 2^{chunk_log2} is outside 2^{}..=2^{}",
                CHUNK_LOG2_RANGE.start(),
                CHUNK_LOG2_RANGE.end()
            )));
        }
        let id_len = usize::from(fixed[11]);

        // 2. The variable part: key id, key version, salt, nonce prefix.
        let mut rest = vec![0u8; id_len + TAIL_LEN];
        let got = read_full(&mut input, &mut rest).map_err(Error::Input)?;
        if got < rest.len() {
            return Err(Error::Damaged(Damage::TruncatedHeader));
        }
        let (id, tail) = rest.split_at(id_len);
        let key_id = KeyId::from_bytes(id).map_err(|_| {
            bad_header(format!("it names an invalid key id {}", show_untrusted(id)))
        })?;
        let key_version = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if key_version == 0 {
            return Err(bad_header(
                "it names key version 0; versions count from 1".into(),
            ));
        }
        let mut nonce = FileNonce {
            salt: [0; SALT_LEN],
            prefix: [0; NONCE_PREFIX_LEN],
        };
        nonce.salt.copy_from_slice(&tail[4..4 + SALT_LEN]);
        nonce.prefix.copy_from_slice(&tail[4 + SALT_LEN..]);

        // 3. Re-encoding gives the same bytes: the header has one encoding.
        let header = Header::new(&key_id, key_version, chunk_log2, nonce);
        debug_assert_eq!(header.bytes[..FIXED_LEN], fixed);
        debug_assert_eq!(header.bytes[FIXED_LEN..], rest);
        Ok(header)
    }

    /// The key id the file is encrypted under.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The version of that key.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// The format version (always [`FORMAT_VERSION`] for a parsed header).
    pub fn format_version(&self) -> u16 {
        FORMAT_VERSION
    }

    /// The plaintext bytes per chunk (all chunks but the last hold exactly this many).
    pub fn chunk_size(&self) -> usize {
        1 << self.chunk_log2
    }

    /// The length of the encoded header: where the first chunk starts.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a header has at least 40 bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The encoded header, as in the file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    pub(crate) fn nonce_prefix(&self) -> &[u8; NONCE_PREFIX_LEN] {
        &self.nonce_prefix
    }

    /// The layout of a file of `file_len` bytes with this header: chunk count and plaintext
    /// length, as the file length implies them (not authenticated until the last chunk is).
    pub fn layout(&self, file_len: u64) -> Result<Layout> {
        let body = file_len
            .checked_sub(self.len() as u64)
            .ok_or(Error::Damaged(Damage::TruncatedHeader))?;
        if body == 0 {
            return Err(Error::Damaged(Damage::NoChunk));
        }
        let chunk = self.chunk_size() as u64;
        let segment = chunk + TAG_LEN as u64;
        let (full, rem) = (body / segment, body % segment);
        let (chunks, last_len) = match rem {
            0 => (full, chunk),
            r if r < TAG_LEN as u64 => {
                return Err(Error::Damaged(Damage::ShortChunk { chunk: full }));
            }
            r => (full + 1, r - TAG_LEN as u64),
        };
        if chunks > MAX_CHUNKS {
            return Err(Error::Damaged(Damage::TooManyChunks));
        }
        Ok(Layout {
            header_len: self.len() as u64,
            chunk_size: chunk,
            chunks,
            plaintext_len: (chunks - 1) * chunk + last_len,
        })
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("format_version", &FORMAT_VERSION)
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("chunk_size", &self.chunk_size())
            .finish_non_exhaustive()
    }
}

/// Where the chunks of a file of a known length lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The header length: the offset of chunk 0.
    pub header_len: u64,
    /// Plaintext bytes per chunk.
    pub chunk_size: u64,
    /// The number of chunks, at least 1.
    pub chunks: u64,
    /// The plaintext length.
    pub plaintext_len: u64,
}

impl Layout {
    /// The offset of chunk `index` in the file.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        self.header_len + index * (self.chunk_size + TAG_LEN as u64)
    }

    /// The stored length of chunk `index` (plaintext and tag).
    pub fn stored_len(&self, index: u64) -> u64 {
        if index + 1 < self.chunks {
            self.chunk_size + TAG_LEN as u64
        } else {
            self.plaintext_len - index * self.chunk_size + TAG_LEN as u64
        }
    }
}

fn bad_header(reason: String) -> Error {
    Error::Damaged(Damage::Header(reason))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let nonce = FileNonce {
            salt: [1; SALT_LEN],
            prefix: [2; NONCE_PREFIX_LEN],
        };
        Header::new(&KeyId::new("cluster/wal").unwrap(), 3, CHUNK_LOG2, nonce)
    }

    #[test]
    fn encodes_and_parses_back() {
        let h = header();
        assert_eq!(h.len(), 39 + "cluster/wal".len());
        assert_eq!(&h.as_bytes()[..8], b"\x89KMSENC\n");
        let parsed = Header::read(h.as_bytes()).unwrap();
        assert!(parsed == h);
        assert_eq!(parsed.key_version(), 3);
        assert_eq!(parsed.chunk_size(), 65536);
    }

    #[test]
    fn layouts() {
        let h = header();
        let hl = h.len() as u64;
        let seg = 65536 + 16;
        let l = h.layout(hl + 16).unwrap();
        assert_eq!((l.chunks, l.plaintext_len), (1, 0));
        let l = h.layout(hl + seg).unwrap();
        assert_eq!((l.chunks, l.plaintext_len), (1, 65536));
        let l = h.layout(hl + seg + 17).unwrap();
        assert_eq!((l.chunks, l.plaintext_len), (2, 65537));
        assert_eq!(l.stored_len(1), 17);
        assert_eq!(l.chunk_offset(1), hl + seg);
        assert!(matches!(h.layout(hl), Err(Error::Damaged(Damage::NoChunk))));
        assert!(matches!(
            h.layout(hl + seg + 5),
            Err(Error::Damaged(Damage::ShortChunk { chunk: 1 }))
        ));
    }
}
