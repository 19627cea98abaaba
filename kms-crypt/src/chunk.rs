//! Sealing and opening one chunk: the file's subkey, the chunk nonces and AES-256-GCM.
//!
//! AES-256-GCM is ring's: on this machine it runs at two to four times the speed of the
//! RustCrypto `aes-gcm` crate and at or above OpenSSL's (figures in `docs/file-format.md`).

use hkdf::Hkdf;
use kms_core::Key;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::header::{Header, TAG_LEN};

/// The HKDF-SHA256 `info` of the chunk subkey of format version 1.
pub(crate) const SUBKEY_INFO: &[u8] = b"kms encrypted file v1 chunk key";

/// The length of a data encryption key accepted for files.
pub(crate) const DEK_LEN: usize = 32;

/// The AEAD state of one file: its subkey, nonce prefix and header.
pub(crate) struct ChunkCipher<'h> {
    key: LessSafeKey,
    header: &'h Header,
}

impl<'h> ChunkCipher<'h> {
    /// Derives the file's subkey from `dek` and the salt in `header`:
    /// `HKDF-SHA256(ikm = DEK, salt = file salt, info = SUBKEY_INFO)`, 32 bytes.
    pub fn new(header: &'h Header, dek: &Key) -> Result<ChunkCipher<'h>> {
        let material = dek.expose_secret();
        if material.len() != DEK_LEN {
            return Err(Error::KeyLength {
                id: dek.id().clone(),
                version: dek.version(),
                bytes: material.len(),
            });
        }
        let mut subkey = Zeroizing::new([0u8; DEK_LEN]);
        Hkdf::<Sha256>::new(Some(header.salt()), material)
            .expand(SUBKEY_INFO, &mut subkey[..])
            .expect("HKDF-SHA256 gives up to 8160 bytes");
        // ring keeps its own expanded key schedule, which it does not zeroize on drop; the
        // subkey bytes themselves are zeroized here when `subkey` drops.
        let unbound =
            UnboundKey::new(&AES_256_GCM, &subkey[..]).expect("AES-256-GCM takes 32-byte keys");
        Ok(ChunkCipher {
            key: LessSafeKey::new(unbound),
            header,
        })
    }

    /// The nonce of chunk `index`: nonce prefix (7 bytes) || index (32-bit big-endian) ||
    /// 0x01 for the last chunk, 0x00 for the others.
    pub fn nonce(&self, index: u64, last: bool) -> Nonce {
        let mut nonce = [0u8; NONCE_LEN];
        let prefix = self.header.nonce_prefix();
        nonce[..prefix.len()].copy_from_slice(prefix);
        // Callers keep `index` below 2^32 (MAX_CHUNKS).
        nonce[prefix.len()..NONCE_LEN - 1].copy_from_slice(&(index as u32).to_be_bytes());
        nonce[NONCE_LEN - 1] = u8::from(last);
        Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts `slot[..len]` in place and writes the tag to `slot[len..len + 16]`.
    pub fn seal(&self, index: u64, last: bool, slot: &mut [u8], len: usize) -> Result<()> {
        let aad = Aad::from(self.header.as_bytes());
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(index, last), aad, &mut slot[..len])
            .map_err(|_| Error::TooLarge)?;
        slot[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Authenticates and decrypts a stored chunk (ciphertext || tag) in place; the plaintext
    /// length on success. On failure ring zeroes the buffer.
    pub fn open(&self, index: u64, last: bool, stored: &mut [u8]) -> Option<usize> {
        let aad = Aad::from(self.header.as_bytes());
        self.key
            .open_in_place(self.nonce(index, last), aad, stored)
            .ok()
            .map(|plain| plain.len())
    }
}
