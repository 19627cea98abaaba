//! Bad plugins: each is refused (or its bad call fails) with a clear error naming the file and
//! the reason, and the host goes on.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kms_core::plugin::Plugin;
use kms_core::{Error, ErrorKind, KeyId, KeySpec};
use kms_plugin_tests::{c_test_source, compile_c, open_plugin, plugin_path, private_dir};

fn refused(path: &Path) -> Error {
    Plugin::load(path).expect_err("the plugin was loaded")
}

/// After every refusal the host still loads and uses a good plugin.
fn host_is_alive() {
    let dir = private_dir();
    let provider = open_plugin(&plugin_path("mock"), dir.path(), "").unwrap();
    let id = KeyId::new("alive").unwrap();
    provider.get_or_create(&id, KeySpec::default()).unwrap();
}

#[test]
fn a_file_that_is_not_a_shared_library() {
    let dir = private_dir();
    let path = dir.path().join("libkms_text.so");
    fs::write(&path, "this is not an ELF file\n").unwrap();
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot load plugin {}: ", path.display())),
        "{text}"
    );
    assert!(
        text.contains("invalid ELF header") || text.contains("too short"),
        "{text}"
    );
    host_is_alive();
}

#[test]
fn a_library_without_the_entry_symbol() {
    let dir = private_dir();
    let path = compile_c(
        &c_test_source("no_entry.c"),
        &dir.path().join("libkms_x.so"),
        &[],
    );
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("plugin {}: ", path.display())),
        "{text}"
    );
    assert!(text.contains("no kms_provider_entry symbol"), "{text}");
    host_is_alive();
}

#[test]
fn a_plugin_of_abi_version_999() {
    let dir = private_dir();
    let path = compile_c(
        &c_test_source("abi999.c"),
        &dir.path().join("libkms_abi999.so"),
        &[],
    );
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "plugin {} speaks ABI version 999, this kms speaks 1",
            path.display()
        )
    );
    host_is_alive();
}

#[test]
fn a_table_smaller_than_revision_1() {
    let dir = private_dir();
    let path = compile_c(
        &c_test_source("small_table.c"),
        &dir.path().join("libkms_s.so"),
        &[],
    );
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "plugin {}: its function table is too small: 32 bytes, ABI version 1 needs at \
             least 112",
            path.display()
        )
    );
    host_is_alive();
}

#[test]
fn a_table_without_a_required_function() {
    let dir = private_dir();
    let path = compile_c(
        &c_test_source("null_required.c"),
        &dir.path().join("libkms_n.so"),
        &[],
    );
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
    assert_eq!(
        err.to_string(),
        format!("plugin {}: its table lacks get", path.display())
    );
    host_is_alive();
}

#[test]
fn a_group_writable_plugin_file() {
    let dir = private_dir();
    let path = dir.path().join("libkms_mock.so");
    fs::copy(plugin_path("mock"), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o775)).unwrap();
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Insecure, "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "refusing plugin {}: it is writable by its group (mode 0775)",
            path.display()
        )),
        "{text}"
    );

    // The same file, once private, loads: the refusal was about the mode alone.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    Plugin::load(&path).unwrap();
}

#[test]
fn a_plugin_in_a_world_writable_directory() {
    let dir = private_dir();
    let path = dir.path().join("libkms_mock.so");
    fs::copy(plugin_path("mock"), &path).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused(&path);
    assert_eq!(err.kind(), ErrorKind::Insecure, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "its directory {} is writable by others",
            dir.path().display()
        )),
        "{err}"
    );
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_plugin_whose_get_panics_fails_that_call_and_serves_the_next() {
    let dir = private_dir();
    let path = plugin_path("mock");
    let provider = open_plugin(&path, dir.path(), "panic_on = \"boom/key\"").unwrap();
    let boom = KeyId::new("boom/key").unwrap();
    let calm = KeyId::new("calm/key").unwrap();

    assert_eq!(provider.get(&calm).unwrap_err().kind(), ErrorKind::NotFound);
    for _ in 0..2 {
        let err = provider.get(&boom).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
        assert_eq!(err.key_id(), Some(&boom));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "mock provider: plugin {}: plugin panicked in get: ",
                path.display()
            )),
            "{text}"
        );
        assert!(text.contains("panic_on \"boom/key\""), "{text}");

        // The next call is served.
        provider.get_or_create(&calm, KeySpec::default()).unwrap();
    }

    let err = provider.create(&boom, KeySpec::default()).unwrap_err();
    assert!(
        err.to_string().contains("plugin panicked in create"),
        "{err}"
    );
    assert!(provider.get(&calm).is_ok());
}

#[test]
fn a_plugin_with_a_one_mebibyte_error_message() {
    let dir = private_dir();
    let path = compile_c(
        &c_test_source("huge_error.c"),
        &dir.path().join("libkms_h.so"),
        &[],
    );
    let provider = open_plugin(&path, dir.path(), "").unwrap();
    let id = KeyId::new("big").unwrap();

    for _ in 0..3 {
        let err = provider.get(&id).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        let message = err.message();
        // 4095 'a's: the two-byte character cut by the 4096-byte limit is dropped whole.
        assert_eq!(
            message,
            format!("{} (cut from 1048576 bytes)", "a".repeat(4095))
        );
        assert!(!message.contains('\u{fffd}'));
    }

    // open's message buffer is bounded the same way.
    let err = open_plugin(&path, dir.path(), "fail_open = true")
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.message().len() < 4096 + 40,
        "{} bytes",
        err.message().len()
    );
    host_is_alive();
}
