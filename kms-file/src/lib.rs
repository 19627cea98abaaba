//! # kms-file: keys in a local store under a master key file
//!
//! The embedded default provider of kms, for development and single hosts. A directory (mode
//! 0700) holds:
//!
//! - `master.key`: 32 random bytes (mode 0600), the KEK; it never leaves this host and is never
//!   written anywhere else;
//! - `keys.db`: the wrapped-key store of `kms-core`, every DEK wrapped by the master key.
//!
//! The directory and the key file are refused when they are symbolic links, owned by another
//! user, or open to the group or others. Options (`[provider.options]`):
//!
//! ```toml
//! dir = "/var/lib/kms"                 # required; relative to the configuration file
//! master_key = "/etc/kms/master.key"   # optional; default <dir>/master.key
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kms_core::config::{self, Context, Registered};
use kms_core::envelope::EnvelopeProvider;
use kms_core::store::Store;
use kms_core::wrap::Kek;
use kms_core::{Error, ErrorKind, KeyProvider, Result, SecretBytes};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The name of the master key file inside the directory.
pub const MASTER_KEY_FILE: &str = "master.key";

/// The name of the store file inside the directory.
pub const STORE_FILE: &str = "keys.db";

/// The options of the file provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The provider's directory.
    pub dir: PathBuf,
    /// Where the master key file is, if not in `dir`.
    #[serde(default)]
    pub master_key: Option<PathBuf>,
}

impl Options {
    /// Options for a directory with the master key inside it.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            master_key: None,
        }
    }

    fn resolved(&self, context: &Context) -> Options {
        Options {
            dir: config::resolve(&context.base_dir, &self.dir),
            master_key: self
                .master_key
                .as_ref()
                .map(|p| config::resolve(&context.base_dir, p)),
        }
    }

    fn master_key_path(&self) -> PathBuf {
        self.master_key
            .clone()
            .unwrap_or_else(|| self.dir.join(MASTER_KEY_FILE))
    }

    fn display_name(&self) -> String {
        format!("file provider at {}", self.dir.display())
    }
}

/// The registry entry of the file provider, under the name `file`.
pub fn registered() -> Registered {
    Registered {
        name: "file",
        summary: "keys in a local store under a master key file (the embedded default)",
        open: |context, options| {
            let options: Options = config::parse_options("file", options)?;
            Ok(Box::new(open(&options.resolved(context))?) as Box<dyn KeyProvider>)
        },
        init: Some(|context, options| {
            let options: Options = config::parse_options("file", options)?;
            init(&options.resolved(context))
        }),
    }
}

/// Creates the directory (0700), the master key file (0600, 32 random bytes) and an empty
/// store. Refuses to touch a directory that already holds either file.
pub fn init(options: &Options) -> Result<String> {
    let name = options.display_name();
    let dir = &options.dir;
    let key_path = options.master_key_path();
    let store_path = dir.join(STORE_FILE);

    // 1. The directory: made 0700, or an existing one that passes the same checks as at open.
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
    check_private(dir, true).map_err(|e| e.with_backend(&name))?;
    for existing in [&key_path, &store_path] {
        if fs::symlink_metadata(existing).is_ok() {
            let message = format!(
                "{} already exists: this provider is already initialised",
                existing.display()
            );
            return Err(Error::new(ErrorKind::AlreadyExists, message).with_backend(&name));
        }
    }

    // 2. The master key, made in memory: the store records its fingerprint.
    let master = SecretBytes::random(Kek::LEN)?;
    let kek = Kek::new(&master)?;

    // 3. The master key file first, durable, so that a store never exists without its key.
    write_new_secret_file(&key_path, master.expose_secret()).map_err(|e| e.with_backend(&name))?;

    // 4. The store, recording the master key's fingerprint.
    Store::create(&store_path, &EnvelopeProvider::initial_meta(&kek))
        .map_err(|e| e.with_backend(&name))?;
    Ok(format!(
        "initialised {name}: master key {} (keep a backup of it: without it no key can be read), store {}",
        key_path.display(),
        store_path.display()
    ))
}

/// Opens an initialised file provider.
pub fn open(options: &Options) -> Result<EnvelopeProvider> {
    let name = options.display_name();
    let key_path = options.master_key_path();
    let store_path = options.dir.join(STORE_FILE);
    let opened = (|| {
        // 1. The directory and the key file must be private to this user.
        check_private(&options.dir, true)?;
        if fs::symlink_metadata(&key_path).is_err() && fs::symlink_metadata(&store_path).is_err() {
            let message = format!(
                "{} is not initialised: run `kms init` first",
                options.dir.display()
            );
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        let master = read_master_key(&key_path)?;
        let kek = Kek::new(&master)?;

        // 2. The store, whose recorded fingerprint must match the key.
        if fs::symlink_metadata(&store_path).is_err() {
            let message = format!(
                "store {} is missing while the master key exists; refusing to start an empty store \
                 (restore keys.db from a backup)",
                store_path.display()
            );
            return Err(Error::new(ErrorKind::Corrupted, message));
        }
        let store = Store::open(&store_path)?;
        EnvelopeProvider::open(name.clone(), store, Box::new(kek))
    })();
    opened.map_err(|e| e.with_backend(&name))
}

/// Refuses a path that is a symbolic link, owned by another user, or open to group or others.
fn check_private(path: &Path, want_dir: bool) -> Result<()> {
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
        return Err(Error::new(
            ErrorKind::Insecure,
            format!("refusing {shown}: it is a symbolic link"),
        ));
    }
    if want_dir && !md.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("{shown} is not a directory"),
        ));
    }
    if !want_dir && !md.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("{shown} is not a regular file"),
        ));
    }
    check_owner_and_mode(path, &md, if want_dir { "700" } else { "600" })
}

fn check_owner_and_mode(path: &Path, md: &fs::Metadata, fix: &str) -> Result<()> {
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
            "refusing {shown}: its mode {mode:04o} lets the group or others in; run `chmod {fix} {shown}`"
        );
        return Err(Error::new(ErrorKind::Insecure, message));
    }
    Ok(())
}

fn read_master_key(path: &Path) -> Result<SecretBytes> {
    let shown = path.display();
    check_private(path, false)?;

    // O_NOFOLLOW closes the gap between the check above and the open; the checks are repeated
    // on the open file.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("cannot open master key file {shown}: {e}"),
            )
        })?;
    let md = file.metadata().map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("cannot inspect master key file {shown}: {e}"),
        )
    })?;
    check_owner_and_mode(path, &md, "600")?;

    let mut buf = Zeroizing::new(Vec::with_capacity(Kek::LEN + 1));
    (&mut file)
        .take(Kek::LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("cannot read master key file {shown}: {e}"),
            )
        })?;
    if buf.len() != Kek::LEN {
        let found = if buf.len() > Kek::LEN {
            "more".to_string()
        } else {
            buf.len().to_string()
        };
        let message =
            format!("master key file {shown} must hold exactly 32 bytes; it holds {found}");
        return Err(Error::new(ErrorKind::Corrupted, message));
    }
    Ok(SecretBytes::copy_from(&buf))
}

/// Writes a new 0600 file under a temporary name, fsyncs it, renames it into place and fsyncs
/// the directory.
fn write_new_secret_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let shown = path.display();
    let fail = |what: &str, e: std::io::Error| {
        Error::new(ErrorKind::Other, format!("cannot {what} {shown}: {e}"))
    };
    let tmp = path.with_extension("key.tmp");
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
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync the directory of", e))
}
