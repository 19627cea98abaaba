//! # kmsd as a library
//!
//! The server behind the `kmsd` binary, usable in-process: tests start it with any
//! `Box<dyn KeyProvider>` (the mock included) through [`spawn`], and the binary runs it until a
//! signal through [`serve`].
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod cache;
pub mod harden;
pub mod server;
pub mod settings;
pub mod stats;

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kms_core::KeyProvider;

pub use crate::server::Shared;
pub use crate::settings::Settings;

/// Where the listening socket comes from.
pub enum Listen {
    /// Bind `settings.socket`, replacing a stale socket.
    Bind,
    /// A socket passed in (by systemd).
    Inherited(UnixListener),
}

/// Serves `provider` until `wake` becomes readable (a signal, or [`Handle::stop`]), then lets
/// requests in flight finish, flushes the audit log and removes the socket it bound.
pub fn serve(
    provider: Box<dyn KeyProvider>,
    settings: Settings,
    listen: Listen,
    wake: &UnixStream,
    on_ready: impl FnOnce(&Path),
) -> Result<()> {
    // 1. The audit log first (a bad path fails before the socket exists), then the socket.
    let audit = settings
        .audit_log
        .as_deref()
        .map(audit::AuditLog::open)
        .transpose()?;
    let (listener, bound) = match listen {
        Listen::Inherited(listener) => (listener, None),
        Listen::Bind => {
            let listener = bind(&settings.socket, settings.socket_mode)?;
            (listener, file_identity(&settings.socket))
        }
    };
    let socket = settings.socket.clone();
    let shared = Arc::new(Shared::new(provider, settings, audit));
    let sweeper = start_sweeper(Arc::clone(&shared));
    tracing::info!(socket = %socket.display(), provider = %shared.provider, "serving");
    on_ready(&socket);

    // 2. Serve until woken; then finish what is in flight.
    let threads = server::accept_loop(&listener, &shared, wake);
    tracing::info!("stopping: finishing requests in flight");
    shared.stop_connections();
    for thread in threads {
        let _ = thread.join();
    }
    let _ = sweeper.join();
    if let Some(audit) = &shared.audit {
        audit.flush();
    }

    // 3. The socket file goes only if it is still the one bound here.
    if bound.is_some() && file_identity(&socket) == bound {
        let _ = std::fs::remove_file(&socket);
    }
    drop(listener);
    tracing::info!("stopped");
    Ok(())
}

/// A server running on a thread of this process.
pub struct Handle {
    wake: UnixStream,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Handle {
    /// Stops the server the way SIGTERM does and waits for it.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        use std::io::Write;
        let _ = (&self.wake).write_all(b"x");
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Starts a server of `provider` on a thread and returns once its socket accepts connections.
pub fn spawn(provider: Box<dyn KeyProvider>, settings: Settings) -> Result<Handle> {
    let (wake_rx, wake_tx) = UnixStream::pair().context("cannot create the wake pipe")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("kmsd".into())
        .spawn(move || {
            let failed = ready_tx.clone();
            let result = serve(provider, settings, Listen::Bind, &wake_rx, move |_| {
                let _ = ready_tx.send(Ok(()));
            });
            if let Err(e) = &result {
                let _ = failed.send(Err(anyhow::anyhow!("{e:#}")));
            }
            result
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Handle {
            wake: wake_tx,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => match thread.join() {
            Ok(result) => result.and_then(|()| bail!("the server stopped before it was ready")),
            Err(_) => bail!("the server thread panicked"),
        },
    }
}

/// Binds the socket. A stale socket (nobody answers) is replaced; a live one means another
/// kmsd is running; anything else at the path is never deleted.
fn bind(path: &Path, mode: u32) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => bail!(
                "already running: another kmsd answers on {}",
                path.display()
            ),
            Err(e) if e.kind() == IoKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing a stale socket");
                std::fs::remove_file(path).with_context(|| {
                    format!("cannot remove the stale socket {}", path.display())
                })?;
            }
            Err(e) => bail!("cannot tell whether {} is in use: {e}", path.display()),
        },
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == IoKind::NotFound => {}
        Err(e) => bail!("cannot inspect {}: {e}", path.display()),
    }

    // The socket is created with no permission for anyone but the owner, then given its mode,
    // so that there is no window in which others could connect.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// The identity of the file at `path`: (device, inode).
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|md| (md.dev(), md.ino()))
}

/// Every 200 ms: flush the audit log; every few seconds: drop idle cached keys.
fn start_sweeper(shared: Arc<Shared>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("kmsd-sweeper".into())
        .spawn(move || {
            let mut ticks = 0u64;
            while !shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(audit) = &shared.audit {
                    audit.flush();
                }
                ticks += 1;
                if ticks.is_multiple_of(25) {
                    let dropped = shared.cache.sweep();
                    if dropped > 0 {
                        tracing::debug!(dropped, "idle keys dropped from the cache");
                    }
                }
            }
        })
        .expect("cannot start the sweeper thread")
}
