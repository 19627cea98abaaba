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
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kms_core::config::{self, Context, Registered};
use kms_core::envelope::EnvelopeProvider;
use kms_core::fsutil::{
    check_owner_and_mode, check_private, create_private_dir, write_new_private_file,
};
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
    create_private_dir(dir).map_err(|e| e.with_backend(&name))?;
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
    write_new_private_file(&key_path, master.expose_secret()).map_err(|e| e.with_backend(&name))?;

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
