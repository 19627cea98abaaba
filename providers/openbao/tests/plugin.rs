//! The openbao provider loaded from `libkms_openbao.so`, against a real OpenBao dev server.

mod common;

use common::{Bao, KEY, private_dir, token_options};
use kms_core::conformance::assert_conforms;
use kms_core::plugin::{Plugin, library_file_name};
use kms_core::{ErrorKind, KeyId, KeySpec};
use kms_plugin_tests::{cargo_build, init_and_open, open_plugin, profile_dir};

fn plugin() -> std::path::PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| cargo_build(&["-p", "kms-openbao-plugin"]));
    profile_dir().join(library_file_name("openbao"))
}

#[test]
fn conforms_as_a_plugin() {
    let bao = Bao::dev();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let provider = init_and_open(&plugin(), dir.path(), &options);
    assert_conforms(provider.as_ref());
    assert_eq!(
        provider.to_string(),
        format!("openbao provider (transit/{KEY})")
    );

    let loaded = Plugin::load(&plugin()).unwrap();
    assert_eq!(loaded.name(), "openbao");
    assert!(loaded.has_init());
}

#[test]
fn failure_kinds_cross_the_plugin_boundary() {
    let mut bao = Bao::dev();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let provider = init_and_open(&plugin(), dir.path(), &options);
    let id = KeyId::new("a").unwrap();
    provider.create(&id, KeySpec::default()).unwrap();

    // A wrong token: denied, naming the address.
    let wrong = token_options(&bao, dir.path(), "s.wrong");
    let err = open_plugin(&plugin(), dir.path(), &wrong).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at {}", bao.addr)),
        "{err}"
    );

    // The server gone: unavailable, and no create.
    bao.stop();
    let err = provider.get(&id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at {} unreachable", bao.addr)),
        "{err}"
    );
    let other = KeyId::new("b").unwrap();
    let err = provider
        .get_or_create(&other, KeySpec::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(provider.list("").unwrap().len(), 1);
}
