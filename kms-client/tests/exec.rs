//! The exec provider with a real helper in another language: a Python program that keeps keys
//! in a JSON file.

use std::path::{Path, PathBuf};

use kms_core::config::Context;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/json_provider.py")
}

fn open(store: &Path, timeout: f64) -> kms_core::Result<kms_client::exec::ExecProvider> {
    let text = format!(
        "command = [\"python3\", {:?}, {:?}]\ntimeout = {timeout}\n",
        helper().display().to_string(),
        store.display().to_string()
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    kms_client::exec::ExecProvider::open(&Context::default(), &table)
}

#[test]
fn conformance_through_a_python_helper() {
    let dir = tempfile::tempdir().unwrap();
    let provider = open(&dir.path().join("keys.json"), 10.0).unwrap();
    kms_core::conformance::assert_conforms(&provider);
}

#[test]
fn keys_survive_the_helper_and_errors_keep_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("keys.json");
    let id = KeyId::new("json/k").unwrap();
    let key = open(&store, 10.0)
        .unwrap()
        .create(&id, KeySpec::default())
        .unwrap();

    // A fresh helper process reads the same file.
    let provider = open(&store, 10.0).unwrap();
    assert_eq!(provider.get(&id).unwrap(), key);
    assert_eq!(
        provider.create(&id, KeySpec::default()).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        provider
            .get(&KeyId::new("none").unwrap())
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn a_crashing_helper_fails_one_call_and_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("keys.json");
    let id = KeyId::new("safe").unwrap();
    let key = open(&store, 10.0)
        .unwrap()
        .create(&id, KeySpec::default())
        .unwrap();

    // The crash hook is set for the helper only, through env(1).
    let provider = {
        let text = format!(
            "command = [\"/usr/bin/env\", \"KMS_HELPER_CRASH_ON=boom\", \"python3\", {:?}, {:?}]\n",
            helper().display().to_string(),
            store.display().to_string()
        );
        let table: toml::Table = toml::from_str(&text).unwrap();
        kms_client::exec::ExecProvider::open(&Context::default(), &table).unwrap()
    };
    let err = provider.get(&KeyId::new("boom").unwrap()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("helper exited"), "{err}");
    // The next call starts a new helper and is served.
    assert_eq!(provider.get(&id).unwrap(), key);
}

#[test]
fn a_helper_that_is_not_a_kms_helper_is_refused() {
    let table: toml::Table = toml::from_str("command = [\"/bin/echo\", \"hello\"]\n").unwrap();
    let err = kms_client::exec::ExecProvider::open(&Context::default(), &table)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(
        err.to_string().contains("does not speak kms protocol v1"),
        "{err}"
    );

    let table: toml::Table =
        toml::from_str("command = [\"/bin/sleep\", \"60\"]\ntimeout = 0.5\n").unwrap();
    let err = kms_client::exec::ExecProvider::open(&Context::default(), &table)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("did not answer within 0.5s"),
        "{err}"
    );

    let table: toml::Table = toml::from_str("command = []\n").unwrap();
    let err = kms_client::exec::ExecProvider::open(&Context::default(), &table)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
}
