//! kmsd over the openbao provider: its cache spares OpenBao (counted by OpenBao's own audit
//! log), and an OpenBao outage is "unavailable" through the socket while cached keys are still
//! served, for a whole minute, after which service comes back without restarting kmsd.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Bao, KEY, init_and_open, private_dir, token_options};
use kms_client::RemoteProvider;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_plugin_tests::{cargo_build, profile_dir};

/// kmsd, killed on drop.
struct Kmsd(Child);

impl Drop for Kmsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_kmsd(dir: &Path, options: &str) -> (Kmsd, RemoteProvider) {
    cargo_build(&["-p", "kmsd"]);
    let config = format!(
        "[provider]\nname = \"openbao\"\n[provider.options]\n{options}\n\
         [server]\nsocket = \"kms.sock\"\n"
    );
    std::fs::write(dir.join("kmsd.toml"), config).unwrap();
    let child = Command::new(profile_dir().join("kmsd"))
        .arg("--config")
        .arg(dir.join("kmsd.toml"))
        .args(["--log-level", "warn"])
        .env_remove("KMS_PLUGIN_PATH")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let kmsd = Kmsd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(client) = RemoteProvider::connect(&dir.join("kms.sock")) {
            return (kmsd, client);
        }
        assert!(Instant::now() < deadline, "kmsd did not start serving");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Transit decrypts that OpenBao answered, from its audit log.
fn decrypts(audit: &Path) -> usize {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    text.lines()
        .filter(|line| line.contains("\"type\":\"response\""))
        .filter(|line| line.contains(&format!("\"path\":\"transit/decrypt/{KEY}\"")))
        .count()
}

#[test]
fn kmsd_asks_openbao_once_per_key_and_serves_its_cache_through_an_outage() {
    let mut bao = Bao::dev_audited();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let ids: Vec<KeyId> = (0..5)
        .map(|i| KeyId::new(&format!("pg/{i}")).unwrap())
        .collect();
    let keys: Vec<_> = {
        let provider = init_and_open(dir.path(), &options);
        ids.iter()
            .map(|id| provider.create(id, KeySpec::default()).unwrap())
            .collect()
    };
    let audit = bao.audit_log();
    let before = decrypts(&audit);

    // 1. 10,000 GETs of one key from 8 clients: one decrypt at OpenBao, by its own audit log.
    let (_kmsd, _) = start_kmsd(dir.path(), &options);
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
                for _ in 0..1_250 {
                    assert_eq!(client.get(&ids[0]).unwrap(), keys[0]);
                }
            });
        }
    });
    assert_eq!(decrypts(&audit) - before, 1);

    // Then 4 clients x 100 rounds over all 5 keys: one decrypt for each of the 4 others.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
                for _ in 0..100 {
                    for (id, key) in ids.iter().zip(&keys) {
                        assert_eq!(&client.get(id).unwrap(), key);
                    }
                }
            });
        }
    });
    assert_eq!(decrypts(&audit) - before, 5);

    // 2. OpenBao gone: cached keys are served, an uncached one is unavailable, never created.
    let client = RemoteProvider::connect(&dir.path().join("kms.sock")).unwrap();
    bao.stop();
    assert_eq!(client.get(&ids[0]).unwrap(), keys[0]);
    let new = KeyId::new("pg/new").unwrap();
    let err = client.get_or_create(&new, KeySpec::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at {} unreachable", bao.addr)),
        "{err}"
    );
    assert_eq!(client.list("pg/").unwrap().len(), 5);
}

#[test]
fn a_minute_without_openbao_serves_cached_keys_and_recovers_without_restarting_kmsd() {
    let mut bao = Bao::persistent();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let cached_id = KeyId::new("outage/cached").unwrap();
    let uncached_id = KeyId::new("outage/uncached").unwrap();
    let (cached, uncached) = {
        let provider = init_and_open(dir.path(), &options);
        (
            provider.create(&cached_id, KeySpec::default()).unwrap(),
            provider.create(&uncached_id, KeySpec::default()).unwrap(),
        )
    };
    let (_kmsd, client) = start_kmsd(dir.path(), &options);
    assert_eq!(client.get(&cached_id).unwrap(), cached);
    drop(client);

    // 1. OpenBao killed for 60 s: every 5 s, on a new connection, the cached key is served,
    //    the uncached one is "unavailable" naming the address, and a new id is not created.
    bao.stop();
    let sock = dir.path().join("kms.sock");
    let fresh = KeyId::new("outage/new").unwrap();
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(60) {
        let client = RemoteProvider::connect(&sock).unwrap();
        assert_eq!(client.get(&cached_id).unwrap(), cached);
        let err = client.get(&uncached_id).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(
            err.to_string()
                .contains(&format!("openbao at {} unreachable", bao.addr)),
            "{err}"
        );
        let err = client
            .get_or_create(&fresh, KeySpec::default())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        rounds += 1;
        std::thread::sleep(Duration::from_secs(5));
    }
    assert!(rounds >= 6, "only {rounds} rounds in the outage");

    // 2. OpenBao back (restarted and unsealed): the same kmsd serves the uncached key, and
    //    creates again; nothing was created during the outage.
    bao.start_sealed();
    bao.unseal_now();
    let client = RemoteProvider::connect(&sock).unwrap();
    assert_eq!(client.get(&uncached_id).unwrap(), uncached);
    assert_eq!(client.list("outage/").unwrap().len(), 2);
    let made = client.get_or_create(&fresh, KeySpec::default()).unwrap();
    assert_eq!(client.get(&fresh).unwrap(), made);
}
