//! The kmsd binary as a process: the socket's lifecycle, SIGTERM, and SIGKILL during create
//! storms.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_client::RemoteProvider;
use kms_core::{Key, KeyId, KeyProvider, KeySpec, SecretBytes};

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let config = dir.path().join("kmsd.toml");
    let text = "[provider]\nname = \"file\"\n[provider.options]\ndir = \"store\"\n\
                [server]\nsocket = \"kms.sock\"\n";
    std::fs::write(&config, text).unwrap();
    kms_file::init(&kms_file::Options::in_dir(dir.path().join("store"))).unwrap();
    Setup {
        dir,
        config,
        socket,
    }
}

fn start(setup: &Setup) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_kmsd"))
        .arg("--config")
        .arg(&setup.config)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&setup.socket);
    child
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while RemoteProvider::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "kmsd did not start serving on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn random_below(n: u64) -> u64 {
    let bytes = SecretBytes::random(8).unwrap();
    u64::from_le_bytes(bytes.expose_secret().try_into().unwrap()) % n
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let setup = setup();

    // A socket file nobody listens on: what a crashed kmsd leaves.
    drop(std::os::unix::net::UnixListener::bind(&setup.socket).unwrap());
    assert!(setup.socket.exists());
    let mut first = start(&setup);

    // A second kmsd on the same socket refuses to start.
    let second = Command::new(env!("CARGO_BIN_EXE_kmsd"))
        .arg("--config")
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    RemoteProvider::connect(&setup.socket)
        .unwrap()
        .get_or_create(&KeyId::new("k").unwrap(), KeySpec::default())
        .unwrap();

    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn a_file_that_is_not_a_socket_is_never_deleted() {
    let setup = setup();
    std::fs::write(&setup.socket, b"precious").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kmsd"))
        .arg("--config")
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a socket; refusing to replace it"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&setup.socket).unwrap(), b"precious");
}

#[test]
fn sigterm_finishes_and_exits_zero() {
    let setup = setup();
    let mut server = start(&setup);
    let client = RemoteProvider::connect(&setup.socket).unwrap();
    let key = client
        .get_or_create(&KeyId::new("before/term").unwrap(), KeySpec::default())
        .unwrap();
    // An idle connection must not hold the server up.
    let _idle = RemoteProvider::connect(&setup.socket).unwrap();

    rustix::process::kill_process(
        rustix::process::Pid::from_child(&server),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!setup.socket.exists(), "the socket was left behind");

    let provider =
        kms_file::open(&kms_file::Options::in_dir(setup.dir.path().join("store"))).unwrap();
    assert_eq!(provider.get(key.id()).unwrap(), key);
}

#[test]
fn sigkill_during_create_storms_loses_no_acknowledged_key() {
    let setup = setup();
    let acknowledged: Arc<Mutex<HashMap<KeyId, Key>>> = Arc::default();
    for round in 0..20 {
        let mut server = start(&setup);

        // 8 clients create keys until the server dies under them.
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..8)
            .map(|client| {
                let socket = setup.socket.clone();
                let acknowledged = Arc::clone(&acknowledged);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let Ok(provider) = RemoteProvider::connect(&socket) else {
                        return;
                    };
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let id = KeyId::new(&format!("storm/{round}/{client}/{n}")).unwrap();
                        match provider.create(&id, KeySpec::default()) {
                            Ok(key) => {
                                acknowledged.lock().unwrap().insert(id, key);
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + random_below(300)));
        server.kill().unwrap();
        server.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.join().unwrap();
        }

        // Every acknowledged key reads back, byte for byte, through a restarted server that
        // finds the dead one's socket.
        let server = start(&setup);
        let provider = RemoteProvider::connect(&setup.socket).unwrap();
        let acknowledged = acknowledged.lock().unwrap();
        for (id, key) in acknowledged.iter() {
            assert_eq!(
                &provider.get(id).unwrap(),
                key,
                "round {round}: {id} changed or vanished"
            );
        }
        let mut server = server;
        server.kill().unwrap();
        server.wait().unwrap();
    }
    let total = acknowledged.lock().unwrap().len();
    assert!(
        total > 100,
        "only {total} keys were acknowledged in 20 rounds"
    );
}
