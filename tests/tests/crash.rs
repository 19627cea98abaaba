//! SIGKILL during create storms loses no acknowledged key and never damages the store.
//!
//! A key is acknowledged when `kms create` exited 0 and printed it. After every kill, every
//! acknowledged key must read back with the same bytes, the store must open, and every key it
//! lists must read (a create killed half-way is either wholly there or wholly absent).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kms_core::KeyId;
use kms_core::KeyProvider;
use kms_tests::{
    Kms, Rng, Run, check_acknowledged, exit_code, kms_bin, kms_command, parse_hex_line,
    wait_for_group_exit,
};
use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// Reads every listed key in-process and checks the acknowledged ones; the CLI lists the same
/// keys.
fn check_store(kms: &Kms, acked: &BTreeMap<String, Vec<u8>>, context: &str) {
    let provider = kms_file::open(&kms_file::Options::in_dir(&kms.dir))
        .unwrap_or_else(|e| panic!("{context}: the store does not open: {e}"));
    let listed = check_acknowledged(&provider, acked, context);
    let listed: Vec<String> = listed.into_iter().map(|info| info.id.to_string()).collect();
    let by_cli: Vec<String> = kms.list().into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(by_cli, listed, "{context}: the CLI lists other keys");
}

/// A shell loop runs `kms create` after `kms create` and logs each acknowledged key; its whole
/// process group (the shell and the `kms` it is running) is killed with SIGKILL after a random
/// 50-400 ms, 20 times over.
#[test]
fn sigkill_of_a_create_loop_loses_no_acknowledged_key() {
    let kms = Kms::new();
    let mut rng = Rng::from_os("create loop");
    let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let script = r#"
        i=0
        while :; do
            if out=$("$KMS" --config "$CFG" create "crash/$ROUND/$i"); then
                printf '%s %s\n' "crash/$ROUND/$i" "$out" >>"$LOG"
            fi
            i=$((i + 1))
        done
    "#;
    let mut listed_before = 0;
    for round in 0..20 {
        let log = kms.root().join(format!("acked-{round}.log"));
        let errors = kms.root().join(format!("errors-{round}.log"));
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("KMS", kms_bin())
            .env("CFG", &kms.config)
            .env("ROUND", round.to_string())
            .env("LOG", &log)
            .env_remove("KMS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&errors).unwrap())
            .process_group(0)
            .spawn()
            .expect("start the create loop");
        sleep(Duration::from_millis(rng.range(50, 400)));
        kill_process_group(Pid::from_child(&child), Signal::KILL).expect("kill the loop");
        let status = child.wait().unwrap();
        wait_for_group_exit(child.id());
        assert_eq!(exit_code(status), 128 + 9, "the loop ended by itself");

        // No create failed: the only one that did not finish is the one killed, silently.
        let errors = fs::read_to_string(&errors).unwrap();
        assert!(
            errors.is_empty(),
            "round {round}: a create failed: {errors}"
        );

        let log = fs::read_to_string(&log).unwrap_or_default();
        let mut new = Vec::new();
        for line in log.lines() {
            let (id, hex) = line.split_once(' ').expect("id and key");
            let key = hex::decode(hex).expect("a hex key");
            assert_eq!(key.len(), 32, "{line}");
            kms.remember(&key);
            new.push((id.to_string(), key));
        }
        // Through the CLI: the last key acknowledged before the kill (the one most at risk)
        // and a few others of this round; every key so far in-process (check_store); and every
        // key through the CLI at the end.
        let mut sample: Vec<usize> = (0..new.len()).collect();
        rng.shuffle(&mut sample);
        sample.truncate(4);
        sample.extend(new.len().checked_sub(1));
        for i in sample {
            let (id, key) = &new[i];
            assert_eq!(&kms.get(id), key, "round {round}: {id}");
        }
        let new_count = new.len();
        acked.extend(new);
        let context = format!("after kill {round}");
        check_store(&kms, &acked, &context);
        // At most one create was in flight when the kill came: at most one unacknowledged key.
        let listed = kms.list().len();
        assert!(listed >= listed_before, "{context}: keys disappeared");
        assert!(
            listed - listed_before <= new_count + 1,
            "{context}: {} keys appeared for {new_count} acknowledged",
            listed - listed_before,
        );
        listed_before = listed;
    }
    assert!(!acked.is_empty(), "no create finished in 20 rounds");
    // In the end, every acknowledged key through the CLI once more.
    for (id, key) in &acked {
        assert_eq!(&kms.get(id), key, "{id}");
    }
    eprintln!("{} acknowledged keys survived 20 kills", acked.len());
}

/// A shell loop rotates one key over and over and logs each acknowledged new version; its
/// process group is killed with SIGKILL after a random 50-400 ms, 10 times over. Every
/// acknowledged version stays readable, in the order it was acknowledged, and version 1 with it.
#[test]
fn sigkill_of_a_rotate_loop_loses_no_acknowledged_version() {
    let kms = Kms::new();
    let mut rng = Rng::from_os("rotate loop");
    let v1 = kms.create("cluster/wal");
    let script = r#"
        while :; do
            if out=$("$KMS" --config "$CFG" rotate cluster/wal); then
                printf '%s\n' "$out" >>"$LOG"
            fi
        done
    "#;
    let log = kms.root().join("rotated.log");
    let id = KeyId::new("cluster/wal").unwrap();
    for round in 0..10 {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("KMS", kms_bin())
            .env("CFG", &kms.config)
            .env("LOG", &log)
            .env_remove("KMS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the rotate loop");
        sleep(Duration::from_millis(rng.range(50, 400)));
        kill_process_group(Pid::from_child(&child), Signal::KILL).expect("kill the loop");
        child.wait().unwrap();
        wait_for_group_exit(child.id());

        let acked: Vec<Vec<u8>> = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|line| hex::decode(line).expect("a hex key"))
            .collect();
        for key in &acked {
            kms.remember(key);
        }
        // Every stored version, through the library.
        let provider = kms_file::open(&kms_file::Options::in_dir(&kms.dir)).expect("open");
        let latest = provider.get(&id).expect("the newest version reads");
        let versions: Vec<Vec<u8>> = (1..=latest.version())
            .map(|v| {
                let key = provider
                    .get_version(&id, v)
                    .unwrap_or_else(|e| panic!("after kill {round}: version {v}: {e}"));
                key.expose_secret().to_vec()
            })
            .collect();
        drop(provider);
        assert_eq!(versions[0], v1, "after kill {round}: version 1 changed");
        // The acknowledged versions, in order; at most one unacknowledged one per kill.
        let mut at = 0;
        for (n, key) in acked.iter().enumerate() {
            let found = versions[at..]
                .iter()
                .position(|v| v == key)
                .unwrap_or_else(|| {
                    panic!("after kill {round}: acknowledged rotation {n} is lost or out of order")
                });
            at += found + 1;
        }
        assert!(
            versions.len() <= 1 + acked.len() + round + 1,
            "after kill {round}: {} versions for {} acknowledged rotations",
            versions.len(),
            acked.len()
        );
        // The CLI agrees on the newest and on the last acknowledged version.
        assert_eq!(kms.get("cluster/wal"), latest.expose_secret());
        if let Some(last) = acked.last() {
            let v = versions.iter().rposition(|k| k == last).unwrap() + 1;
            let got = kms.key(["get", "cluster/wal", "--version", &v.to_string()]);
            assert_eq!(&got, last);
        }
    }
}

/// Single `kms create` processes, each killed with SIGKILL at a random moment of its life
/// (from before it opened the store to after it printed), until 20 have been killed mid-way.
#[test]
fn sigkill_of_a_single_create_loses_nothing_acknowledged() {
    let kms = Kms::new();
    let mut rng = Rng::from_os("single create");

    // How long a create takes here, so that the kills land across its whole life.
    let mut longest = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        kms.create(&format!("warmup/{i}"));
        longest = longest.max(started.elapsed());
    }
    let span = (longest.as_micros() as u64 * 3 / 2).max(1_000);

    let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let (mut killed, mut finished, mut rounds) = (0, 0, 0);
    while killed < 20 && rounds < 400 {
        let id = format!("single/{rounds}");
        rounds += 1;
        let mut cmd = kms_command(["--config".as_ref(), kms.config.as_os_str()]);
        cmd.args(["create", id.as_str()]);
        let child = cmd.spawn().expect("start kms create");
        let pid = Pid::from_child(&child);
        sleep(Duration::from_micros(rng.range(0, span)));
        // The child is not reaped before wait_with_output, so the pid is still its own.
        let _ = kill_process(pid, Signal::KILL);
        let out = child.wait_with_output().unwrap();
        let run = kms.checked(Run {
            what: format!("kms create {id}"),
            code: exit_code(out.status),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
        match run.code {
            0 => {
                finished += 1;
                let key = parse_hex_line(&run.stdout);
                kms.remember(&key);
                assert_eq!(kms.get(&id), key, "{id}");
                acked.insert(id.clone(), key);
            }
            137 => {
                killed += 1;
                // Killed before or after its commit: the key is wholly there or absent.
                let after = kms.run(["get", id.as_str()]);
                assert!(matches!(after.code, 0 | 3), "{id} after the kill: {after}");
                // Killed after printing but before exiting: what it printed is stored.
                if run.stdout.len() == 65 {
                    assert_eq!(after.stdout, run.stdout, "{id}: killed after printing");
                }
            }
            _ => panic!("kms create neither finished nor was killed: {run}"),
        }
        let context = format!("after round {rounds}");
        check_store(&kms, &acked, &context);
    }
    for (id, key) in &acked {
        assert_eq!(&kms.get(id), key, "{id}");
    }
    eprintln!("{rounds} creates: {killed} killed, {finished} finished");
    assert!(killed > 0, "no create was killed in {rounds} rounds");
}
