//! Properties of `Kek` wrapping: it round-trips for any KEK, key id, version and DEK length, and
//! refuses a blob read under another id or version, or with any single bit flipped.

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
