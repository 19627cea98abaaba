//! What `kms` prints: hex, base64 and raw output of the same key, key lengths, versions after a
//! rotation, and the `--dev` form.

use std::ffi::OsStr;

use base64::Engine;
use kms_tests::{Kms, Run, kms_command, parse_list};

#[test]
fn hex_base64_and_raw_print_the_same_bytes() {
    let kms = Kms::new();
    let run = kms.run(["create", "cluster/wal"]);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stderr.is_empty(), "{run}");
    // Exactly 64 lowercase hex digits and a newline.
    assert_eq!(run.stdout.len(), 65, "{run}");
    assert_eq!(run.stdout[64], b'\n');
    assert!(
        run.stdout[..64]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    );
    let key = hex::decode(&run.stdout[..64]).unwrap();
    kms.remember(&key);
    assert_eq!(kms.get("cluster/wal"), key);

    let run = kms.run(["get", "cluster/wal", "--format", "base64"]);
    assert_eq!(run.code, 0, "{run}");
    let line = run.stdout_text();
    let b64 = line.strip_suffix('\n').expect("one line");
    assert_eq!(b64.len(), 44);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("standard base64 with padding");
    assert_eq!(decoded, key);

    let run = kms.run(["get", "cluster/wal", "--format", "raw"]);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout, key, "raw output is the 32 bytes alone");

    // The other key-printing commands take the same formats.
    let run = kms.run(["get-or-create", "cluster/wal", "--format", "raw"]);
    assert_eq!(run.stdout, key);
    let run = kms.run(["create", "db/1", "--format", "raw"]);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout.len(), 32);
    kms.remember(&run.stdout);
    assert_eq!(kms.get("db/1"), run.stdout);
    assert_ne!(run.stdout, key);
}

#[test]
fn key_lengths() {
    let kms = Kms::new();
    for (bits, bytes) in [(128, 16), (192, 24), (256, 32)] {
        for command in ["create", "get-or-create"] {
            let id = format!("len/{command}/{bits}");
            let bits = bits.to_string();
            let run = kms.run([command, id.as_str(), "--bits", &bits, "--format", "raw"]);
            assert_eq!(run.code, 0, "{run}");
            assert_eq!(run.stdout.len(), bytes, "{run}");
            kms.remember(&run.stdout);
            let again = kms.get(&id);
            assert_eq!(again, run.stdout);
            // get-or-create of an existing key returns it, whatever --bits says.
            let run = kms.run(["get-or-create", id.as_str(), "--bits", "256"]);
            assert_eq!(kms_tests::parse_hex_line(&run.stdout), again);
        }
    }
    let listed = kms.list();
    assert_eq!(listed.len(), 6);
    for (id, version, bits) in listed {
        assert_eq!(version, 1);
        assert!(
            id.ends_with(&format!("/{bits}")),
            "{id} listed with {bits} bits"
        );
    }
}

#[test]
fn rotation_adds_versions_and_keeps_old_ones_readable() {
    let kms = Kms::new();
    let v1 = kms.create("cluster/wal");
    let other = kms.create("cluster/other");
    let v2 = kms.key(["rotate", "cluster/wal"]);
    assert_ne!(v1, v2);
    assert_eq!(kms.get("cluster/wal"), v2);
    assert_eq!(kms.key(["get", "cluster/wal", "--version", "1"]), v1);
    assert_eq!(kms.key(["get", "cluster/wal", "--version", "2"]), v2);
    let listed = kms.list();
    assert!(
        listed.contains(&("cluster/wal".to_string(), 2, 256)),
        "{listed:?}"
    );
    assert!(
        listed.contains(&("cluster/other".to_string(), 1, 256)),
        "{listed:?}"
    );

    let run = kms.run(["rotate", "cluster/wal", "--bits", "128", "--format", "raw"]);
    assert_eq!(run.code, 0, "{run}");
    let v3 = run.stdout;
    assert_eq!(v3.len(), 16);
    kms.remember(&v3);
    assert_eq!(kms.get("cluster/wal"), v3);
    assert_eq!(kms.key(["get", "cluster/wal", "--version", "1"]), v1);
    assert_eq!(kms.key(["get", "cluster/wal", "--version", "2"]), v2);
    assert_eq!(kms.get("cluster/other"), other);
    kms.fails(
        ["get", "cluster/wal", "--version", "4"],
        3,
        &["\"cluster/wal\"", "no version 4"],
    );
    assert!(kms.list().contains(&("cluster/wal".to_string(), 3, 128)));
    assert_eq!(kms.rows(), 4);
}

#[test]
fn dev_mode_initialises_once_and_keeps_its_keys() {
    let kms = Kms::uninitialised();
    let dev = kms.dir.as_os_str();
    let dev_run = |command: &str| {
        let args = [
            OsStr::new("--dev"),
            dev,
            OsStr::new(command),
            OsStr::new("demo/wal"),
        ];
        kms.checked(Run::of(kms_command(args)))
    };
    let first = dev_run("get-or-create");
    assert_eq!(first.code, 0, "{first}");
    assert!(first.stderr.contains("initialised"), "{first}");
    let key = kms_tests::parse_hex_line(&first.stdout);
    kms.remember(&key);
    kms.remember(&std::fs::read(kms.master_key_path()).unwrap());

    let second = dev_run("get");
    assert_eq!(second.code, 0, "{second}");
    assert!(second.stderr.is_empty(), "initialised twice: {second}");
    assert_eq!(kms_tests::parse_hex_line(&second.stdout), key);

    // The same store through a configuration file.
    assert_eq!(kms.get("demo/wal"), key);
    assert_eq!(
        parse_list(&kms.run(["list"]).stdout_text()),
        [("demo/wal".to_string(), 1, 256)]
    );
}
