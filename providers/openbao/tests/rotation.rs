//! KEK rotation against a real OpenBao: Transit `rotate`, then Transit `rewrap` of every stored
//! key; checked by raising the Transit key's `min_decryption_version` afterwards, so that any
//! key left under the old version would fail to read. Also a rotation through `kms rotate-kek`
//! killed with SIGKILL in the middle and resumed.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Bao, KEY, context, init_and_open, open, private_dir, table, token_options};
use kms_core::store::Store;
use kms_core::{KeyId, KeyProvider, KeySpec};
use kms_plugin_tests::{cargo_build, profile_dir};

fn remember_all(provider: &dyn KeyProvider, n: usize) -> BTreeMap<(String, u32), Vec<u8>> {
    let mut keys = BTreeMap::new();
    for i in 0..n {
        let id = KeyId::new(&format!("db/{i}/rel")).unwrap();
        let key = provider.create(&id, KeySpec::default()).unwrap();
        keys.insert((id.to_string(), 1), key.expose_secret().to_vec());
        if i % 10 == 0 {
            let key = provider.rotate(&id, KeySpec::default()).unwrap();
            keys.insert((id.to_string(), 2), key.expose_secret().to_vec());
        }
    }
    keys
}

fn assert_all_read_back(provider: &dyn KeyProvider, keys: &BTreeMap<(String, u32), Vec<u8>>) {
    for ((id, version), bytes) in keys {
        let id = KeyId::new(id).unwrap();
        let key = provider.get_version(&id, *version).unwrap();
        assert_eq!(key.expose_secret(), &bytes[..], "{id} v{version}");
    }
}

fn blobs_under(dir: &std::path::Path, prefix: &str) -> (usize, usize) {
    let store = Store::open(&dir.join("store/keys.db")).unwrap();
    let rows = store.wrapped_by(2, 100_000).unwrap();
    let under = rows
        .iter()
        .filter(|(_, r)| r.wrapped.starts_with(prefix.as_bytes()))
        .count();
    (rows.len(), under)
}

#[test]
fn rotation_rewraps_every_key_on_the_server() {
    let bao = Bao::dev();
    let dir = private_dir();
    let text = token_options(&bao, dir.path(), &bao.token);
    let options = kms_openbao::Options::from_table(&context(dir.path()), &table(&text)).unwrap();
    let before = init_and_open(dir.path(), &text);
    let keys = remember_all(before.as_ref(), 120);
    assert_eq!(keys.len(), 132);

    let mut seen = Vec::new();
    let rotated = kms_openbao::rotate_kek(&options, |n| seen.push(n)).unwrap();
    assert_eq!((rotated.from, rotated.to, rotated.resumed), (1, 2, false));
    assert_eq!(rotated.rewrapped, 132);
    assert_eq!(rotated.transit_version, 2);
    assert_eq!(seen.last(), Some(&132));
    assert!(
        seen.len() >= 3,
        "batches of {}: {seen:?}",
        kms_openbao::REWRAP_BATCH
    );
    assert_eq!(
        bao.read_field(&format!("transit/keys/{KEY}"), "latest_version"),
        "2"
    );
    assert_eq!(blobs_under(dir.path(), "vault:v2:"), (132, 132));

    // Nothing is left for Transit key version 1: forbid it, and every key still reads.
    bao.cli(&[
        "write",
        &format!("transit/keys/{KEY}/config"),
        "min_decryption_version=2",
    ]);
    let provider = open(dir.path(), &text).unwrap();
    assert_all_read_back(provider.as_ref(), &keys);
    let new = KeyId::new("after/rotation").unwrap();
    let created = provider.create(&new, KeySpec::default()).unwrap();
    assert_eq!(provider.get(&new).unwrap(), created);

    // A provider opened before the rotation follows it without being reopened.
    assert_all_read_back(before.as_ref(), &keys);
    let late = KeyId::new("opened/before").unwrap();
    let made = before.create(&late, KeySpec::default()).unwrap();
    assert_eq!(provider.get(&late).unwrap(), made);

    // A second rotation goes on from generation 2.
    let rotated = kms_openbao::rotate_kek(&options, |_| {}).unwrap();
    assert_eq!((rotated.from, rotated.to, rotated.rewrapped), (2, 3, 134));
    let provider = open(dir.path(), &text).unwrap();
    assert_all_read_back(provider.as_ref(), &keys);
    assert_eq!(provider.get(&new).unwrap(), created);
}

#[test]
fn a_rotation_killed_in_the_middle_resumes_through_the_cli() {
    cargo_build(&["-p", "kms-cli"]);
    let kms = profile_dir().join("kms");
    let bao = Bao::dev();
    let dir = private_dir();

    // The configuration names the token by an environment variable.
    let config = format!(
        "[provider]\nname = \"openbao\"\n[provider.options]\ndir = \"store\"\n\
         address = \"{}\"\nkey = \"{KEY}\"\ntoken_env = \"KMS_TEST_BAO_TOKEN\"\n",
        bao.addr
    );
    let config_path = dir.path().join("kms.toml");
    std::fs::write(&config_path, config).unwrap();
    let run = |args: &[&str]| {
        Command::new(&kms)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("KMS_TEST_BAO_TOKEN", &bao.token)
            .env_remove("KMS_SOCKET")
            .env_remove("KMS_PLUGIN_PATH")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["get-or-create", "cli/key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_key = String::from_utf8(out.stdout).unwrap();

    let text = format!(
        "dir = \"store\"\naddress = \"{}\"\nkey = \"{KEY}\"\ntoken_file = \"token\"\n",
        bao.addr
    );
    common::write_private(dir.path(), "token", &bao.token);
    let keys = remember_all(open(dir.path(), &text).unwrap().as_ref(), 1_000);

    // 1. Kill `kms rotate-kek` three times, each after a random number (1 to 3) of its batches
    //    of 50; after each kill every key reads back. (At most about 15 of the 21 batches are
    //    done by then, so the rotation is still unfinished.)
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("kill points from seed {seed}");
    for round in 0..3u64 {
        let batches = 1 + (seed >> (round * 4)) % 3;
        let mut child = Command::new(&kms)
            .arg("--config")
            .arg(&config_path)
            .arg("rotate-kek")
            .env("KMS_TEST_BAO_TOKEN", &bao.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        for batch in 1..=batches {
            let mut line = String::new();
            stderr.read_line(&mut line).unwrap();
            if round == 0 && batch == 1 {
                assert!(line.starts_with("kms: re-wrapped 50 keys"), "{line}");
            }
            assert!(line.starts_with("kms: re-wrapped"), "{line}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let provider = open(dir.path(), &text).unwrap();
        assert_all_read_back(provider.as_ref(), &keys);
    }

    // 2. Mid-rotation: the store holds both generations, and every key reads.
    let store = Store::open(&dir.path().join("store/keys.db")).unwrap();
    let counts = store.count_by_kek().unwrap();
    drop(store);
    assert!(
        counts.len() == 2 && counts[0].0 == 1 && counts[1].0 == 2,
        "{counts:?}"
    );
    let provider = open(dir.path(), &text).unwrap();
    assert_all_read_back(provider.as_ref(), &keys);
    // A key created now is written for the new generation.
    let during = provider
        .create(&KeyId::new("during/rotation").unwrap(), KeySpec::default())
        .unwrap();
    drop(provider);

    // 3. Resumed: finished without a second Transit rotation.
    let out = run(&["rotate-kek"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kms: resumed and finished the KEK rotation from generation 1 to 2"),
        "{stderr}"
    );
    assert_eq!(
        bao.read_field(&format!("transit/keys/{KEY}"), "latest_version"),
        "2"
    );
    assert_eq!(
        blobs_under(dir.path(), "vault:v2:"),
        (keys.len() + 2, keys.len() + 2)
    );

    // 4. Version 1 forbidden: everything reads, through the library and the CLI.
    bao.cli(&[
        "write",
        &format!("transit/keys/{KEY}/config"),
        "min_decryption_version=2",
    ]);
    let provider = open(dir.path(), &text).unwrap();
    assert_all_read_back(provider.as_ref(), &keys);
    let id = KeyId::new("during/rotation").unwrap();
    assert_eq!(provider.get(&id).unwrap(), during);
    let out = run(&["get", "cli/key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), cli_key);
}
