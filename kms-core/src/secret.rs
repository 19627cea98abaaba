//! Secret key material and the key types built on it.
//!
//! [`SecretBytes`] owns secret bytes on the heap, zeroizes them when dropped, shows nothing
//! through `Debug`, has no `Display`, and is read only through [`SecretBytes::expose_secret`].

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, ErrorKind};
use crate::id::KeyId;

/// Secret bytes that are zeroized on drop and never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Box<[u8]>);

impl SecretBytes {
    /// Takes ownership of `bytes`. The caller's buffer is zeroized.
    pub fn new(mut bytes: Vec<u8>) -> SecretBytes {
        let secret = SecretBytes(bytes.as_slice().into());
        bytes.zeroize();
        secret
    }

    /// Copies `bytes` into a new secret; the caller keeps (and should zeroize) its copy.
    pub fn copy_from(bytes: &[u8]) -> SecretBytes {
        SecretBytes(bytes.into())
    }

    /// `len` bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Result<SecretBytes, Error> {
        let mut buf = Zeroizing::new(vec![0u8; len]);
        getrandom::fill(&mut buf).map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("the system random generator failed: {e}"),
            )
        })?;
        Ok(SecretBytes(buf.as_slice().into()))
    }

    /// The secret bytes. Every read of key material goes through this call.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// The number of secret bytes (not secret itself).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.0.len())
    }
}

/// The length of a key: AES-128, AES-192 or AES-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum KeyLen {
    /// 16 bytes.
    Aes128,
    /// 24 bytes.
    Aes192,
    /// 32 bytes, the default.
    #[default]
    Aes256,
}

impl KeyLen {
    /// The length in bytes.
    pub fn bytes(self) -> usize {
        match self {
            KeyLen::Aes128 => 16,
            KeyLen::Aes192 => 24,
            KeyLen::Aes256 => 32,
        }
    }

    /// The length in bits.
    pub fn bits(self) -> u32 {
        self.bytes() as u32 * 8
    }

    /// The length for a bit count of 128, 192 or 256.
    pub fn from_bits(bits: u32) -> Result<KeyLen, Error> {
        match bits {
            128 => Ok(KeyLen::Aes128),
            192 => Ok(KeyLen::Aes192),
            256 => Ok(KeyLen::Aes256),
            other => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a key has 128, 192 or 256 bits, not {other}"),
            )),
        }
    }

    /// The length for a byte count of 16, 24 or 32.
    pub fn from_bytes(bytes: usize) -> Option<KeyLen> {
        match bytes {
            16 => Some(KeyLen::Aes128),
            24 => Some(KeyLen::Aes192),
            32 => Some(KeyLen::Aes256),
            _ => None,
        }
    }
}

/// What `create` is asked to make. The default is a 256-bit key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct KeySpec {
    /// The key length.
    pub len: KeyLen,
}

impl KeySpec {
    /// A spec for a key of `len`.
    pub fn new(len: KeyLen) -> KeySpec {
        KeySpec { len }
    }
}

/// The longest secret a key id may hold: generated keys have 16, 24 or 32 bytes; imported
/// secrets (a TLS key's passphrase, say) have 1 to this many.
pub const MAX_SECRET_LEN: usize = 1024;

/// A data encryption key (or an imported secret): its id, its version and its secret bytes.
///
/// `Debug` shows the id, the version and the length, never the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    id: KeyId,
    version: u32,
    material: SecretBytes,
}

impl Key {
    /// Assembles a key. The material has 1 to [`MAX_SECRET_LEN`] bytes.
    pub fn new(id: KeyId, version: u32, material: SecretBytes) -> Result<Key, Error> {
        if material.is_empty() || material.len() > MAX_SECRET_LEN {
            let message = format!(
                "key \"{id}\" has {} bytes; a key or secret has 1 to {MAX_SECRET_LEN}",
                material.len()
            );
            return Err(Error::new(ErrorKind::Corrupted, message).with_key_id(&id));
        }
        Ok(Key {
            id,
            version,
            material,
        })
    }

    /// The key id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The version, counted from 1.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The length of the key in bytes (16, 24 or 32 for generated keys).
    pub fn len(&self) -> usize {
        self.material.len()
    }

    /// Never true: a key has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.material.is_empty()
    }

    /// The AES key length, if the key has one of the AES lengths.
    pub fn aes_len(&self) -> Option<KeyLen> {
        KeyLen::from_bytes(self.material.len())
    }

    /// The secret bytes of the key.
    pub fn expose_secret(&self) -> &[u8] {
        self.material.expose_secret()
    }

    /// The secret bytes as a [`SecretBytes`].
    pub fn material(&self) -> &SecretBytes {
        &self.material
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("bytes", &self.len())
            .finish_non_exhaustive()
    }
}

/// What `list` reports of a key: no material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key id.
    pub id: KeyId,
    /// The newest version.
    pub version: u32,
    /// The length of the newest version in bytes (16, 24 or 32 for generated keys).
    pub bytes: u32,
    /// When the newest version was created, in seconds since the Unix epoch (0 if unknown).
    pub created: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_material() {
        let material = SecretBytes::copy_from(&[0xAB; 32]);
        let key = Key::new(KeyId::new("a/b").unwrap(), 3, material.clone()).unwrap();
        for shown in [
            format!("{material:?}"),
            format!("{key:?}"),
            format!("{key:#?}"),
        ] {
            assert!(!shown.to_lowercase().contains("ab, ab"), "{shown}");
            assert!(!shown.contains("171"), "{shown}");
            assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        }
        assert_eq!(format!("{material:?}"), "SecretBytes([redacted; 32 bytes])");
        assert!(format!("{key:?}").contains("\"a/b\""));
    }

    #[test]
    fn random_keys_differ_and_have_the_length() {
        let a = SecretBytes::random(32).unwrap();
        let b = SecretBytes::random(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn key_lengths() {
        assert_eq!(KeyLen::from_bits(192).unwrap().bytes(), 24);
        assert_eq!(
            KeyLen::from_bits(512).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let secret = Key::new(KeyId::new("a").unwrap(), 1, SecretBytes::copy_from(&[1; 7]));
        assert_eq!(secret.unwrap().aes_len(), None);
        let err = Key::new(KeyId::new("a").unwrap(), 1, SecretBytes::copy_from(&[]));
        assert_eq!(err.unwrap_err().kind(), ErrorKind::Corrupted);
        let too_long = SecretBytes::copy_from(&[1; MAX_SECRET_LEN + 1]);
        let err = Key::new(KeyId::new("a").unwrap(), 1, too_long);
        assert_eq!(err.unwrap_err().kind(), ErrorKind::Corrupted);
    }
}
