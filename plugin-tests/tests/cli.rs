//! The `kms` CLI with plugins: found next to the binary with no plugin directory configured,
//! driven against the mock plugin, `kms init` through the file plugin, the built-in fallback
//! when a plugin is missing, and `kms plugins`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kms_plugin_tests::{built_by_default, kms_bin, plugin_path, private_dir};

fn kms(bin: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("KMS_CONFIG")
        .output()
        .expect("kms runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("kms.toml");
    fs::write(&path, text).unwrap();
    path
}

fn is_hex_key(line: &str) -> bool {
    line.len() == 64 && line.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn plain_cargo_build_puts_every_plugin_beside_kms_which_lists_them() {
    let profile = built_by_default();
    for name in ["file", "mock", "command", "pkcs11", "openbao", "aws_kms"] {
        let path = profile.join(format!("libkms_{name}.so"));
        assert!(path.is_file(), "cargo build made no {}", path.display());
    }

    let output = Command::new(profile.join("kms"))
        .arg("plugins")
        .env_remove("KMS_CONFIG")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let listed = stdout(&output);
    for name in ["file", "mock", "command", "pkcs11", "openbao", "aws-kms"] {
        let path = profile.join(format!("libkms_{}.so", name.replace('-', "_")));
        let line = format!(
            "{name}\t{}\t1\t{}",
            env!("CARGO_PKG_VERSION"),
            path.display()
        );
        assert!(
            listed.lines().any(|l| l == line),
            "no {line:?} in:\n{listed}"
        );
    }
}

#[test]
fn kms_plugins_reads_the_configured_directories_too() {
    let dir = private_dir();
    let plugins = dir.path().join("plugins");
    fs::create_dir(&plugins).unwrap();
    fs::copy(plugin_path("mock"), plugins.join("libkms_mymock.so")).unwrap();
    let config = write_config(
        dir.path(),
        "[provider]\nname = \"mock\"\n[plugins]\ndirs = [\"plugins\"]\nnext_to_executable = false\n",
    );
    let output = kms(&kms_bin(), &config, &["plugins"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let expected = format!(
        "mock\t{}\t1\t{}\n",
        env!("CARGO_PKG_VERSION"),
        plugins.join("libkms_mymock.so").display()
    );
    assert_eq!(stdout(&output), expected);
}

#[test]
fn the_cli_drives_the_mock_plugin() {
    let dir = private_dir();
    let config = write_config(dir.path(), "[provider]\nname = \"mock\"\n");

    // The mock is in memory: each process starts empty.
    let output = kms(&kms_bin(), &config, &["get-or-create", "cluster/wal"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(is_hex_key(printed.trim_end()), "{printed:?}");

    let output = kms(&kms_bin(), &config, &["get", "cluster/wal"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("not found"), "{}", stderr(&output));

    let config = write_config(
        dir.path(),
        "[provider]\nname = \"mock\"\n[provider.options]\nfail_next = 1\n\
         fail_kind = \"unavailable\"\n",
    );
    let output = kms(&kms_bin(), &config, &["get-or-create", "cluster/wal"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("unavailable"),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).is_empty());
}

#[test]
fn kms_init_and_keys_go_through_the_file_plugin() {
    let dir = private_dir();
    let config = write_config(
        dir.path(),
        "[provider]\nname = \"file\"\n[provider.options]\ndir = \"keys\"\n",
    );
    let output = kms(&kms_bin(), &config, &["init"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("initialised file provider at"),
        "{}",
        stderr(&output)
    );

    let made = kms(&kms_bin(), &config, &["get-or-create", "db/1"]);
    assert!(made.status.success(), "{}", stderr(&made));
    let read = kms(&kms_bin(), &config, &["get", "db/1"]);
    assert!(read.status.success(), "{}", stderr(&read));
    assert_eq!(stdout(&made), stdout(&read));
    assert!(is_hex_key(stdout(&read).trim_end()));
}

/// A `kms` copied alone into a directory, with what else the test puts there.
fn lone_kms(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir(&bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let kms = bin.join("kms");
    fs::copy(kms_bin(), &kms).unwrap();
    kms
}

#[test]
fn without_its_plugin_file_falls_back_to_the_linked_in_provider() {
    let dir = private_dir();
    let kms_alone = lone_kms(dir.path());
    let config = write_config(
        dir.path(),
        "[provider]\nname = \"file\"\n[provider.options]\ndir = \"keys\"\n",
    );
    let output = kms(&kms_alone, &config, &["init"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = kms(&kms_alone, &config, &["get-or-create", "a"]);
    assert!(output.status.success(), "{}", stderr(&output));

    // The store is the same whether reached through the plugin or the linked-in provider.
    let through_plugin = kms(&kms_bin(), &config, &["get", "a"]);
    assert_eq!(stdout(&through_plugin), stdout(&output));
}

#[test]
fn a_name_without_plugin_or_linked_in_provider_lists_what_was_searched() {
    let dir = private_dir();
    let kms_alone = lone_kms(dir.path());
    let config = write_config(dir.path(), "[provider]\nname = \"mock\"\n");
    let output = kms(&kms_alone, &config, &["get", "a"]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains("unknown provider \"mock\": no libkms_mock.so in"),
        "{text}"
    );
    assert!(
        text.contains(&dir.path().join("bin").display().to_string()),
        "{text}"
    );
    assert!(text.contains("file (linked in)"), "{text}");
}

#[test]
fn an_insecure_plugin_is_refused_not_bypassed() {
    let dir = private_dir();
    let kms_alone = lone_kms(dir.path());
    let plugin = dir.path().join("bin/libkms_file.so");
    fs::copy(plugin_path("file"), &plugin).unwrap();
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o757)).unwrap();
    let config = write_config(
        dir.path(),
        "[provider]\nname = \"file\"\n[provider.options]\ndir = \"keys\"\n",
    );
    let output = kms(&kms_alone, &config, &["init"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.contains(&format!(
            "refusing plugin {}: it is writable by others",
            plugin.display()
        )),
        "{text}"
    );
    assert!(!dir.path().join("keys").exists(), "init went on regardless");
}

#[test]
fn a_plugin_named_by_path() {
    let dir = private_dir();
    let config = write_config(
        dir.path(),
        &format!("[provider]\nname = \"{}\"\n", plugin_path("mock").display()),
    );
    let output = kms(&kms_bin(), &config, &["get-or-create", "p"]);
    assert!(output.status.success(), "{}", stderr(&output));
}
