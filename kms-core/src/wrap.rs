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
//!
//! # One key, or many
//!
//! [`KeyWrapper::wrap`] and [`KeyWrapper::unwrap`] handle one key. A single RFC 5649 wrap is a
//! chain of dependent AES operations and so bound by their latency, whatever the processor's
//! AES throughput. [`KeyWrapper::wrap_many`] and [`KeyWrapper::unwrap_many`] take a batch: a
//! [`Kek`] runs its keys side by side through the lane engine of [`kwp`], several times faster
//! per key; a remote KEK loops over its single-key calls unless it has something better. Both
//! give the very same blobs, and each key of a batch succeeds or fails on its own.

pub mod kwp;

use std::fmt;

use aes_kw::aes::Aes256;
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

    /// Wraps a batch of keys: for each `(id, version, dek)`, in order, what
    /// [`wrap`](KeyWrapper::wrap) gives for it. A key refused for itself fails alone, with an
    /// error naming its key id.
    ///
    /// The default calls [`wrap`](KeyWrapper::wrap) for each key in turn. Once the backend
    /// itself fails (unavailable, denied: any error but [`ErrorKind::Corrupted`],
    /// [`ErrorKind::InvalidInput`], [`ErrorKind::InvalidKeyId`] and [`ErrorKind::NotFound`]),
    /// it stops calling, and each key left fails with that error under its own id: a batch of
    /// hundreds must not wait out hundreds of timeouts of a server that is down. [`Kek`]
    /// overrides it with the batched engine of [`kwp`].
    fn wrap_many(&self, items: &[(&KeyId, u32, &SecretBytes)]) -> Vec<Result<Vec<u8>>> {
        one_by_one(
            items,
            |(id, _, _)| id,
            |(id, version, dek)| self.wrap(id, *version, dek),
        )
    }

    /// Unwraps a batch of blobs: for each `(id, version, wrapped)`, in order, what
    /// [`unwrap`](KeyWrapper::unwrap) gives for it. A corrupted blob fails alone, with an
    /// error naming its key id.
    ///
    /// The default calls [`unwrap`](KeyWrapper::unwrap) for each blob in turn, and stops
    /// calling once the backend itself fails, as [`wrap_many`](KeyWrapper::wrap_many) does.
    /// [`Kek`] overrides it with the batched engine of [`kwp`].
    fn unwrap_many(&self, items: &[(&KeyId, u32, &[u8])]) -> Vec<Result<SecretBytes>> {
        one_by_one(
            items,
            |(id, _, _)| id,
            |(id, version, wrapped)| self.unwrap(id, *version, wrapped),
        )
    }
}

/// The default batch of a [`KeyWrapper`]: `call` for each item in turn, until one fails for
/// a reason that is not the key's own; each item left then fails with that error, under the
/// key id `id_of` gives.
fn one_by_one<I, T>(
    items: &[I],
    id_of: impl Fn(&I) -> &KeyId,
    mut call: impl FnMut(&I) -> Result<T>,
) -> Vec<Result<T>> {
    let mut stopped: Option<Error> = None;
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        if let Some(cause) = &stopped {
            results.push(Err(not_attempted(id_of(item), cause)));
            continue;
        }
        let result = call(item);
        if let Err(e) = &result
            && !concerns_the_key_alone(e.kind())
        {
            stopped = Some(e.clone());
        }
        results.push(result);
    }
    results
}

/// Whether a failure of one key of a batch says nothing of the backend, so that the batch
/// goes on.
fn concerns_the_key_alone(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Corrupted
            | ErrorKind::InvalidInput
            | ErrorKind::InvalidKeyId
            | ErrorKind::NotFound
    )
}

/// The error of a key a batch did not try after `cause`, the backend's failure on an earlier
/// key.
fn not_attempted(id: &KeyId, cause: &Error) -> Error {
    let message = format!(
        "key \"{id}\" was not attempted after the backend failed on an earlier key: {}",
        cause.message()
    );
    let error = Error::new(cause.kind(), message).with_key_id(id);
    match cause.backend() {
        Some(backend) => error.with_backend(backend),
        None => error,
    }
}

/// How many keys a [`Kek`] puts through the batched engine at once: bounds the zeroized work
/// buffer (about 14 KiB of 32-byte DEKs) so that it stays in cache.
const CHUNK: usize = 256;

/// A local 256-bit key encryption key.
pub struct Kek {
    /// For single keys: the RFC 5649 implementation of `aes-kw`.
    kwp: KwpAes256,
    /// For batches: the same key for the lane engine of [`kwp`].
    aes: Aes256,
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
        let bad_length = |_| Error::new(ErrorKind::InvalidInput, "bad key encryption key length");
        let kwp = KwpAes256::new_from_slice(bytes).map_err(bad_length)?;
        let aes = Aes256::new_from_slice(bytes).map_err(bad_length)?;
        Ok(Kek {
            kwp,
            aes,
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
        check_dek(id, dek)?;

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
        // 1. RFC 5649 unwrap, which checks the integrity value and the padding.
        check_wrapped_len(id, version, wrapped)?;
        with_buffer(wrapped.len() - 8, |buf| {
            let plain = self
                .kwp
                .unwrap_key(wrapped, buf)
                .map_err(|_| integrity_failed(id, version))?;

            // 2. The binding must be the one of this id and version.
            open_bound(id, version, plain)
        })
    }

    fn wrap_many(&self, items: &[(&KeyId, u32, &SecretBytes)]) -> Vec<Result<Vec<u8>>> {
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(CHUNK) {
            self.wrap_chunk(chunk, &mut results);
        }
        results
    }

    fn unwrap_many(&self, items: &[(&KeyId, u32, &[u8])]) -> Vec<Result<SecretBytes>> {
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(CHUNK) {
            self.unwrap_chunk(chunk, &mut results);
        }
        results
    }
}

impl Kek {
    /// [`KeyWrapper::wrap_many`] of at most [`CHUNK`] keys, results appended to `results`.
    fn wrap_chunk(
        &self,
        chunk: &[(&KeyId, u32, &SecretBytes)],
        results: &mut Vec<Result<Vec<u8>>>,
    ) {
        // 1. Lay every acceptable key out in one zeroized buffer, each in the place of its
        //    wrapping: a semiblock for the AIV, then the binding and the key.
        let checked: Vec<Result<usize>> = chunk
            .iter()
            .map(|(id, _, dek)| check_dek(id, dek).map(|()| BINDING_LEN + dek.len()))
            .collect();
        let total = checked
            .iter()
            .flatten()
            .map(|len| kwp::wrapped_len(*len))
            .sum();
        let mut work = Zeroizing::new(vec![0u8; total]);
        let mut items = Vec::with_capacity(chunk.len());
        let mut rest = &mut work[..];
        for ((id, version, dek), plain_len) in chunk.iter().zip(&checked) {
            let Ok(plain_len) = *plain_len else { continue };
            let (buf, tail) = rest.split_at_mut(kwp::wrapped_len(plain_len));
            buf[8..8 + BINDING_LEN].copy_from_slice(&binding(id, *version));
            buf[8 + BINDING_LEN..8 + plain_len].copy_from_slice(dek.expose_secret());
            items.push(kwp::WrapItem::new(buf, plain_len).expect("laid out for its length"));
            rest = tail;
        }

        // 2. RFC 5649 wrap, the keys side by side.
        kwp::wrap_in_place(&self.aes, &mut items);
        drop(items);

        // 3. The results in the order of the keys.
        let mut at = 0;
        for plain_len in checked {
            results.push(plain_len.map(|plain_len| {
                let len = kwp::wrapped_len(plain_len);
                at += len;
                work[at - len..at].to_vec()
            }));
        }
    }

    /// [`KeyWrapper::unwrap_many`] of at most [`CHUNK`] blobs, results appended to `results`.
    fn unwrap_chunk(&self, chunk: &[(&KeyId, u32, &[u8])], results: &mut Vec<Result<SecretBytes>>) {
        // 1. Copy every blob of a possible length into one zeroized buffer.
        let checked: Vec<Result<()>> = chunk
            .iter()
            .map(|(id, version, wrapped)| check_wrapped_len(id, *version, wrapped))
            .collect();
        let total = chunk
            .iter()
            .zip(&checked)
            .filter(|(_, ok)| ok.is_ok())
            .map(|((_, _, wrapped), _)| wrapped.len())
            .sum();
        let mut work = Zeroizing::new(vec![0u8; total]);
        let mut bufs = Vec::with_capacity(chunk.len());
        let mut rest = &mut work[..];
        for ((_, _, wrapped), ok) in chunk.iter().zip(&checked) {
            if ok.is_ok() {
                let (buf, tail) = rest.split_at_mut(wrapped.len());
                buf.copy_from_slice(wrapped);
                bufs.push(buf);
                rest = tail;
            }
        }

        // 2. RFC 5649 unwrap, the blobs side by side; each checks its integrity value.
        let unwrapped = kwp::unwrap_in_place(&self.aes, &mut bufs);

        // 3. Each binding must be the one of its id and version.
        let mut opened = bufs.iter().zip(unwrapped);
        for ((id, version, _), ok) in chunk.iter().zip(checked) {
            results.push(ok.and_then(|()| {
                let (buf, plain_len) = opened.next().expect("one result per buffer");
                let plain_len = plain_len.ok_or_else(|| integrity_failed(id, *version))?;
                open_bound(id, *version, &buf[8..8 + plain_len])
            }));
        }
    }
}

/// Refuses a key that cannot be wrapped: empty, or longer than any secret kms holds.
fn check_dek(id: &KeyId, dek: &SecretBytes) -> Result<()> {
    if dek.is_empty() || dek.len() > MAX_SECRET_LEN {
        let message = format!(
            "key \"{id}\" cannot be wrapped: it has {} bytes, a key to wrap has 1 to \
             {MAX_SECRET_LEN}",
            dek.len()
        );
        return Err(Error::new(ErrorKind::InvalidInput, message).with_key_id(id));
    }
    Ok(())
}

fn corrupted(id: &KeyId, version: u32, why: &str) -> Error {
    let message = format!("wrapped key \"{id}\" version {version} {why}");
    Error::new(ErrorKind::Corrupted, message).with_key_id(id)
}

fn integrity_failed(id: &KeyId, version: u32) -> Error {
    corrupted(
        id,
        version,
        "fails its integrity check (altered, or wrapped by another key)",
    )
}

/// Refuses a blob whose length no wrapped key of kms can have.
fn check_wrapped_len(id: &KeyId, version: u32, wrapped: &[u8]) -> Result<()> {
    let max = wrapped_len(MAX_SECRET_LEN);
    if wrapped.len() < 16 || wrapped.len() > max || !wrapped.len().is_multiple_of(8) {
        let why = format!("has an impossible length of {} bytes", wrapped.len());
        return Err(corrupted(id, version, &why));
    }
    Ok(())
}

/// The key inside an unwrapped plaintext `binding || dek`, once the binding is found to be the
/// one of `id` and `version`.
fn open_bound(id: &KeyId, version: u32, plain: &[u8]) -> Result<SecretBytes> {
    if plain.len() <= BINDING_LEN {
        return Err(corrupted(id, version, "is too short to hold a key"));
    }
    let (bound, dek) = plain.split_at(BINDING_LEN);
    if !constant_time_eq(bound, &binding(id, version)) {
        return Err(corrupted(
            id,
            version,
            "belongs to another key id or version",
        ));
    }
    Ok(SecretBytes::copy_from(dek))
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

    /// Twelve keys of mixed lengths, wrapped and read back in one batch: one flipped byte, one
    /// wrong id, one wrong version and one truncated blob fail alone, each as `unwrap` fails.
    #[test]
    fn a_batch_fails_exactly_its_damaged_blobs() {
        let kek = kek(7);
        let ids: Vec<KeyId> = (0..12)
            .map(|i| KeyId::new(&format!("db/{i}")).unwrap())
            .collect();
        let deks: Vec<SecretBytes> = (0..12)
            .map(|i| SecretBytes::random([16, 24, 32][i % 3]).unwrap())
            .collect();
        let items: Vec<_> = ids
            .iter()
            .zip(&deks)
            .map(|(id, dek)| (id, 3, dek))
            .collect();
        let mut blobs: Vec<Vec<u8>> = kek
            .wrap_many(&items)
            .into_iter()
            .map(|b| b.unwrap())
            .collect();

        // The damage: blob 2 altered, blob 5 read as another id, blob 8 as another version,
        // blob 10 cut short.
        blobs[2][17] ^= 0x40;
        let other = KeyId::new("db/elsewhere").unwrap();
        blobs[10].truncate(24);
        let read: Vec<(&KeyId, u32, &[u8])> = (0..12)
            .map(|i| {
                let id = if i == 5 { &other } else { &ids[i] };
                let version = if i == 8 { 4 } else { 3 };
                (id, version, &blobs[i][..])
            })
            .collect();

        let results = kek.unwrap_many(&read);
        assert_eq!(results.len(), 12);
        for (i, result) in results.into_iter().enumerate() {
            let (id, version, blob) = read[i];
            if [2, 5, 8, 10].contains(&i) {
                let err = result.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Corrupted, "{i}: {err}");
                assert_eq!(err.key_id(), Some(id), "{i}");
                assert_eq!(err, kek.unwrap(id, version, blob).unwrap_err(), "{i}");
            } else {
                assert_eq!(result.unwrap(), deks[i], "{i}");
            }
        }
    }

    /// A wrapper with only the single-key methods, as a remote KEK is.
    struct OneAtATime(Kek);

    impl KeyWrapper for OneAtATime {
        fn fingerprint(&self) -> Vec<u8> {
            self.0.fingerprint()
        }

        fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
            self.0.wrap(id, version, dek)
        }

        fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
            self.0.unwrap(id, version, wrapped)
        }
    }

    #[test]
    fn default_batches_agree_with_the_kek_batches() {
        let (kek, single) = (kek(9), OneAtATime(kek(9)));
        let ids: Vec<KeyId> = (0..20)
            .map(|i| KeyId::new(&format!("t/{i}")).unwrap())
            .collect();
        let deks: Vec<SecretBytes> = (0..20)
            .map(|i| SecretBytes::random(1 + i * 7).unwrap())
            .collect();
        let empty = SecretBytes::copy_from(&[]);
        let mut items: Vec<_> = ids
            .iter()
            .zip(&deks)
            .map(|(id, dek)| (id, 1, dek))
            .collect();
        items[4].2 = &empty;

        let batched = kek.wrap_many(&items);
        assert_eq!(batched, single.wrap_many(&items));
        let err = batched[4].as_ref().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(err.key_id(), Some(&ids[4]));

        let blobs: Vec<Vec<u8>> = batched.into_iter().map(|b| b.unwrap_or_default()).collect();
        let read: Vec<_> = items
            .iter()
            .zip(&blobs)
            .map(|((id, v, _), b)| (*id, *v, &b[..]))
            .collect();
        assert_eq!(kek.unwrap_many(&read), single.unwrap_many(&read));
    }

    /// A remote KEK that goes down at its fourth call.
    struct GoesDown {
        kek: Kek,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl GoesDown {
        fn call(&self) -> Result<()> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n >= 3 {
                let error = Error::new(ErrorKind::Unavailable, "connection refused");
                return Err(error.with_backend("remote at 127.0.0.1:1"));
            }
            Ok(())
        }
    }

    impl KeyWrapper for GoesDown {
        fn fingerprint(&self) -> Vec<u8> {
            self.kek.fingerprint()
        }

        fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
            self.call()?;
            self.kek.wrap(id, version, dek)
        }

        fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
            self.call()?;
            self.kek.unwrap(id, version, wrapped)
        }
    }

    #[test]
    fn default_batches_stop_calling_a_backend_that_is_down() {
        let remote = GoesDown {
            kek: kek(3),
            calls: Default::default(),
        };
        let ids: Vec<KeyId> = (0..10)
            .map(|i| KeyId::new(&format!("r/{i}")).unwrap())
            .collect();
        let blobs: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| {
                remote
                    .kek
                    .wrap(id, 1, &SecretBytes::random(32).unwrap())
                    .unwrap()
            })
            .collect();

        // A corrupted blob (the second) fails alone; the backend going down (at the fourth
        // call) ends the calls, and every key left fails as unavailable under its own id.
        let mut read: Vec<(&KeyId, u32, &[u8])> = ids
            .iter()
            .zip(&blobs)
            .map(|(id, b)| (id, 1, &b[..]))
            .collect();
        read[1].1 = 2;
        let results = remote.unwrap_many(&read);
        assert_eq!(remote.calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert!(results[0].is_ok() && results[2].is_ok());
        assert_eq!(
            results[1].as_ref().unwrap_err().kind(),
            ErrorKind::Corrupted
        );
        assert_eq!(
            results[3].as_ref().unwrap_err().message(),
            "connection refused"
        );
        for (i, result) in results.iter().enumerate().skip(4) {
            let err = result.as_ref().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{i}");
            assert_eq!(err.key_id(), Some(&ids[i]), "{i}");
            assert_eq!(err.backend(), Some("remote at 127.0.0.1:1"), "{i}");
            assert!(err.to_string().contains("was not attempted"), "{err}");
        }
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
