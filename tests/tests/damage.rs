//! A damaged store, a wrong or exposed master key: each is refused with its own clearly worded
//! error, and nothing is re-initialised, rewritten or created over it.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;

use kms_core::SecretBytes;
use kms_tests::{Kms, Rng};

/// Every command that opens the store, for checks that all of them refuse.
const OPENING: [&[&str]; 6] = [
    &["list"],
    &["get", "tables/payroll"],
    &["get-or-create", "tables/new"],
    &["create", "tables/new"],
    &["rotate", "tables/payroll"],
    &["delete", "tables/payroll", "--yes"],
];

/// A store with three keys.
fn store_with_keys() -> (Kms, [Vec<u8>; 3]) {
    let kms = Kms::new();
    let keys = [
        kms.create("tables/payroll"),
        kms.create("tables/orders"),
        kms.create("cluster/wal"),
    ];
    (kms, keys)
}

fn file_len(path: &std::path::Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

#[test]
fn a_truncated_store_is_refused_and_never_reinitialised() {
    for (size, why) in [(0u64, "empty"), (100, "truncated"), (4096, "truncated")] {
        let (kms, _) = store_with_keys();
        kms.assert_no_wal();
        let store = kms.store_path();
        fs::OpenOptions::new()
            .write(true)
            .open(&store)
            .unwrap()
            .set_len(size)
            .unwrap();
        for args in OPENING {
            kms.fails(args, 1, &["damaged", why, &store.display().to_string()]);
            assert_eq!(file_len(&store), size, "{args:?} rewrote the store");
            kms.assert_no_wal();
        }
        // `init` refuses to start a new store over it.
        kms.fails(["init"], 4, &["already exists"]);
        assert_eq!(file_len(&store), size, "init rewrote the store");
        let names: Vec<_> = fs::read_dir(&kms.dir).unwrap().collect();
        assert_eq!(names.len(), 2, "files appeared next to the damaged store");
    }
}

#[test]
fn a_missing_store_is_not_silently_recreated() {
    let (kms, _) = store_with_keys();
    fs::remove_file(kms.store_path()).unwrap();
    for args in OPENING {
        kms.fails(args, 1, &["keys.db", "missing", "backup"]);
        assert!(!kms.store_path().exists(), "{args:?} created a new store");
    }
}

#[test]
fn a_flipped_byte_in_a_wrapped_key_fails_its_integrity_check() {
    let mut rng = Rng::from_os("flipped byte");
    let (kms, [payroll, orders, wal]) = store_with_keys();
    let wrapped: Vec<u8> = kms
        .sqlite()
        .query_row(
            "SELECT wrapped FROM keys WHERE id = ?1 AND version = 1",
            ["tables/payroll"],
            |row| row.get(0),
        )
        .unwrap();
    // Every connection is closed, so the store file alone holds the rows.
    kms.assert_no_wal();
    let store = kms.store_path();
    let bytes = fs::read(&store).unwrap();
    let hits: Vec<usize> = bytes
        .windows(wrapped.len())
        .enumerate()
        .filter(|(_, w)| *w == wrapped.as_slice())
        .map(|(at, _)| at)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "the wrapped key is not in the file exactly once"
    );
    let at = hits[0] + rng.range(0, wrapped.len() as u64 - 1) as usize;
    let mask = 1u8 << rng.range(0, 7);
    let mut file = fs::OpenOptions::new().write(true).open(&store).unwrap();
    file.seek(SeekFrom::Start(at as u64)).unwrap();
    file.write_all(&[bytes[at] ^ mask]).unwrap();
    drop(file);

    for args in [
        &["get", "tables/payroll"][..],
        &["get", "tables/payroll", "--version", "1"],
        &["get-or-create", "tables/payroll"],
    ] {
        kms.fails(args, 1, &["\"tables/payroll\"", "integrity"]);
    }
    // The other keys still read, the listing still works, nothing was replaced.
    assert_eq!(kms.get("tables/orders"), orders);
    assert_eq!(kms.get("cluster/wal"), wal);
    assert_eq!(kms.list().len(), 3);
    assert_eq!(kms.rows(), 3);
    let _ = payroll;
}

#[test]
fn a_wrapped_key_moved_to_another_id_or_version_is_detected() {
    let (kms, [payroll, orders, _]) = store_with_keys();
    let orders_v2 = kms.key(["rotate", "tables/orders"]);
    let conn = kms.sqlite();
    let moved = conn
        .execute(
            "UPDATE keys SET wrapped = (SELECT wrapped FROM keys WHERE id = 'tables/payroll') \
             WHERE id = 'cluster/wal'",
            [],
        )
        .unwrap();
    assert_eq!(moved, 1);
    let moved = conn
        .execute(
            "UPDATE keys SET wrapped = (SELECT wrapped FROM keys WHERE id = ?1 AND version = 1) \
             WHERE id = ?1 AND version = 2",
            ["tables/orders"],
        )
        .unwrap();
    assert_eq!(moved, 1);
    drop(conn);

    kms.fails(
        ["get", "cluster/wal"],
        1,
        &["\"cluster/wal\"", "another key id"],
    );
    kms.fails(["get-or-create", "cluster/wal"], 1, &["another key id"]);
    kms.fails(
        ["get", "tables/orders"],
        1,
        &["\"tables/orders\" version 2", "another key id or version"],
    );
    // The blob's own row and the untouched version still read.
    assert_eq!(kms.get("tables/payroll"), payroll);
    assert_eq!(kms.key(["get", "tables/orders", "--version", "1"]), orders);
    assert_ne!(orders, orders_v2);
}

#[test]
fn a_wrong_master_key_is_refused_as_wrong_kek() {
    let (kms, keys) = store_with_keys();
    let before = kms.snapshot();
    let original = fs::read(kms.master_key_path()).unwrap();
    let other = SecretBytes::random(32).unwrap();
    kms.remember(other.expose_secret());
    fs::write(kms.master_key_path(), other.expose_secret()).unwrap();
    assert_eq!(
        fs::metadata(kms.master_key_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    for args in OPENING {
        kms.fails(args, 1, &["wrong KEK", "fingerprint"]);
    }
    // A key file of the wrong length is a different error.
    fs::write(kms.master_key_path(), &other.expose_secret()[..31]).unwrap();
    kms.fails(["list"], 1, &["master.key", "exactly 32 bytes", "31"]);

    // With the right key back, nothing was changed or created.
    fs::write(kms.master_key_path(), &original).unwrap();
    assert_eq!(kms.snapshot(), before);
    assert_eq!(kms.get("tables/payroll"), keys[0]);
}

#[test]
fn exposed_or_redirected_secrets_are_refused() {
    let (kms, keys) = store_with_keys();
    let before = kms.snapshot();
    let key_path = kms.master_key_path();
    let shown_key = key_path.display().to_string();
    let shown_dir = kms.dir.display().to_string();
    let set_mode = |path: &std::path::Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };

    for mode in [0o644, 0o640, 0o604, 0o660] {
        set_mode(&key_path, mode);
        let shown_mode = format!("{mode:04o}");
        for args in OPENING {
            let fix = format!("chmod 600 {shown_key}");
            kms.fails(args, 1, &["refusing", &shown_mode, &fix]);
        }
    }
    set_mode(&key_path, 0o600);

    for mode in [0o755, 0o750, 0o701] {
        set_mode(&kms.dir, mode);
        let shown_mode = format!("{mode:04o}");
        let fix = format!("chmod 700 {shown_dir}");
        for args in OPENING {
            kms.fails(args, 1, &["refusing", &shown_mode, &fix]);
        }
    }
    set_mode(&kms.dir, 0o700);

    // The master key as a symbolic link to a private copy: refused all the same.
    let elsewhere = kms.root().join("master.key.real");
    fs::rename(&key_path, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &key_path).unwrap();
    for args in OPENING {
        kms.fails(args, 1, &["refusing", &shown_key, "symbolic link"]);
    }
    fs::remove_file(&key_path).unwrap();
    fs::rename(&elsewhere, &key_path).unwrap();

    // The store directory as a symbolic link.
    let real_dir = kms.root().join("store.real");
    fs::rename(&kms.dir, &real_dir).unwrap();
    std::os::unix::fs::symlink(&real_dir, &kms.dir).unwrap();
    for args in OPENING {
        kms.fails(args, 1, &["refusing", &shown_dir, "symbolic link"]);
    }
    fs::remove_file(&kms.dir).unwrap();
    fs::rename(&real_dir, &kms.dir).unwrap();

    // Put right, everything is as it was.
    assert_eq!(kms.snapshot(), before);
    assert_eq!(kms.get("tables/payroll"), keys[0]);
}
