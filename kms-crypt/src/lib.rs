//! # kms-crypt
//!
//! The kms encrypted file format, for the `kms encrypt` / `kms decrypt` commands and for any
//! front-end tool that needs the same files without the CLI. The format is specified in
//! `docs/file-format.md`; in short:
//!
//! - A header: magic, format version, chunk size, the key id and key version the file is
//!   encrypted under, a random 128-bit salt and a random 56-bit nonce prefix.
//! - A body of chunks of 64 KiB plaintext, each sealed with AES-256-GCM under a per-file
//!   subkey `HKDF-SHA256(DEK, salt)`, with the nonce `prefix || chunk counter || last flag`
//!   (the STREAM construction) and the whole header as associated data. Truncation,
//!   reordering, chunks from other files, appended bytes and header edits all fail.
//!
//! ```
//! use kms_core::{Key, KeyId, SecretBytes};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let key = Key::new(KeyId::new("cluster/wal")?, 1, SecretBytes::random(32)?)?;
//! let mut encrypted = Vec::new();
//! kms_crypt::encrypt(&key, &b"WAL segment"[..], &mut encrypted)?;
//!
//! // A reader learns from the header which key it needs ...
//! let header = kms_crypt::read_header(&encrypted[..])?;
//! assert_eq!(header.key_id().as_str(), "cluster/wal");
//!
//! // ... and asks its provider for that version (here: the key at hand).
//! let mut plain = Vec::new();
//! kms_crypt::decrypt(|_id, _version| Ok(key.clone()), &encrypted[..], &mut plain)?;
//! assert_eq!(plain, b"WAL segment");
//! # Ok(())
//! # }
//! ```
//!
//! Output that must appear whole or not at all goes through [`atomic::AtomicFile`].
//!
//! ## Guarantees and limits
//! - Decryption writes a batch of plaintext (about 1 MiB) only after every chunk in it has
//!   authenticated. A file that turns out to be damaged after some batches were written has
//!   had those written: write to an [`atomic::AtomicFile`] and commit only on success.
//! - Key material and plaintext buffers are zeroized when dropped; ring's expanded AES key
//!   schedule is not (ring offers no way to).
//! - Only 256-bit keys encrypt or decrypt files.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod atomic;
mod chunk;
mod error;
mod header;
mod parallel;
mod stream;

use std::io::{Read, Seek, Write};

use kms_core::{Key, KeyId};

pub use error::{Damage, Error, Result};
pub use header::{
    CHUNK_LOG2, CHUNK_LOG2_RANGE, FORMAT_VERSION, Header, Layout, MAGIC, MAX_CHUNKS,
    NONCE_PREFIX_LEN, SALT_LEN, TAG_LEN,
};

/// Encrypts `input` to `output` under `key` (256 bits), with a fresh random salt and nonce
/// prefix; returns the plaintext length.
///
/// `output` receives the header, then the chunks in batches of about 1 MiB. On error the
/// output holds a prefix of the file that no reader accepts (its last chunk is missing).
pub fn encrypt(key: &Key, input: impl Read + Send, output: impl Write + Send) -> Result<u64> {
    let header = Header::new(
        key.id(),
        key.version(),
        CHUNK_LOG2,
        header::FileNonce::random()?,
    );
    stream::encrypt(&header, key, input, output)
}

/// Reads the header of an encrypted file from `input`, consuming exactly its bytes: which key
/// id and version the file needs. The header is authenticated only when a chunk is.
pub fn read_header(input: impl Read) -> Result<Header> {
    Header::read(input)
}

/// Decrypts `input` to `output`; returns the plaintext length.
///
/// `lookup` is called once, with the key id and version from the header, and returns that
/// key (a provider's `get_version`). Its error is returned as [`Error::Key`].
pub fn decrypt<L>(lookup: L, mut input: impl Read + Send, output: impl Write + Send) -> Result<u64>
where
    L: FnOnce(&KeyId, u32) -> kms_core::Result<Key>,
{
    let header = Header::read(&mut input)?;
    decrypt_after_header(&header, lookup, input, output)
}

/// Decrypts the chunks that follow `header`, for a caller that read the header itself with
/// [`read_header`] from the same `input`.
pub fn decrypt_after_header<L>(
    header: &Header,
    lookup: L,
    input: impl Read + Send,
    output: impl Write + Send,
) -> Result<u64>
where
    L: FnOnce(&KeyId, u32) -> kms_core::Result<Key>,
{
    let key = stream::lookup(header, lookup)?;
    stream::decrypt(header, &key, input, output)
}

/// Decrypts the plaintext bytes `offset .. offset + length` (to the end when `length` is
/// `None`) of the encrypted file `input` to `output`; returns the bytes written.
///
/// Only the chunks holding the range are read, plus the last chunk, whose authentication
/// proves the plaintext length (so a range check never trusts an unauthenticated length, and
/// a file cut at a chunk boundary is always caught). A range that starts or ends past the end
/// of the plaintext is an [`Error::Range`]; `offset` equal to the length gives zero bytes.
pub fn decrypt_range<L>(
    lookup: L,
    input: impl Read + Seek,
    offset: u64,
    length: Option<u64>,
    output: impl Write,
) -> Result<u64>
where
    L: FnOnce(&KeyId, u32) -> kms_core::Result<Key>,
{
    stream::decrypt_range(lookup, input, offset, length, output)
}

/// What a test fixes that encryption otherwise draws at random.
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug)]
pub struct TestParams {
    /// The subkey salt.
    pub salt: [u8; SALT_LEN],
    /// The nonce prefix.
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    /// The chunk size as a power of two, within [`CHUNK_LOG2_RANGE`].
    pub chunk_log2: u8,
}

/// [`encrypt`] with a fixed salt, nonce prefix and chunk size, for known-answer tests. Never
/// use it for real data: a salt used twice under one key repeats nonces.
#[cfg(feature = "testing")]
pub fn encrypt_with_params(
    key: &Key,
    params: TestParams,
    input: impl Read + Send,
    output: impl Write + Send,
) -> Result<u64> {
    assert!(
        CHUNK_LOG2_RANGE.contains(&params.chunk_log2),
        "chunk size out of range"
    );
    let nonce = header::FileNonce {
        salt: params.salt,
        prefix: params.nonce_prefix,
    };
    let header = Header::new(key.id(), key.version(), params.chunk_log2, nonce);
    stream::encrypt(&header, key, input, output)
}
