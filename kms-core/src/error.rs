//! The error type shared by every provider, the store, the plugin boundary and the protocol.
//!
//! An [`Error`] carries a [`ErrorKind`] that callers act on, the key id and the provider it
//! concerns where there is one, and a lowercase message without a final period. No constructor
//! takes key material, and no message is ever built from it.

use std::fmt;

use crate::id::KeyId;

/// What went wrong, in the terms a caller acts on.
///
/// The kinds are stable: each has a short [`code`](ErrorKind::code) used by the line protocol
/// and a number used by the plugin ABI. New kinds may be added.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The backend said definitely that no such key exists.
    NotFound,
    /// `create` was asked for an id that already holds a key.
    AlreadyExists,
    /// A key id or prefix broke the key id rules; nothing was called.
    InvalidKeyId,
    /// A request was malformed in another way (a key length, a version, a flag).
    InvalidInput,
    /// The key encryption key does not match the one that wrapped the store.
    WrongKek,
    /// The passphrase did not unlock any slot of the store.
    WrongPassphrase,
    /// Stored data failed its integrity checks: truncated, altered or moved.
    Corrupted,
    /// The backend could not be reached or did not answer in time; retrying may help.
    Unavailable,
    /// The backend or the server refused the caller.
    Denied,
    /// The configuration or the provider options are wrong.
    InvalidConfig,
    /// A file or directory holding secrets has unsafe ownership or permissions.
    Insecure,
    /// The provider cannot do this operation at all.
    Unsupported,
    /// The disk holding the store is full.
    NoSpace,
    /// A plugin misbehaved: wrong ABI, bad table, broken answer or a panic inside it.
    Plugin,
    /// Any other failure: an I/O error, a bug, a broken invariant.
    Other,
}

impl ErrorKind {
    /// Every kind, in the order of their ABI numbers.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::Other,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidKeyId,
        ErrorKind::InvalidInput,
        ErrorKind::WrongKek,
        ErrorKind::WrongPassphrase,
        ErrorKind::Corrupted,
        ErrorKind::Unavailable,
        ErrorKind::Denied,
        ErrorKind::InvalidConfig,
        ErrorKind::Insecure,
        ErrorKind::Unsupported,
        ErrorKind::NoSpace,
        ErrorKind::Plugin,
    ];

    /// The stable short code, as used by the line protocol (`ERR not-found ...`).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidKeyId => "invalid-key-id",
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::WrongKek => "wrong-kek",
            ErrorKind::WrongPassphrase => "wrong-passphrase",
            ErrorKind::Corrupted => "corrupted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Denied => "denied",
            ErrorKind::InvalidConfig => "invalid-config",
            ErrorKind::Insecure => "insecure",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::Plugin => "plugin",
            ErrorKind::Other => "other",
        }
    }

    /// The kind with the given protocol code.
    pub fn from_code(code: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The stable number of this kind at the plugin ABI.
    pub fn number(self) -> u32 {
        ErrorKind::ALL.iter().position(|k| *k == self).unwrap_or(0) as u32
    }

    /// The kind with the given ABI number; unknown numbers (from a newer plugin) are `Other`.
    pub fn from_number(n: u32) -> ErrorKind {
        ErrorKind::ALL
            .get(n as usize)
            .copied()
            .unwrap_or(ErrorKind::Other)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A failure, with its kind, the key id and provider it concerns, and a message.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    key_id: Option<KeyId>,
    backend: Option<Box<str>>,
    message: Box<str>,
}

/// The result type of kms.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a lowercase message that names the cause.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            key_id: None,
            backend: None,
            message: message.into().into_boxed_str(),
        }
    }

    /// `NotFound` for `id`.
    pub fn not_found(id: &KeyId) -> Error {
        Error::new(ErrorKind::NotFound, format!("key \"{id}\" not found")).with_key_id(id)
    }

    /// `AlreadyExists` for `id`.
    pub fn already_exists(id: &KeyId) -> Error {
        Error::new(
            ErrorKind::AlreadyExists,
            format!("key \"{id}\" already exists"),
        )
        .with_key_id(id)
    }

    /// `Unsupported` for an operation the provider cannot do.
    pub fn unsupported(operation: &str) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!("this provider does not support {operation}"),
        )
    }

    /// Records the key id the error concerns.
    pub fn with_key_id(mut self, id: &KeyId) -> Error {
        self.key_id = Some(id.clone());
        self
    }

    /// Records the provider the error came from (its secret-free display name), unless an
    /// inner layer already did.
    pub fn with_backend(mut self, backend: impl fmt::Display) -> Error {
        if self.backend.is_none() {
            self.backend = Some(backend.to_string().into_boxed_str());
        }
        self
    }

    /// Prefixes the message with more context: `"{context}: {message}"`.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message).into_boxed_str();
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The key id the error concerns, if any.
    pub fn key_id(&self) -> Option<&KeyId> {
        self.key_id.as_ref()
    }

    /// The display name of the provider the error came from, if known.
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }

    /// The message without the provider name.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Some(backend) => write!(f, "{backend}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("key_id", &self.key_id)
            .field("backend", &self.backend)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_numbers_round_trip() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_code(kind.code()), Some(kind));
            assert_eq!(ErrorKind::from_number(kind.number()), kind);
        }
        assert_eq!(ErrorKind::from_number(9999), ErrorKind::Other);
        assert_eq!(ErrorKind::NotFound.number(), 1);
    }

    #[test]
    fn display_names_the_key_and_the_backend() {
        let id = KeyId::new("cluster/wal").unwrap();
        let err = Error::not_found(&id).with_backend("file provider at /x");
        assert_eq!(
            err.to_string(),
            "file provider at /x: key \"cluster/wal\" not found"
        );
        assert_eq!(err.key_id(), Some(&id));
        let err = err.with_backend("ignored");
        assert_eq!(err.backend(), Some("file provider at /x"));
    }
}
