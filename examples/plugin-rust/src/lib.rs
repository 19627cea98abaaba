//! # An example kms provider plugin in Rust
//!
//! Keys as files in a directory: `<dir>/<hex of the key id>.<version>`, each holding the raw
//! key bytes. A new version is written to a temporary file, synced, and hard-linked to its final
//! name, which fails if the name exists: so `create` is exclusive across threads and processes,
//! and a key file is never seen half-written.
//!
//! **This stores keys unwrapped**: it shows how a plugin is built, and is no provider to keep
//! real keys with. A real plugin wraps its keys under a KEK that lives elsewhere.
//!
//! ```toml
//! [provider]
//! name = "example"          # finds libkms_example.so
//! [provider.options]
//! dir = "example-keys"      # relative to the configuration file's directory
//! ```
//!
//! Build it with `cargo build -p kms-example-plugin`; the library is
//! `target/<profile>/libkms_example.so`.
#![deny(unsafe_code)]

use std::fmt;
use std::fs;
use std::io::{ErrorKind as IoKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kms_core::config::{self, Context};
use kms_core::toml::Table;
use kms_core::{
    Capabilities, Error, ErrorKind, Key, KeyId, KeyInfo, KeyLen, KeyProvider, KeySpec, Result,
    SecretBytes,
};
use serde::Deserialize;

/// The plugin's options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// The key directory.
    dir: PathBuf,
}

impl Options {
    fn parse(context: &Context, table: &Table) -> Result<Options> {
        let options: Options = config::parse_options("example", table)?;
        Ok(Options {
            dir: config::resolve(&context.base_dir, &options.dir),
        })
    }
}

/// Keys as files in a directory.
struct DirProvider {
    dir: PathBuf,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        IoKind::PermissionDenied => ErrorKind::Denied,
        IoKind::StorageFull => ErrorKind::NoSpace,
        _ => ErrorKind::Other,
    };
    Error::new(kind, format!("cannot {what} {}: {e}", path.display()))
}

impl DirProvider {
    fn path(&self, id: &KeyId, version: u32) -> PathBuf {
        self.dir
            .join(format!("{}.{version}", hex::encode(id.as_str())))
    }

    /// The newest version of `id`, if any: versions are numbered from 1 without gaps.
    fn newest(&self, id: &KeyId) -> Option<u32> {
        let mut newest = None;
        let mut version = 1;
        while self.path(id, version).exists() {
            newest = Some(version);
            version += 1;
        }
        newest
    }

    fn read(&self, id: &KeyId, version: u32) -> Result<Key> {
        let path = self.path(id, version);
        let mut file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == IoKind::NotFound => {
                let message = format!("key \"{id}\" has no version {version}");
                return Err(Error::new(ErrorKind::NotFound, message).with_key_id(id));
            }
            Err(e) => return Err(io_error("open", &path, e)),
        };
        let mut bytes = Vec::with_capacity(33);
        (&mut file)
            .take(33)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error("read", &path, e))?;
        let material = SecretBytes::new(bytes);
        if KeyLen::from_bytes(material.len()).is_none() {
            let message = format!("key file {} has a bad length", path.display());
            return Err(Error::new(ErrorKind::Corrupted, message).with_key_id(id));
        }
        Key::new(id.clone(), version, material)
    }

    /// Writes a new version; `Ok(None)` if that version already exists.
    fn write_new(&self, id: &KeyId, version: u32, spec: KeySpec) -> Result<Option<Key>> {
        let material = SecretBytes::random(spec.len.bytes())?;
        let path = self.path(id, version);
        let tag = hex::encode(SecretBytes::random(8)?.expose_secret());
        let tmp = self.dir.join(format!(".tmp-{tag}"));

        // 1. The bytes, durable, under a temporary name.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_error("create", &tmp, e))?;
        file.write_all(material.expose_secret())
            .and_then(|_| file.sync_all())
            .map_err(|e| io_error("write", &tmp, e))?;
        drop(file);

        // 2. The final name, by a link that fails if it exists: exclusive and all-or-nothing.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == IoKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(io_error("link", &path, e)),
        }

        // 3. The directory entry, durable.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync", &self.dir, e))?;
        Key::new(id.clone(), version, material).map(Some)
    }

    fn named<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|e| e.with_backend(self))
    }
}

impl fmt::Display for DirProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "example provider at {}", self.dir.display())
    }
}

impl KeyProvider for DirProvider {
    fn get(&self, id: &KeyId) -> Result<Key> {
        self.named(match self.newest(id) {
            Some(version) => self.read(id, version),
            None => Err(Error::not_found(id)),
        })
    }

    fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
        self.named(self.read(id, version))
    }

    fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.named(match self.write_new(id, 1, spec)? {
            Some(key) => Ok(key),
            None => Err(Error::already_exists(id)),
        })
    }

    // `get_or_create` is the trait's default: get, create on NotFound, get again when another
    // caller won the race. It is correct because `create` is exclusive.

    fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        loop {
            let newest = self.newest(id).ok_or_else(|| Error::not_found(id));
            if let Some(key) = self.named(self.write_new(id, self.named(newest)? + 1, spec))? {
                return Ok(key);
            }
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_error("list", &self.dir, e));
        let mut newest: Vec<(KeyId, u32)> = Vec::new();
        for entry in self.named(entries)?.flatten() {
            let name = entry.file_name();
            let Some((id, version)) = name.to_str().and_then(|n| n.rsplit_once('.')) else {
                continue;
            };
            let id = hex::decode(id)
                .ok()
                .and_then(|b| KeyId::from_bytes(&b).ok());
            let (Some(id), Ok(version)) = (id, version.parse::<u32>()) else {
                continue;
            };
            if id.as_str().starts_with(prefix) {
                match newest.iter_mut().find(|(known, _)| *known == id) {
                    Some(seen) => seen.1 = seen.1.max(version),
                    None => newest.push((id, version)),
                }
            }
        }
        newest.sort();
        let mut listed = Vec::with_capacity(newest.len());
        for (id, version) in newest {
            let key = self.named(self.read(&id, version))?;
            listed.push(KeyInfo {
                bytes: key.len() as u32,
                id,
                version,
                created: 0,
            });
        }
        Ok(listed)
    }

    fn delete(&self, id: &KeyId) -> Result<()> {
        let Some(newest) = self.newest(id) else {
            return self.named(Err(Error::not_found(id)));
        };
        // Newest first, so that a crash mid-way leaves versions 1..n without a gap.
        for version in (1..=newest).rev() {
            let path = self.path(id, version);
            self.named(fs::remove_file(&path).map_err(|e| io_error("remove", &path, e)))?;
        }
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
}

fn open(context: &Context, table: &Table) -> Result<Box<dyn KeyProvider>> {
    let options = Options::parse(context, table)?;
    if !options.dir.is_dir() {
        let message = format!(
            "{} is not a directory: run `kms init` first",
            options.dir.display()
        );
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    Ok(Box::new(DirProvider { dir: options.dir }))
}

fn init(context: &Context, table: &Table) -> Result<String> {
    let options = Options::parse(context, table)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&options.dir)
        .map_err(|e| io_error("create", &options.dir, e))?;
    Ok(format!(
        "initialised example provider at {}",
        options.dir.display()
    ))
}

kms_core::export_provider!(open, init = init);
