//! The ABI's promises, checked: the C header and the Rust twin agree, and a plugin built
//! against an older revision of ABI version 1 still loads, with the functions it lacks treated
//! as unsupported.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use kms_core::conformance::{assert_conforms, run};
use kms_core::plugin::Plugin;
use kms_core::plugin::abi::{self, KmsKey, KmsKeyInfo, KmsMessage, KmsOption, KmsProviderV1Table};
use kms_core::{ErrorKind, KeyId, KeySpec};
use kms_plugin_tests::{c_example_source, c_test_source, open_plugin, private_dir, workspace_root};

/// What `c/abi_layout.c`, compiled against the header, prints.
fn header_facts() -> HashMap<String, i64> {
    let dir = private_dir();
    let program = dir.path().join("abi_layout");
    let status = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-I"])
        .arg(workspace_root().join("include"))
        .arg("-o")
        .arg(&program)
        .arg(c_test_source("abi_layout.c"))
        .status()
        .unwrap();
    assert!(status.success());
    let output = Command::new(&program).output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (name, value) = line.split_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn the_c_header_and_abi_rs_agree() {
    let facts = header_facts();
    let fact = |name: &str| facts[name] as usize;

    assert_eq!(fact("size.table"), size_of::<KmsProviderV1Table>());
    assert_eq!(fact("size.table"), abi::TABLE_SIZE_REVISION_3);
    assert_eq!(fact("size.revision_2"), abi::TABLE_SIZE_REVISION_2);
    assert_eq!(fact("size.revision_1"), abi::TABLE_SIZE_REVISION_1);
    assert_eq!(fact("size.option"), size_of::<KmsOption>());
    assert_eq!(fact("size.key"), size_of::<KmsKey>());
    assert_eq!(fact("size.key_info"), size_of::<KmsKeyInfo>());
    assert_eq!(fact("size.message"), size_of::<KmsMessage>());
    assert_eq!(fact("offset.key_version"), offset_of!(KmsKey, version));
    assert_eq!(fact("offset.info_created"), offset_of!(KmsKeyInfo, created));
    assert_eq!(fact("offset.message_len"), offset_of!(KmsMessage, len));

    macro_rules! same_offsets {
        ($($field:ident),*) => {$(
            assert_eq!(
                fact(concat!("offset.", stringify!($field))),
                offset_of!(KmsProviderV1Table, $field),
                stringify!($field)
            );
        )*};
    }
    same_offsets!(
        abi_version,
        table_size,
        name,
        version,
        open,
        init,
        get,
        create,
        get_or_create,
        list,
        delete_key,
        capabilities,
        free_key,
        close,
        last_error,
        get_version,
        rotate,
        display_name,
        import
    );

    assert_eq!(
        facts["const.KMS_ABI_VERSION"],
        i64::from(abi::KMS_ABI_VERSION)
    );
    assert_eq!(facts["const.KMS_OK"], i64::from(abi::KMS_OK));
    assert_eq!(facts["const.KMS_MESSAGE_CAP"], abi::KMS_MESSAGE_CAP as i64);
    for (cap, bit) in [
        ("LIST", abi::KMS_CAP_LIST),
        ("DELETE", abi::KMS_CAP_DELETE),
        ("VERSIONS", abi::KMS_CAP_VERSIONS),
        ("DURABLE", abi::KMS_CAP_DURABLE),
    ] {
        assert_eq!(
            facts[&format!("const.KMS_CAP_{cap}")],
            i64::from(bit),
            "{cap}"
        );
    }

    // Every error kind has its constant, with the number kms-core gives it.
    for kind in ErrorKind::ALL {
        let name = format!(
            "const.KMS_ERR_{}",
            kind.code().to_uppercase().replace('-', "_")
        );
        let value = facts
            .get(&name)
            .unwrap_or_else(|| panic!("the header lacks {name}"));
        assert_eq!(*value, i64::from(abi::status_of(kind)), "{name}");
    }
}

#[test]
fn a_revision_1_plugin_loads_and_lacks_only_the_appended_functions() {
    let dir = private_dir();
    let path = kms_plugin_tests::compile_c(
        &c_example_source(),
        &dir.path().join("libkms_c_example.so"),
        &["-DKMS_EXAMPLE_AS_REVISION_1"],
    );

    let plugin = Plugin::load(&path).unwrap();
    assert_eq!(plugin.table_size(), abi::TABLE_SIZE_REVISION_1);
    assert_eq!((plugin.revision(), plugin.version()), (1, "0.1.0-r1"));

    let provider = open_plugin(&path, dir.path(), "").unwrap();

    // The plugin claims versions, but its table has no get_version or rotate.
    assert!(!provider.capabilities().versions);
    assert!(provider.capabilities().list && provider.capabilities().delete);
    let id = KeyId::new("old/rev").unwrap();
    provider.create(&id, KeySpec::default()).unwrap();
    for err in [
        provider.rotate(&id, KeySpec::default()).unwrap_err(),
        provider.get_version(&id, 1).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    }

    // No display_name either: the host names it.
    assert_eq!(
        provider.to_string(),
        format!("c-example plugin ({})", path.display())
    );

    // Everything of revision 1 conforms; the versions check is skipped, not failed.
    assert_conforms(provider.as_ref());
    let report = run(provider.as_ref(), "rev1/");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.skipped.len(), 1, "{report:?}");
}
