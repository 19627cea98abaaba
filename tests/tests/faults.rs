//! The fault harness: real processes killed with SIGKILL at random points while they serve,
//! rotate and encrypt, and after each kill the same question: is every acknowledged key still
//! there with identical bytes, and does the store open?
//!
//! - `kmsd` killed during create storms of 8 clients (file and command provider);
//! - `kms rotate-kek` killed while `kmsd` serves the same command-provider store under load,
//!   and `kmsd` killed during some of those rotations;
//! - `kms encrypt --create` killed while it writes an encrypted file, in-process and through
//!   `kmsd`, with `kmsd` killed too; `kms decrypt` killed while it writes the plaintext.
//!
//! A key is *acknowledged* when a client received it: an `OK` answer from kmsd, or a `kms`
//! command that exited 0 and printed it. A request cut off by a kill may or may not have stored
//! its key; it must not leave anything else. Clients must see a clean error, never a wrong key.
//!
//! The kill points come from [`Rng`]: the seed is printed, and `KMS_TEST_SEED=N` replays a run;
//! `--nocapture` shows where each kill landed. Disk-full faults are in `disk_full.rs`, kills of
//! CLI-only create loops in `crash.rs`, of CLI-only KEK rotations and passphrase changes in
//! `command_crash.rs`.
//!
//! Every command-provider store here uses 1,000 PBKDF2 iterations instead of the default
//! 600,000 (see `command_crash.rs`: the count changes how long an unlock takes, not what is
//! written or when).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use kms_client::RemoteProvider;
use kms_core::{Error, ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_tests::{
    KekState, KillAt, Kms, Kmsd, LINKED_ONLY, Rng, Run, assert_failure, check_acknowledged,
    command_config, file_config, kms_command, parse_hex_line,
};

/// PBKDF2 iterations of every command-provider store here (see the module documentation).
const ITERATIONS: u32 = 1000;

/// Key ids and the bytes a client received for them.
type Acked = BTreeMap<String, Vec<u8>>;

/// A file-provider store that runs the provider linked into `kms` and `kmsd`.
fn file_store() -> Kms {
    let kms = Kms::init_with(|dir| format!("{}{LINKED_ONLY}", file_config(dir)));
    kms.remember(&fs::read(kms.master_key_path()).expect("master.key"));
    kms
}

/// A command-provider store unlocked by `printf pw`.
fn command_store() -> Kms {
    Kms::init_with(|dir| command_config(dir, "printf pw", ITERATIONS))
}

/// The in-process options of [`command_store`].
fn command_options(kms: &Kms) -> kms_command::Options {
    kms_command::Options {
        dir: kms.dir.clone(),
        passphrase_command: "printf pw".to_string(),
        timeout: 10.0,
        iterations: ITERATIONS,
    }
}

/// Opens a store in-process (no kmsd in between).
type Open<'a> = &'a dyn Fn() -> kms_core::Result<kms_core::envelope::EnvelopeProvider>;

/// Opens the store in-process: it must open and pass SQLite's integrity check, every key it
/// lists must read, and every acknowledged key must read back with identical bytes. Returns
/// the number of keys listed.
fn check_in_process(open: Open<'_>, acked: &Acked, context: &str) -> usize {
    let provider = open().unwrap_or_else(|e| panic!("{context}: the store does not open: {e}"));
    provider
        .store()
        .integrity_check()
        .unwrap_or_else(|e| panic!("{context}: the store fails its integrity check: {e}"));
    check_acknowledged(&provider, acked, context).len()
}

/// Through kmsd: every acknowledged key reads back with identical bytes, every listed key
/// reads, and kmsd lists what the store holds (`in_process` keys).
fn check_through(kmsd: &Kmsd, acked: &Acked, in_process: usize, context: &str) {
    let remote = kmsd.connect();
    let listed = check_acknowledged(&remote, acked, &format!("{context}, through kmsd"));
    assert_eq!(
        listed.len(),
        in_process,
        "{context}: kmsd lists {} keys, the store holds {in_process}",
        listed.len()
    );
}

/// Adds what a client received to `acked`; an id received twice must have had the same
/// bytes both times (get-or-create races, and a create and later gets).
fn merge(acked: &mut Acked, received: Vec<(String, Vec<u8>)>, context: &str) -> usize {
    let mut new = 0;
    for (id, bytes) in received {
        match acked.get(&id) {
            Some(known) => assert!(
                *known == bytes,
                "{context}: two different keys were acknowledged for {id}"
            ),
            None => {
                acked.insert(id, bytes);
                new += 1;
            }
        }
    }
    new
}

/// The load a client puts on kmsd, and which errors it accepts besides kmsd's death.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// As fast as it can: 6 requests in 10 create a new id, 2 race on get-or-create, 2 read a
    /// known key. No other error.
    Storm,
    /// Beside `kms rotate-kek`: 2 in 10 create, 1 races, 7 read, with a pause of 1 ms after
    /// each request. (A kmsd opened before a rotation adds keys under the old KEK, which the
    /// rotation must re-wrap before it can switch: a storm of creates at full speed keeps it
    /// busy for as long as the storm lasts.) `wrong-kek` is expected as documented
    /// (`docs/providers/command.md`): a kmsd opened before the rotation cannot unwrap keys
    /// re-wrapped under the new KEK (unless cached), and after the switch cannot add keys
    /// under the retired one.
    BesideRotation,
}

/// A request of [`client`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Race,
    Get,
}

impl Load {
    fn pick(self, rng: &mut Rng) -> Op {
        let (create, race) = match self {
            Load::Storm => (6, 2),
            Load::BesideRotation => (2, 1),
        };
        match rng.range(0, 9) {
            n if n < create => Op::Create,
            n if n < create + race => Op::Race,
            _ => Op::Get,
        }
    }
}

/// What one client saw during a round.
struct Seen {
    /// Keys it received, by id.
    received: Vec<(String, Vec<u8>)>,
    /// Answers received.
    answers: usize,
    /// `wrong-kek` answers (only with [`Load::BesideRotation`]).
    wrong_kek: usize,
    /// The `unavailable` error that ended it, if kmsd died under it.
    ended_by: Option<String>,
}

/// One client of kmsd over protocol v1 (`RemoteProvider`), until `stop` is set or kmsd
/// dies: creates new ids under `prefix`, races the other clients with get-or-create on 16 ids
/// under `shared`, and reads keys known from earlier rounds. Every key received is checked
/// against its request (id, version, length, and the bytes for known keys); every error must
/// be one that `load` expects.
fn client(
    socket: &Path,
    prefix: &str,
    shared: &str,
    seed: u64,
    known: &[(String, Vec<u8>)],
    stop: &AtomicBool,
    load: Load,
) -> Seen {
    let mut rng = Rng::seeded(seed);
    let mut seen = Seen {
        received: Vec::new(),
        answers: 0,
        wrong_kek: 0,
        ended_by: None,
    };
    let died = |e: &Error| {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{prefix}: {e}");
        assert!(e.message().contains("kmsd at "), "{prefix}: {e}");
        Some(e.to_string())
    };
    let provider = match RemoteProvider::connect(socket) {
        Ok(provider) => provider,
        Err(e) => {
            seen.ended_by = died(&e);
            return seen;
        }
    };
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if load == Load::BesideRotation {
            sleep(Duration::from_millis(1));
        }
        let op = load.pick(&mut rng);
        let (id, want) = match op {
            Op::Create => (format!("{prefix}/new/{n}"), None),
            Op::Race => (format!("{shared}/{}", rng.range(0, 15)), None),
            Op::Get if known.is_empty() => continue,
            Op::Get => {
                let (id, bytes) = &known[rng.range(0, known.len() as u64 - 1) as usize];
                (id.clone(), Some(bytes))
            }
        };
        let key_id = KeyId::new(&id).expect("a valid id");
        let result = match op {
            Op::Create => provider.create(&key_id, KeySpec::default()),
            Op::Race => provider.get_or_create(&key_id, KeySpec::default()),
            Op::Get => provider.get(&key_id),
        };
        match result {
            Ok(key) => {
                seen.answers += 1;
                assert_eq!(key.id(), &key_id, "{prefix}: a key for another id");
                assert_eq!(
                    key.len(),
                    32,
                    "{prefix}: {id}: a key of {} bytes",
                    key.len()
                );
                if op == Op::Create {
                    assert_eq!(key.version(), 1, "{prefix}: {id}: a new key not at v1");
                }
                if let Some(bytes) = want {
                    assert!(
                        key.expose_secret() == bytes.as_slice(),
                        "{prefix}: GET {id} answered another key"
                    );
                }
                seen.received.push((id, key.expose_secret().to_vec()));
            }
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                seen.ended_by = died(&e);
                break;
            }
            Err(e) if load == Load::BesideRotation && e.kind() == ErrorKind::WrongKek => {
                seen.answers += 1;
                seen.wrong_kek += 1;
                // Reading: the key was re-wrapped under a KEK this kmsd has not loaded.
                // Creating: the KEK this kmsd writes with was retired by the switch.
                let unloaded = e
                    .message()
                    .contains("a KEK rotation began since this provider opened");
                let retired = e
                    .message()
                    .contains("retired by a rotation since this provider opened; reopen it");
                let expected = match op {
                    Op::Create => retired,
                    Op::Race => retired || unloaded,
                    Op::Get => unloaded,
                };
                assert!(expected, "{prefix}: {id}: {e}");
            }
            Err(e) => panic!("{prefix}: {id}: unexpected error: {e}"),
        }
    }
    seen
}

/// A `kms --socket S create ID` loop until kmsd dies: each create either prints a key or fails
/// with status 1 and one line naming kmsd. Returns the keys received.
fn cli_client(kms: &Kms, socket: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut received = Vec::new();
    for n in 0.. {
        let id = format!("{prefix}/{n}");
        let mut cmd = kms_command(["--socket".as_ref(), socket.as_os_str()]);
        cmd.args(["create", id.as_str()]);
        let run = kms.checked(Run::of(cmd));
        if run.code != 0 {
            assert_failure(&run, 1, &["kmsd at "]);
            return received;
        }
        let key = parse_hex_line(&run.stdout);
        kms.remember(&key);
        received.push((id, key));
    }
    unreachable!()
}

/// Clients of [`client`] per round, besides the one `kms` CLI client.
const CLIENTS: usize = 7;

/// Rounds of [`kmsd_create_storms`].
const STORM_ROUNDS: usize = 10;

/// kmsd serving `kms`'s store; 7 protocol clients and one `kms --socket` CLI loop create keys
/// until kmsd is killed with SIGKILL after a random 50-500 ms; kmsd is started again (over the
/// dead one's socket), 10 times over. After each kill:
/// - every client ended with `unavailable` naming kmsd (the CLI: status 1, one line), and no
///   client ever received a key for another id or other bytes for a known key;
/// - in-process, the store opens, passes SQLite's integrity check, lists every acknowledged
///   key, and every key it lists reads; acknowledged keys have identical bytes; at most one key
///   per client (its request in flight) was stored without being acknowledged;
/// - through the restarted kmsd, the same: every acknowledged key, every listed key.
fn kmsd_create_storms(kms: &Kms, open: Open<'_>, test: &str) {
    let started = Instant::now();
    let mut rng = Rng::from_os(test);
    let socket = kms.add_server();
    let mut kmsd = Kmsd::start(&kms.config, &socket, &kms.root().join("kmsd.log"));
    let mut acked = Acked::new();
    let mut listed_before = 0;
    let mut answers = 0;

    for round in 0..STORM_ROUNDS {
        let context = format!("{test}, kill {round}");
        let known: Vec<(String, Vec<u8>)> =
            acked.iter().map(|(i, b)| (i.clone(), b.clone())).collect();
        let delay = Duration::from_millis(rng.range(50, 500));
        let seeds: Vec<u64> = (0..CLIENTS).map(|_| rng.next_u64()).collect();
        // Never set: the clients stop when kmsd dies under them.
        let stop = AtomicBool::new(false);

        // The storm, and the kill.
        let (seen, by_cli) = thread::scope(|scope| {
            let clients: Vec<_> = seeds
                .iter()
                .enumerate()
                .map(|(c, &seed)| {
                    let (socket, known, stop) = (&socket, &known, &stop);
                    let prefix = format!("storm/{round}/{c}");
                    let shared = format!("storm/{round}/race");
                    scope.spawn(move || {
                        client(socket, &prefix, &shared, seed, known, stop, Load::Storm)
                    })
                })
                .collect();
            let cli = scope.spawn(|| cli_client(kms, &socket, &format!("storm/{round}/cli")));
            sleep(delay);
            kmsd.kill();
            let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().unwrap()).collect();
            (seen, cli.join().unwrap())
        });

        // Every client ended by kmsd's death, and what they received agrees.
        let mut new = merge(&mut acked, by_cli, &context);
        for (c, s) in seen.into_iter().enumerate() {
            assert!(
                s.ended_by.is_some(),
                "{context}: client {c} stopped without an error"
            );
            answers += s.answers;
            new += merge(&mut acked, s.received, &context);
        }

        // In-process: nothing acknowledged is lost, and at most one unacknowledged key per
        // client was stored.
        let listed = check_in_process(open, &acked, &context);
        let appeared = listed - listed_before;
        assert!(
            appeared >= new && appeared <= new + CLIENTS + 1,
            "{context}: {appeared} keys appeared for {new} acknowledged"
        );
        eprintln!(
            "{context}: after {delay:?}, {new} keys acknowledged, {} stored unacknowledged",
            appeared - new
        );
        listed_before = listed;

        // Through kmsd, started again.
        kmsd.restart();
        check_through(&kmsd, &acked, listed, &context);
    }
    assert!(
        acked.len() > 100,
        "{test}: only {} keys acknowledged",
        acked.len()
    );
    eprintln!(
        "{test}: {STORM_ROUNDS} kills, {} keys acknowledged, {answers} answers checked, \
         {:.1?} in all",
        acked.len(),
        started.elapsed()
    );
}

/// [`kmsd_create_storms`] over the file provider.
#[test]
fn kmsd_killed_during_create_storms_file_provider() {
    let kms = file_store();
    let options = kms_file::Options::in_dir(&kms.dir);
    kmsd_create_storms(&kms, &|| kms_file::open(&options), "kmsd storms, file");
}

/// [`kmsd_create_storms`] over the command provider (the master key in a passphrase slot).
#[test]
fn kmsd_killed_during_create_storms_command_provider() {
    let kms = command_store();
    let options = command_options(&kms);
    kmsd_create_storms(
        &kms,
        &|| kms_command::open(&options),
        "kmsd storms, command",
    );
}

/// Keys made before the KEK rotations.
const ROTATION_KEYS: usize = 4_000;

/// Kills of `kms rotate-kek` in [`kms_rotate_kek_killed_while_kmsd_serves`].
const ROTATION_ROUNDS: usize = 12;

/// Clients of kmsd while `kms rotate-kek` runs.
const LOAD_CLIENTS: usize = 4;

/// Makes `count` keys through kmsd from `threads` clients.
fn create_through(socket: &Path, count: usize, threads: usize) -> Acked {
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let remote = RemoteProvider::connect(socket).expect("connect to kmsd");
                    (t..count)
                        .step_by(threads)
                        .map(|i| {
                            let id = format!("db/{t}/{i}");
                            let key = remote
                                .create(&KeyId::new(&id).unwrap(), KeySpec::default())
                                .unwrap_or_else(|e| panic!("create {id}: {e}"));
                            (id, key.expose_secret().to_vec())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a creating thread"))
            .collect()
    })
}

/// Asserts that a `kms rotate-kek` that exited 0 says whether it resumed, and rightly.
fn assert_rotation_finished(run: &Run, resuming: bool, context: &str) {
    assert_eq!(run.code, 0, "{context}: {run}");
    let how = if resuming {
        "kms: resumed and finished the KEK rotation"
    } else {
        "kms: finished the KEK rotation"
    };
    assert!(
        run.stderr.contains(how),
        "{context}: resuming={resuming}: {run}"
    );
}

/// One round: `LOAD_CLIENTS` clients of kmsd while `kms rotate-kek` runs on the same store,
/// killed at `rotate` (or left to finish), and kmsd killed at `kill_kmsd`. Returns the
/// rotation's run and what the clients saw.
fn rotation_round(
    kms: &Kms,
    kmsd: &mut Kmsd,
    round: usize,
    seeds: &[u64],
    known: &[(String, Vec<u8>)],
    rotate: Option<KillAt>,
    kill_kmsd: Option<Duration>,
) -> (Run, Vec<Seen>) {
    let stop = AtomicBool::new(false);
    let socket = kmsd.socket().to_path_buf();
    thread::scope(|scope| {
        let clients: Vec<_> = seeds
            .iter()
            .enumerate()
            .map(|(c, &seed)| {
                let (socket, stop) = (&socket, &stop);
                let prefix = format!("load/{round}/{c}");
                let shared = format!("load/{round}/race");
                scope.spawn(move || {
                    client(
                        socket,
                        &prefix,
                        &shared,
                        seed,
                        known,
                        stop,
                        Load::BesideRotation,
                    )
                })
            })
            .collect();
        let rotation = scope.spawn(move || match rotate {
            Some(at) => kms.run_and_kill(&["rotate-kek"], at),
            None => kms.run(["rotate-kek"]),
        });
        if let Some(delay) = kill_kmsd {
            sleep(delay);
            kmsd.kill();
        }
        let run = rotation.join().expect("the rotation thread");
        stop.store(true, Ordering::Relaxed);
        let seen = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (run, seen)
    })
}

/// `kms rotate-kek` (command provider) killed with SIGKILL while kmsd serves the same store to
/// 4 clients that create, race on get-or-create and read; kmsd killed too in every third
/// round. 4,000 keys made through kmsd first; then one whole rotation under load, to measure
/// it; then 12 kills: ten at random points spread over 1.1 x the measured duration, two right
/// after the second batch of re-wrapped keys (the rotation blocked on a full stderr pipe).
///
/// The design allows this (the store is multi-process safe, `docs/providers/command.md`), with
/// a documented limit this test pins: a kmsd opened before a rotation began has only the old
/// KEK, so until it is restarted it answers `wrong-kek` for keys it has not cached once they
/// are re-wrapped ("a KEK rotation began since this provider opened ... reopen it"), and after the switch it cannot create ("retired by a
/// rotation since this provider opened; reopen it"). Never another error, never a wrong key.
/// A kmsd started during an unfinished rotation loads both KEKs and serves everything.
///
/// After each kill: every client's error was `unavailable` (kmsd killed) or such a
/// `wrong-kek`; in-process, the store opens, passes its integrity check, every key reads,
/// every acknowledged key has identical bytes, every row is under a live KEK generation with
/// its slot and fingerprint, and the rows are exactly the acknowledged keys (plus at most one
/// per client when kmsd was killed). After every odd-numbered kill that left a rotation
/// unfinished, `kms rotate-kek` resumes and finishes it. A kmsd that was killed, or that a
/// switch has left behind, is restarted, and every acknowledged key reads through it.
#[test]
fn kms_rotate_kek_killed_while_kmsd_serves() {
    let started = Instant::now();
    let test = "rotation beside kmsd";
    let mut rng = Rng::from_os(test);
    let kms = command_store();
    let options = command_options(&kms);
    let open = || kms_command::open(&options);
    let socket = kms.add_server();
    let mut kmsd = Kmsd::start(&kms.config, &socket, &kms.root().join("kmsd.log"));

    // 1. Keys made through kmsd; then kmsd started again, so that it has none cached.
    let mut acked = create_through(&socket, ROTATION_KEYS, 8);
    for (_, bytes) in acked.iter().take(100) {
        kms.remember(bytes);
    }
    kmsd.kill();
    kmsd.restart();
    let mut opened = KekState::read(&kms, "start");
    opened.check(ROTATION_KEYS as u64, "start");
    let created = started.elapsed();

    // 2. One whole rotation under load: how long it takes, and where its first progress line
    //    ends (a kill there lands after two batches).
    let known: Vec<(String, Vec<u8>)> = acked.iter().map(|(i, b)| (i.clone(), b.clone())).collect();
    let seeds: Vec<u64> = (0..LOAD_CLIENTS).map(|_| rng.next_u64()).collect();
    let timer = Instant::now();
    let (run, seen) = rotation_round(&kms, &mut kmsd, 0, &seeds, &known, None, None);
    let full = timer.elapsed();
    assert_rotation_finished(&run, false, "the measured rotation");
    let first_line = run
        .stderr
        .find("kms: re-wrapped 512 keys\n")
        .map(|at| at + 25);
    let first_line = first_line.unwrap_or_else(|| panic!("no first batch line: {run}"));
    let mut wrong_kek = 0;
    for s in seen {
        assert!(s.ended_by.is_none(), "kmsd died: {:?}", s.ended_by);
        wrong_kek += s.wrong_kek;
        merge(&mut acked, s.received, "the measured rotation");
    }
    let after = KekState::read(&kms, "the measured rotation");
    after.check(acked.len() as u64, "the measured rotation");
    assert_eq!((after.current, after.rotation), (2, None), "{after:?}");
    check_in_process(&open, &acked, "the measured rotation");
    eprintln!(
        "{ROTATION_KEYS} keys made in {created:.1?}; one rotation under load takes {full:.1?} \
         ({wrong_kek} wrong-kek answers from the kmsd opened before it)"
    );

    // 3. The kill points: all but two spread over 1.1 x one rotation, two after the second
    //    batch.
    let span = (full.as_micros() as u64 * 11 / 10).max(50_000);
    let mut plan: Vec<KillAt> = rng
        .stratified(ROTATION_ROUNDS as u64 - 2, 0, span)
        .into_iter()
        .map(KillAt::Delay)
        .chain([
            KillAt::StderrFull(first_line),
            KillAt::StderrFull(first_line),
        ])
        .collect();
    rng.shuffle(&mut plan);

    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    let mut unacknowledged = 0;
    let mut resumed = 0;
    for (round, at) in plan.into_iter().enumerate() {
        let round = round + 1;
        let context = format!("{test}, kill {round}");
        let before = KekState::read(&kms, &context);
        let kill_kmsd = (round % 3 == 1).then(|| Duration::from_micros(rng.range(0, span)));
        let known: Vec<(String, Vec<u8>)> =
            acked.iter().map(|(i, b)| (i.clone(), b.clone())).collect();
        let seeds: Vec<u64> = (0..LOAD_CLIENTS).map(|_| rng.next_u64()).collect();
        let (run, seen) =
            rotation_round(&kms, &mut kmsd, round, &seeds, &known, Some(at), kill_kmsd);

        // The rotation was killed, or finished and said so.
        assert!(matches!(run.code, 0 | 137), "{context}: {run}");
        assert!(run.stdout.is_empty(), "{context}: {run}");
        if run.code == 0 {
            assert_rotation_finished(&run, before.rotation.is_some(), &context);
        }
        let mut new = 0;
        for s in seen {
            // (With kmsd killed, a client between two requests may see `stop` first.)
            assert!(
                s.ended_by.is_none() || kill_kmsd.is_some(),
                "{context}: a client ended by {:?}",
                s.ended_by
            );
            new += merge(&mut acked, s.received, &context);
        }

        // Nothing acknowledged is lost; unacknowledged keys only from a killed kmsd.
        let after = KekState::read(&kms, &context);
        after.check(after.total_rows(), &context);
        let extra = after.total_rows() as usize - acked.len();
        let allowed = if kill_kmsd.is_some() { LOAD_CLIENTS } else { 0 };
        assert!(
            extra >= unacknowledged && extra <= unacknowledged + allowed,
            "{context}: {} rows for {} acknowledged keys ({unacknowledged} unacknowledged \
             before)",
            after.total_rows(),
            acked.len()
        );
        unacknowledged = extra;
        let listed = check_in_process(&open, &acked, &context);
        assert_eq!(listed as u64, after.total_rows(), "{context}");
        let phase = after.rotation_phase(&run, &before);
        let how = if before.rotation.is_some() {
            "resuming"
        } else {
            "fresh"
        };
        *phases.entry(format!("{phase} ({how})")).or_default() += 1;
        eprintln!(
            "{context}: {at:?}{}, {how}: {phase}; generation {} -> {}, {new} keys acknowledged",
            match kill_kmsd {
                Some(d) => format!(", kmsd killed at {d:?}"),
                None => String::new(),
            },
            before.current,
            after.current
        );

        // Every other kill, the rotation is resumed and finished.
        let mut now = after;
        if round % 2 == 1 && now.rotation.is_some() {
            let run = kms.run(["rotate-kek"]);
            assert_rotation_finished(&run, true, &format!("{context}, resumed"));
            resumed += 1;
            let done = KekState::read(&kms, &context);
            done.check(now.total_rows(), &format!("{context}, resumed"));
            assert_eq!((done.current, done.rotation), (now.current + 1, None));
            now = done;
        }

        // kmsd: started again if it was killed or if a switch retired the KEK it writes with
        // (which it must show first: its creates are refused, as documented).
        if kmsd.is_running() && now.current > opened.rotation.unwrap_or(opened.current) {
            let id = KeyId::new(&format!("probe/{round}")).unwrap();
            let e = kmsd
                .connect()
                .create(&id, KeySpec::default())
                .expect_err("a create through a kmsd whose KEK was retired");
            assert_eq!(e.kind(), ErrorKind::WrongKek, "{context}: {e}");
            assert!(e.message().contains("reopen it"), "{context}: {e}");
            kmsd.kill();
        }
        if !kmsd.is_running() {
            kmsd.restart();
            opened = now;
            check_through(&kmsd, &acked, listed, &context);
        }
    }

    // 4. The last rotation finishes; a restarted kmsd serves every key.
    let before = KekState::read(&kms, "the last rotation");
    let run = kms.run(["rotate-kek"]);
    assert_rotation_finished(&run, before.rotation.is_some(), "the last rotation");
    let end = KekState::read(&kms, "at the end");
    end.check(acked.len() as u64 + unacknowledged as u64, "at the end");
    assert_eq!(end.rotation, None, "{end:?}");
    assert_eq!(end.rows_under(end.current), end.total_rows(), "{end:?}");
    let listed = check_in_process(&open, &acked, "at the end");
    kmsd.kill();
    kmsd.restart();
    check_through(&kmsd, &acked, listed, "at the end");

    eprintln!(
        "{ROTATION_ROUNDS} kills, {} KEK generations, {resumed} resumed runs, {} keys; where \
         the kills landed:",
        end.current,
        acked.len()
    );
    for (phase, count) in &phases {
        eprintln!("  {count:2}  {phase}");
    }
    eprintln!("{test}: {:.1?} in all", started.elapsed());
}

/// The plaintext encrypted by the tests below: 16 MiB.
const PLAIN_LEN: usize = 16 << 20;

/// A plaintext of [`PLAIN_LEN`] pseudo-random bytes, written to `root/plain`.
fn write_plaintext(root: &Path, rng: &mut Rng) -> (PathBuf, Vec<u8>) {
    let mut plain = Vec::with_capacity(PLAIN_LEN);
    while plain.len() < PLAIN_LEN {
        plain.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    let path = root.join("plain");
    fs::write(&path, &plain).expect("write the plaintext");
    (path, plain)
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list the output directory")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Decrypts the file at `path` with the key `provider` has for it.
fn decrypt_with(provider: &dyn KeyProvider, path: &Path) -> kms_crypt::Result<Vec<u8>> {
    let input = fs::File::open(path).expect("open the encrypted file");
    let mut plain = Vec::new();
    kms_crypt::decrypt(|id, v| provider.get_version(id, v), input, &mut plain)?;
    Ok(plain)
}

/// The key `id` if `provider` has it; `None` only for a definite "not found".
fn key_if_any(provider: &dyn KeyProvider, id: &str, context: &str) -> Option<Vec<u8>> {
    match provider.get(&KeyId::new(id).unwrap()) {
        Ok(key) => Some(key.expose_secret().to_vec()),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("{context}: {id}: {e}"),
    }
}

/// After a run of `kms encrypt --create --key ID PLAIN OUT` that exited `code` (0, or 137 when
/// killed, or 1 when kmsd died under it): OUT is absent (and then the run did not exit 0), or
/// a complete file, mode 0600, that decrypts to the plaintext with the key `provider` has
/// for ID. Returns whether OUT exists and whether the key does.
fn check_output(
    provider: &dyn KeyProvider,
    id: &str,
    out: &Path,
    code: i32,
    plain: &[u8],
    context: &str,
) -> (bool, bool) {
    use std::os::unix::fs::PermissionsExt;
    let key = key_if_any(provider, id, context);
    let Ok(meta) = fs::symlink_metadata(out) else {
        assert_ne!(code, 0, "{context}: exit 0 and no {}", out.display());
        return (false, key.is_some());
    };
    assert!(meta.is_file(), "{context}: {} is not a file", out.display());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{context}");
    assert!(
        key.is_some(),
        "{context}: {} exists but key {id} does not",
        out.display()
    );
    let got = decrypt_with(provider, out)
        .unwrap_or_else(|e| panic!("{context}: {} does not decrypt: {e}", out.display()));
    assert!(
        got == plain,
        "{context}: {} decrypts to other bytes",
        out.display()
    );
    (true, true)
}

/// Counts outcomes by name, for the summary.
fn count(outcomes: &mut BTreeMap<&'static str, usize>, outcome: &'static str) {
    *outcomes.entry(outcome).or_default() += 1;
}

/// The outcome of one killed run, for the summary.
fn outcome(code: i32, file: bool, key: bool) -> &'static str {
    match (code, file, key) {
        (0, _, _) => "finished before the kill",
        (_, true, _) => "killed after the file was linked: the whole file",
        (_, false, true) => "killed before the file was linked: no file, the key made",
        (_, false, false) => "killed before the key was made: nothing",
    }
}

/// `kms encrypt --create` of a 16 MiB file (file provider, in-process), killed with SIGKILL
/// 24 times at random points spread over 1.2 x the measured duration of one run, plus two
/// within its first 3 ms, each round under a new key id and output name. After each kill the
/// output name either does not exist, or is a complete file (mode 0600) that decrypts to the
/// plaintext with the key the store holds for its id; the output directory holds nothing else
/// (the file was written unnamed, with `O_TMPFILE`: no temporary file is left); the store
/// opens and every key it lists reads. Finally `kms decrypt` restores one of the files.
#[test]
fn kms_encrypt_killed_leaves_a_whole_file_or_none() {
    let started = Instant::now();
    let test = "encrypt kills";
    let mut rng = Rng::from_os(test);
    let kms = file_store();
    let (input, plain) = write_plaintext(kms.root(), &mut rng);
    let input = input.to_str().expect("a UTF-8 path").to_string();
    let out_dir = kms.root().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = |name: &str| out_dir.join(name).to_str().unwrap().to_string();
    let encrypt = |id: &str, out: &str| -> Vec<String> {
        ["encrypt", "--create", "--key", id, &input, out]
            .map(str::to_string)
            .to_vec()
    };

    // How long one encryption takes here.
    let mut longest = Duration::ZERO;
    let mut expected = Vec::new();
    for i in 0..3 {
        let name = format!("measure-{i}.kms");
        let args = encrypt(&format!("measure/{i}"), &out(&name));
        let timer = Instant::now();
        let run = kms.run(&args);
        longest = longest.max(timer.elapsed());
        assert_eq!(run.code, 0, "{run}");
        expected.push(name);
    }
    let span = (longest.as_micros() as u64 * 6 / 5).max(10_000);
    let mut plan = rng.stratified(24, 0, span);
    plan.extend([0, 1].map(|_| Duration::from_micros(rng.range(0, 3_000))));
    rng.shuffle(&mut plan);

    let mut outcomes = BTreeMap::new();
    for (round, delay) in plan.into_iter().enumerate() {
        let context = format!("{test}, kill {round}");
        let (id, name) = (format!("files/{round}"), format!("{round}.kms"));
        let args = encrypt(&id, &out(&name));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = kms.run_and_kill(&args, KillAt::Delay(delay));
        assert!(matches!(run.code, 0 | 137), "{context}: {run}");
        assert!(
            run.stdout.is_empty() && run.stderr.is_empty(),
            "{context}: {run}"
        );

        let provider = kms_file::open(&kms_file::Options::in_dir(&kms.dir))
            .unwrap_or_else(|e| panic!("{context}: the store does not open: {e}"));
        check_acknowledged(&provider, &Acked::new(), &context);
        let (file, key) = check_output(
            &provider,
            &id,
            out_dir.join(&name).as_path(),
            run.code,
            &plain,
            &context,
        );
        if file {
            expected.push(name);
        }
        expected.sort();
        assert_eq!(names(&out_dir), expected, "{context}: the output directory");
        let outcome = outcome(run.code, file, key);
        eprintln!("{context}: {delay:?}: {outcome}");
        count(&mut outcomes, outcome);
    }

    // The CLI decrypts what it wrote.
    let back = kms.root().join("back");
    let run = kms.run([
        "decrypt".as_ref(),
        out_dir.join("measure-0.kms").as_os_str(),
        back.as_os_str(),
    ]);
    assert_eq!(run.code, 0, "{run}");
    assert!(
        fs::read(&back).unwrap() == plain,
        "kms decrypt restored other bytes"
    );

    eprintln!("26 kills of kms encrypt (one run takes {longest:.1?}):");
    for (outcome, n) in &outcomes {
        eprintln!("  {n:2}  {outcome}");
    }
    eprintln!("{test}: {:.1?} in all", started.elapsed());
}

/// `kms decrypt` of a 16 MiB file killed with SIGKILL 16 times at random points spread over
/// 1.2 x the measured duration of one run: the output name is either absent or holds the whole
/// plaintext, and the output directory holds nothing else (no partial plaintext anywhere).
#[test]
fn kms_decrypt_killed_leaves_the_whole_plaintext_or_none() {
    let test = "decrypt kills";
    let mut rng = Rng::from_os(test);
    let kms = file_store();
    let (input, plain) = write_plaintext(kms.root(), &mut rng);
    let encrypted = kms.root().join("plain.kms");
    let run = kms.run([
        "encrypt".as_ref(),
        "--create".as_ref(),
        "--key".as_ref(),
        "files/plain".as_ref(),
        input.as_os_str(),
        encrypted.as_os_str(),
    ]);
    assert_eq!(run.code, 0, "{run}");
    let encrypted = encrypted.to_str().unwrap().to_string();
    let out_dir = kms.root().join("out");
    fs::create_dir(&out_dir).unwrap();

    let mut longest = Duration::ZERO;
    for _ in 0..3 {
        let out = out_dir.join("measure");
        let timer = Instant::now();
        let run = kms.run(["decrypt".as_ref(), encrypted.as_ref(), out.as_os_str()]);
        longest = longest.max(timer.elapsed());
        assert_eq!(run.code, 0, "{run}");
        fs::remove_file(out).unwrap();
    }
    let span = (longest.as_micros() as u64 * 6 / 5).max(10_000);

    let mut expected: Vec<String> = Vec::new();
    let mut outcomes = BTreeMap::new();
    for (round, delay) in rng.stratified(16, 0, span).into_iter().enumerate() {
        let context = format!("{test}, kill {round}");
        let name = format!("{round}.plain");
        let out = out_dir.join(&name);
        let args = ["decrypt", encrypted.as_str(), out.to_str().unwrap()];
        let run = kms.run_and_kill(&args, KillAt::Delay(delay));
        assert!(matches!(run.code, 0 | 137), "{context}: {run}");
        let outcome = match fs::read(&out) {
            Ok(got) => {
                assert!(got == plain, "{context}: {name} holds other bytes");
                expected.push(name);
                expected.sort();
                if run.code == 0 {
                    "finished before the kill"
                } else {
                    "killed after the file was linked: the whole plaintext"
                }
            }
            Err(_) => {
                assert_eq!(run.code, 137, "{context}: exit 0 and no {name}");
                "killed before the file was linked: nothing"
            }
        };
        assert_eq!(names(&out_dir), expected, "{context}: the output directory");
        eprintln!("{context}: {delay:?}: {outcome}");
        count(&mut outcomes, outcome);
    }
    eprintln!("16 kills of kms decrypt (one run takes {longest:.1?}):");
    for (outcome, n) in &outcomes {
        eprintln!("  {n:2}  {outcome}");
    }
}

/// `kms --socket S encrypt --create` of a 16 MiB file while kmsd is killed with SIGKILL at a
/// random point (spread over 1.2 x the measured duration of one run), 16 times, the
/// encryption itself killed too in every other round. kmsd is asked once, for the key, at the
/// start: an encryption that asked before the kill finishes (or is killed), one that asked
/// after fails with status 1 and one line naming kmsd. After each round, with kmsd started
/// again: the output name is absent or a complete file that decrypts to the plaintext with
/// the key kmsd and the store (in-process) have for its id; the output directory holds
/// nothing else; every key reads through kmsd.
#[test]
fn kms_encrypt_through_kmsd_killed_with_kmsd() {
    let started = Instant::now();
    let test = "encrypt through kmsd";
    let mut rng = Rng::from_os(test);
    let kms = file_store();
    let socket = kms.add_server();
    let mut kmsd = Kmsd::start(&kms.config, &socket, &kms.root().join("kmsd.log"));
    let (input, plain) = write_plaintext(kms.root(), &mut rng);
    let out_dir = kms.root().join("out");
    fs::create_dir(&out_dir).unwrap();
    let encrypt = |id: &str, out: &Path| {
        let mut cmd = kms_command(["--socket".as_ref(), socket.as_os_str()]);
        cmd.args(["encrypt", "--create", "--key", id])
            .arg(&input)
            .arg(out);
        cmd
    };

    let mut longest = Duration::ZERO;
    let mut expected = Vec::new();
    for i in 0..3 {
        let name = format!("measure-{i}.kms");
        let timer = Instant::now();
        let run = kms.checked(Run::of(encrypt(
            &format!("measure/{i}"),
            &out_dir.join(&name),
        )));
        longest = longest.max(timer.elapsed());
        assert_eq!(run.code, 0, "{run}");
        expected.push(name);
    }
    let span = (longest.as_micros() as u64 * 6 / 5).max(10_000);
    let kmsd_kills = rng.stratified(16, 0, span);
    let encrypt_kills = rng.stratified(8, 0, span);

    let mut outcomes = BTreeMap::new();
    for (round, kill_kmsd) in kmsd_kills.into_iter().enumerate() {
        let context = format!("{test}, round {round}");
        let (id, name) = (format!("files/{round}"), format!("{round}.kms"));
        let out = out_dir.join(&name);
        let kill_encrypt = (round % 2 == 0).then(|| encrypt_kills[round / 2]);
        let cmd = encrypt(&id, &out);
        let run = thread::scope(|scope| {
            let run = scope.spawn(|| match kill_encrypt {
                Some(delay) => kms.spawn_and_kill(cmd, "kms encrypt", KillAt::Delay(delay)),
                None => kms.checked(Run::of(cmd)),
            });
            sleep(kill_kmsd);
            kmsd.kill();
            run.join().expect("the encrypting thread")
        });
        match run.code {
            0 | 137 => assert!(run.stderr.is_empty(), "{context}: {run}"),
            _ => assert_failure(&run, 1, &["kmsd at "]),
        }

        kmsd.restart();
        let remote = kmsd.connect();
        let (file, key) = check_output(&remote, &id, &out, run.code, &plain, &context);
        let provider = kms_file::open(&kms_file::Options::in_dir(&kms.dir))
            .unwrap_or_else(|e| panic!("{context}: the store does not open: {e}"));
        let in_process = check_output(&provider, &id, &out, run.code, &plain, &context);
        assert_eq!(
            in_process,
            (file, key),
            "{context}: kmsd and the store disagree"
        );
        if file {
            expected.push(name);
        }
        expected.sort();
        assert_eq!(names(&out_dir), expected, "{context}: the output directory");
        let listed = check_acknowledged(&provider, &Acked::new(), &context).len();
        check_through(&kmsd, &Acked::new(), listed, &context);

        let outcome = match run.code {
            1 => "kmsd gone before kms had the key: status 1, no file",
            code => outcome(code, file, key),
        };
        eprintln!("{context}: kmsd killed at {kill_kmsd:?}, kms at {kill_encrypt:?}: {outcome}");
        count(&mut outcomes, outcome);
    }
    eprintln!("16 kills of kmsd during kms encrypt (one run takes {longest:.1?}):");
    for (outcome, n) in &outcomes {
        eprintln!("  {n:2}  {outcome}");
    }
    eprintln!("{test}: {:.1?} in all", started.elapsed());
}
