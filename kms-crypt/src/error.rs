//! What can go wrong with an encrypted file.
//!
//! The library reads and writes streams without names, so its messages say "the input" and
//! "the output"; [`Error::message_for`] names the files for a program's user. No message is
//! built from key material or plaintext.

use std::fmt;
use std::io;

use kms_core::{ErrorKind, KeyId};

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure to encrypt or decrypt.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The input does not start with the magic bytes of the format.
    NotEncrypted,
    /// The input is in a format version this crate does not read.
    UnsupportedVersion {
        /// The version in the file.
        found: u16,
    },
    /// The input fails a check of the format: what failed is in the [`Damage`].
    Damaged(Damage),
    /// The key could not be had: the lookup's own error (not found, unavailable, denied).
    Key(kms_core::Error),
    /// The key is not a 256-bit key; files are encrypted under 256-bit keys only.
    KeyLength {
        /// The key id.
        id: KeyId,
        /// The key version.
        version: u32,
        /// The key's length in bytes.
        bytes: usize,
    },
    /// The input would need more than 2^32 chunks.
    TooLarge,
    /// A byte range outside the plaintext.
    Range(String),
    /// Reading the input failed.
    Input(io::Error),
    /// Writing the output failed.
    Output(io::Error),
    /// The system random generator failed.
    Random(String),
}

/// How an encrypted file fails the checks of the format.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Damage {
    /// The input ends inside the header.
    TruncatedHeader,
    /// A header field holds a value no writer produces.
    Header(String),
    /// The header is followed by no chunk at all.
    NoChunk,
    /// A chunk fails authentication: altered, moved, from another file, or the key is wrong.
    Authentication {
        /// The chunk index, from 0.
        chunk: u64,
        /// Whether it is the last chunk of the input.
        last: bool,
    },
    /// The final chunk of the input authenticates as a chunk that is not the last one: the
    /// input was cut short at a chunk boundary.
    MissingLastChunk,
    /// The final chunk of the input is shorter than a tag: the input was cut short.
    ShortChunk {
        /// The chunk index.
        chunk: u64,
    },
    /// An empty last chunk follows full ones; writers never produce it.
    EmptyLastChunk {
        /// The chunk index.
        chunk: u64,
    },
    /// The input holds more than 2^32 chunks.
    TooManyChunks,
}

impl Error {
    /// The kind of the failure, in the terms of kms (the CLI maps it to an exit status).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotEncrypted | Error::Damaged(_) => ErrorKind::Corrupted,
            Error::UnsupportedVersion { .. } => ErrorKind::Unsupported,
            Error::Key(e) => e.kind(),
            Error::KeyLength { .. } | Error::TooLarge | Error::Range(_) => ErrorKind::InvalidInput,
            Error::Input(e) | Error::Output(e) if e.kind() == io::ErrorKind::StorageFull => {
                ErrorKind::NoSpace
            }
            Error::Input(_) | Error::Output(_) | Error::Random(_) => ErrorKind::Other,
        }
    }

    /// The message for a user, naming the input and output files.
    pub fn message_for(&self, input: &dyn fmt::Display, output: &dyn fmt::Display) -> String {
        match self {
            Error::NotEncrypted => {
                format!(
                    "{input} is not a kms encrypted file: it does not start with the magic bytes"
                )
            }
            Error::UnsupportedVersion { found } => format!(
                "{input} is in encrypted file format version {found}; this kms reads version {}",
                crate::FORMAT_VERSION
            ),
            Error::Damaged(damage) => format!("encrypted file {input} is damaged: {damage}"),
            // The message names the key id, whether or not the lookup's own message did.
            Error::Key(e) => match e.key_id() {
                Some(id) if !e.message().contains(id.as_str()) => format!("key \"{id}\": {e}"),
                _ => e.to_string(),
            },
            Error::TooLarge => format!("{input} is too large: more than 2^32 chunks"),
            Error::Range(reason) => format!("{input}: {reason}"),
            Error::Input(e) => format!("cannot read {input}: {e}"),
            Error::Output(e) => format!("cannot write {output}: {e}"),
            Error::KeyLength { .. } | Error::Random(_) => self.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KeyLength { id, version, bytes } => write!(
                f,
                "key \"{id}\" version {version} has {} bits; files are encrypted with \
                 AES-256-GCM under 256-bit keys only",
                bytes * 8
            ),
            Error::Random(e) => write!(f, "the system random generator failed: {e}"),
            other => f.write_str(&other.message_for(&"the input", &"the output")),
        }
    }
}

impl std::error::Error for Error {}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::TruncatedHeader => f.write_str("truncated: the header is cut short"),
            Damage::Header(reason) => write!(f, "its header is invalid: {reason}"),
            Damage::NoChunk => {
                f.write_str("truncated: the last chunk is missing (no chunk at all)")
            }
            Damage::Authentication { chunk: 0, .. } => f.write_str(
                "chunk 0 fails authentication (the header or chunk 0 was altered, or the key \
                 is not the one the file was encrypted under)",
            ),
            Damage::Authentication { chunk, last: true } => write!(
                f,
                "chunk {chunk} fails authentication (the last chunk: altered, cut short or \
                 followed by extra bytes)"
            ),
            Damage::Authentication { chunk, last: false } => {
                write!(f, "chunk {chunk} fails authentication")
            }
            Damage::MissingLastChunk => f.write_str("truncated: the last chunk is missing"),
            Damage::ShortChunk { chunk } => {
                write!(
                    f,
                    "truncated: chunk {chunk} is shorter than its 16-byte tag"
                )
            }
            Damage::EmptyLastChunk { chunk } => write!(
                f,
                "chunk {chunk} is an empty last chunk after full ones, which no writer produces"
            ),
            Damage::TooManyChunks => f.write_str("it has more than 2^32 chunks"),
        }
    }
}

impl From<Damage> for Error {
    fn from(damage: Damage) -> Error {
        Error::Damaged(damage)
    }
}
