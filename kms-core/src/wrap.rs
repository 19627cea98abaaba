//! Wrapping data encryption keys under a key encryption key (KEK).
//!
//! [`KeyWrapper`] is what an envelope provider needs from wherever its KEK lives: wrap a DEK,
//! unwrap it, and a fingerprint that tells one KEK from another. [`Kek`] is the local
//! implementation, a 256-bit AES key held in memory and used with AES key wrap with padding
//! (RFC 5649).
//!
//! # Binding a wrapped key to its id and version
//!
//! RFC 5649 has no associated data, so the binding travels inside the wrapped plaintext:
//!
//! ```text
//! wrapped = AES-KWP(KEK, binding || dek)
//! binding = SHA-256("kms/dek-binding/v1" || 0x00 || version as u32 BE || key id)[..16]
//! ```
//!
//! Unwrapping checks the integrity value of RFC 5649 first (a wrong KEK or an altered blob
//! fails there), then compares the binding with the one computed for the id and version being
//! read, so a blob copied onto another id or version is refused. Sixteen bytes make a second
//! preimage against any stored id out of reach.

use std::fmt;

use aes_kw::{KeyInit, KwpAes256};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::id::KeyId;
use crate::secret::{MAX_SECRET_LEN, SecretBytes};

/// Length of the id-and-version binding placed before the DEK.
pub const BINDING_LEN: usize = 16;

/// Length of a KEK fingerprint.
pub const FINGERPRINT_LEN: usize = 32;

/// What an envelope provider asks of its KEK, wherever it lives.
pub trait KeyWrapper: Send + Sync {
    /// Identifies the KEK without revealing it. Stored with the wrapped keys, so that opening a
    /// store with another KEK is refused as [`ErrorKind::WrongKek`].
    fn fingerprint(&self) -> Vec<u8>;

    /// Wraps `dek` for `id` at `version`.
    fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>>;

    /// Unwraps a blob made by [`wrap`](KeyWrapper::wrap) for the same `id` and `version`.
    /// A blob that fails its integrity check, or was made for another id or version, is
    /// [`ErrorKind::Corrupted`].
    fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes>;
}

/// A local 256-bit key encryption key.
pub struct Kek {
    kwp: KwpAes256,
    fingerprint: [u8; FINGERPRINT_LEN],
}

impl Kek {
    /// Length of a KEK in bytes.
    pub const LEN: usize = 32;

    /// Builds a KEK from 32 secret bytes.
    pub fn new(material: &SecretBytes) -> Result<Kek> {
        let bytes = material.expose_secret();
        if bytes.len() != Kek::LEN {
            let message = format!("a key encryption key has 32 bytes, not {}", bytes.len());
            return Err(Error::new(ErrorKind::InvalidInput, message));
        }
        let kwp = KwpAes256::new_from_slice(bytes)
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "bad key encryption key length"))?;
        Ok(Kek {
            kwp,
            fingerprint: fingerprint_of(bytes),
        })
    }

    /// The KEK's fingerprint: HMAC-SHA256 keyed by the KEK over a fixed label. It reveals
    /// nothing of the KEK but tells two KEKs apart.
    pub fn fingerprint_bytes(&self) -> &[u8; FINGERPRINT_LEN] {
        &self.fingerprint
    }
}

fn fingerprint_of(kek: &[u8]) -> [u8; FINGERPRINT_LEN] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(kek).expect("HMAC takes any key length");
    mac.update(b"kms/kek-fingerprint/v1");
    mac.finalize().into_bytes().into()
}

/// The binding of a wrapped key to its id and version.
pub fn binding(id: &KeyId, version: u32) -> [u8; BINDING_LEN] {
    let digest = Sha256::new()
        .chain_update(b"kms/dek-binding/v1\0")
        .chain_update(version.to_be_bytes())
        .chain_update(id.as_str().as_bytes())
        .finalize();
    let mut out = [0u8; BINDING_LEN];
    out.copy_from_slice(&digest[..BINDING_LEN]);
    out
}

/// Length of a wrapped key of `dek_len` bytes.
pub fn wrapped_len(dek_len: usize) -> usize {
    (BINDING_LEN + dek_len).div_ceil(8) * 8 + 8
}

impl KeyWrapper for Kek {
    fn fingerprint(&self) -> Vec<u8> {
        self.fingerprint.to_vec()
    }

    fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
        if dek.is_empty() || dek.len() > MAX_SECRET_LEN {
            let message = format!("a key to wrap has 1 to {MAX_SECRET_LEN} bytes");
            return Err(Error::new(ErrorKind::InvalidInput, message));
        }

        // 1. Plaintext: the binding, then the key (on the stack for the usual key sizes).
        let plain_len = BINDING_LEN + dek.len();
        with_buffer(plain_len, |plain| {
            plain[..BINDING_LEN].copy_from_slice(&binding(id, version));
            plain[BINDING_LEN..].copy_from_slice(dek.expose_secret());

            // 2. RFC 5649 wrap.
            let mut out = vec![0u8; wrapped_len(dek.len())];
            self.kwp
                .wrap_key(plain, &mut out)
                .map_err(|e| Error::new(ErrorKind::Other, format!("key wrap failed: {e}")))?;
            Ok(out)
        })
    }

    fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
        let corrupted = |why: &str| {
            let message = format!("wrapped key \"{id}\" version {version} {why}");
            Error::new(ErrorKind::Corrupted, message).with_key_id(id)
        };

        // 1. RFC 5649 unwrap, which checks the integrity value and the padding.
        let max = wrapped_len(MAX_SECRET_LEN);
        if wrapped.len() < 16 || wrapped.len() > max || !wrapped.len().is_multiple_of(8) {
            return Err(corrupted(&format!(
                "has an impossible length of {} bytes",
                wrapped.len()
            )));
        }
        with_buffer(wrapped.len() - 8, |buf| {
            let plain = self.kwp.unwrap_key(wrapped, buf).map_err(|_| {
                corrupted("fails its integrity check (altered, or wrapped by another key)")
            })?;

            // 2. The binding must be the one of this id and version.
            if plain.len() <= BINDING_LEN {
                return Err(corrupted("is too short to hold a key"));
            }
            let (bound, dek) = plain.split_at(BINDING_LEN);
            if !constant_time_eq(bound, &binding(id, version)) {
                return Err(corrupted("belongs to another key id or version"));
            }
            Ok(SecretBytes::copy_from(dek))
        })
    }
}

/// Runs `f` on a zeroed buffer of `len` bytes that is zeroized afterwards: on the stack for
/// keys of up to 64 bytes (every generated key), on the heap for longer imported secrets.
fn with_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> Result<T>) -> Result<T> {
    const STACK: usize = BINDING_LEN + 64;
    if len <= STACK {
        let mut buf = Zeroizing::new([0u8; STACK]);
        f(&mut buf[..len])
    } else {
        let mut buf = Zeroizing::new(vec![0u8; len]);
        f(&mut buf)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("fingerprint", &hex_prefix(&self.fingerprint))
            .finish()
    }
}

/// The first eight bytes of a fingerprint in hex, for messages.
pub fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::new(&SecretBytes::copy_from(&[byte; 32])).unwrap()
    }

    #[test]
    fn round_trip_all_lengths() {
        let kek = kek(7);
        let id = KeyId::new("db/1").unwrap();
        for len in [16, 24, 32] {
            let dek = SecretBytes::random(len).unwrap();
            let wrapped = kek.wrap(&id, 1, &dek).unwrap();
            assert_eq!(wrapped.len(), wrapped_len(len));
            assert_eq!(kek.unwrap(&id, 1, &wrapped).unwrap(), dek);
        }
    }

    #[test]
    fn moved_blob_is_refused() {
        let kek = kek(7);
        let a = KeyId::new("a").unwrap();
        let b = KeyId::new("b").unwrap();
        let wrapped = kek.wrap(&a, 1, &SecretBytes::random(32).unwrap()).unwrap();
        let err = kek.unwrap(&b, 1, &wrapped).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupted);
        assert!(
            err.to_string().contains("another key id or version"),
            "{err}"
        );
        let err = kek.unwrap(&a, 2, &wrapped).unwrap_err();
        assert!(
            err.to_string().contains("another key id or version"),
            "{err}"
        );
    }

    #[test]
    fn wrong_kek_and_flipped_bytes_fail_integrity() {
        let id = KeyId::new("a").unwrap();
        let wrapped = kek(1)
            .wrap(&id, 1, &SecretBytes::random(32).unwrap())
            .unwrap();
        let err = kek(2).unwrap(&id, 1, &wrapped).unwrap_err();
        assert!(err.to_string().contains("integrity"), "{err}");
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                kek(1).unwrap(&id, 1, &bad).unwrap_err().kind(),
                ErrorKind::Corrupted
            );
        }
        assert!(
            kek(1)
                .unwrap(&id, 1, &wrapped[..wrapped.len() - 8])
                .is_err()
        );
        assert!(kek(1).unwrap(&id, 1, &[]).is_err());
    }

    #[test]
    fn fingerprints_tell_keks_apart_and_hide_them() {
        assert_ne!(kek(1).fingerprint(), kek(2).fingerprint());
        assert_eq!(kek(1).fingerprint(), kek(1).fingerprint());
        assert!(!format!("{:?}", kek(0xAB)).contains("abab"));
    }

    #[test]
    fn binding_known_answer() {
        // Pins the binding format: a change here strands every existing store.
        let id = KeyId::new("cluster/wal").unwrap();
        let expected = {
            let mut h = Sha256::new();
            h.update(b"kms/dek-binding/v1\0\0\0\0\x01cluster/wal");
            h.finalize()
        };
        assert_eq!(binding(&id, 1), expected[..16]);
    }
}
