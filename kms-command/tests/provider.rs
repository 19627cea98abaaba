//! The command provider against real shell commands: output rules, timeouts, stored KDF
//! parameters, wrong passphrases, slots, and the conformance suite.

use std::path::Path;
use std::time::{Duration, Instant};

use kms_command::{Options, SlotChange};
use kms_core::{ErrorKind, KeyId, KeyLen, KeyProvider, KeySpec, SecretBytes};

fn options(dir: &Path, command: &str) -> Options {
    Options {
        dir: dir.join("store"),
        passphrase_command: command.to_string(),
        timeout: 5.0,
        iterations: 1000,
    }
}

fn init(dir: &Path, command: &str) -> Options {
    let options = options(dir, command);
    kms_command::init(&options).unwrap();
    options
}

fn with_command(options: &Options, command: &str) -> Options {
    Options {
        passphrase_command: command.to_string(),
        ..options.clone()
    }
}

fn store_rows(options: &Options) -> Vec<(String, Vec<u8>)> {
    let conn = rusqlite::Connection::open(options.dir.join("keys.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, value FROM meta ORDER BY name")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

fn edit_meta(options: &Options, name: &str, value: &[u8]) {
    let conn = rusqlite::Connection::open(options.dir.join("keys.db")).unwrap();
    conn.execute(
        "UPDATE meta SET value = ?1 WHERE name = ?2",
        rusqlite::params![value, name],
    )
    .unwrap();
}

#[test]
fn conformance() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let provider = kms_command::open(&options).unwrap();
    kms_core::conformance::assert_conforms(&provider);
}

#[test]
fn printf_echo_and_crlf_unlock_the_same_store() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let id = KeyId::new("a/b").unwrap();
    let key = kms_command::open(&options)
        .unwrap()
        .create(&id, KeySpec::default())
        .unwrap();
    for command in [
        "printf pw",
        "echo pw",
        "printf 'pw\\r\\n'",
        "printf '%%s\\n' pw",
    ] {
        let provider = kms_command::open(&with_command(&options, command)).unwrap();
        assert_eq!(provider.get(&id).unwrap(), key, "{command}");
    }
    // Spaces are part of the passphrase.
    let err = kms_command::open(&with_command(&options, "printf ' pw'"))
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
}

#[test]
fn bad_outputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let before = store_rows(&options);
    let cases = [
        (
            "printf 'a\\nb'",
            ErrorKind::InvalidInput,
            "more than one line",
        ),
        ("printf ''", ErrorKind::InvalidInput, "is empty"),
        ("true", ErrorKind::InvalidInput, "is empty"),
        ("printf 'p\\0w'", ErrorKind::InvalidInput, "NUL"),
        (
            "printf pw; exit 1",
            ErrorKind::Denied,
            "exited with status 1",
        ),
        (
            "echo 'no such vault' >&2; exit 3",
            ErrorKind::Denied,
            "no such vault",
        ),
        (
            "head -c 5000 /dev/zero | tr '\\0' a",
            ErrorKind::InvalidInput,
            "longer than 4096",
        ),
        (
            "printf wrong",
            ErrorKind::WrongPassphrase,
            "wrong passphrase",
        ),
    ];
    for (command, kind, text) in cases {
        let err = kms_command::open(&with_command(&options, command))
            .err()
            .unwrap();
        assert_eq!(err.kind(), kind, "{command}: {err}");
        let message = err.to_string();
        assert!(message.contains(text), "{command}: {message}");
        assert!(
            !message.contains("pw\""),
            "{command} leaks the passphrase: {message}"
        );
    }
    assert_eq!(
        store_rows(&options),
        before,
        "a failed unlock wrote to the store"
    );
}

/// Whether the process `pid` is gone (or a zombie awaiting its reaper).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

#[test]
fn hanging_commands_are_killed_with_their_group() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let pid_file = tmp.path().join("pid");
    let pid_path = pid_file.display();
    let hanging = [
        format!("echo $$ > {pid_path}; sleep 3600"),
        format!("sleep 3600 & echo $! > {pid_path}; printf pw"),
    ];
    for command in hanging {
        let _ = std::fs::remove_file(&pid_file);
        let slow = Options {
            timeout: 1.0,
            ..with_command(&options, &command)
        };
        let started = Instant::now();
        let err = kms_command::open(&slow).err().unwrap();
        let took = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(
            err.to_string()
                .contains("timed out after 1s and was killed"),
            "{err}"
        );
        // The bound: killed within the timeout plus 2 seconds.
        assert!(took < Duration::from_secs(3), "{command}: took {took:?}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !is_gone(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(is_gone(pid), "{command}: process {pid} survived");
    }
}

#[test]
fn stored_iterations_outlive_the_default_and_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let strong = Options {
        iterations: 600_000,
        ..options(tmp.path(), "printf pw")
    };
    kms_command::init(&strong).unwrap();
    let id = KeyId::new("k").unwrap();
    let key = kms_command::open(&strong)
        .unwrap()
        .create(&id, KeySpec::default())
        .unwrap();

    // The default for new slots changes: the store keeps opening with its own parameters.
    let weaker_default = Options {
        iterations: 2000,
        ..strong.clone()
    };
    assert_eq!(
        kms_command::open(&weaker_default)
            .unwrap()
            .get(&id)
            .unwrap(),
        key
    );
    let slots = kms_command::list_slots(&weaker_default).unwrap();
    assert_eq!(slots[0].iterations, 600_000);

    // An edited iteration count is refused at once, before any derivation.
    let kdf = store_rows(&strong)
        .into_iter()
        .find(|(n, _)| n == "command.kdf.primary")
        .unwrap();
    let original = String::from_utf8(kdf.1.clone()).unwrap();
    for edited in ["0", "1099511627776", "-5", "x"] {
        let text = original.replace("iterations=600000", &format!("iterations={edited}"));
        edit_meta(&strong, "command.kdf.primary", text.as_bytes());
        let started = Instant::now();
        let err = kms_command::open(&strong).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Corrupted, "{edited}: {err}");
        assert!(
            err.to_string().contains("invalid KDF parameters"),
            "{edited}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{edited}: not refused at once"
        );
    }
    edit_meta(&strong, "command.kdf.primary", original.as_bytes());
    assert_eq!(kms_command::open(&strong).unwrap().get(&id).unwrap(), key);
}

#[test]
fn damaged_slot_is_not_a_wrong_passphrase() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let (name, mut blob) = store_rows(&options)
        .into_iter()
        .find(|(n, _)| n == "command.slot.primary.1")
        .unwrap();
    blob[3] ^= 0x40;
    edit_meta(&options, &name, &blob);
    let err = kms_command::open(&options).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert!(err.to_string().contains("slot \"primary\""), "{err}");
}

#[test]
fn slots_add_change_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let id = KeyId::new("x").unwrap();
    let key = kms_command::open(&options)
        .unwrap()
        .create(&id, KeySpec::default())
        .unwrap();
    let secret = |s: &str| SecretBytes::copy_from(s.as_bytes());

    kms_command::set_slot(&options, "recovery", SlotChange::Add, &secret("rec")).unwrap();
    let err = kms_command::set_slot(&options, "recovery", SlotChange::Add, &secret("r2"));
    assert_eq!(err.unwrap_err().kind(), ErrorKind::AlreadyExists);
    let recovery = with_command(&options, "printf rec");
    assert_eq!(kms_command::open(&recovery).unwrap().get(&id).unwrap(), key);

    kms_command::set_slot(&recovery, "primary", SlotChange::Change, &secret("new")).unwrap();
    let err = kms_command::open(&options).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    let renewed = with_command(&options, "printf new");
    assert_eq!(kms_command::open(&renewed).unwrap().get(&id).unwrap(), key);

    kms_command::remove_slot(&renewed, "recovery").unwrap();
    assert_eq!(
        kms_command::open(&recovery).err().unwrap().kind(),
        ErrorKind::WrongPassphrase
    );
    let err = kms_command::remove_slot(&renewed, "primary").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("last one"), "{err}");
    // With two slots, the one the configured command opens cannot go: kms would be locked out.
    kms_command::set_slot(&renewed, "recovery", SlotChange::Add, &secret("rec")).unwrap();
    let err = kms_command::remove_slot(&renewed, "primary").unwrap_err();
    assert!(
        err.to_string()
            .contains("the configured passphrase_command opens"),
        "{err}"
    );
    kms_command::remove_slot(&recovery, "primary").unwrap();
    assert_eq!(kms_command::open(&recovery).unwrap().get(&id).unwrap(), key);
    let err = kms_command::set_slot(&recovery, "../x", SlotChange::Add, &secret("a"));
    assert_eq!(err.unwrap_err().kind(), ErrorKind::InvalidInput);
}

#[test]
fn kek_rotation_rewraps_every_key_and_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let provider = kms_command::open(&options).unwrap();
    let mut keys = Vec::new();
    for i in 0..300 {
        let id = KeyId::new(&format!("db/{i}")).unwrap();
        keys.push(provider.create(&id, KeySpec::default()).unwrap());
    }
    let rotated_key = provider.rotate(keys[0].id(), KeySpec::default()).unwrap();
    drop(provider);

    let rotated = kms_command::rotate_kek(&options, |_| {}).unwrap();
    assert_eq!(
        (rotated.from, rotated.to, rotated.rewrapped, rotated.resumed),
        (1, 2, 301, false)
    );
    let provider = kms_command::open(&options).unwrap();
    for key in &keys[1..] {
        assert_eq!(&provider.get(key.id()).unwrap(), key);
    }
    assert_eq!(provider.get_version(keys[0].id(), 1).unwrap(), keys[0]);
    assert_eq!(provider.get(keys[0].id()).unwrap(), rotated_key);

    // The old generation is gone from the store's metadata, the new one recorded.
    let names: Vec<String> = store_rows(&options).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"command.slot.primary.2".to_string()),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".1") || n == "kek.1.fingerprint"),
        "{names:?}"
    );
}

/// The rotation re-wraps its rows in batches: one damaged blob among 700 keys stops it with
/// an error naming that key, every key stays readable, and once the blob is restored the
/// rotation resumes and finishes.
#[test]
fn kek_rotation_stops_at_a_damaged_blob_naming_it_and_resumes_once_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let provider = kms_command::open(&options).unwrap();
    let mut keys = Vec::new();
    for i in 0..700 {
        let id = KeyId::new(&format!("db/{i}")).unwrap();
        let len = [KeyLen::Aes128, KeyLen::Aes192, KeyLen::Aes256][i % 3];
        keys.push(provider.create(&id, KeySpec::new(len)).unwrap());
    }
    drop(provider);

    // Damage the blob of one key past the first transaction of the rotation (512 rows).
    let conn = rusqlite::Connection::open(options.dir.join("keys.db")).unwrap();
    let victim = "db/600";
    let blob: Vec<u8> = conn
        .query_row("SELECT wrapped FROM keys WHERE id = ?1", [victim], |r| {
            r.get(0)
        })
        .unwrap();
    let mut damaged = blob.clone();
    damaged[20] ^= 0x01;
    let set_blob = |b: &[u8]| {
        conn.execute(
            "UPDATE keys SET wrapped = ?1 WHERE id = ?2",
            rusqlite::params![b, victim],
        )
        .unwrap()
    };
    set_blob(&damaged);

    let err = kms_command::rotate_kek(&options, |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert_eq!(err.key_id().map(KeyId::as_str), Some(victim), "{err}");
    let provider = kms_command::open(&options).unwrap();
    for key in keys.iter().filter(|k| k.id().as_str() != victim) {
        assert_eq!(&provider.get(key.id()).unwrap(), key);
    }
    drop(provider);

    set_blob(&blob);
    let rotated = kms_command::rotate_kek(&options, |_| {}).unwrap();
    assert_eq!((rotated.from, rotated.to, rotated.resumed), (1, 2, true));
    assert!(
        rotated.rewrapped >= 1 && rotated.rewrapped < 700,
        "{rotated:?}"
    );
    let provider = kms_command::open(&options).unwrap();
    for key in &keys {
        assert_eq!(&provider.get(key.id()).unwrap(), key);
    }
}

#[test]
fn a_provider_opened_before_a_rotation_cannot_write_under_the_retired_kek() {
    let tmp = tempfile::tempdir().unwrap();
    let options = init(tmp.path(), "printf pw");
    let stale = kms_command::open(&options).unwrap();
    kms_command::rotate_kek(&options, |_| {}).unwrap();
    let err = stale
        .create(&KeyId::new("late").unwrap(), KeySpec::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKek, "{err}");
    assert!(err.to_string().contains("retired"), "{err}");
    let fresh = kms_command::open(&options).unwrap();
    assert_eq!(
        fresh.get(&KeyId::new("late").unwrap()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
