//! Properties of `Kek` wrapping: it round-trips for any KEK, key id, version and DEK length, and
//! refuses a blob read under another id or version, or with any single bit flipped. The batched
//! `wrap_many` / `unwrap_many` give, key by key, exactly what `wrap` / `unwrap` give, failures
//! included.

use kms_core::wrap::{Kek, KeyWrapper, wrapped_len};
use kms_core::{ErrorKind, KeyId, SecretBytes};
use proptest::prelude::*;

/// A segment of a valid key id: characters of the alphabet, never `.` or `..`.
fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,40}".prop_filter("`.` and `..` are not segments", |s| s != "." && s != "..")
}

/// A valid key id: one to eight segments joined by `/`, at most 255 bytes.
fn key_id() -> impl Strategy<Value = KeyId> {
    prop::collection::vec(segment(), 1..8)
        .prop_map(|segments| segments.join("/"))
        .prop_filter("at most 255 bytes", |s| s.len() <= 255)
        .prop_map(|s| KeyId::new(&s).expect("the strategy makes valid ids"))
}

/// A DEK of 16, 24 or 32 bytes.
fn dek() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![Just(16usize), Just(24), Just(32)]
        .prop_flat_map(|len| prop::collection::vec(any::<u8>(), len))
}

fn kek(material: [u8; 32]) -> Kek {
    Kek::new(&SecretBytes::copy_from(&material)).unwrap()
}

/// A batch of keys to wrap: each with its id, version and DEK of 16, 24 or 32 bytes, mixed. The
/// sizes are around the engine's 8 lanes, and one of several chunks of 256.
fn batch() -> impl Strategy<Value = Vec<(KeyId, u32, Vec<u8>)>> {
    prop::sample::select(vec![0usize, 1, 7, 8, 9, 100, 600])
        .prop_flat_map(|size| prop::collection::vec((key_id(), any::<u32>(), dek()), size..=size))
}

/// How a blob of a batch is damaged before unwrapping.
#[derive(Clone, Copy, Debug)]
enum Damage {
    None,
    FlipBit(prop::sample::Index),
    WrongId,
    WrongVersion,
    Truncate(prop::sample::Index),
    Extend,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => Just(Damage::None),
        1 => any::<prop::sample::Index>().prop_map(Damage::FlipBit),
        1 => Just(Damage::WrongId),
        1 => Just(Damage::WrongVersion),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => Just(Damage::Extend),
    ]
}

proptest! {
    #[test]
    fn round_trip(material in any::<[u8; 32]>(), id in key_id(), version in any::<u32>(),
                  dek in dek()) {
        let kek = kek(material);
        let wrapped = kek.wrap(&id, version, &SecretBytes::copy_from(&dek)).unwrap();
        prop_assert_eq!(wrapped.len(), wrapped_len(dek.len()));
        let unwrapped = kek.unwrap(&id, version, &wrapped).unwrap();
        prop_assert!(unwrapped.expose_secret() == dek.as_slice());
    }

    #[test]
    fn another_id_or_version_is_corrupted(
        material in any::<[u8; 32]>(),
        id in key_id(),
        other_id in key_id(),
        version in any::<u32>(),
        delta in 1..=u32::MAX,
        dek in dek(),
    ) {
        prop_assume!(id != other_id);
        let kek = kek(material);
        let wrapped = kek.wrap(&id, version, &SecretBytes::copy_from(&dek)).unwrap();
        let moved = kek.unwrap(&other_id, version, &wrapped).unwrap_err();
        prop_assert_eq!(moved.kind(), ErrorKind::Corrupted);
        let other_version = version.wrapping_add(delta);
        let renumbered = kek.unwrap(&id, other_version, &wrapped).unwrap_err();
        prop_assert_eq!(renumbered.kind(), ErrorKind::Corrupted);
    }

    #[test]
    fn any_flipped_bit_is_corrupted(
        material in any::<[u8; 32]>(),
        id in key_id(),
        version in any::<u32>(),
        dek in dek(),
        bit in any::<prop::sample::Index>(),
    ) {
        let kek = kek(material);
        let mut wrapped = kek.wrap(&id, version, &SecretBytes::copy_from(&dek)).unwrap();
        let bit = bit.index(wrapped.len() * 8);
        wrapped[bit / 8] ^= 1 << (bit % 8);
        let err = kek.unwrap(&id, version, &wrapped).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::Corrupted);
    }

    #[test]
    fn another_kek_is_corrupted(
        material in any::<[u8; 32]>(),
        other in any::<[u8; 32]>(),
        id in key_id(),
        version in any::<u32>(),
        dek in dek(),
    ) {
        prop_assume!(material != other);
        let wrapped = kek(material).wrap(&id, version, &SecretBytes::copy_from(&dek)).unwrap();
        let err = kek(other).unwrap(&id, version, &wrapped).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::Corrupted);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn wrap_many_gives_the_blobs_of_wrap(material in any::<[u8; 32]>(), keys in batch()) {
        let kek = kek(material);
        let deks: Vec<SecretBytes> = keys.iter().map(|(_, _, d)| SecretBytes::copy_from(d)).collect();
        let items: Vec<_> = keys.iter().zip(&deks).map(|((id, v, _), d)| (id, *v, d)).collect();

        let batched = kek.wrap_many(&items);
        prop_assert_eq!(batched.len(), items.len());
        for ((id, version, dek), got) in items.iter().zip(batched) {
            let expected = kek.wrap(id, *version, dek).unwrap();
            prop_assert_eq!(got.unwrap(), expected);
        }
    }

    #[test]
    fn unwrap_many_round_trips(material in any::<[u8; 32]>(), keys in batch()) {
        let kek = kek(material);
        let wrapped: Vec<Vec<u8>> = keys
            .iter()
            .map(|(id, v, d)| kek.wrap(id, *v, &SecretBytes::copy_from(d)).unwrap())
            .collect();
        let items: Vec<_> = keys.iter().zip(&wrapped).map(|((id, v, _), w)| (id, *v, &w[..])).collect();

        let unwrapped = kek.unwrap_many(&items);
        prop_assert_eq!(unwrapped.len(), keys.len());
        for ((_, _, dek), got) in keys.iter().zip(unwrapped) {
            prop_assert!(got.unwrap().expose_secret() == dek.as_slice());
        }
    }

    #[test]
    fn unwrap_many_fails_each_damaged_blob_as_unwrap_does(
        material in any::<[u8; 32]>(),
        keys in batch(),
        damages in prop::collection::vec(damage(), 600),
    ) {
        let kek = kek(material);
        let moved_to = KeyId::new("moved:here").unwrap();

        // Each blob, damaged or not, read back under some id and version.
        let mut read: Vec<(KeyId, u32, Vec<u8>)> = Vec::new();
        for ((id, version, dek), damage) in keys.iter().zip(&damages) {
            let mut blob = kek.wrap(id, *version, &SecretBytes::copy_from(dek)).unwrap();
            let (mut id, mut version) = (id.clone(), *version);
            match *damage {
                Damage::None => {}
                Damage::FlipBit(bit) => {
                    let bit = bit.index(blob.len() * 8);
                    blob[bit / 8] ^= 1 << (bit % 8);
                }
                Damage::WrongId => id = moved_to.clone(),
                Damage::WrongVersion => version = version.wrapping_add(1),
                Damage::Truncate(to) => blob.truncate(to.index(blob.len())),
                Damage::Extend => blob.extend_from_slice(&[0; 8]),
            }
            read.push((id, version, blob));
        }
        let items: Vec<_> = read.iter().map(|(id, v, w)| (id, *v, &w[..])).collect();

        // Key by key, the batch gives what a single unwrap gives: the key, or the same error.
        let batched = kek.unwrap_many(&items);
        prop_assert_eq!(batched.len(), items.len());
        for ((id, version, blob), got) in items.iter().zip(batched) {
            match (kek.unwrap(id, *version, blob), got) {
                (Ok(expected), Ok(got)) => prop_assert_eq!(expected, got),
                (Err(expected), Err(got)) => {
                    prop_assert_eq!(got.kind(), ErrorKind::Corrupted);
                    prop_assert_eq!(got.key_id(), Some(*id));
                    prop_assert_eq!(expected, got);
                }
                (expected, got) => prop_assert!(false, "unwrap {:?}, unwrap_many {:?}",
                    expected.map(|_| "a key"), got.map(|_| "a key")),
            }
        }
    }
}
