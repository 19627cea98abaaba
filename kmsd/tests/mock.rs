//! kmsd over the mock provider, in-process as a trait object and loaded as a plugin: a cloud
//! KMS behind kmsd sees one call per key, and its failures reach clients with their kind.

use std::path::Path;
use std::sync::Arc;

use kms_client::RemoteProvider;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_mock::MockProvider;
use kmsd::Settings;

fn settings(dir: &Path) -> Settings {
    let text = format!(
        "socket = {:?}\n",
        dir.join("kms.sock").display().to_string()
    );
    Settings::from_table(&toml::from_str(&text).unwrap(), Path::new("")).unwrap()
}

#[test]
fn ten_thousand_gets_of_one_key_make_one_backend_call() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockProvider::new());
    let server = kmsd::spawn(Box::new(Arc::clone(&mock)), settings(dir.path())).unwrap();
    let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
    let id = KeyId::new("cloud/key").unwrap();
    let key = client.get_or_create(&id, KeySpec::default()).unwrap();

    // Eight clients at once, 10,000 GETs in all.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
                for _ in 0..1250 {
                    assert_eq!(client.get(&id).unwrap(), key);
                }
            });
        }
    });
    let calls = mock.calls();
    assert_eq!(
        (calls.get, calls.get_or_create, calls.create),
        (0, 1, 0),
        "{calls:?}"
    );
    let stats: std::collections::HashMap<String, u64> =
        client.stats().unwrap().into_iter().collect();
    assert_eq!(stats["cache_hits"], 10_000, "{stats:?}");
    assert_eq!(stats["provider_get_or_create"], 1, "{stats:?}");
    server.stop().unwrap();
}

#[test]
fn backend_failures_reach_clients_with_their_kind_and_never_create() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Arc::new(MockProvider::new());
    let server = kmsd::spawn(Box::new(Arc::clone(&mock)), settings(dir.path())).unwrap();
    let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
    let id = KeyId::new("cloud/flaky").unwrap();

    for kind in [ErrorKind::Unavailable, ErrorKind::Denied] {
        mock.fail_next(1, kind);
        let err = client.get_or_create(&id, KeySpec::default()).unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert_eq!(mock.len(), 0, "a failed backend call created a key");
    }
    // Concurrent misses on one id make one backend call.
    mock.set_latency(std::time::Duration::from_millis(50));
    let created = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
                    client.get_or_create(&id, KeySpec::default()).unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(created.iter().all(|k| k == &created[0]));
    assert_eq!(mock.len(), 1);
    server.stop().unwrap();
}

#[test]
fn kmsd_binary_serves_the_mock_plugin() {
    // The plugin is built by `cargo build` next to kmsd; the binary finds it by name.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsd.toml");
    let text = "[provider]\nname = \"mock\"\n[server]\nsocket = \"kms.sock\"\n";
    std::fs::write(&config, text).unwrap();
    let kmsd = Path::new(env!("CARGO_BIN_EXE_kmsd"));
    if !kmsd.with_file_name("libkms_mock.so").is_file() {
        let status =
            std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
                .args(["build", "--quiet", "-p", "kms-mock-plugin"])
                .status()
                .unwrap();
        assert!(status.success());
    }
    let mut child = std::process::Command::new(kmsd)
        .arg("--config")
        .arg(&config)
        .args(["--log-level", "warn"])
        .spawn()
        .unwrap();
    let socket = dir.path().join("kms.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let client = loop {
        match RemoteProvider::connect(&socket) {
            Ok(client) => break client,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("kmsd did not come up: {e}"),
        }
    };
    assert!(client.to_string().contains("mock"), "{client}");
    kms_core::conformance::assert_conforms(&client);
    child.kill().unwrap();
    child.wait().unwrap();
}
