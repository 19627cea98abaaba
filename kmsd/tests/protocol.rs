//! kmsd in-process over a real Unix socket: malformed input, pipelining, caching, and
//! authorization by peer credentials.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_client::RemoteProvider;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kmsd::Settings;

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    handle: Option<kmsd::Handle>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop().unwrap();
        }
    }
}

/// A server of a fresh file provider; `extra` is appended to the `[server]` table.
fn start(extra: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    kms_file::init(&kms_file::Options::in_dir(&store)).unwrap();
    let provider = kms_file::open(&kms_file::Options::in_dir(&store)).unwrap();
    let socket = dir.path().join("kms.sock");
    let text = format!(
        "socket = {:?}\naudit_log = {:?}\nidle_timeout = 5\n{extra}",
        socket.display().to_string(),
        dir.path().join("audit.log").display().to_string()
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    let settings = Settings::from_table(&table, Path::new("")).unwrap();
    let handle = kmsd::spawn(Box::new(provider), settings).unwrap();
    Server {
        _dir: dir,
        socket,
        handle: Some(handle),
    }
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut conn = Conn {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        assert!(conn.line().starts_with("KMS/1 file provider at "));
        conn
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "no complete answer: {line:?}");
        line.pop();
        line
    }

    fn ask(&mut self, request: &str) -> String {
        self.send(format!("{request}\n").as_bytes());
        self.line()
    }
}

#[test]
fn malformed_input_gets_one_error_and_the_connection_stays_usable() {
    let server = start("");
    let mut conn = Conn::open(&server.socket);
    let created = conn.ask("GET-OR-CREATE ok/key");
    assert!(created.starts_with("OK 1 "), "{created}");

    let huge = {
        let mut line = b"GET ".to_vec();
        line.resize(1 << 20, b'a');
        line.push(b'\n');
        line
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"GET a b\n".to_vec(),
            "ERR invalid-input GET takes 1 argument(s), got 2",
        ),
        (
            b"GET a\0b\n".to_vec(),
            "ERR invalid-input request holds the byte 0x00",
        ),
        (
            b"GET \xff\xfe\n".to_vec(),
            "ERR invalid-input request holds the byte 0xff",
        ),
        (
            huge,
            "ERR invalid-input request line longer than 4095 bytes",
        ),
        (
            b"FLY me\n".to_vec(),
            "ERR invalid-input unknown verb \"FLY\"",
        ),
        (
            b"GET ../../etc/passwd\n".to_vec(),
            "ERR invalid-key-id invalid key id",
        ),
        (b"\n".to_vec(), "ERR invalid-input empty request"),
        (
            b"CREATE x 512\n".to_vec(),
            "ERR invalid-input a key has 128, 192 or 256 bits",
        ),
    ];
    for (bad, expected) in cases {
        conn.send(&bad);
        let answer = conn.line();
        assert!(
            answer.starts_with(expected),
            "{answer:?} for {:?}",
            &bad[..bad.len().min(20)]
        );
        // The next valid request is answered correctly.
        assert_eq!(conn.ask("GET ok/key"), created);
    }

    // CRLF endings.
    conn.send(b"PING\r\nGET ok/key\r\n");
    assert_eq!(conn.line(), "OK PONG");
    assert_eq!(conn.line(), created);

    // A key id holding a newline cannot be sent through the client: it is refused first, and
    // nothing is created.
    assert_eq!(
        KeyId::new("a\nCREATE b").unwrap_err().kind(),
        ErrorKind::InvalidKeyId
    );
    assert!(conn.ask("GET b").starts_with("ERR not-found"));

    // Half a line, then the client closes its side: one error, then the end.
    conn.send(b"GET ok/ke");
    conn.writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        conn.line()
            .starts_with("ERR invalid-input the connection closed in the middle")
    );
    let mut rest = String::new();
    assert_eq!(conn.reader.read_to_string(&mut rest).unwrap(), 0);
}

#[test]
fn ten_thousand_pipelined_requests_are_answered_in_order() {
    let server = start("");
    let client = RemoteProvider::connect(&server.socket).unwrap();
    let keys: Vec<_> = (0..10)
        .map(|i| {
            client
                .create(&KeyId::new(&format!("p/{i}")).unwrap(), KeySpec::default())
                .unwrap()
        })
        .collect();
    let expected: Vec<String> = (0..10_000)
        .map(|i| match i % 1000 {
            999 => "ERR invalid-input".to_string(),
            _ => String::from_utf8(
                kms_core::protocol::format_key(&keys[i % 10])
                    .as_bytes()
                    .to_vec(),
            )
            .unwrap(),
        })
        .collect();

    let mut conn = Conn::open(&server.socket);
    let mut writer = conn.writer.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut all = Vec::new();
        for i in 0..10_000 {
            match i % 1000 {
                999 => all.extend_from_slice(b"GET bad/../x x\n"),
                _ => all.extend_from_slice(format!("GET p/{}\n", i % 10).as_bytes()),
            }
        }
        writer.write_all(&all).unwrap();
    });
    for (i, want) in expected.iter().enumerate() {
        let got = conn.line();
        assert!(
            got.starts_with(want.as_str()),
            "answer {i}: {got:?}, expected {want:?}"
        );
    }
    sender.join().unwrap();
}

#[test]
fn cached_keys_cost_one_provider_call() {
    let server = start("");
    let mut conn = Conn::open(&server.socket);
    let first = conn.ask("GET-OR-CREATE hot/key");
    let mut batch = Vec::new();
    for _ in 0..10_000 {
        batch.extend_from_slice(b"GET hot/key\n");
    }
    conn.send(&batch);
    for _ in 0..10_000 {
        assert_eq!(conn.line(), first);
    }
    let client = RemoteProvider::connect(&server.socket).unwrap();
    let stats: std::collections::HashMap<String, u64> =
        client.stats().unwrap().into_iter().collect();
    assert_eq!(stats["provider_get"], 0, "{stats:?}");
    assert_eq!(stats["provider_get_or_create"], 1, "{stats:?}");
    assert_eq!(stats["cache_hits"], 10_000, "{stats:?}");
    assert_eq!(stats["cached_keys"], 1, "{stats:?}");
}

#[test]
fn remote_provider_passes_the_conformance_suite_and_keeps_error_kinds() {
    let server = start("");
    let client = RemoteProvider::connect(&server.socket).unwrap();
    kms_core::conformance::assert_conforms(&client);
    let missing = KeyId::new("nope").unwrap();
    assert_eq!(
        client.get(&missing).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let id = KeyId::new("exists").unwrap();
    client.create(&id, KeySpec::default()).unwrap();
    let err = client.create(&id, KeySpec::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(err.to_string().contains("\"exists\""), "{err}");
}

#[test]
fn audit_log_records_operations_and_never_keys() {
    let server = start("");
    let client = RemoteProvider::connect(&server.socket).unwrap();
    let key = client
        .get_or_create(&KeyId::new("audited/k").unwrap(), KeySpec::default())
        .unwrap();
    let _ = client.get(&KeyId::new("audited/missing").unwrap());
    drop(client);
    let audit_path = server.socket.with_file_name("audit.log");
    let mut server = server;
    server.handle.take().unwrap().stop().unwrap();
    let audit = std::fs::read_to_string(audit_path).unwrap();
    let lines: Vec<&str> = audit.lines().collect();
    assert_eq!(lines.len(), 2, "{audit}");
    let me = rustix::process::geteuid().as_raw();
    assert!(lines[0].contains(&format!(" uid={me} ")), "{audit}");
    assert!(
        lines[0].ends_with("op=GET-OR-CREATE id=audited/k result=ok"),
        "{audit}"
    );
    assert!(
        lines[1].ends_with("op=GET id=audited/missing result=not-found"),
        "{audit}"
    );
    let hex: String = key
        .expose_secret()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let b64 = kms_core::protocol::format_key(&key).to_string();
    assert!(
        !audit.contains(&hex[..16]) && !audit.contains(&b64[5..20]),
        "key material in the audit log"
    );
}

/// Runs a protocol client as `nobody` (through runuser and the system Python) and returns its
/// answers, one per request.
fn as_nobody(socket: &Path, requests: &[&str]) -> Vec<String> {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
f.readline()
for request in sys.argv[2:]:
    f.write(request.encode() + b"\n"); f.flush()
    answer = f.readline().decode().rstrip("\n")
    print(answer)
    if answer.startswith("OK ") and request.startswith("LIST"):
        for _ in range(int(answer.split()[1])):
            f.readline()
"#;
    let output = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "/usr/bin/python3", "-c", script])
        .arg(socket)
        .args(requests)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn open_to_nobody(server: &Server) {
    let dir = server.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn another_uid_without_a_rule_is_denied() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED: needs root to run a client as nobody");
        return;
    }
    let server = start("socket_mode = \"0666\"\n");
    open_to_nobody(&server);
    let answers = as_nobody(
        &server.socket,
        &["PING", "GET-OR-CREATE x", "LIST", "STATS"],
    );
    assert_eq!(answers[0], "OK PONG");
    for answer in &answers[1..] {
        assert!(
            answer.starts_with("ERR denied uid 65534 may not"),
            "{answers:?}"
        );
    }
    let client = RemoteProvider::connect(&server.socket).unwrap();
    assert_eq!(
        client.get(&KeyId::new("x").unwrap()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn a_rule_serves_another_uid_under_its_prefix_only() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED: needs root to run a client as nobody");
        return;
    }
    let rule = "socket_mode = \"0666\"\n[[allow]]\nuids = [65534]\nprefix = \"app/\"\nops = [\"get\", \"create\", \"list\"]\n";
    let server = start(rule);
    open_to_nobody(&server);
    let answers = as_nobody(
        &server.socket,
        &[
            "GET-OR-CREATE app/k",
            "GET app/k",
            "LIST app/",
            "GET-OR-CREATE other/k",
            "LIST",
            "DELETE app/k",
            "STATS",
        ],
    );
    assert!(answers[0].starts_with("OK 1 "), "{answers:?}");
    assert_eq!(answers[1], answers[0]);
    assert_eq!(answers[2], "OK 1");
    for denied in &answers[3..] {
        assert!(denied.starts_with("ERR denied"), "{answers:?}");
    }
    let client = RemoteProvider::connect(&server.socket).unwrap();
    assert_eq!(
        client
            .get(&KeyId::new("other/k").unwrap())
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert!(client.get(&KeyId::new("app/k").unwrap()).is_ok());
}
