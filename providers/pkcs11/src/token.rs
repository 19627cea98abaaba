//! One PKCS#11 token: the module loaded once per process, the slot found by label, a pool of
//! logged-in sessions, and the mapping of PKCS#11 return values to kms errors.
//!
//! # Threads
//!
//! A module is loaded and `C_Initialize`d once per process (with `CKF_OS_LOCKING_OK`, so the
//! module protects itself with the OS's mutexes) and shared by every provider that names it. A
//! PKCS#11 session must not be used by two threads at once, so a [`Token`] keeps a pool of
//! idle sessions: a caller takes one (or opens one), uses it alone and gives it back. Login
//! state is per application and token in PKCS#11, not per session; the pool keeps at least one
//! session open, so the login lasts as long as the provider.
//!
//! # Fork
//!
//! A child process inherits the parent's memory but not its PKCS#11 state: the specification
//! requires the child to call `C_Initialize` itself, and sessions and handles of the parent are
//! meaningless there. Every session checkout compares the process id with the one the module was
//! initialised in; on a change the module is initialised again, the inherited sessions are
//! abandoned (never closed: closing them could close the parent's) and the token is logged in
//! again with the PIN kept in memory.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use kms_core::{Error, ErrorKind, Result, SecretBytes};
use sha2::{Digest, Sha256};

/// Idle sessions kept per token beyond which returned sessions are closed.
const MAX_IDLE: usize = 32;

/// A module loaded and initialised in one process.
struct Loaded {
    pid: u32,
    context: Pkcs11,
    /// Per slot, a digest of the PIN that logged this process in, to check a second PIN
    /// against when the token answers "already logged in".
    logins: HashMap<u64, [u8; 32]>,
}

/// Every module this process loaded, by path.
fn modules() -> MutexGuard<'static, HashMap<PathBuf, Loaded>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Loaded>>> = OnceLock::new();
    MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The context of `module` for this process: loaded and initialised on first use, and again
/// in a child after a fork.
fn context(module: &Path) -> Result<Pkcs11> {
    let pid = std::process::id();
    let mut modules = modules();
    if let Some(loaded) = modules.get(module)
        && loaded.pid == pid
    {
        return Ok(loaded.context.clone());
    }

    // 1. The file: a missing module is a configuration error, not an outage.
    if std::fs::metadata(module).is_err() {
        let message = format!(
            "PKCS#11 module {} does not exist (for SoftHSM2: apt-get install softhsm2)",
            module.display()
        );
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    let context = Pkcs11::new(module).map_err(|e| {
        let message = format!("cannot load PKCS#11 module {}: {e}", module.display());
        Error::new(ErrorKind::InvalidConfig, message)
    })?;

    // 2. C_Initialize with OS locking. "Already initialised" means another part of this
    //    process (or the parent, for a module that ignores forks) did it: usable as it is.
    let args = CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK);
    match context.initialize(args) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(ck_error(e, "C_Initialize failed")),
    }
    modules.insert(
        module.to_path_buf(),
        Loaded {
            pid,
            context: context.clone(),
            logins: HashMap::new(),
        },
    );
    Ok(context)
}

/// A PKCS#11 token reached through a module, with the PIN to log in.
pub(crate) struct Token {
    module: PathBuf,
    label: String,
    pin: SecretBytes,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The process the sessions below belong to; 0 before the first checkout.
    pid: u32,
    slot: Option<Slot>,
    idle: Vec<Session>,
    /// Handles of key objects found by label, valid in this process.
    handles: HashMap<String, ObjectHandle>,
}

impl Token {
    /// Reaches the token and logs in, so that a wrong PIN or a missing token is reported now.
    pub(crate) fn open(module: &Path, label: &str, pin: SecretBytes) -> Result<Arc<Token>> {
        let token = Arc::new(Token {
            module: module.to_path_buf(),
            label: label.to_string(),
            pin,
            state: Mutex::new(State::default()),
        });
        drop(token.session()?);
        Ok(token)
    }

    /// The token and its module, for messages that may cross a plugin boundary without the
    /// provider's name.
    fn shown(&self) -> String {
        format!(
            "token \"{}\" of module {}",
            self.label,
            self.module.display()
        )
    }

    /// The token's label.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A logged-in session of this process, used by one caller at a time.
    pub(crate) fn session(&self) -> Result<Lease<'_>> {
        let pid = std::process::id();
        let mut state = self.lock();

        // 1. A new process (first use, or a child after fork): forget what was inherited.
        if state.pid != pid {
            for session in state.idle.drain(..) {
                // Closing would act on the parent's session handle numbers: abandon them.
                std::mem::forget(session);
            }
            state.handles.clear();
            state.slot = None;
            state.pid = pid;
        }

        // 2. An idle session, if any.
        if let Some(session) = state.idle.pop() {
            return Ok(Lease {
                token: self,
                pid,
                session: Some(session),
            });
        }

        // 3. Else a new one, logged in.
        let context = context(&self.module)?;
        let slot = match state.slot {
            Some(slot) => slot,
            None => {
                let slot = self.find_slot(&context)?;
                state.slot = Some(slot);
                slot
            }
        };
        drop(state);
        let session = context
            .open_rw_session(slot)
            .map_err(|e| ck_error(e, &format!("cannot open a session on {}", self.shown())))?;
        self.login(&session, slot)?;
        Ok(Lease {
            token: self,
            pid,
            session: Some(session),
        })
    }

    fn find_slot(&self, context: &Pkcs11) -> Result<Slot> {
        let slots = context
            .get_slots_with_initialized_token()
            .map_err(|e| ck_error(e, "cannot list the slots"))?;
        let mut found = Vec::new();
        let mut seen = Vec::new();
        for slot in slots {
            let info = context
                .get_token_info(slot)
                .map_err(|e| ck_error(e, "cannot read token information"))?;
            let label = info.label().trim_end().to_string();
            if label == self.label {
                found.push(slot);
            }
            seen.push(format!("\"{}\"", label.escape_debug()));
        }
        match found.as_slice() {
            [slot] => Ok(*slot),
            [] => {
                let present = if seen.is_empty() {
                    "no token is present".to_string()
                } else {
                    format!("tokens present: {}", seen.join(", "))
                };
                let message = format!("{} is not present ({present})", self.shown());
                Err(Error::new(ErrorKind::Unavailable, message))
            }
            _ => {
                let message = format!(
                    "{} tokens are labelled \"{}\": token labels must be unique",
                    found.len(),
                    self.label
                );
                Err(Error::new(ErrorKind::InvalidConfig, message))
            }
        }
    }

    fn pin_digest(&self, slot: Slot) -> [u8; 32] {
        Sha256::new()
            .chain_update(b"kms/pkcs11-pin-check/v1\0")
            .chain_update(slot.id().to_be_bytes())
            .chain_update(self.pin.expose_secret())
            .finalize()
            .into()
    }

    /// Logs in as the user. The login is shared by every session of this process on the
    /// token, so a token that says "already logged in" proves nothing about this PIN: it is
    /// compared with the one that logged in.
    fn login(&self, session: &Session, slot: Slot) -> Result<()> {
        let pin = RawAuthPin::new(Box::new(self.pin.expose_secret().to_vec()));
        let digest = self.pin_digest(slot);
        let result = session.login_with_raw(UserType::User, &pin);
        let mut modules = modules();
        let loaded = modules.get_mut(&self.module);
        match result {
            Ok(()) => {
                if let Some(loaded) = loaded {
                    loaded.logins.insert(slot.id(), digest);
                }
                Ok(())
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                match loaded.and_then(|l| l.logins.get(&slot.id()).copied()) {
                    Some(known) if known == digest => Ok(()),
                    Some(_) => Err(Error::new(
                        ErrorKind::Denied,
                        format!(
                            "wrong PIN for {} (it differs from the PIN this process logged in \
                             with)",
                            self.shown()
                        ),
                    )),
                    None => {
                        // Logged in by someone we do not know of (a module that kept its state
                        // across a fork): log out and prove this PIN.
                        drop(modules);
                        let _ = session.logout();
                        session.login_with_raw(UserType::User, &pin).map_err(|e| {
                            ck_error(e, &format!("cannot log in to {}", self.shown()))
                        })?;
                        if let Some(loaded) = self::modules().get_mut(&self.module) {
                            loaded.logins.insert(slot.id(), digest);
                        }
                        Ok(())
                    }
                }
            }
            Err(e) => Err(ck_error(e, &format!("cannot log in to {}", self.shown()))),
        }
    }

    /// The handle of a key object found by label in this process, if looked up before.
    pub(crate) fn cached_handle(&self, label: &str) -> Option<ObjectHandle> {
        self.lock().handles.get(label).copied()
    }

    pub(crate) fn cache_handle(&self, label: &str, handle: ObjectHandle) {
        self.lock().handles.insert(label.to_string(), handle);
    }

    pub(crate) fn forget_handle(&self, label: &str) {
        self.lock().handles.remove(label);
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module)
            .field("label", &self.label)
            .field("pin", &"[redacted]")
            .finish()
    }
}

/// A session taken from a token's pool; given back when dropped.
pub(crate) struct Lease<'a> {
    token: &'a Token,
    pid: u32,
    session: Option<Session>,
}

impl Lease<'_> {
    pub(crate) fn session(&self) -> &Session {
        self.session
            .as_ref()
            .expect("a lease holds its session until dropped")
    }

    /// Closes the session instead of returning it to the pool: after an error that may have
    /// left it unusable.
    pub(crate) fn discard(mut self) {
        // Dropped here: cryptoki closes it.
        self.session.take();
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let mut state = self.token.lock();
        if state.pid == self.pid && std::process::id() == self.pid && state.idle.len() < MAX_IDLE {
            state.idle.push(session);
        } else if std::process::id() != self.pid {
            std::mem::forget(session);
        }
    }
}

/// The PKCS#11 name of a return value, such as `CKR_PIN_INCORRECT`.
pub(crate) fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR");
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The kms error kind of a PKCS#11 return value.
pub(crate) fn rv_kind(rv: RvError) -> ErrorKind {
    use RvError::*;
    match rv {
        PinIncorrect
        | PinInvalid
        | PinLenRange
        | PinExpired
        | PinLocked
        | UserPinNotInitialized
        | UserNotLoggedIn
        | UserTypeInvalid => ErrorKind::Denied,
        TokenNotPresent
        | TokenNotRecognized
        | DeviceRemoved
        | DeviceError
        | DeviceMemory
        | SessionClosed
        | SessionHandleInvalid
        | SessionCount
        | CryptokiNotInitialized
        | SlotIdInvalid
        | FunctionFailed
        | GeneralError
        | HostMemory => ErrorKind::Unavailable,
        _ => ErrorKind::Other,
    }
}

/// A cryptoki error as a kms error: `doing`, then the PKCS#11 return value.
pub(crate) fn ck_error(error: CkError, doing: &str) -> Error {
    match error {
        CkError::Pkcs11(rv, _) => {
            let hint = match rv {
                RvError::PinIncorrect => ": wrong PIN",
                RvError::PinLocked => ": the PIN is locked; unlock it with the token's tools",
                _ => "",
            };
            let message = format!("{doing}: {}{hint}", rv_name(rv));
            Error::new(rv_kind(rv), message)
        }
        CkError::LibraryLoading(e) => Error::new(ErrorKind::InvalidConfig, format!("{doing}: {e}")),
        other => Error::new(ErrorKind::Other, format!("{doing}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_values_are_named_and_sorted() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(rv_kind(RvError::PinIncorrect), ErrorKind::Denied);
        assert_eq!(rv_kind(RvError::PinLocked), ErrorKind::Denied);
        assert_eq!(rv_kind(RvError::TokenNotPresent), ErrorKind::Unavailable);
        assert_ne!(rv_kind(RvError::WrappedKeyInvalid), ErrorKind::NotFound);
    }

    #[test]
    fn debug_hides_the_pin() {
        let token = Token {
            module: "/m.so".into(),
            label: "t".into(),
            pin: SecretBytes::copy_from(b"s3cret-pin"),
            state: Mutex::new(State::default()),
        };
        let shown = format!("{token:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
