//! The conformance suite against every provider loaded as a plugin: the shipped ones (file,
//! command, mock), the Rust example and the C example.

use kms_core::conformance::assert_conforms;
use kms_core::plugin::Plugin;
use kms_core::{ErrorKind, KeyId, KeySpec};
use kms_plugin_tests::{
    c_example_source, compile_c, init_and_open, open_plugin, plugin_path, private_dir,
};

#[test]
fn file_plugin_conforms() {
    let dir = private_dir();
    let provider = init_and_open(&plugin_path("file"), dir.path(), "dir = \"keys\"");
    assert_conforms(provider.as_ref());

    // The plugin resolved the relative directory against the configuration directory.
    let expected = format!("file provider at {}", dir.path().join("keys").display());
    assert_eq!(provider.to_string(), expected);
    assert!(provider.capabilities().durable);
}

#[test]
fn file_plugin_keys_survive_reopening() {
    let dir = private_dir();
    let id = KeyId::new("cluster/wal").unwrap();
    let first = {
        let provider = init_and_open(&plugin_path("file"), dir.path(), "dir = \"keys\"");
        provider.get_or_create(&id, KeySpec::default()).unwrap()
    };
    let provider = open_plugin(&plugin_path("file"), dir.path(), "dir = \"keys\"").unwrap();
    assert_eq!(
        provider.get(&id).unwrap().expose_secret(),
        first.expose_secret()
    );
}

#[test]
fn command_plugin_conforms() {
    let dir = private_dir();
    let options = "dir = \"store\"\npassphrase_command = \"echo correct-horse-battery\"\n\
                   iterations = 1000\ntimeout = 10.5";
    let provider = init_and_open(&plugin_path("command"), dir.path(), options);
    assert_conforms(provider.as_ref());
}

#[test]
fn mock_plugin_conforms() {
    let dir = private_dir();
    let provider = open_plugin(&plugin_path("mock"), dir.path(), "").unwrap();
    assert_conforms(provider.as_ref());
    assert_eq!(provider.to_string(), "mock provider");
    assert!(!provider.capabilities().durable);

    let plugin = Plugin::load(&plugin_path("mock")).unwrap();
    assert_eq!(
        (plugin.name(), plugin.version(), plugin.abi_version()),
        ("mock", env!("CARGO_PKG_VERSION"), 1)
    );
    assert_eq!(plugin.revision(), 3);
    assert!(!plugin.has_init());
}

#[test]
fn mock_plugin_options_cross_the_boundary() {
    let dir = private_dir();
    let path = plugin_path("mock");
    let provider = open_plugin(&path, dir.path(), "fail_next = 2\nfail_kind = \"denied\"").unwrap();
    let id = KeyId::new("a").unwrap();
    for _ in 0..2 {
        let err = provider.get(&id).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
        assert_eq!(err.key_id(), Some(&id));
        assert!(
            err.to_string()
                .starts_with("mock provider: injected denied"),
            "{err}"
        );
    }
    assert_eq!(provider.get(&id).unwrap_err().kind(), ErrorKind::NotFound);

    // The mock's strict options are checked inside the plugin, and the message comes back.
    let err = open_plugin(&path, dir.path(), "fail_kind = \"flaky\"")
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.to_string().contains("unknown fail_kind \"flaky\""),
        "{err}"
    );
    let err = open_plugin(&path, dir.path(), "latency = 5").err().unwrap();
    assert!(err.to_string().contains("latency"), "{err}");
    assert!(err.to_string().starts_with("mock plugin ("), "{err}");
}

#[test]
fn rust_example_plugin_conforms() {
    let dir = private_dir();
    let provider = init_and_open(
        &plugin_path("example"),
        dir.path(),
        "dir = \"example-keys\"",
    );
    assert_conforms(provider.as_ref());
    let expected = format!(
        "example provider at {}",
        dir.path().join("example-keys").display()
    );
    assert_eq!(provider.to_string(), expected);
}

#[test]
fn c_example_plugin_conforms() {
    let dir = private_dir();
    let path = compile_c(
        &c_example_source(),
        &dir.path().join("libkms_c_example.so"),
        &[],
    );
    let plugin = Plugin::load(&path).unwrap();
    assert_eq!((plugin.name(), plugin.version()), ("c-example", "0.1.0"));
    assert_eq!(plugin.revision(), 3);

    let provider = open_plugin(&path, dir.path(), "label = \"conformance\"").unwrap();
    assert_conforms(provider.as_ref());
    assert_eq!(provider.to_string(), "c example provider (conformance)");
    let caps = provider.capabilities();
    assert!(caps.list && caps.delete && caps.versions && !caps.durable);

    let err = open_plugin(&path, dir.path(), "colour = \"blue\"")
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("\"colour\""), "{err}");
}
