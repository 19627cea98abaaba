//! A KEK rotation killed with SIGKILL by the `kms` CLI resumes and finishes with every key
//! intact.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use kms_core::{KeyId, KeyProvider, KeySpec};
use kms_plugin_tests::{cargo_build, profile_dir};

/// Kills the child on every path, panics included.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kms() -> PathBuf {
    cargo_build(&["-p", "kms-cli", "-p", "kms-pkcs11-plugin"]);
    profile_dir().join("kms")
}

fn rotate(kms: &Path, config: &Path) -> Killed {
    let child = Command::new(kms)
        .arg("--config")
        .arg(config)
        .arg("rotate-kek")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kms runs");
    Killed(child)
}

fn check_all(hsm: &Hsm, before: &HashMap<KeyId, Vec<u8>>) {
    let provider = kms_pkcs11::open(&parse(hsm, &options("store"))).unwrap();
    for (id, bytes) in before {
        let key = provider.get(id).unwrap();
        assert_eq!(key.expose_secret(), bytes.as_slice(), "{id}");
    }
}

fn rotation_pending(hsm: &Hsm) -> bool {
    let db = rusqlite::Connection::open(hsm.dir.join("store/keys.db")).unwrap();
    db.query_row(
        "SELECT count(*) FROM meta WHERE name = 'pkcs11.rotation'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

#[test]
fn killed_rotation_resumes() {
    let Some(hsm) = enter("killed_rotation_resumes") else {
        return;
    };
    let kms = kms();
    let config = hsm.dir.join("kms.toml");
    let text = format!(
        "[provider]\nname = \"pkcs11\"\n[provider.options]\n{}",
        options("store")
    );
    std::fs::write(&config, text).unwrap();

    // 1. init through the CLI, 1,000 keys through the library.
    let out = Command::new(&kms)
        .arg("--config")
        .arg(&config)
        .arg("init")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut before = HashMap::new();
    {
        let provider = kms_pkcs11::open(&parse(&hsm, &options("store"))).unwrap();
        for i in 0..1000 {
            let id = KeyId::new(&format!("rel/{i}")).unwrap();
            let key = provider.create(&id, KeySpec::default()).unwrap();
            before.insert(id, key.expose_secret().to_vec());
        }
    }

    // 2. Killed right after its first batch: a rotation is left half done, every key readable.
    let mut child = rotate(&kms, &config);
    let stderr = child.0.stderr.take().unwrap();
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line).unwrap();
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(line.contains("re-wrapped 256 keys"), "{line}");
    assert!(
        rotation_pending(&hsm),
        "the kill landed after the rotation finished"
    );
    check_all(&hsm, &before);

    // 3. Killed at random points of the resumed rotation, each time leaving every key intact.
    for round in 0..3 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let delay = Duration::from_millis(u64::from(nanos % 200));
        let mut child = rotate(&kms, &config);
        std::thread::sleep(delay);
        let _ = child.0.kill();
        child.0.wait().unwrap();
        eprintln!(
            "round {round}: killed after {delay:?}; pending {}",
            rotation_pending(&hsm)
        );
        check_all(&hsm, &before);
    }

    // 4. Run to the end: finished, one generation left, every key intact.
    let out = Command::new(&kms)
        .arg("--config")
        .arg(&config)
        .arg("rotate-kek")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finished the KEK rotation"), "{stderr}");
    assert!(!rotation_pending(&hsm));
    check_all(&hsm, &before);
    let provider = kms_pkcs11::open(&parse(&hsm, &options("store"))).unwrap();
    let counts = provider.store().count_by_kek().unwrap();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts[0].1, 1000);
    assert!(counts[0].0 >= 2);
    assert_eq!(provider.list("rel/").unwrap().len(), 1000);
}
