//! The aws-kms provider through the real `kms` binary (linked in, or its plugin beside it):
//! init, keys, and `kms rotate-kek --to` against a real moto server.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Moto, in_moto_env, private_dir};

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
        "[provider]\nname = \"aws-kms\"\n[provider.options]\ndir = \"keys\"\nkey_id = \"{key_id}\"\n\
         region = \"us-east-1\"\nendpoint = \"{}\"\n",
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
}
