//! The harness of the aws-kms tests: a real `moto_server` on a free loopback port, killed on
//! every path (Drop), KMS keys made with the SDK against it, and the test environment.
//!
//! Credentials come from the standard chain, so the tests need `AWS_ACCESS_KEY_ID` and friends
//! in the environment. Setting them inside a multi-threaded test process is not sound, so
//! each test re-runs itself (the same test binary, that one test) with the variables set:
//! [`in_moto_env`] returns `false` in the parent, which only checks the child's status.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kms_aws_kms::{Kms, Options};

const CHILD_MARK: &str = "KMS_AWS_KMS_TEST_CHILD";

/// Runs the test `name` again in a child process with fake AWS credentials in its
/// environment; `true` in that child (run the body), `false` in the parent (done).
pub fn in_moto_env(name: &str) -> bool {
    if std::env::var_os(CHILD_MARK).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let status = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_MARK, "1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_SESSION_TOKEN", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_KMS")
        .status()
        .expect("the test binary runs itself");
    assert!(
        status.success(),
        "test {name} failed in its child process: {status}"
    );
    false
}

/// A running `moto_server`, killed when dropped.
pub struct Moto {
    child: Option<Child>,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
}

impl Moto {
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` and waits until it accepts connections.
    /// Fails (never skips) when moto is not installed.
    pub fn start() -> Moto {
        let port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free port");
            listener.local_addr().unwrap().port()
        };
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot start moto_server ({e}): these tests need the real moto server; install \
                 it with `pip install 'moto[server]'` (.ci/run does this)"
            ),
        };
        let mut moto = Moto {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return moto;
            }
            if let Some(status) = moto.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto_server exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port} in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it now (and waits for it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Provider options for a directory and a KMS key on this server.
    pub fn options(&self, dir: &Path, key_id: &str) -> Options {
        let mut options = Options::new(dir, key_id);
        options.region = Some("us-east-1".to_string());
        options.endpoint = Some(self.endpoint());
        options.operation_timeout = 5.0;
        options.connect_timeout = 1.0;
        options
    }

    /// A client of this server, for administration (CreateKey, DisableKey, ...).
    pub fn admin(&self) -> Kms {
        Kms::connect(&self.options(Path::new("/nonexistent"), "unused")).expect("a client")
    }

    /// CreateKey: a new symmetric key; its ARN.
    pub fn create_key(&self) -> String {
        self.create_key_with_policy(None)
    }

    /// CreateKey with a key policy.
    pub fn create_key_with_policy(&self, policy: Option<&str>) -> String {
        let admin = self.admin();
        let mut request = admin
            .client()
            .create_key()
            .description("kms test key")
            .key_usage(kms_aws_kms::aws_sdk_kms::types::KeyUsageType::EncryptDecrypt);
        if let Some(policy) = policy {
            request = request.policy(policy);
        }
        let created = admin
            .call("CreateKey", request.send())
            .unwrap()
            .expect("CreateKey on moto");
        created.key_metadata().unwrap().arn().unwrap().to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private temporary directory (0700).
pub fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Options as a TOML table, as a configuration file would give them.
pub fn table(options: &Options) -> kms_core::toml::Table {
    let mut text = format!(
        "dir = {:?}\nkey_id = {:?}\nregion = \"us-east-1\"\noperation_timeout = 5.0\n",
        options.dir.display().to_string(),
        options.key_id
    );
    if let Some(endpoint) = &options.endpoint {
        text.push_str(&format!("endpoint = {endpoint:?}\n"));
    }
    text.parse().expect("valid TOML")
}

/// `<target>/<profile>`, found from the test executable.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe.parent().expect("the test lives in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Runs `cargo build` with `args` into the target directory the tests run from.
pub fn cargo_build(args: &[&str]) {
    let profile = profile_dir();
    let target = profile.parent().unwrap().to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .args(args)
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target);
    match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(other) => {
            command.args(["--profile", other]);
        }
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "cargo build {args:?} failed: {status}");
}

/// Builds the plugin crate (once per test process) and returns the path of
/// `libkms_aws_kms.so`.
pub fn plugin_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            cargo_build(&["-p", "kms-aws-kms-plugin"]);
            profile_dir().join(kms_core::plugin::library_file_name("aws-kms"))
        })
        .clone()
}
