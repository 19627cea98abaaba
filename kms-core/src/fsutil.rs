//! Checks and writes for files that hold secrets: private directories, private files, durable
//! creation. Shared by every provider that keeps something on disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Creates `dir` (and its parents) with mode 0700 if it does not exist, then checks it as
/// [`check_private`] does.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if fs::symlink_metadata(dir).is_err() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Other,
                    format!("cannot create directory {}: {e}", dir.display()),
                )
            })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("cannot set the mode of {}: {e}", dir.display()),
            )
        })?;
    }
    check_private(dir, true)
}

/// Refuses a path that is a symbolic link, not of the wanted type, owned by another user, or
/// open to the group or others.
pub fn check_private(path: &Path, want_dir: bool) -> Result<()> {
    let shown = path.display();
    let md = fs::symlink_metadata(path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::InvalidConfig
        } else {
            ErrorKind::Other
        };
        Error::new(kind, format!("cannot inspect {shown}: {e}"))
    })?;
    if md.file_type().is_symlink() {
        let message = format!("refusing {shown}: it is a symbolic link");
        return Err(Error::new(ErrorKind::Insecure, message));
    }
    if want_dir && !md.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("{shown} is not a directory"),
        ));
    }
    if !want_dir && !md.is_file() {
        let message = format!("{shown} is not a regular file");
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    check_owner_and_mode(path, &md, if want_dir { "700" } else { "600" })
}

/// Refuses metadata owned by another user or with any group or other permission bit; `fix`
/// is the mode suggested in the message.
pub fn check_owner_and_mode(path: &Path, md: &fs::Metadata, fix: &str) -> Result<()> {
    let shown = path.display();
    let me = rustix::process::geteuid().as_raw();
    if md.uid() != me {
        let message = format!(
            "refusing {shown}: it is owned by uid {}, not by this user (uid {me})",
            md.uid()
        );
        return Err(Error::new(ErrorKind::Insecure, message));
    }
    let mode = md.mode() & 0o777;
    if mode & 0o077 != 0 {
        let message = format!(
            "refusing {shown}: its mode {mode:04o} lets the group or others in; \
             run `chmod {fix} {shown}`"
        );
        return Err(Error::new(ErrorKind::Insecure, message));
    }
    Ok(())
}

/// Writes a new 0600 file under a temporary name, fsyncs it, renames it into place (refusing
/// to replace an existing file) and fsyncs the directory.
pub fn write_new_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let shown = path.display();
    let fail = |what: &str, e: std::io::Error| {
        Error::new(ErrorKind::Other, format!("cannot {what} {shown}: {e}"))
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)
        .map_err(|e| fail("create", e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| fail("write", e))?;
    drop(file);
    if fs::symlink_metadata(path).is_ok() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{shown} already exists"),
        ));
    }
    fs::rename(&tmp, path).map_err(|e| fail("rename into", e))?;
    sync_parent(path)
}

/// Fsyncs the directory holding `path`, so that a create or rename in it is durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("cannot sync directory {}: {e}", parent.display()),
            )
        })
}
