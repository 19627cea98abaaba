//! The main job on a real database: PostgreSQL 15 takes its TLS key passphrase from kms and
//! archives its WAL encrypted through kms; a point-in-time recovery decrypts it back.
//!
//! Driven by `tests/e2e/postgres.sh` (which asserts each step and prints `ok: ...` lines),
//! once with the file provider and once with the command provider. Needs root (PostgreSQL
//! runs as the `postgres` user through runuser) and PostgreSQL 15 in /usr/lib/postgresql/15.

use std::path::Path;
use std::process::Command;

fn binaries() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let kms = kms_tests::kms_bin();
        let dir = kms
            .parent()
            .expect("the kms binary has a directory")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "kmsd", "-p", "kms-file-plugin"])
            .args(["-p", "kms-command-plugin", "--manifest-path"])
            .arg(&manifest)
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "building kmsd and the plugins failed");
        for needed in ["kms", "kmsd", "libkms_file.so", "libkms_command.so"] {
            assert!(
                dir.join(needed).is_file(),
                "{needed} missing in {}",
                dir.display()
            );
        }
        dir
    })
}

fn run(provider: &str) {
    let postgres = Path::new("/usr/lib/postgresql/15/bin/initdb");
    assert!(
        postgres.is_file(),
        "PostgreSQL 15 is not installed (.ci/run installs it)"
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "the PostgreSQL end-to-end test runs as root (it runs PostgreSQL as `postgres`)"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/postgres.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(binaries())
        .arg(provider)
        .output()
        .expect("cannot run the end-to-end script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "{provider}: {stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "postgres end-to-end with the {provider} provider: passed"
        )),
        "{stdout}"
    );
    for step in [
        "PostgreSQL started with its TLS key unlocked through kms",
        "archive_command failed",
        "none holds the marker",
        "point-in-time recovery through kms decrypt",
    ] {
        assert!(
            stdout.contains(step),
            "{provider}: missing step {step:?}\n{stdout}"
        );
    }
}

#[test]
fn postgres_with_the_file_provider() {
    run("file");
}

#[test]
fn postgres_with_the_command_provider() {
    run("command");
}
