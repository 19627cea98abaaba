//! Properties of `KeyId::new` and `KeyId::from_bytes`: they never panic, and accept exactly the
//! strings an independent oracle accepts.
//!
//! The rules, from `src/id.rs`: 1 to 255 bytes from `[A-Za-z0-9._:/-]`, no leading `/`, and no
//! empty, `.` or `..` segment between slashes.

use kms_core::{ErrorKind, KeyId};
use proptest::prelude::*;

/// The oracle, written from the rules rather than from the code: an id is a `/`-separated list of
/// segments, each a non-empty run of allowed characters that is not `.` or `..`.
fn is_valid_id(text: &str) -> bool {
    const ALLOWED: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-";
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.chars().all(|c| ALLOWED.contains(c))
    };
    !text.is_empty() && text.len() <= 255 && text.split('/').all(valid_segment)
}

/// Pieces that sit near the edges of the rules.
const PIECES: &[&str] = &[
    "a", "Z", "9", ".", "..", "...", "/", "//", "_", ":", "-", " ", "\\", "\0", "\n", "\u{e9}",
    "\u{7f}", "*", "db", "x.y",
];

/// Strings assembled from edge pieces, long ones included.
fn edgy_string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(PIECES), 0..24).prop_map(|p| p.concat()),
        "[a./]{250,260}",
        "[a-c]{1,3}(/[a-c.]{1,3}){0,4}/?",
    ]
}

fn check(text: &str) -> Result<(), TestCaseError> {
    match KeyId::new(text) {
        Ok(id) => {
            prop_assert!(is_valid_id(text), "accepted {:?}", text);
            prop_assert_eq!(id.as_str(), text);
        }
        Err(e) => {
            prop_assert!(!is_valid_id(text), "refused {:?}: {}", text, e);
            prop_assert_eq!(e.kind(), ErrorKind::InvalidKeyId);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_strings_match_the_oracle(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn edge_strings_match_the_oracle(text in edgy_string()) {
        check(&text)?;
    }

    #[test]
    fn arbitrary_bytes_match_the_oracle(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let expected = std::str::from_utf8(&bytes).is_ok_and(is_valid_id);
        match KeyId::from_bytes(&bytes) {
            Ok(id) => {
                prop_assert!(expected, "accepted {:?}", bytes);
                prop_assert_eq!(id.as_str().as_bytes(), bytes.as_slice());
            }
            Err(e) => {
                prop_assert!(!expected, "refused {:?}: {}", bytes, e);
                prop_assert_eq!(e.kind(), ErrorKind::InvalidKeyId);
            }
        }
    }
}

#[test]
fn oracle_agrees_with_the_documented_examples() {
    for ok in [
        "cluster/wal",
        "db/16384/rel/24576",
        "x..y",
        ".a/b.",
        &"k".repeat(255),
    ] {
        assert!(is_valid_id(ok), "{ok}");
    }
    for bad in [
        "",
        ".",
        "..",
        "/a",
        "a/",
        "a//b",
        "a/./b",
        "a/../b",
        "a b",
        &"k".repeat(256),
    ] {
        assert!(!is_valid_id(bad), "{bad}");
    }
}
