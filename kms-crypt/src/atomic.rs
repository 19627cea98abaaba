//! Output files that appear whole or not at all.
//!
//! [`AtomicFile`] writes to a file with no name in the target directory (Linux `O_TMPFILE`,
//! mode 0600) and gives it its final name only in [`AtomicFile::commit`], after an fsync; the
//! directory is fsynced after. Until then the final name keeps whatever it held, and if the
//! process fails or is killed, the unnamed file vanishes with it: no partial file and no
//! plaintext is left under any name.
//!
//! Where the file system has no `O_TMPFILE`, a named temporary file (`.kms-PID-RANDOM.tmp`,
//! created exclusively with mode 0600) takes its place; it is removed after any error, but a
//! process killed with SIGKILL leaves it behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};
use rustix::io::Errno;

/// A new file that takes its final name only when committed.
pub struct AtomicFile {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    /// The temporary name, while the file has one (only in the fallback without `O_TMPFILE`,
    /// and between link and rename when replacing an existing file).
    temp: Option<PathBuf>,
}

impl AtomicFile {
    /// Starts a file that will be `path`; nothing appears under `path` yet.
    pub fn create(path: impl AsRef<Path>) -> io::Result<AtomicFile> {
        let path = path.as_ref().to_path_buf();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };

        // 1. An unnamed file in the target directory.
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        match rustix::fs::openat(CWD, &dir, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => {
                return Ok(AtomicFile {
                    file: File::from(fd),
                    path,
                    dir,
                    temp: None,
                });
            }
            // No O_TMPFILE on this file system (or kernel): fall back to a named file.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }

        // 2. A named temporary file, created exclusively.
        let temp = temp_name(&dir)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&temp)?;
        Ok(AtomicFile {
            file,
            path,
            dir,
            temp: Some(temp),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fsyncs the file, gives it its final name (replacing a file that had it) and fsyncs the
    /// directory. On error nothing new is left under the final name.
    pub fn commit(self) -> io::Result<()> {
        self.finish(true)
    }

    /// Like [`commit`](AtomicFile::commit), but fails with [`io::ErrorKind::AlreadyExists`]
    /// when the final name is taken (even if it was taken after [`create`](AtomicFile::create)),
    /// leaving that file untouched: for archives, where a file once written must never be
    /// replaced.
    pub fn commit_new(self) -> io::Result<()> {
        self.finish(false)
    }

    fn finish(mut self, replace: bool) -> io::Result<()> {
        self.file.flush()?;
        self.file.sync_all()?;
        if !replace {
            match self.temp.clone() {
                // A hard link fails when the name is taken: never replaces.
                Some(temp) => {
                    fs::hard_link(&temp, &self.path)?;
                    fs::remove_file(&temp)?;
                }
                None => self.link_to(&self.path)?,
            }
            self.temp = None;
            return File::open(&self.dir)?.sync_all();
        }
        match self.temp.clone() {
            Some(temp) => fs::rename(&temp, &self.path)?,
            None => {
                // Linked straight to the final name when it is free: one atomic step. When
                // it is taken, linked to a temporary name and renamed over it.
                match self.link_to(&self.path) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => {
                        let temp = temp_name(&self.dir)?;
                        self.link_to(&temp)?;
                        self.temp = Some(temp.clone());
                        fs::rename(&temp, &self.path)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.temp = None;
        File::open(&self.dir)?.sync_all()
    }

    /// Gives the unnamed file the name `target`, which must not exist.
    fn link_to(&self, target: &Path) -> io::Result<()> {
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        match rustix::fs::linkat(CWD, &proc_path, CWD, target, AtFlags::SYMLINK_FOLLOW) {
            // Without /proc, AT_EMPTY_PATH does the same (it needs CAP_DAC_READ_SEARCH).
            Err(Errno::NOENT) => {
                rustix::fs::linkat(&self.file, "", CWD, target, AtFlags::EMPTY_PATH)?;
                Ok(())
            }
            other => Ok(other?),
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.file.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
    }
}

impl std::fmt::Debug for AtomicFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicFile")
            .field("path", &self.path)
            .field("temp", &self.temp)
            .finish_non_exhaustive()
    }
}

/// A fresh temporary name in `dir`: `.kms-PID-RANDOM.tmp`.
fn temp_name(dir: &Path) -> io::Result<PathBuf> {
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| io::Error::other(e.to_string()))?;
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(dir.join(format!(".kms-{}-{random}.tmp", std::process::id())))
}
