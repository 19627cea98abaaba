//! The pkcs11 provider loaded as a plugin (`libkms_pkcs11.so`) against a real SoftHSM2 token.

mod common;

use common::*;
use kms_core::conformance::assert_conforms;
use kms_core::plugin::library_file_name;
use kms_core::{ErrorKind, KeyId, KeySpec};
use kms_plugin_tests::{cargo_build, init_and_open, open_plugin, profile_dir};

fn plugin() -> std::path::PathBuf {
    cargo_build(&["-p", "kms-pkcs11-plugin"]);
    profile_dir().join(library_file_name("pkcs11"))
}

#[test]
fn plugin_conforms() {
    let Some(hsm) = enter("plugin_conforms") else {
        return;
    };
    let path = plugin();
    let provider = init_and_open(&path, &hsm.dir, &options("store"));
    assert_conforms(provider.as_ref());
    let name = provider.to_string();
    assert!(
        name.starts_with(&format!(
            "pkcs11 provider at {}",
            hsm.dir.join("store").display()
        )),
        "{name}"
    );

    // Keys made through the plugin read back through the library, and the other way round.
    let id = KeyId::new("cluster/wal").unwrap();
    let key = provider.get_or_create(&id, KeySpec::default()).unwrap();
    drop(provider);
    let library = kms_pkcs11::open(&parse(&hsm, &options("store"))).unwrap();
    assert_eq!(
        kms_core::KeyProvider::get(&library, &id)
            .unwrap()
            .expose_secret(),
        key.expose_secret()
    );
}

#[test]
fn plugin_keeps_error_kinds() {
    let Some(hsm) = enter("plugin_keeps_error_kinds") else {
        return;
    };
    let path = plugin();
    drop(init_and_open(&path, &hsm.dir, &options("store")));

    let wrong = options_text("store", TOKEN, KEY, WRONG_PIN_ENV);
    let err = open_plugin(&path, &hsm.dir, &wrong).err().expect("denied");
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("CKR_PIN_INCORRECT"), "{err}");

    let absent = options_text("store", "no-such-token", KEY, PIN_ENV);
    let err = open_plugin(&path, &hsm.dir, &absent)
        .err()
        .expect("unavailable");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    let provider = open_plugin(&path, &hsm.dir, &options("store")).unwrap();
    let err = provider.get(&KeyId::new("nothing").unwrap()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// A C program opens the plugin, makes a key, forks: the child (which must initialise the
/// module and log in again) reads the key and makes one; the parent then still works.
#[test]
fn plugin_survives_fork() {
    let Some(hsm) = enter("plugin_survives_fork") else {
        return;
    };
    let path = plugin();
    drop(init_and_open(&path, &hsm.dir, &options("store")));

    let exe = hsm.dir.join("fork");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/fork.c");
    let include = kms_plugin_tests::workspace_root().join("include");
    let status = std::process::Command::new("cc")
        .args(["-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&exe)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc {} failed", source.display());

    let out = std::process::Command::new(&exe)
        .arg(&path)
        .arg(hsm.dir.join("store"))
        .args([MODULE, TOKEN, KEY, PIN_ENV])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "parent made a key\nchild read the parent's key and made its own\n\
         parent still works and reads the child's key\n"
    );
}
