//! The SoftHSM2 harness of the pkcs11 tests.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialised, and a PKCS#11 module is
//! initialised once per process. So that each test gets a token directory of its own (and no
//! test changes the environment of a running process), [`enter`] runs the body of a test in a
//! child process: the parent makes a temporary token directory, writes a `softhsm2.conf`,
//! initialises a token with `softhsm2-util`, and re-runs the test binary for that one test with
//! `SOFTHSM2_CONF` and the PINs in the child's environment. The child runs the body; the parent
//! asserts that it passed.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kms_core::config::Context;

/// SoftHSM2's PKCS#11 module, as Debian installs it.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The label of the token each test gets.
pub const TOKEN: &str = "kms-test";
/// The user PIN, handed to the child in [`PIN_ENV`].
pub const PIN: &str = "2468-user";
/// The security officer's PIN.
pub const SO_PIN: &str = "1357-so";
/// The variable holding the right PIN.
pub const PIN_ENV: &str = "KMS_TEST_PKCS11_PIN";
/// The variable holding a wrong PIN.
pub const WRONG_PIN_ENV: &str = "KMS_TEST_PKCS11_WRONG_PIN";
/// The key label of the tests' KEK.
pub const KEY: &str = "kms-kek";

const DIR_ENV: &str = "KMS_TEST_PKCS11_DIR";

/// What the body of a test gets: its scratch directory (mode 0700).
pub struct Hsm {
    pub dir: PathBuf,
}

fn require_softhsm() {
    assert!(
        Path::new(MODULE).exists(),
        "SoftHSM2 is not installed: {MODULE} is missing; install it with \
         `apt-get install softhsm2` (the pkcs11 tests need a real token)"
    );
    let util = Command::new("softhsm2-util").arg("--version").output();
    assert!(
        util.is_ok_and(|o| o.status.success()),
        "softhsm2-util does not run; install it with `apt-get install softhsm2`"
    );
}

/// Runs the test `name` in a child with a fresh SoftHSM2 token: returns `None` in the parent
/// (once the child passed), the scratch directory in the child.
pub fn enter(name: &str) -> Option<Hsm> {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        return Some(Hsm {
            dir: PathBuf::from(dir),
        });
    }
    require_softhsm();

    // 1. A private scratch directory holding the token directory and the configuration.
    let scratch = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let tokens = scratch.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let conf = scratch.path().join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
        tokens.display()
    );
    std::fs::write(&conf, text).unwrap();

    // 2. The token.
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", TOKEN, "--pin", PIN])
        .args(["--so-pin", SO_PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util runs");
    assert!(
        out.status.success(),
        "softhsm2-util --init-token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 3. The test body, in a child of its own.
    let status = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(DIR_ENV, scratch.path())
        .env(PIN_ENV, PIN)
        .env(WRONG_PIN_ENV, "9999-not-it")
        .status()
        .expect("the test binary runs itself");
    assert!(
        status.success(),
        "test {name} failed in its SoftHSM2 child process (its output is above): {status}"
    );
    None
}

/// Provider options (TOML) for the store `store` (relative to the scratch directory).
pub fn options_text(store: &str, token: &str, key: &str, pin_env: &str) -> String {
    format!(
        "dir = \"{store}\"\nmodule = \"{MODULE}\"\ntoken_label = \"{token}\"\n\
         key_label = \"{key}\"\npin_env = \"{pin_env}\"\n"
    )
}

/// The usual options: store `store`, the test token, the test key, the right PIN.
pub fn options(store: &str) -> String {
    options_text(store, TOKEN, KEY, PIN_ENV)
}

pub fn table(text: &str) -> kms_core::toml::Table {
    text.parse().expect("test options are valid TOML")
}

pub fn context(hsm: &Hsm) -> Context {
    Context {
        base_dir: hsm.dir.clone(),
    }
}

pub fn parse(hsm: &Hsm, text: &str) -> kms_pkcs11::Options {
    kms_pkcs11::Options::from_table(&context(hsm), &table(text)).expect("valid options")
}

/// The mechanisms of the test token.
pub fn mechanisms() -> Vec<cryptoki::mechanism::MechanismType> {
    let session = raw_session();
    let info = session.get_session_info().unwrap();
    let pkcs11 = cryptoki::context::Pkcs11::new(MODULE).unwrap();
    pkcs11.get_mechanism_list(info.slot_id()).unwrap()
}

/// A raw PKCS#11 session on the test token, logged in, to look at what the provider made.
pub fn raw_session() -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let pkcs11 = Pkcs11::new(MODULE).unwrap();
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .expect("the test token");
    let session = pkcs11.open_rw_session(slot).unwrap();
    let pin = cryptoki::types::AuthPin::from(PIN.to_string());
    match session.login(cryptoki::session::UserType::User, Some(&pin)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("C_Login: {e}"),
    }
    session
}

/// The AES key objects labelled `label` on the test token.
pub fn keys_labelled(
    session: &cryptoki::session::Session,
    label: &str,
) -> Vec<cryptoki::object::ObjectHandle> {
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap()
}
