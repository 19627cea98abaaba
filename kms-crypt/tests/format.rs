//! The encrypted file format against an independent reference (RustCrypto's `aes-gcm` and
//! `hkdf`, written from `docs/file-format.md`), a frozen known answer, round trips at every
//! chunk boundary, ranges, and every kind of damage the format promises to catch.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use kms_core::{Key, KeyId, SecretBytes};
use kms_crypt::{Damage, Error, TestParams};
use sha2::{Digest, Sha256};

const SALT: [u8; 16] = *b"0123456789abcdef";
const PREFIX: [u8; 7] = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6];
/// 4 KiB chunks, the smallest readers accept, to make multi-chunk files small.
const SMALL: u8 = 12;

fn key(id: &str, version: u32, byte: u8) -> Key {
    Key::new(
        KeyId::new(id).unwrap(),
        version,
        SecretBytes::new(vec![byte; 32]),
    )
    .unwrap()
}

fn params(chunk_log2: u8) -> TestParams {
    TestParams {
        salt: SALT,
        nonce_prefix: PREFIX,
        chunk_log2,
    }
}

fn plaintext(len: usize) -> Vec<u8> {
    // Bytes that differ from chunk to chunk, so a moved chunk cannot decrypt to the same data.
    (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
}

fn encrypt_fixed(key: &Key, chunk_log2: u8, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = kms_crypt::encrypt_with_params(key, params(chunk_log2), plain, &mut out).unwrap();
    assert_eq!(n, plain.len() as u64);
    out
}

fn decrypt(key: &Key, file: &[u8]) -> Result<Vec<u8>, Error> {
    // The key at hand, whatever the header names (a damaged header may name another key,
    // which decryption must then refuse).
    let mut out = Vec::new();
    kms_crypt::decrypt(|_, _| Ok(key.clone()), file, &mut out)?;
    Ok(out)
}

/// The format, written again from its specification with other libraries.
fn reference(key: &Key, chunk_log2: u8, plain: &[u8]) -> Vec<u8> {
    let id = key.id().as_str().as_bytes();
    let mut header = Vec::new();
    header.extend_from_slice(b"\x89KMSENC\n");
    header.extend_from_slice(&1u16.to_be_bytes());
    header.push(chunk_log2);
    header.push(id.len() as u8);
    header.extend_from_slice(id);
    header.extend_from_slice(&key.version().to_be_bytes());
    header.extend_from_slice(&SALT);
    header.extend_from_slice(&PREFIX);

    let mut subkey = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&SALT), key.expose_secret())
        .expand(b"kms encrypted file v1 chunk key", &mut subkey)
        .unwrap();
    let aead = Aes256Gcm::new_from_slice(&subkey).unwrap();

    let chunk = 1usize << chunk_log2;
    let mut pieces: Vec<&[u8]> = plain.chunks(chunk).collect();
    if pieces.is_empty() {
        pieces.push(&[]);
    }
    let mut file = header.clone();
    let count = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        let mut nonce = [0u8; 12];
        nonce[..7].copy_from_slice(&PREFIX);
        nonce[7..11].copy_from_slice(&(i as u32).to_be_bytes());
        nonce[11] = u8::from(i + 1 == count);
        let sealed = aead
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: piece,
                    aad: &header,
                },
            )
            .unwrap();
        file.extend_from_slice(&sealed);
    }
    file
}

#[test]
fn matches_the_reference_at_every_boundary() {
    let k = key("cluster/wal", 3, 0x42);
    let chunk = 1usize << SMALL;
    for len in [
        0,
        1,
        chunk - 1,
        chunk,
        chunk + 1,
        2 * chunk,
        3 * chunk + 17,
        70 * chunk + 5,
    ] {
        let plain = plaintext(len);
        let file = encrypt_fixed(&k, SMALL, &plain);
        assert_eq!(file, reference(&k, SMALL, &plain), "length {len}");
        assert_eq!(decrypt(&k, &file).unwrap(), plain, "length {len}");
    }
    // The writers' own chunk size, across batches of several chunks.
    for len in [0, 65536, 65537, (1 << 20) + 3, (3 << 20) + 65536] {
        let plain = plaintext(len);
        let file = encrypt_fixed(&k, kms_crypt::CHUNK_LOG2, &plain);
        assert_eq!(
            file,
            reference(&k, kms_crypt::CHUNK_LOG2, &plain),
            "length {len}"
        );
        assert_eq!(decrypt(&k, &file).unwrap(), plain, "length {len}");
    }
}

/// A frozen answer: if this changes, files written by earlier versions no longer read.
#[test]
fn known_answer() {
    let k = key("pg/wal", 1, 0x11);
    let file = encrypt_fixed(&k, SMALL, b"kms file format version 1");
    assert_eq!(file.len(), 8 + 2 + 1 + 1 + 6 + 4 + 16 + 7 + 25 + 16);
    assert_eq!(
        hex::encode(&file[..45]),
        "894b4d53454e430a00010c0670672f77616c00000001303132333435363738396162636465\
         66a0a1a2a3a4a5a6"
    );
    assert_eq!(hex::encode(Sha256::digest(&file)), KNOWN_SHA256);
}

/// SHA-256 of the file above, computed apart from this crate with Python's `cryptography`
/// (OpenSSL's AES-GCM and HKDF), following docs/file-format.md.
const KNOWN_SHA256: &str = "4f5439da9731401bc1a251d8bc0d342ce511ea2b58f915d1dbcfbe51340cf96d";

#[test]
fn random_salt_and_prefix_differ_between_files() {
    let k = key("cluster/wal", 1, 7);
    let plain = plaintext(10_000);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let mut out = Vec::new();
        kms_crypt::encrypt(&k, &plain[..], &mut out).unwrap();
        let header = kms_crypt::read_header(&out[..]).unwrap();
        let nonce_part = out[header.len() - 23..header.len()].to_vec();
        assert!(seen.insert(nonce_part), "a salt and nonce prefix repeated");
        assert_eq!(decrypt(&k, &out).unwrap(), plain);
    }
}

#[test]
fn header_names_key_and_version() {
    let k = key("tenant-7/table.42", 9, 1);
    let file = encrypt_fixed(&k, SMALL, b"x");
    let header = kms_crypt::read_header(&file[..]).unwrap();
    assert_eq!(header.key_id().as_str(), "tenant-7/table.42");
    assert_eq!(header.key_version(), 9);
    assert_eq!(header.chunk_size(), 4096);
    assert_eq!(header.format_version(), 1);
}

fn damage(result: Result<Vec<u8>, Error>) -> Damage {
    match result {
        Err(Error::Damaged(d)) => d,
        other => panic!("expected damage, got {other:?}"),
    }
}

/// A file of 5 chunks: 4 full, 1 short.
fn five_chunks() -> (Key, Vec<u8>, Vec<u8>, usize, usize) {
    let k = key("cluster/wal", 1, 0x33);
    let plain = plaintext(4 * 4096 + 100);
    let file = encrypt_fixed(&k, SMALL, &plain);
    let header_len = kms_crypt::read_header(&file[..]).unwrap().len();
    (k, plain, file, header_len, 4096 + 16)
}

#[test]
fn every_flipped_byte_is_caught() {
    let (k, _, file, _, _) = five_chunks();
    for at in 0..file.len() {
        let mut bad = file.clone();
        bad[at] ^= 0x01;
        assert!(
            decrypt(&k, &bad).is_err(),
            "a flipped bit at byte {at} went unnoticed"
        );
    }
}

#[test]
fn truncation_is_caught() {
    let (k, _, file, header_len, segment) = five_chunks();
    // At a chunk boundary: the last chunk is missing.
    for chunks in 1..=4 {
        let cut = &file[..header_len + chunks * segment];
        assert_eq!(
            damage(decrypt(&k, cut)),
            Damage::MissingLastChunk,
            "{chunks} chunks"
        );
    }
    // Only the header.
    assert_eq!(damage(decrypt(&k, &file[..header_len])), Damage::NoChunk);
    // Inside the header.
    assert_eq!(damage(decrypt(&k, &file[..20])), Damage::TruncatedHeader);
    // Inside a chunk, and everywhere else.
    for len in header_len..file.len() {
        assert!(
            decrypt(&k, &file[..len]).is_err(),
            "cut to {len} bytes went unnoticed"
        );
    }
}

#[test]
fn reordered_chunks_and_appended_bytes_are_caught() {
    let (k, _, file, h, seg) = five_chunks();
    let mut swapped = file.clone();
    let (a, b) = (h + seg, h + 2 * seg);
    let chunk1 = file[a..a + seg].to_vec();
    swapped.copy_within(b..b + seg, a);
    swapped[b..b + seg].copy_from_slice(&chunk1);
    assert_eq!(
        damage(decrypt(&k, &swapped)),
        Damage::Authentication {
            chunk: 1,
            last: false
        }
    );

    let mut appended = file.clone();
    appended.push(0);
    assert!(matches!(
        damage(decrypt(&k, &appended)),
        Damage::Authentication { last: true, .. }
    ));
    // A whole extra chunk copied from the same file.
    let mut doubled = file.clone();
    doubled.extend_from_slice(&file[h..h + seg]);
    assert!(decrypt(&k, &doubled).is_err());
}

#[test]
fn a_chunk_from_another_file_is_caught() {
    // Same key, same chunk size: only the salt and prefix differ.
    let k = key("cluster/wal", 1, 0x33);
    let plain = plaintext(4 * 4096 + 100);
    let mut one = Vec::new();
    let mut two = Vec::new();
    kms_crypt::encrypt(&k, &plain[..], &mut one).unwrap();
    kms_crypt::encrypt(&k, &plain[..], &mut two).unwrap();
    let h = kms_crypt::read_header(&one[..]).unwrap().len();
    let seg = 65536 + 16;
    assert!(one.len() < h + seg, "one chunk of 64 KiB");
    // The files have one chunk each: graft two's chunk onto one's header.
    let mut grafted = one[..h].to_vec();
    grafted.extend_from_slice(&two[h..]);
    assert_eq!(
        damage(decrypt(&k, &grafted)),
        Damage::Authentication {
            chunk: 0,
            last: true
        }
    );

    // Fixed salt and prefix (as a broken writer would have): the header's key id still binds.
    let other = key("cluster/other", 1, 0x33);
    let a = encrypt_fixed(&k, SMALL, &plain);
    let b = encrypt_fixed(&other, SMALL, &plain);
    let (ha, hb) = (
        kms_crypt::read_header(&a[..]).unwrap().len(),
        kms_crypt::read_header(&b[..]).unwrap().len(),
    );
    let mut mixed = a.clone();
    mixed[ha + 4096 + 16..ha + 2 * (4096 + 16)]
        .copy_from_slice(&b[hb + 4096 + 16..hb + 2 * (4096 + 16)]);
    assert_eq!(
        damage(decrypt(&k, &mixed)),
        Damage::Authentication {
            chunk: 1,
            last: false
        }
    );
}

#[test]
fn wrong_key_wrong_version_and_short_keys() {
    let (_, _, file, _, _) = five_chunks();
    let wrong = key("cluster/wal", 1, 0x34);
    assert_eq!(
        damage(decrypt(&wrong, &file)),
        Damage::Authentication {
            chunk: 0,
            last: false
        }
    );
    // A provider answering with another version is refused before any chunk is opened.
    let mut out = Vec::new();
    let err = kms_crypt::decrypt(|_, _| Ok(key("cluster/wal", 2, 0x33)), &file[..], &mut out)
        .unwrap_err();
    assert!(matches!(err, Error::Key(_)), "{err:?}");
    assert!(err.to_string().contains("version 2"), "{err}");
    assert!(out.is_empty());
    // 128-bit keys do not encrypt files.
    let short = Key::new(
        KeyId::new("short").unwrap(),
        1,
        SecretBytes::new(vec![1; 16]),
    )
    .unwrap();
    let err = kms_crypt::encrypt(&short, &b"x"[..], Vec::new()).unwrap_err();
    assert!(matches!(err, Error::KeyLength { bytes: 16, .. }), "{err:?}");
    assert!(!err.to_string().contains("0101"), "no key bytes in {err}");
}

#[test]
fn the_lookup_error_is_returned_with_its_kind() {
    let (_, _, file, _, _) = five_chunks();
    let err = kms_crypt::decrypt(
        |id, _| {
            Err(kms_core::Error::new(
                kms_core::ErrorKind::Unavailable,
                "kmsd at /run/kms.sock is down",
            )
            .with_key_id(id))
        },
        &file[..],
        Vec::new(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), kms_core::ErrorKind::Unavailable);
    assert!(err.to_string().contains("cluster/wal"), "{err}");
}

#[test]
fn not_encrypted_and_unknown_versions() {
    let k = key("a", 1, 1);
    assert!(matches!(
        decrypt(&k, b"plain text, not a kms file"),
        Err(Error::NotEncrypted)
    ));
    assert!(matches!(decrypt(&k, b""), Err(Error::NotEncrypted)));
    let mut file = encrypt_fixed(&k, SMALL, b"x");
    file[9] = 2;
    assert!(matches!(
        decrypt(&k, &file),
        Err(Error::UnsupportedVersion { found: 2 })
    ));
    let mut file = encrypt_fixed(&k, SMALL, b"x");
    file[10] = 40; // chunk size 2^40
    assert!(matches!(damage(decrypt(&k, &file)), Damage::Header(_)));
    let mut file = encrypt_fixed(&k, SMALL, b"x");
    file[11] = 0; // an empty key id
    assert!(matches!(damage(decrypt(&k, &file)), Damage::Header(_)));
}

#[test]
fn ranges_match_the_plaintext() {
    let k = key("cluster/wal", 1, 0x55);
    let chunk = 4096u64;
    let plain = plaintext(5 * 4096 + 123);
    let file = encrypt_fixed(&k, SMALL, &plain);
    let len = plain.len() as u64;
    let points = [
        0,
        1,
        chunk - 1,
        chunk,
        chunk + 1,
        2 * chunk,
        4 * chunk + 5,
        len - 1,
        len,
    ];
    for &offset in &points {
        for &end in &points {
            if end < offset {
                continue;
            }
            let mut out = Vec::new();
            let n = kms_crypt::decrypt_range(
                |_, _| Ok(k.clone()),
                std::io::Cursor::new(&file),
                offset,
                Some(end - offset),
                &mut out,
            )
            .unwrap();
            assert_eq!(n, end - offset);
            assert_eq!(
                out,
                &plain[offset as usize..end as usize],
                "{offset}..{end}"
            );
        }
    }
    // To the end, past the end, and on a damaged file.
    let mut out = Vec::new();
    kms_crypt::decrypt_range(
        |_, _| Ok(k.clone()),
        std::io::Cursor::new(&file),
        9000,
        None,
        &mut out,
    )
    .unwrap();
    assert_eq!(out, &plain[9000..]);
    let past = kms_crypt::decrypt_range(
        |_, _| Ok(k.clone()),
        std::io::Cursor::new(&file),
        len - 1,
        Some(2),
        Vec::new(),
    );
    assert!(matches!(past, Err(Error::Range(_))), "{past:?}");
    let cut = &file[..file.len() - (123 + 16)];
    let err = kms_crypt::decrypt_range(
        |_, _| Ok(k.clone()),
        std::io::Cursor::new(cut),
        0,
        Some(10),
        Vec::new(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Damaged(Damage::MissingLastChunk)),
        "{err:?}"
    );
    let mut flipped = file.clone();
    let h = kms_crypt::read_header(&file[..]).unwrap().len();
    flipped[h + 4096 + 16 + 7] ^= 0x80; // chunk 1
    let mut out = Vec::new();
    let err = kms_crypt::decrypt_range(
        |_, _| Ok(k.clone()),
        std::io::Cursor::new(&flipped),
        4096,
        Some(10),
        &mut out,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Damaged(Damage::Authentication { chunk: 1, .. })),
        "{err:?}"
    );
    assert!(out.is_empty(), "nothing of a chunk that fails is written");
}

/// A stream that fails in the middle stops both workers and reports the earliest failure.
#[test]
fn a_failing_reader_or_writer_is_reported() {
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk gone"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(9);
            self.0 -= n;
            Ok(n)
        }
    }
    let k = key("a", 1, 1);
    let err = kms_crypt::encrypt(&k, Failing(5 << 20), Vec::new()).unwrap_err();
    assert!(matches!(err, Error::Input(_)), "{err:?}");
    assert!(err.to_string().contains("disk gone"), "{err}");

    struct Full(usize);
    impl std::io::Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 < buf.len() {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let plain = plaintext(4 << 20);
    let err = kms_crypt::encrypt(&k, &plain[..], Full(3 << 20)).unwrap_err();
    assert_eq!(err.kind(), kms_core::ErrorKind::NoSpace, "{err:?}");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn round_trip(len in 0usize..40_000, chunk_log2 in 12u8..=14, byte: u8) {
            let k = key("prop/key", 1, byte);
            let plain = plaintext(len);
            let file = encrypt_fixed(&k, chunk_log2, &plain);
            prop_assert_eq!(&file, &reference(&k, chunk_log2, &plain));
            prop_assert_eq!(decrypt(&k, &file).unwrap(), plain);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let k = key("prop/key", 1, 0);
            let _ = decrypt(&k, &bytes);
            let mut with_magic = b"\x89KMSENC\n\x00\x01\x0c\x08prop/key".to_vec();
            with_magic.extend_from_slice(&bytes);
            prop_assert!(decrypt(&k, &with_magic).is_err());
        }
    }
}
