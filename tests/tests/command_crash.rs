//! The command provider under SIGKILL, with the real `kms` binary: a KEK rotation over 10,000
//! keys killed at 20 points, a passphrase change killed at 20 points; and the passphrase
//! command's output rules through the CLI.
//!
//! Every store here uses 1,000 PBKDF2 iterations instead of the default 600,000, to keep the
//! tests fast. The iteration count only sets how long each derivation takes: it changes
//! neither what is written, nor in which transactions, nor in which order, so it changes
//! nothing of what these tests show (the kill points are chosen from measured durations).
//!
//! Set `KMS_TEST_SEED` to replay a run's kill points; `--nocapture` shows where each kill
//! landed.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::thread;
use std::time::{Duration, Instant};

use kms_command::Options;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_tests::{KekState, KillAt, Kms, ROTATION_META, Rng, Run, command_config, kms_command};

/// PBKDF2 iterations of every store here (see the module documentation).
const ITERATIONS: u32 = 1000;

/// Keys and their bytes, as created.
type Keys = Vec<(KeyId, Vec<u8>)>;

fn write_config(kms: &Kms, passphrase_command: &str) {
    let text = command_config(&kms.dir, passphrase_command, ITERATIONS);
    fs::write(&kms.config, text).expect("write the configuration");
}

/// The in-process options matching the configuration `write_config` writes.
fn options(kms: &Kms, passphrase_command: &str) -> Options {
    Options {
        dir: kms.dir.clone(),
        passphrase_command: passphrase_command.to_string(),
        timeout: 10.0,
        iterations: ITERATIONS,
    }
}

/// A command-provider store made by `kms init`, unlocked by `passphrase_command`.
fn command_store(passphrase_command: &str) -> Kms {
    Kms::init_with(|dir| command_config(dir, passphrase_command, ITERATIONS))
}

/// Creates `count` keys in-process from `threads` threads (the store group-commits them).
fn create_keys(options: &Options, count: usize, threads: usize) -> Keys {
    let provider = kms_command::open(options).expect("open the new store");
    let provider = &provider;
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..count)
                        .step_by(threads)
                        .map(|i| {
                            let id = KeyId::new(&format!("db/{t}/{i}")).unwrap();
                            let key = provider
                                .create(&id, KeySpec::default())
                                .unwrap_or_else(|e| panic!("create {id}: {e}"));
                            (id, key.expose_secret().to_vec())
                        })
                        .collect::<Keys>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a creating thread"))
            .collect()
    })
}

/// Opens the store in-process and reads every key of `keys` back with identical bytes.
fn check_keys<'a>(
    options: &Options,
    keys: impl IntoIterator<Item = &'a (KeyId, Vec<u8>)>,
    context: &str,
) {
    let provider = kms_command::open(options)
        .unwrap_or_else(|e| panic!("{context}: the store does not open: {e}"));
    for (id, bytes) in keys {
        let got = provider
            .get(id)
            .unwrap_or_else(|e| panic!("{context}: key {id} does not read: {e}"));
        assert!(
            got.expose_secret() == bytes.as_slice(),
            "{context}: key {id} changed"
        );
    }
}

/// A copy of the store directory (0700) and a configuration naming it, in a new temporary
/// directory.
fn copy_store(kms: &Kms) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("store");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("the copy's directory");
    for entry in fs::read_dir(&kms.dir).expect("list the store directory") {
        let entry = entry.expect("a directory entry");
        if entry.file_type().expect("a file type").is_file() {
            fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy a store file");
        }
    }
    let config = tmp.path().join("kms.toml");
    let text = command_config(&dir, "printf pw", ITERATIONS);
    fs::write(&config, text).expect("write the copy's configuration");
    (tmp, config)
}

/// Asserts that a `kms rotate-kek` that exited 0 says whether it resumed, and rightly.
fn assert_finished(run: &Run, resuming: bool, context: &str) {
    assert_eq!(run.code, 0, "{context}: {run}");
    let resumed = run
        .stderr
        .contains("kms: resumed and finished the KEK rotation");
    let fresh = run.stderr.contains("kms: finished the KEK rotation");
    assert!(
        if resuming { resumed } else { fresh },
        "{context}: resuming={resuming}: {run}"
    );
}

const KEYS: usize = 10_000;

/// 10,000 keys; `kms rotate-kek` killed with SIGKILL 20 times: at 18 random points, three
/// within 20 ms of the start and fifteen spread over 1.1 x the measured duration of one
/// rotation, and twice at the start of phase 3 (every key re-wrapped, the switch not made).
/// After every kill the store opens and every key reads back with identical bytes; after
/// every odd-numbered kill that left a rotation in progress, `kms rotate-kek` resumes it and
/// says so. Finally a rotation runs to completion and leaves no trace of an unfinished one.
#[test]
fn sigkill_during_kek_rotation_loses_no_key() {
    let started = Instant::now();
    let mut rng = Rng::from_os("kek rotation kills");
    let kms = command_store("printf pw");
    let options = options(&kms, "printf pw");
    let keys = create_keys(&options, KEYS, 8);
    assert_eq!(keys.len(), KEYS);
    // Stderr is checked for these keys after every run (a sample: the check is quadratic).
    for _ in 0..100 {
        kms.remember(&keys[rng.range(0, KEYS as u64 - 1) as usize].1);
    }
    let created = started.elapsed();
    KekState::read(&kms, "after creating").check(KEYS as u64, "after creating");
    check_keys(&options, &keys, "after creating");
    let checked = started.elapsed() - created;

    // One whole rotation on a copy of the store: how long one takes here, and what it prints
    // before the line that reports the last batch, after which phase 3 begins.
    let (copy, copy_config) = copy_store(&kms);
    let timer = Instant::now();
    let run = Run::of(kms_command([
        "--config".as_ref(),
        copy_config.as_os_str(),
        "rotate-kek".as_ref(),
    ]));
    let full = timer.elapsed();
    drop(copy);
    assert_finished(&run, false, "the measured rotation");
    assert!(
        run.stderr
            .contains(&format!("from generation 1 to 2: {KEYS} keys re-wrapped")),
        "{run}"
    );
    let last_batch = format!("kms: re-wrapped {KEYS} keys\n");
    let before_phase_3 = run
        .stderr
        .find(&last_batch)
        .unwrap_or_else(|| panic!("no line {last_batch:?}: {run}"));
    eprintln!(
        "{KEYS} keys created in {created:.1?}, all read in {checked:.1?}; \
         one rotation takes {full:.1?}"
    );

    // The kill points. Rounds that follow an odd round start a fresh rotation (an odd round
    // finishes what its kill left), so the early kills, meant for phase 1, and the phase 3
    // kills, whose stderr must be that of a fresh rotation, are put in even rounds.
    let span = (full.as_micros() as u64 * 11 / 10).max(60_000);
    let mut plan: Vec<KillAt> = rng
        .stratified(15, 20_000, span)
        .into_iter()
        .map(KillAt::Delay)
        .collect();
    for round in [0, 2, 4] {
        let early = Duration::from_micros(rng.range(0, 20_000));
        plan.insert(round, KillAt::Delay(early));
    }
    let mut later_even: Vec<usize> = (6..20).step_by(2).collect();
    rng.shuffle(&mut later_even);
    let mut phase_3_rounds = later_even[..2].to_vec();
    phase_3_rounds.sort();
    for &round in &phase_3_rounds {
        plan.insert(round, KillAt::StderrFull(before_phase_3));
    }
    assert_eq!(plan.len(), 20);

    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut resumed_runs = 0;
    for (round, at) in plan.into_iter().enumerate() {
        let context = format!("kill {round}");
        let before = KekState::read(&kms, &context);
        let resuming = before.rotation.is_some();
        let run = kms.run_and_kill(&["rotate-kek"], at);
        assert!(
            matches!(run.code, 0 | 137),
            "{context}: neither finished nor killed: {run}"
        );
        assert!(run.stdout.is_empty(), "{context}: {run}");
        if run.code == 0 {
            assert_finished(&run, resuming, &context);
            resumed_runs += usize::from(resuming);
        }

        // Where the kill landed, from what the store holds now.
        let after = KekState::read(&kms, &context);
        after.check(KEYS as u64, &context);
        let phase = after.rotation_phase(&run, &before);
        if let KillAt::StderrFull(_) = at {
            assert!(!resuming, "{context}: a phase 3 kill in a resumed rotation");
            assert_eq!(
                phase, "phase 3, every key re-wrapped, before the switch",
                "{context}: {run}"
            );
        }
        let how = if resuming { "resuming" } else { "fresh" };
        *phases.entry(format!("{phase} ({how})")).or_default() += 1;
        eprintln!(
            "{context}: {at:?}, {how}: {phase}; generation {} -> {}, rotation {:?} -> {:?}, \
             rows {:?}",
            before.current, after.current, before.rotation, after.rotation, after.rows
        );
        check_keys(&options, &keys, &context);

        if round % 2 == 1 && after.rotation.is_some() {
            let run = kms.run(["rotate-kek"]);
            assert_finished(&run, true, &format!("{context}, resumed"));
            resumed_runs += 1;
            let done = KekState::read(&kms, &context);
            done.check(KEYS as u64, &format!("{context}, resumed"));
            assert_eq!((done.current, done.rotation), (after.current + 1, None));
        }
    }

    // A rotation that completes, and leaves no trace of an unfinished one.
    let before = KekState::read(&kms, "the last rotation");
    let run = kms.run(["rotate-kek"]);
    assert_finished(&run, before.rotation.is_some(), "the last rotation");
    let end = KekState::read(&kms, "at the end");
    end.check(KEYS as u64, "at the end");
    assert_eq!(end.rotation, None, "{end:?}");
    assert!(!end.meta.iter().any(|n| n == ROTATION_META), "{end:?}");
    assert_eq!(
        end.rows,
        BTreeMap::from([(end.current, KEYS as u64)]),
        "{end:?}"
    );
    check_keys(&options, &keys, "at the end");

    eprintln!(
        "20 kills, {} KEK generations, {resumed_runs} resumed runs; where the kills landed:",
        end.current
    );
    for (phase, count) in &phases {
        eprintln!("  {count:2}  {phase}");
    }
    eprintln!("kek rotation kills: {:.1?} in all", started.elapsed());
    assert!(
        resumed_runs >= 1,
        "no run of kms rotate-kek resumed an interrupted rotation"
    );
}

/// Which of `passphrases` opens the store: exactly one does, with the keys of `sample` intact;
/// the other fails with "wrong passphrase", never with anything else.
fn the_one_that_opens(kms: &Kms, passphrases: [&str; 2], sample: &Keys, context: &str) -> usize {
    let mut opens = Vec::new();
    for (i, passphrase) in passphrases.iter().enumerate() {
        let options = options(kms, &format!("printf {passphrase}"));
        match kms_command::open(&options) {
            Ok(provider) => {
                for (id, bytes) in sample {
                    let got = provider.get(id).unwrap_or_else(|e| {
                        panic!("{context}: with {passphrase}, key {id} does not read: {e}")
                    });
                    assert!(
                        got.expose_secret() == bytes.as_slice(),
                        "{context}: with {passphrase}, key {id} changed"
                    );
                }
                opens.push(i);
            }
            Err(e) => assert_eq!(
                e.kind(),
                ErrorKind::WrongPassphrase,
                "{context}: {passphrase}: {e}"
            ),
        }
    }
    assert_eq!(
        opens.len(),
        1,
        "{context}: {} of the old and the new passphrase open the store",
        opens.len()
    );
    opens[0]
}

/// `kms slot change primary` killed with SIGKILL 20 times, alternately from `pw` to `NEW` and
/// back: at 18 random points (two within 20 ms of the start, sixteen spread over 1.25 x the
/// measured duration of one change) and twice right after the commit, before kms reports it.
/// After every kill exactly one of the two passphrases opens the store, with its keys intact,
/// and the other is refused as a wrong passphrase.
#[test]
fn sigkill_during_a_passphrase_change_leaves_exactly_one_passphrase() {
    let started = Instant::now();
    let mut rng = Rng::from_os("passphrase change kills");
    let kms = command_store("printf pw");
    let keys = create_keys(&options(&kms, "printf pw"), 2_000, 8);
    let passphrases = ["pw", "NEW"];
    let change = |to: usize| {
        let new = format!("printf {}", passphrases[to]);
        ["slot", "change", "primary", "--new-passphrase-command"]
            .into_iter()
            .map(str::to_string)
            .chain([new])
            .collect::<Vec<String>>()
    };
    let sample = |rng: &mut Rng| -> Keys {
        (0..200)
            .map(|_| keys[rng.range(0, keys.len() as u64 - 1) as usize].clone())
            .collect()
    };

    // Four whole changes (pw -> NEW -> pw -> NEW -> pw): how long one takes here.
    let mut current = 0;
    let mut took = Vec::new();
    for _ in 0..4 {
        write_config(&kms, &format!("printf {}", passphrases[current]));
        let timer = Instant::now();
        let run = kms.run(change(1 - current));
        took.push(timer.elapsed());
        assert_eq!(run.code, 0, "{run}");
        assert!(
            run.stderr
                .contains("kms: changed the passphrase of slot \"primary\""),
            "{run}"
        );
        current = 1 - current;
        let opens = the_one_that_opens(&kms, passphrases, &sample(&mut rng), "a whole change");
        assert_eq!(opens, current);
    }
    took.sort();
    let typical = took[took.len() / 2];

    // The kill points: two within 20 ms of the start, sixteen spread over 1.25 x one change,
    // and two once the change is committed and kms is about to say so (its only line on
    // stderr), its stderr a full pipe.
    let span = (typical.as_micros() as u64 * 5 / 4).max(20_000);
    let mut plan: Vec<KillAt> = rng
        .stratified(16, 0, span)
        .into_iter()
        .map(KillAt::Delay)
        .chain([KillAt::StderrFull(0), KillAt::StderrFull(0)])
        .collect();
    rng.shuffle(&mut plan);
    for _ in 0..2 {
        let early = Duration::from_micros(rng.range(0, 20_000));
        plan.insert(0, KillAt::Delay(early));
    }

    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (round, at) in plan.into_iter().enumerate() {
        let context = format!("kill {round}");
        write_config(&kms, &format!("printf {}", passphrases[current]));
        let args = change(1 - current);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = kms.run_and_kill(&args, at);
        assert!(
            matches!(run.code, 0 | 137),
            "{context}: neither finished nor killed: {run}"
        );
        assert!(run.stdout.is_empty(), "{context}: {run}");
        let opens = the_one_that_opens(&kms, passphrases, &sample(&mut rng), &context);
        let outcome = match (run.code, opens == current) {
            (0, true) => panic!("{context}: the change finished but the old passphrase opens"),
            (0, false) => "finished before the kill",
            (_, true) => "killed before the commit: the old passphrase opens",
            (_, false) => "killed after the commit: the new passphrase opens",
        };
        if let KillAt::StderrFull(_) = at {
            assert_eq!(
                outcome, "killed after the commit: the new passphrase opens",
                "{context}: {run}"
            );
        }
        *outcomes.entry(outcome).or_default() += 1;
        eprintln!(
            "{context}: {at:?}, {} -> {}: {outcome}",
            passphrases[current],
            passphrases[1 - current]
        );
        current = opens;
    }
    check_keys(
        &options(&kms, &format!("printf {}", passphrases[current])),
        &keys,
        "at the end",
    );
    eprintln!("20 kills of a passphrase change (one change takes {typical:.1?}):");
    for (outcome, count) in &outcomes {
        eprintln!("  {count:2}  {outcome}");
    }
    eprintln!("passphrase change kills: {:.1?} in all", started.elapsed());
}

/// The rows of both tables of the store, to show that a refused unlock wrote nothing.
fn dump(kms: &Kms) -> Vec<(String, Vec<u8>)> {
    let conn = kms.sqlite();
    let mut rows = Vec::new();
    for query in [
        "SELECT name, value FROM meta ORDER BY name",
        "SELECT id || ' ' || version || ' ' || kek, wrapped FROM keys ORDER BY id, version",
    ] {
        let mut stmt = conn.prepare(query).expect("prepare");
        let found = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("query");
        rows.extend(found.map(|r| r.expect("a row")));
    }
    rows
}

/// Through the CLI: `printf pw`, `echo pw` and `printf 'pw\r\n'` unlock the same store; two
/// lines, empty output, a NUL, a non-zero exit and a wrong passphrase are each a clear error
/// with a non-zero status and nothing on stdout, and write nothing.
#[test]
fn passphrase_command_output_through_the_cli() {
    let kms = command_store("printf pw");
    let key = kms.create("app/one");
    for command in ["printf pw", "echo pw", "printf 'pw\\r\\n'"] {
        write_config(&kms, command);
        assert!(kms.get("app/one") == key, "{command}: another key");
    }

    let before = dump(&kms);
    let cases: [(&str, i32, &[&str]); 5] = [
        (
            "printf 'a\\nb'",
            2,
            &["passphrase command output", "more than one line"],
        ),
        ("printf ''", 2, &["passphrase command output", "is empty"]),
        ("printf 'p\\0w'", 2, &["passphrase command output", "NUL"]),
        (
            "printf pw; exit 1",
            1,
            &["passphrase command exited with status 1"],
        ),
        ("printf wrong", 1, &["wrong passphrase"]),
    ];
    for (command, code, fragments) in cases {
        write_config(&kms, command);
        for args in [
            &["get", "app/one"][..],
            &["create", "app/two"],
            &["rotate-kek"],
        ] {
            let run = kms.fails(args, code, fragments);
            assert!(
                !run.stderr.to_lowercase().contains("corrupt"),
                "{command}: {run}"
            );
        }
    }
    assert!(dump(&kms) == before, "a refused unlock wrote to the store");

    write_config(&kms, "printf pw");
    assert!(kms.get("app/one") == key, "the key changed");
}
