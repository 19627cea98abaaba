//! Disk full: creates and a KEK rotation on a filesystem that runs out of space fail with a
//! clear "no space" error, and the store then opens with every key acknowledged before it
//! intact, byte for byte; once space is back, work goes on where it stopped.
//!
//! The filesystem is a real tmpfs of a few hundred KiB, mounted for the test and unmounted
//! after it (so the test runs as root, as CI does). A filler file takes part of the space, so
//! that the test can free room again by removing it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kms_command::Options;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_tests::{Run, command_config, file_config, kms_command};

/// A tmpfs mounted on a fresh temporary directory, unmounted when dropped (also on panic).
struct SmallDisk {
    _tmp: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallDisk {
    fn new(size_kib: u32) -> SmallDisk {
        assert!(
            rustix::process::geteuid().is_root(),
            "the disk-full tests mount a tmpfs and run as root (CI does)"
        );
        let tmp = tempfile::Builder::new()
            .prefix("kms-disk-full-")
            .tempdir()
            .expect("a temporary directory");
        let mount = tmp.path().join("disk");
        fs::create_dir(&mount).expect("the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_kib}k,mode=0700"))
            .arg("tmpfs")
            .arg(&mount)
            .status()
            .expect("cannot run mount");
        assert!(status.success(), "mounting a tmpfs on {}", mount.display());
        SmallDisk { _tmp: tmp, mount }
    }

    fn path(&self) -> &Path {
        &self.mount
    }

    /// Takes every free byte of the disk with a file, to be given back with
    /// [`SmallDisk::free`].
    fn fill_up(&self) {
        use std::io::Write;
        let mut file = fs::File::create(self.mount.join("filler")).expect("the filler file");
        let block = vec![0xa5; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("writing the filler file: {e}"),
            }
        }
        let _ = file.sync_all();
    }

    /// Gives `kib` KiB of the filler file back.
    fn free_some(&self, kib: u64) {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(self.mount.join("filler"))
            .expect("the filler file");
        let len = file.metadata().expect("its size").len();
        file.set_len(len.saturating_sub(kib * 1024))
            .expect("shrink the filler file");
    }

    fn free(&self) {
        fs::remove_file(self.mount.join("filler")).expect("remove the filler file");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

type Keys = Vec<(KeyId, Vec<u8>)>;

/// Creates `n` keys, which must all succeed.
fn create_n(provider: &dyn KeyProvider, prefix: &str, n: usize) -> Keys {
    (0..n)
        .map(|i| {
            let id = KeyId::new(&format!("{prefix}/{i}")).expect("a valid id");
            let key = provider
                .create(&id, KeySpec::default())
                .unwrap_or_else(|e| panic!("create {id} with space left: {e}"));
            (id, key.expose_secret().to_vec())
        })
        .collect()
}

/// Creates keys until the disk is full; returns the acknowledged ones and the error.
fn create_until_full(provider: &dyn KeyProvider, prefix: &str) -> (Keys, kms_core::Error) {
    let mut keys = Vec::new();
    for i in 0..1_000_000 {
        let id = KeyId::new(&format!("{prefix}/more/{i}")).expect("a valid id");
        match provider.create(&id, KeySpec::default()) {
            Ok(key) => keys.push((id, key.expose_secret().to_vec())),
            Err(e) => return (keys, e),
        }
    }
    panic!("a disk of a few hundred KiB never filled up");
}

fn assert_no_space(error: &str) {
    assert!(
        error.contains("no space"),
        "a full disk is not reported as such: {error}"
    );
}

fn assert_keys(provider: &dyn KeyProvider, keys: &Keys) {
    for (id, bytes) in keys {
        let key = provider
            .get(id)
            .unwrap_or_else(|e| panic!("acknowledged key {id} lost after disk full: {e}"));
        assert_eq!(key.expose_secret(), &bytes[..], "key {id} changed");
    }
}

#[test]
fn creates_on_a_full_disk_fail_clearly_and_lose_nothing() {
    let disk = SmallDisk::new(8192);
    let dir = disk.path().join("store");
    let config = disk.path().join("kms.toml");
    fs::write(&config, file_config(&dir)).unwrap();
    let options = kms_file::Options::in_dir(&dir);
    kms_file::init(&options).expect("init on the small disk");

    // 1. Keys, then the disk filled up: the next creates fail saying there is no space.
    let provider = kms_file::open(&options).expect("open");
    let mut keys = create_n(&provider, "full", 200);
    disk.fill_up();
    let (more, error) = create_until_full(&provider, "full");
    keys.extend(more);
    assert_eq!(error.kind(), ErrorKind::NoSpace, "{error}");
    assert_no_space(&error.to_string());
    assert!(
        error.to_string().contains("key \"full/more/"),
        "no key id in: {error}"
    );

    // 2. The CLI says so too, on one line, with exit status 1, and prints no key.
    let run = Run::of(kms_command([
        "--config".as_ref(),
        config.as_os_str(),
        "create".as_ref(),
        "cli/one".as_ref(),
    ]));
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stdout.is_empty(), "{run}");
    assert_no_space(&run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");

    // 3. Every acknowledged key reads back, in this process and in a fresh one.
    assert_keys(&provider, &keys);
    drop(provider);
    let reopened = kms_file::open(&options).expect("the store opens after disk full");
    assert_keys(&reopened, &keys);
    let listed = reopened.list("full/").expect("list");
    assert_eq!(
        listed.len(),
        keys.len(),
        "a failed create left a key behind"
    );
    let run = Run::of(kms_command([
        "--config".as_ref(),
        config.as_os_str(),
        "get".as_ref(),
        keys[0].0.as_str().as_ref(),
        "--format".as_ref(),
        "hex".as_ref(),
    ]));
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout_text().trim(), hex::encode(&keys[0].1));

    // 4. With space back, creates go on.
    disk.free();
    let id = KeyId::new("after/1").unwrap();
    let key = reopened
        .create(&id, KeySpec::default())
        .expect("create after freeing");
    assert_keys(&reopened, &vec![(id, key.expose_secret().to_vec())]);
    assert_keys(&reopened, &keys);
}

#[test]
fn a_kek_rotation_on_a_full_disk_fails_clearly_and_resumes() {
    let disk = SmallDisk::new(8192);
    let dir = disk.path().join("store");
    let pass = disk.path().join("pass");
    fs::write(&pass, "disk full passphrase\n").unwrap();
    let command = format!("cat {}", pass.display());
    let config = disk.path().join("kms.toml");
    fs::write(&config, command_config(&dir, &command, 1000)).unwrap();
    let options = Options {
        dir: dir.clone(),
        passphrase_command: command.clone(),
        timeout: 10.0,
        iterations: 1000,
    };
    kms_command::init(&options).expect("init on the small disk");

    // 1. Keys, then the disk filled up.
    let provider = kms_command::open(&options).expect("open");
    let keys = create_n(&provider, "rot", 300);
    drop(provider);
    disk.fill_up();

    // 2. The rotation needs room to re-wrap: it fails with "no space", through the CLI too.
    let failed = kms_command::rotate_kek(&options, |_| {}).expect_err("rotation on a full disk");
    assert_eq!(failed.kind(), ErrorKind::NoSpace, "{failed}");
    assert_no_space(&failed.to_string());
    let run = Run::of(kms_command([
        "--config".as_ref(),
        config.as_os_str(),
        "rotate-kek".as_ref(),
    ]));
    assert_eq!(run.code, 1, "{run}");
    assert_no_space(&run.stderr);

    // 3. Every key still reads back, from a freshly opened store. (A store opened anew needs
    //    room for SQLite's WAL index, 32 KiB: see docs/architecture.md.)
    disk.free_some(128);
    let reopened = kms_command::open(&options).expect("the store opens after the failure");
    assert_keys(&reopened, &keys);
    drop(reopened);

    // 4. With space back, running the rotation again finishes it, and nothing changed.
    disk.free();
    let rotated = kms_command::rotate_kek(&options, |_| {}).expect("the resumed rotation");
    assert_eq!(rotated.to, rotated.from + 1);
    let reopened = kms_command::open(&options).expect("open after the rotation");
    assert_keys(&reopened, &keys);
    let store = kms_core::store::Store::open(&dir.join(kms_command::STORE_FILE)).unwrap();
    let by_kek = store.count_by_kek().unwrap();
    assert_eq!(
        by_kek,
        vec![(rotated.to, keys.len() as u64)],
        "keys left under the old KEK"
    );
}
