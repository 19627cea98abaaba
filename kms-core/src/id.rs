//! Key identifiers.
//!
//! A [`KeyId`] is validated once, when it is built, so that every later file, network or plugin
//! call can rely on it: 1 to 255 bytes from `[A-Za-z0-9._:/-]`, no leading slash, and no empty,
//! `.` or `..` segment between slashes.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind};

/// The longest key id accepted, in bytes.
pub const MAX_KEY_ID_LEN: usize = 255;

/// A validated key identifier such as `cluster/wal` or `db/16384/rel/24576`.
///
/// Key ids are not secret: they appear in logs, errors and audit lines.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(Box<str>);

impl KeyId {
    /// Validates `raw` and returns it as a key id.
    pub fn new(raw: &str) -> Result<KeyId, Error> {
        validate(raw.as_bytes())?;
        Ok(KeyId(raw.into()))
    }

    /// Validates raw bytes (as they arrive from a socket or a plugin) and returns a key id.
    pub fn from_bytes(raw: &[u8]) -> Result<KeyId, Error> {
        validate(raw)?;
        // `validate` only lets ASCII through, so this cannot fail.
        let text = std::str::from_utf8(raw).map_err(|_| invalid(raw, "it is not UTF-8"))?;
        Ok(KeyId(text.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks that `prefix` could start a key id, for `list`: the empty prefix, or characters from
/// the key id alphabet without a leading slash. A prefix may end in the middle of a segment.
pub fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let bytes = prefix.as_bytes();
    if bytes.len() > MAX_KEY_ID_LEN {
        return Err(invalid(bytes, "a prefix is at most 255 bytes long"));
    }
    if let Some(bad) = bytes.iter().find(|b| !is_id_byte(**b)) {
        return Err(invalid(bytes, &bad_byte_reason(*bad)));
    }
    if bytes.first() == Some(&b'/') {
        return Err(invalid(bytes, "a prefix may not start with '/'"));
    }
    Ok(())
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-')
}

fn bad_byte_reason(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("the character '{}' is not allowed", b as char)
    } else {
        format!("the byte 0x{b:02x} is not allowed")
    }
}

fn validate(raw: &[u8]) -> Result<(), Error> {
    if raw.is_empty() {
        return Err(invalid(raw, "a key id may not be empty"));
    }
    if raw.len() > MAX_KEY_ID_LEN {
        let reason = format!(
            "it is {} bytes long; the limit is {MAX_KEY_ID_LEN}",
            raw.len()
        );
        return Err(invalid(raw, &reason));
    }
    if let Some(bad) = raw.iter().find(|b| !is_id_byte(**b)) {
        let reason = format!(
            "{}; allowed are A-Z a-z 0-9 . _ : / -",
            bad_byte_reason(*bad)
        );
        return Err(invalid(raw, &reason));
    }
    if raw[0] == b'/' {
        return Err(invalid(raw, "a key id may not start with '/'"));
    }
    for segment in raw.split(|b| *b == b'/') {
        match segment {
            b"" => {
                return Err(invalid(
                    raw,
                    "a key id may not hold an empty segment ('//' or a trailing '/')",
                ));
            }
            b"." | b".." => {
                return Err(invalid(raw, "a key id may not hold a '.' or '..' segment"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Builds the error for a refused id. The id is shown escaped and shortened, so that a hostile
/// id can neither forge log lines nor flood them.
fn invalid(raw: &[u8], reason: &str) -> Error {
    Error::new(
        ErrorKind::InvalidKeyId,
        format!("invalid key id {}: {reason}", show_untrusted(raw)),
    )
}

/// Renders untrusted bytes for a message: escaped, quoted, at most 64 bytes of the input.
pub fn show_untrusted(raw: &[u8]) -> String {
    const SHOWN: usize = 64;
    let head = &raw[..raw.len().min(SHOWN)];
    let mut out = String::with_capacity(head.len() + 8);
    out.push('"');
    for chunk in head.utf8_chunks() {
        for c in chunk.valid().chars() {
            out.extend(c.escape_debug());
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('"');
    if raw.len() > SHOWN {
        out.push_str(&format!("... ({} bytes)", raw.len()));
    }
    out
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({:?})", &*self.0)
    }
}

impl FromStr for KeyId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyId::new(s)
    }
}

impl AsRef<str> for KeyId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_examples() {
        for ok in [
            "cluster/wal",
            "db/16384/rel/24576",
            "a",
            "pg:ssl",
            "A.b_c-d",
            "x..y",
            ".a/b.",
        ] {
            assert_eq!(KeyId::new(ok).unwrap().as_str(), ok);
        }
        assert!(KeyId::new(&"k".repeat(255)).is_ok());
    }

    #[test]
    fn refuses_hostile_ids_with_invalid_key_id() {
        let long = "k".repeat(256);
        for bad in [
            "",
            "..",
            ".",
            "../../etc/passwd",
            "a/../../x",
            "/etc/shadow",
            "a//b",
            "a/",
            "a/./b",
            "a b",
            "a\nCREATE b",
            "a\0b",
            "caf\u{e9}",
            long.as_str(),
            "a\\b",
            "*",
        ] {
            let err = KeyId::new(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidKeyId, "{bad:?} was accepted");
        }
    }

    #[test]
    fn error_escapes_control_characters() {
        let err = KeyId::new("a\nCREATE b").unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("\\n"), "{err}");
        let err = KeyId::from_bytes(b"a\xff\x00").unwrap_err().to_string();
        assert!(err.contains("\\xff"), "{err}");
    }

    #[test]
    fn long_ids_are_shortened_in_errors() {
        let err = KeyId::new(&"x".repeat(10_000)).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
        assert!(err.contains("10000 bytes"), "{err}");
    }

    #[test]
    fn prefixes() {
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("db/").is_ok());
        assert!(validate_prefix("db/1").is_ok());
        assert!(validate_prefix("/").is_err());
        assert!(validate_prefix("a b").is_err());
    }
}
