//! The audit log: one line per key operation, never key material.
//!
//! ```text
//! 2026-12-03T19:54:56Z uid=1000 gid=1000 pid=4242 op=GET-OR-CREATE id=cluster/wal result=ok
//! ```
//!
//! Lines are buffered and written at least every 200 ms by the server's sweeper and when the
//! server stops; a SIGKILL can lose the last fraction of a second of lines.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use kms_core::{Error, ErrorKind, Result};

/// Who made a request, from the socket's peer credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id.
    pub pid: i32,
}

/// An append-only audit log file.
pub struct AuditLog {
    out: Mutex<BufWriter<File>>,
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log for appending.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                let message = format!("cannot open audit log {}: {e}", path.display());
                Error::new(ErrorKind::InvalidConfig, message)
            })?;
        Ok(AuditLog {
            out: Mutex::new(BufWriter::with_capacity(64 * 1024, file)),
        })
    }

    /// Records one operation. `id` is a validated key id or `-`; `result` is `ok` or an error
    /// code.
    pub fn record(&self, peer: Peer, op: &str, id: &str, result: &str) {
        let line = format!(
            "{} uid={} gid={} pid={} op={op} id={id} result={result}\n",
            kms_core::time::format_utc(kms_core::time::now_secs()),
            peer.uid,
            peer.gid,
            peer.pid
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(line.as_bytes()) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }

    /// Writes buffered lines to the file.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.flush() {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}
