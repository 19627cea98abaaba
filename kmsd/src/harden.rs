//! Process hardening and systemd socket activation.

use std::os::unix::net::UnixListener;

use anyhow::{Result, bail};

/// No core dumps: a dump of kmsd would hold unwrapped keys.
pub fn disable_core_dumps() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    if let Err(e) = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    ) {
        tracing::warn!("cannot disable core dumps (RLIMIT_CORE): {e}");
    }
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!("cannot mark the process non-dumpable: {e}");
    }
}

/// Locks present and future memory, on first touch, so that keys never reach swap. Where the
/// system does not allow it (RLIMIT_MEMLOCK), kmsd says so and runs on.
pub fn lock_memory() {
    use rustix::mm::{MlockAllFlags, mlockall};
    let flags = MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT;
    match mlockall(flags) {
        Ok(()) => tracing::info!("memory locked: keys cannot be swapped out"),
        Err(e) => tracing::warn!(
            "cannot lock memory ({e}); keys may reach swap: raise RLIMIT_MEMLOCK (LimitMEMLOCK= in systemd)"
        ),
    }
}

/// The listening socket passed by systemd (`LISTEN_PID` is this process and `LISTEN_FDS` is
/// 1), if any.
pub fn systemd_listener() -> Result<Option<UnixListener>> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok());
    if !pid_matches || count.is_none() {
        return Ok(None);
    }
    if count != Some(1) {
        bail!(
            "systemd passed {} sockets; kmsd takes exactly one",
            count.unwrap_or(0)
        );
    }
    // SD_LISTEN_FDS_START: the first passed descriptor is 3.
    const FD: i32 = 3;
    #[allow(unsafe_code)]
    // SAFETY: under the socket activation protocol, checked above (LISTEN_PID is this process,
    // LISTEN_FDS is 1), descriptor 3 was opened by systemd for this process and nothing else in
    // kmsd has taken ownership of it; the listener becomes its only owner.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(FD) };
    let stat = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        bail!("descriptor 3 passed by systemd is not a socket");
    }
    // LISTEN_PID and LISTEN_FDS stay in the environment (changing it is unsafe in a threaded
    // process); they are harmless to children, whose pid differs from LISTEN_PID.
    tracing::info!("using the socket passed by systemd");
    Ok(Some(UnixListener::from(fd)))
}
