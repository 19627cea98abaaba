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
