//! The aws-kms provider through the real `kms` binary (linked in, or its plugin beside it):
//! init, keys, and `kms rotate-kek --to` against a real moto server.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use common::{Moto, in_moto_env, private_dir};
use kms_core::{KeyId, KeyProvider, KeySpec};

fn kms(config: &Path, args: &[&str]) -> Output {
    let bin = common::profile_dir().join("kms");
    Command::new(&bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("kms runs")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "kms failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn write_config(path: &Path, moto: &Moto, key_id: &str) {
    let text = format!(
        "[provider]\nname = \"aws-kms\"\n[provider.options]\ndir = \"keys\"\n\
         key_id = \"{key_id}\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\n",
        moto.endpoint()
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn kms_binary_inits_serves_and_rotates_the_kek() {
    if !in_moto_env("kms_binary_inits_serves_and_rotates_the_kek") {
        return;
    }
    common::cargo_build(&["-p", "kms-cli", "-p", "kms-aws-kms-plugin"]);
    let moto = Moto::start();
    let dir = private_dir();
    let config = dir.path().join("kms.toml");
    let (old, new) = (moto.create_key(), moto.create_key());
    write_config(&config, &moto, &old);

    let line = String::from_utf8(kms(&config, &["init"]).stderr).unwrap();
    assert!(line.contains(&old), "{line}");
    let first = ok(kms(&config, &["get-or-create", "db/1"]));
    assert_eq!(first.trim().len(), 64, "{first}");
    assert_eq!(ok(kms(&config, &["get", "db/1"])), first);

    // A missing key is kms's NotFound (exit status 3), never a create.
    let missing = kms(&config, &["get", "db/none"]);
    assert_eq!(missing.status.code(), Some(3));
    assert_eq!(ok(kms(&config, &["list"])).lines().count(), 1);

    // Rotation to the new KMS key, then the configuration names it.
    let rotated = kms(&config, &["rotate-kek", "--to", &new]);
    let said = String::from_utf8_lossy(&rotated.stderr).to_string();
    assert!(rotated.status.success(), "{said}");
    assert!(said.contains("from generation 1 to 2"), "{said}");
    assert!(said.contains(&new), "{said}");
    let refused = kms(&config, &["get", "db/1"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wrong KEK"));
    write_config(&config, &moto, &new);
    assert_eq!(ok(kms(&config, &["get", "db/1"])), first);

    // No credentials anywhere in the chain: a configuration error (exit status 2) that says
    // so, not "unreachable".
    let home = private_dir();
    let bare = Command::new(common::profile_dir().join("kms"))
        .arg("--config")
        .arg(&config)
        .args(["get", "db/1"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&bare.stderr);
    assert_eq!(bare.status.code(), Some(2), "{said}");
    assert!(said.contains("no AWS credentials"), "{said}");
    assert!(said.contains(&moto.endpoint()), "{said}");
}

#[test]
fn rotate_kek_killed_with_sigkill_resumes_and_keeps_every_key() {
    if !in_moto_env("rotate_kek_killed_with_sigkill_resumes_and_keeps_every_key") {
        return;
    }
    common::cargo_build(&["-p", "kms-cli", "-p", "kms-aws-kms-plugin"]);
    let moto = Moto::start();
    let dir = private_dir();
    let config = dir.path().join("kms.toml");
    let (old, new) = (moto.create_key(), moto.create_key());
    write_config(&config, &moto, &old);
    ok(kms(&config, &["init"]));

    // 1. 1,000 keys, made through the library by four threads.
    let options = moto.options(&dir.path().join("keys"), &old);
    let provider = Arc::new(kms_aws_kms::open(&options).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let provider = provider.clone();
            std::thread::spawn(move || {
                (0..250)
                    .map(|i| {
                        let id = KeyId::new(&format!("t{t}/{i}")).unwrap();
                        let key = provider.create(&id, KeySpec::default()).unwrap();
                        (id, key.expose_secret().to_vec())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let keys: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    drop(provider);

    // 2. `kms rotate-kek --to` killed with SIGKILL at a random point: once it has moved a
    //    random number of batches of 100 (1 to 5).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let kill_after = 100 * (1 + seed % 5);
    println!("killed after {kill_after} keys (seed {seed})");
    let kill_line = format!("kms: re-wrapped {kill_after} keys");
    let mut child = Command::new(common::profile_dir().join("kms"))
        .arg("--config")
        .arg(&config)
        .args(["rotate-kek", "--to", &new])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref().take(100) {
        let line = line.unwrap();
        let reached = line == kill_line;
        seen.push(line);
        if reached {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        seen.last().map(String::as_str),
        Some(kill_line.as_str()),
        "{seen:?}"
    );

    // 3. Every key still reads, then the rotation is resumed and finished.
    let halfway = kms_aws_kms::open(&options).unwrap();
    let counts = halfway.store().count_by_kek().unwrap();
    assert_eq!(
        counts.iter().map(|(_, n)| n).sum::<u64>(),
        1_000,
        "{counts:?}"
    );
    let moved = u64::from(kill_after);
    assert!(
        counts.contains(&(2, moved)) || counts.contains(&(2, moved + 100)),
        "{counts:?}"
    );
    for (id, key) in &keys {
        assert_eq!(halfway.get(id).unwrap().expose_secret(), &key[..]);
    }
    drop(halfway);
    let resumed = kms(&config, &["rotate-kek"]);
    let said = String::from_utf8_lossy(&resumed.stderr).to_string();
    assert!(resumed.status.success(), "{said}");
    assert!(said.contains("resumed and finished"), "{said}");

    write_config(&config, &moto, &new);
    let options = moto.options(&dir.path().join("keys"), &new);
    let provider = kms_aws_kms::open(&options).unwrap();
    assert_eq!(provider.store().count_by_kek().unwrap(), vec![(2, 1_000)]);
    for (id, key) in &keys {
        assert_eq!(provider.get(id).unwrap().expose_secret(), &key[..], "{id}");
    }
}
