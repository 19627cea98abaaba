//! Bad input to the `kms` CLI and the library: hostile key ids, broken configuration files and
//! misuse of the commands. Each is refused with a clear one-line message naming the cause and
//! the documented exit status, and nothing is created or changed: the listing, the row count
//! and the bytes of the store file are the same before and after.
//!
//! The cases are data: `tests/data/bad_ids.txt`, `good_ids.txt` and `bad_configs.txt`.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;

use kms_core::{ErrorKind, KeyId};
use kms_tests::{Kms, assert_failure, data_file, data_rows, parse_id};

struct BadId {
    cli: bool,
    exit: i32,
    names: String,
    id: Vec<u8>,
}

fn bad_ids() -> Vec<BadId> {
    let rows: Vec<BadId> = data_rows("bad_ids.txt")
        .into_iter()
        .map(|fields| {
            assert_eq!(fields.len(), 4, "bad_ids.txt row {fields:?}");
            BadId {
                cli: match fields[0].as_str() {
                    "cli" => true,
                    "lib" => false,
                    other => panic!("bad_ids.txt: unknown place {other:?}"),
                },
                exit: fields[1].parse().expect("an exit status"),
                names: fields[2].clone(),
                id: parse_id(&fields[3]),
            }
        })
        .collect();
    assert!(rows.len() >= 20, "bad_ids.txt lost its cases");
    rows
}

/// What a hostile id may not do to a message: hold a control character (a forged log line, a
/// terminal escape) or reach it unshortened.
fn assert_tame_message(message: &str, id: &[u8]) {
    let body = message.strip_suffix('\n').unwrap_or(message);
    assert!(
        !body.chars().any(char::is_control),
        "the message about {id:?} holds a control character: {message:?}"
    );
    assert!(
        body.len() < 400,
        "the message about a long id is long: {message:?}"
    );
}

#[test]
fn library_refuses_every_hostile_id() {
    for case in bad_ids() {
        let err = KeyId::from_bytes(&case.id).expect_err("a hostile id was accepted");
        assert_eq!(err.kind(), ErrorKind::InvalidKeyId, "{err}");
        let message = err.to_string();
        assert!(message.contains("invalid key id"), "{message}");
        assert!(
            message.contains(&case.names),
            "the error for {:?} does not name {:?}: {message}",
            case.id,
            case.names
        );
        assert_tame_message(&message, &case.id);
        if let Ok(text) = std::str::from_utf8(&case.id) {
            let err = KeyId::new(text).expect_err("a hostile id was accepted by KeyId::new");
            assert_eq!(err.to_string(), message);
        }
    }
    // NUL is refused wherever it is, and the message shows it escaped.
    for raw in [&b"\0"[..], b"a\0", b"\0a", b"cluster/wal\0../x"] {
        let err = KeyId::from_bytes(raw).expect_err("NUL accepted");
        assert_eq!(err.kind(), ErrorKind::InvalidKeyId);
        assert!(err.to_string().contains("0x00"), "{err}");
        assert!(!err.to_string().contains('\0'), "{err:?}");
    }
}

#[test]
fn cli_refuses_every_hostile_id_and_touches_nothing() {
    let kms = Kms::new();
    let existing = kms.create("cluster/wal");
    let before = kms.snapshot();
    let mut checked = 0;
    for case in bad_ids().into_iter().filter(|c| c.cli) {
        let id = OsStr::from_bytes(&case.id);
        // `--` before the id, so that no id could pass for an option.
        let dash = OsStr::new("--");
        let commands: [&[&OsStr]; 5] = [
            &[OsStr::new("create"), dash, id],
            &[OsStr::new("get"), dash, id],
            &[OsStr::new("get-or-create"), dash, id],
            &[OsStr::new("rotate"), dash, id],
            &[OsStr::new("delete"), OsStr::new("--yes"), dash, id],
        ];
        for args in commands {
            let run = kms.fails(args, case.exit, &["invalid key id", &case.names]);
            assert_tame_message(&run.stderr, &case.id);
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} hostile commands ran");
    assert_eq!(kms.snapshot(), before, "a refused id changed the store");
    assert_eq!(kms.get("cluster/wal"), existing);
    let names: Vec<String> = fs::read_dir(&kms.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "files appeared in the store directory: {names:?}"
    );
}

#[test]
fn ids_at_the_edges_of_the_rules_are_accepted() {
    let kms = Kms::new();
    let ids: Vec<String> = data_file("good_ids.txt")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| String::from_utf8(parse_id(l)).expect("a text id"))
        .collect();
    assert!(
        ids.iter().any(|id| id.len() == 255),
        "the 255-byte id is missing"
    );
    let mut keys = Vec::new();
    for id in &ids {
        KeyId::new(id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        let key = kms.key(["get-or-create", id.as_str()]);
        assert_eq!(kms.get(id), key, "{id}");
        keys.push(key);
    }
    let mut listed: Vec<String> = kms.list().into_iter().map(|(id, _, _)| id).collect();
    let mut expected = ids.clone();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected);
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), ids.len(), "two ids share a key");
}

struct ConfigCase {
    exit: i32,
    fragments: Vec<String>,
    body: Option<String>,
}

fn config_cases() -> Vec<ConfigCase> {
    let mut cases: Vec<ConfigCase> = Vec::new();
    for line in data_file("bad_configs.txt").lines() {
        if let Some(head) = line.strip_prefix("== ") {
            let mut parts = head.split(" | ").map(str::trim);
            let exit = parts.next().unwrap().parse().expect("an exit status");
            cases.push(ConfigCase {
                exit,
                fragments: parts.map(str::to_string).collect(),
                body: Some(String::new()),
            });
        } else if let Some(case) = cases.last_mut() {
            match &mut case.body {
                Some(body) if line == "!missing" => {
                    assert!(body.is_empty(), "bad_configs.txt: text before !missing");
                    case.body = None;
                }
                Some(body) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None => assert!(line.is_empty(), "bad_configs.txt: text after !missing"),
            }
        } else {
            assert!(
                line.is_empty() || line.starts_with('#'),
                "bad_configs.txt: text before the first case: {line:?}"
            );
        }
    }
    assert!(cases.len() >= 8, "bad_configs.txt lost its cases");
    cases
}

#[test]
fn broken_configurations_are_refused_with_exit_2() {
    let kms = Kms::new();
    let key = kms.create("cfg/existing");
    let before = kms.snapshot();
    for (n, case) in config_cases().into_iter().enumerate() {
        let path = kms.root().join(format!("bad-{n}.toml"));
        let dir = kms.dir.display().to_string();
        let fill = |s: &str| {
            s.replace("{dir}", &dir)
                .replace("{config}", &path.display().to_string())
        };
        if let Some(body) = &case.body {
            fs::write(&path, fill(body)).unwrap();
        }
        let fragments: Vec<String> = case.fragments.iter().map(|f| fill(f)).collect();
        let fragments: Vec<&str> = fragments.iter().map(String::as_str).collect();
        for args in [
            &["list"][..],
            &["get", "cfg/existing"],
            &["create", "cfg/new"],
            &["get-or-create", "cfg/new"],
        ] {
            let mut full = vec![OsStr::new("--config"), path.as_os_str()];
            full.extend(args.iter().map(OsStr::new));
            let run = kms.run_bare(&full);
            assert_failure(&run, case.exit, &fragments);
        }
    }
    // No configuration at all.
    let run = kms.run_bare(["list"]);
    assert_failure(&run, 2, &["no configuration", "--config", "KMS_CONFIG"]);

    assert_eq!(
        kms.snapshot(),
        before,
        "a refused configuration changed the store"
    );
    assert_eq!(kms.get("cfg/existing"), key);
}

#[test]
fn misuse_of_commands_has_its_own_exit_status() {
    let kms = Kms::new();
    let key = kms.create("tables/payroll");
    let before = kms.snapshot();

    // delete without --yes: usage error, the key stays.
    kms.fails(
        ["delete", "tables/payroll"],
        2,
        &["--yes", "tables/payroll"],
    );
    assert_eq!(kms.get("tables/payroll"), key);

    // Missing keys and versions: 3, naming the id.
    kms.fails(
        ["get", "tables/missing"],
        3,
        &["\"tables/missing\"", "not found"],
    );
    kms.fails(
        ["get", "tables/payroll", "--version", "2"],
        3,
        &["\"tables/payroll\"", "no version 2"],
    );
    kms.fails(
        ["rotate", "tables/missing"],
        3,
        &["\"tables/missing\"", "not found"],
    );
    kms.fails(
        ["delete", "tables/missing", "--yes"],
        3,
        &["\"tables/missing\""],
    );

    // An existing key: 4, and its bytes are untouched.
    kms.fails(
        ["create", "tables/payroll"],
        4,
        &["\"tables/payroll\"", "already exists"],
    );
    kms.fails(
        ["create", "tables/payroll", "--bits", "128"],
        4,
        &["already exists"],
    );
    assert_eq!(kms.get("tables/payroll"), key);

    // A second init refuses to touch the store: 4.
    kms.fails(["init"], 4, &["already exists", "already initialised"]);

    // Bad key lengths, versions and formats are usage errors, caught by the argument parser.
    for args in [
        &["create", "tables/x", "--bits", "100"][..],
        &["create", "tables/x", "--bits", "512"],
        &["get-or-create", "tables/x", "--bits", "abc"],
        &["get", "tables/payroll", "--version", "-1"],
        &["get", "tables/payroll", "--format", "octal"],
        &["frobnicate"],
        &["get"],
    ] {
        let run = kms.run(args);
        assert_eq!(run.code, 2, "{run}");
        assert!(run.stdout.is_empty(), "{run}");
        // Usage errors are one line too, like every other error.
        assert_eq!(run.stderr.lines().count(), 1, "{run}");
        assert!(
            run.stderr.starts_with("kms: ") && run.stderr.trim_end().ends_with("see kms --help"),
            "{run}"
        );
    }
    assert_eq!(
        kms.snapshot(),
        before,
        "a refused command changed the store"
    );

    // An explicit, confirmed delete works, and then the key is gone (3).
    let run = kms.run(["delete", "tables/payroll", "--yes"]);
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stderr.contains("deleted key \"tables/payroll\""),
        "{run}"
    );
    kms.fails(["get", "tables/payroll"], 3, &["not found"]);
    assert!(kms.list().is_empty());
}
