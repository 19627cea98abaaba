//! The [`KeyProvider`] trait: what every place keys can live must do.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::id::KeyId;
use crate::secret::{Key, KeyInfo, KeySpec, SecretBytes};

/// What a provider can do beyond `get`, `create` and `get_or_create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// `list` works.
    pub list: bool,
    /// `delete` works.
    pub delete: bool,
    /// `rotate` (new versions of a key) and `get_version` work.
    pub versions: bool,
    /// Keys survive the process: false only for in-memory providers.
    pub durable: bool,
}

impl Capabilities {
    /// Every capability.
    pub const ALL: Capabilities = Capabilities {
        list: true,
        delete: true,
        versions: true,
        durable: true,
    };

    /// No optional capability.
    pub const NONE: Capabilities = Capabilities {
        list: false,
        delete: false,
        versions: false,
        durable: false,
    };
}

/// A place where data encryption keys live, asked by key id.
///
/// The trait is object-safe and used as `Box<dyn KeyProvider>`: the rest of kms cannot tell a
/// linked-in provider from a plugin. Its `Display` is the provider's secret-free name for logs
/// and errors, such as `file provider at /var/lib/kms`.
///
/// # Contract
/// - [`get`](KeyProvider::get) returns the newest version of the key, or an error of kind
///   [`ErrorKind::NotFound`] only when the backend said definitely that the key does not exist.
///   A denied, failed or timed-out call is another kind and never leads to a create.
/// - [`create`](KeyProvider::create) makes a new random key, durable before it returns, or
///   fails with [`ErrorKind::AlreadyExists`].
/// - [`get_or_create`](KeyProvider::get_or_create) is atomic across threads and processes:
///   every caller racing on a new id receives the same bytes, and one key is stored.
/// - Key material never appears in an error, a log line or a `Debug` string.
pub trait KeyProvider: fmt::Display + Send + Sync {
    /// The newest version of the key `id`.
    fn get(&self, id: &KeyId) -> Result<Key>;

    /// A new random key for `id`, durable before it is returned.
    fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key>;

    /// The key `id`, created with `spec` if it does not exist.
    ///
    /// The default is correct for any provider whose `create` is exclusive: it asks, creates on
    /// a definite `NotFound`, and reads the winner's key when it loses a race. Providers that can
    /// do better in one round trip override it.
    fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        for _ in 0..8 {
            match self.get(id) {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                other => return other,
            }
            match self.create(id, spec) {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                other => return other,
            }
        }
        // Only reachable if the key is deleted and re-created in a tight loop by others.
        let message = format!("key \"{id}\" kept appearing and disappearing; giving up");
        Err(Error::new(ErrorKind::Unavailable, message).with_key_id(id))
    }

    /// A given version of the key `id`.
    fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
        let _ = version;
        Err(Error::unsupported("key versions").with_key_id(id))
    }

    /// Adds a new version of the key `id`, which `get` returns from then on. Older versions
    /// stay readable through `get_version`.
    fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        let _ = spec;
        Err(Error::unsupported("key rotation").with_key_id(id))
    }

    /// Stores a secret made elsewhere (a TLS key's passphrase, say) under `id` as version 1,
    /// durable before it returns; [`ErrorKind::AlreadyExists`] if the id exists.
    fn import(&self, id: &KeyId, secret: &SecretBytes) -> Result<Key> {
        let _ = secret;
        Err(Error::unsupported("importing secrets").with_key_id(id))
    }

    /// The keys whose id starts with `prefix`, sorted by id. The empty prefix lists every key.
    fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        let _ = prefix;
        Err(Error::unsupported("listing keys"))
    }

    /// Deletes every version of the key `id`. Never implicit: only an explicit request deletes.
    fn delete(&self, id: &KeyId) -> Result<()> {
        Err(Error::unsupported("deleting keys").with_key_id(id))
    }

    /// What this provider can do.
    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
    }
}

/// Forwards every method through a smart pointer, so that `Box<dyn KeyProvider>` and a
/// provider shared with `Arc` (by a server and a test that watches it, say) are providers too.
macro_rules! forward_provider {
    ($pointer:ident) => {
        impl<P: KeyProvider + ?Sized> KeyProvider for $pointer<P> {
            fn get(&self, id: &KeyId) -> Result<Key> {
                (**self).get(id)
            }
            fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
                (**self).create(id, spec)
            }
            fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
                (**self).get_or_create(id, spec)
            }
            fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
                (**self).get_version(id, version)
            }
            fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
                (**self).rotate(id, spec)
            }
            fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
                (**self).list(prefix)
            }
            fn import(&self, id: &KeyId, secret: &SecretBytes) -> Result<Key> {
                (**self).import(id, secret)
            }
            fn delete(&self, id: &KeyId) -> Result<()> {
                (**self).delete(id)
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
        }
    };
}

forward_provider!(Box);
forward_provider!(Arc);
