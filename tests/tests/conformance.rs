//! The file provider passes the shared conformance suite in-process, and the library and the
//! `kms` binary reach the very same keys.

use kms_core::config::{Config, Registry};
use kms_core::conformance::{assert_conforms, run};
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_tests::Kms;

#[test]
fn file_provider_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    let options = kms_file::Options::in_dir(tmp.path().join("store"));
    let made = kms_file::init(&options).expect("init");
    assert!(made.contains("initialised"), "{made}");
    let provider = kms_file::open(&options).expect("open");
    assert_conforms(&provider);

    // A second run under another prefix, on a second instance of the same store: keys of the
    // first run stay, the store is shared.
    let before = provider.list("").unwrap().len();
    assert!(before > 0);
    let second = kms_file::open(&options).expect("open a second time");
    let report = run(&second, "conformance/second/");
    assert!(report.is_ok(), "{report}");
    assert!(
        report.skipped.is_empty(),
        "the file provider skipped {:?}",
        report.skipped
    );
    assert!(provider.list("").unwrap().len() > before);

    // init refuses a second time.
    let err = kms_file::init(&options).expect_err("initialised twice");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
}

#[test]
fn file_provider_conforms_when_opened_through_the_registry() {
    let kms = Kms::uninitialised();
    let mut registry = Registry::new();
    registry.register(kms_file::registered());
    let config = Config::load(&kms.config).expect("load the configuration");
    registry.init(&config).expect("init through the registry");
    let provider: Box<dyn KeyProvider> = registry.open(&config).expect("open");
    assert!(
        provider.to_string().starts_with("file provider at "),
        "{provider}"
    );
    assert_conforms(provider.as_ref());
}

#[test]
fn the_library_and_the_cli_reach_the_same_keys() {
    let kms = Kms::new();
    let provider = kms_file::open(&kms_file::Options::in_dir(&kms.dir)).expect("open");

    // Made by the library, read by the CLI.
    let id = KeyId::new("cluster/wal").unwrap();
    let key = provider.create(&id, KeySpec::default()).unwrap();
    kms.remember(key.expose_secret());
    assert_eq!(kms.get("cluster/wal"), key.expose_secret());

    // Made by the CLI, read by the library (the provider opened before the key existed).
    let from_cli = kms.create("db/5/rel/16384");
    let id = KeyId::new("db/5/rel/16384").unwrap();
    assert_eq!(
        provider.get(&id).unwrap().expose_secret(),
        from_cli.as_slice()
    );

    // Rotated by the CLI, both versions through the library.
    let v2 = kms.key(["rotate", "cluster/wal"]);
    let wal = KeyId::new("cluster/wal").unwrap();
    assert_eq!(provider.get(&wal).unwrap().expose_secret(), v2.as_slice());
    assert_eq!(provider.get(&wal).unwrap().version(), 2);
    assert_eq!(
        provider.get_version(&wal, 1).unwrap().expose_secret(),
        key.expose_secret()
    );
    drop(provider);
    kms.assert_no_wal();
}
