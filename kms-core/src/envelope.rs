//! Envelope encryption over the wrapped-key store: the provider logic shared by `file`,
//! `command` and the cloud backends.
//!
//! A DEK is drawn from the OS CSPRNG, wrapped by the current KEK (through a [`KeyWrapper`]),
//! bound to its id and version, and stored; `get` reads the blob and unwraps it with the KEK
//! generation recorded in its row. The store remembers the fingerprint of every KEK generation,
//! so a store opened with another KEK is refused as "wrong KEK" before any key is touched.

use std::fmt;

use crate::error::{Error, ErrorKind, Result};
use crate::id::KeyId;
use crate::provider::{Capabilities, KeyProvider};
use crate::secret::{Key, KeyInfo, KeyLen, KeySpec, MAX_SECRET_LEN, SecretBytes};
pub use crate::store::fingerprint_meta_name;
use crate::store::{Inserted, Record, Rewrapped, Store};
use crate::wrap::{KeyWrapper, hex_prefix};

/// Metadata name of the current KEK generation (a decimal number); absent means 1.
pub const CURRENT_KEK_META: &str = "kek.current";

/// Keys handed to a KEK per [`KeyWrapper::unwrap_many`] / [`KeyWrapper::wrap_many`] call
/// during [`EnvelopeProvider::rewrap_all`].
pub const REWRAP_CHUNK: usize = 256;

/// A provider that keeps wrapped DEKs in a [`Store`] under KEKs reached through
/// [`KeyWrapper`]s.
pub struct EnvelopeProvider {
    name: String,
    store: Store,
    current: u32,
    /// The generation new keys are wrapped by: `current`, or the target of a rotation.
    writing: u32,
    wrappers: Vec<(u32, Box<dyn KeyWrapper>)>,
}

impl EnvelopeProvider {
    /// Opens a provider over `store` with the KEK of its current generation. The KEK's
    /// fingerprint must match the one recorded in the store, else [`ErrorKind::WrongKek`].
    pub fn open(
        name: impl Into<String>,
        store: Store,
        kek: Box<dyn KeyWrapper>,
    ) -> Result<EnvelopeProvider> {
        let name = name.into();
        let current = current_generation(&store).map_err(|e| e.with_backend(&name))?;
        check_fingerprint(&store, current, kek.as_ref()).map_err(|e| e.with_backend(&name))?;
        Ok(EnvelopeProvider {
            name,
            store,
            current,
            writing: current,
            wrappers: vec![(current, kek)],
        })
    }

    /// Records a new store's first KEK: call once, right after [`Store::create`].
    pub fn initial_meta(kek: &dyn KeyWrapper) -> Vec<(String, Vec<u8>)> {
        vec![
            (fingerprint_meta_name(1), kek.fingerprint()),
            (CURRENT_KEK_META.to_string(), b"1".to_vec()),
        ]
    }

    /// Adds the wrapper of an older (or newer) KEK generation, for reading keys it wrapped.
    pub fn add_wrapper(&mut self, generation: u32, kek: Box<dyn KeyWrapper>) -> Result<()> {
        check_fingerprint(&self.store, generation, kek.as_ref())
            .map_err(|e| e.with_backend(&self.name))?;
        self.wrappers.retain(|(g, _)| *g != generation);
        self.wrappers.push((generation, kek));
        Ok(())
    }

    /// Wraps new keys with KEK generation `generation` (loaded with [`add_wrapper`]): during a
    /// rotation, so that no new key is left for the old KEK.
    ///
    /// [`add_wrapper`]: EnvelopeProvider::add_wrapper
    pub fn write_with(&mut self, generation: u32) -> Result<()> {
        if !self.wrappers.iter().any(|(g, _)| *g == generation) {
            let message = format!("KEK generation {generation} is not loaded");
            return Err(Error::new(ErrorKind::Other, message).with_backend(&self.name));
        }
        self.writing = generation;
        Ok(())
    }

    /// Re-wraps every key wrapped by KEK generation `from` under generation `to`, `batch` rows
    /// per transaction. Each row changes atomically and records its generation, so the work can
    /// stop at any point (a crash included) and be resumed by calling this again. Returns the
    /// number of rows re-wrapped; `progress` is told the running total after each batch.
    ///
    /// The keys go to the KEKs [`REWRAP_CHUNK`] at a time through
    /// [`KeyWrapper::unwrap_many`] and [`KeyWrapper::wrap_many`], which a local KEK runs side
    /// by side. A row that fails stops the work before its transaction, with the error the
    /// rows taken one by one would meet first.
    pub fn rewrap_all(
        &self,
        from: u32,
        to: u32,
        batch: u32,
        mut progress: impl FnMut(usize),
    ) -> Result<usize> {
        let mut total = 0;
        loop {
            let rows = self.with_name(self.store.wrapped_by(from, batch.max(1)))?;
            if rows.is_empty() {
                return Ok(total);
            }
            let mut rewrapped = Vec::with_capacity(rows.len());
            for chunk in rows.chunks(REWRAP_CHUNK) {
                rewrapped.extend(self.with_name(self.rewrap_chunk(from, to, chunk))?);
            }
            total += self.with_name(self.store.rewrap_batch(rewrapped))?;
            progress(total);
        }
    }

    /// The rows of `chunk` re-wrapped from generation `from` to `to`. On failure, the error
    /// that re-wrapping the rows one by one, in order, would meet first: looking up either KEK
    /// (named after the first row), or unwrapping or wrapping a row.
    fn rewrap_chunk(
        &self,
        from: u32,
        to: u32,
        chunk: &[(KeyId, Record)],
    ) -> Result<Vec<Rewrapped>> {
        let Some((first, _)) = chunk.first() else {
            return Ok(Vec::new());
        };

        // 1. Unwrap the chunk with the old KEK; keep the keys before the first failure.
        let old = self.wrapper(from, first)?;
        let sealed: Vec<_> = chunk
            .iter()
            .map(|(id, record)| (id, record.version, &record.wrapped[..]))
            .collect();
        let mut deks = Vec::with_capacity(chunk.len());
        let mut failed = None;
        for result in old.unwrap_many(&sealed) {
            match result {
                Ok(dek) => deks.push(dek),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if deks.is_empty()
            && let Some(e) = failed
        {
            return Err(e);
        }

        // 2. Wrap those keys with the new KEK: a wrap failure comes first if its row does.
        let new = self.wrapper(to, first)?;
        let items: Vec<_> = chunk
            .iter()
            .zip(&deks)
            .map(|((id, record), dek)| (id, record.version, dek))
            .collect();
        let mut rewrapped = Vec::with_capacity(chunk.len());
        for ((id, record), wrapped) in chunk.iter().zip(new.wrap_many(&items)) {
            rewrapped.push(Rewrapped {
                id: id.clone(),
                version: record.version,
                from_kek: from,
                to_kek: to,
                wrapped: wrapped?,
            });
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(rewrapped),
        }
    }

    /// The store under this provider.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The current KEK generation.
    pub fn current_generation(&self) -> u32 {
        self.current
    }

    fn wrapper(&self, generation: u32, id: &KeyId) -> Result<&dyn KeyWrapper> {
        self.wrappers
            .iter()
            .find(|(g, _)| *g == generation)
            .map(|(_, w)| w.as_ref())
            .ok_or_else(|| {
                // A generation newer than any loaded was made by a rotation that began after
                // this provider opened (elsewhere: the CLI beside kmsd): finishing or resuming
                // that rotation does not give this provider the new KEK; reopening does.
                let message = if generation > self.writing {
                    format!(
                        "key \"{id}\" is wrapped by KEK generation {generation}, which is not \
                         loaded: a KEK rotation began since this provider opened (at generation \
                         {}); reopen it",
                        self.writing
                    )
                } else {
                    format!(
                        "key \"{id}\" is wrapped by KEK generation {generation}, which is not \
                         loaded (current is {}); finish or resume the KEK rotation",
                        self.current
                    )
                };
                Error::new(ErrorKind::WrongKek, message).with_key_id(id)
            })
    }

    fn unwrap_record(&self, id: &KeyId, record: &Record) -> Result<Key> {
        let wrapper = self.wrapper(record.kek, id)?;
        let material = wrapper.unwrap(id, record.version, &record.wrapped)?;
        if material.len() != record.len as usize {
            let message = format!(
                "key \"{id}\" version {} unwraps to {} bytes but its row says {}",
                record.version,
                material.len(),
                record.len
            );
            return Err(Error::new(ErrorKind::Corrupted, message).with_key_id(id));
        }
        Key::new(id.clone(), record.version, material)
    }

    fn new_record(&self, id: &KeyId, version: u32, len: KeyLen) -> Result<(Record, SecretBytes)> {
        let dek = SecretBytes::random(len.bytes())?;
        let wrapper = self.wrapper(self.writing, id)?;
        let wrapped = wrapper.wrap(id, version, &dek)?;
        Ok((
            Record::new(version, self.writing, len.bytes() as u32, wrapped),
            dek,
        ))
    }

    /// Stores a new version; `Ok(Err(existing))` when the id already has it or a newer one.
    fn store_new(
        &self,
        id: &KeyId,
        version: u32,
        spec: KeySpec,
    ) -> Result<std::result::Result<Key, Record>> {
        let (record, dek) = self.new_record(id, version, spec.len)?;
        let inserted = self.store.insert(id, record).map_err(|e| {
            e.context(format_args!(
                "key \"{id}\" version {version} was not stored"
            ))
            .with_key_id(id)
        })?;
        match inserted {
            Inserted::Stored => Ok(Ok(Key::new(id.clone(), version, dek)?)),
            Inserted::Exists(existing) => Ok(Err(existing)),
            Inserted::RetiredKek => {
                let message = format!(
                    "key \"{id}\" was not stored: KEK generation {} was retired by a rotation \
                     since this provider opened; reopen it",
                    self.writing
                );
                Err(Error::new(ErrorKind::WrongKek, message).with_key_id(id))
            }
        }
    }

    fn with_name<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|e| e.with_backend(&self.name))
    }
}

/// Ends a KEK rotation from generation `from` to `to`, if no key is left wrapped by `from`: in
/// one transaction `to` becomes the current generation, and `from`'s fingerprint goes with the
/// provider's own records of the rotation and of `from` (`retired`). Returns `false`, changing
/// nothing, when keys under `from` remain (written meanwhile): re-wrap them and call again.
pub fn switch_generation(store: &Store, from: u32, to: u32, retired: Vec<String>) -> Result<bool> {
    let set = vec![(CURRENT_KEK_META.to_string(), to.to_string().into_bytes())];
    let mut delete = vec![fingerprint_meta_name(from)];
    delete.extend(retired);
    store.update_meta_if_none_wrapped_by(from, set, delete)
}

fn current_generation(store: &Store) -> Result<u32> {
    match store.meta(CURRENT_KEK_META)? {
        None => Ok(1),
        Some(raw) => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|g| *g >= 1)
            .ok_or_else(|| {
                let message = format!(
                    "store {} is damaged: its current KEK generation record is unreadable",
                    store.path().display()
                );
                Error::new(ErrorKind::Corrupted, message)
            }),
    }
}

fn check_fingerprint(store: &Store, generation: u32, kek: &dyn KeyWrapper) -> Result<()> {
    let recorded = store
        .meta(&fingerprint_meta_name(generation))?
        .ok_or_else(|| {
            let message = format!(
                "store {} is damaged: it records no fingerprint for KEK generation {generation}",
                store.path().display()
            );
            Error::new(ErrorKind::Corrupted, message)
        })?;
    let offered = kek.fingerprint();
    if recorded != offered {
        let message = format!(
            "wrong KEK: store {} was wrapped by the KEK with fingerprint {}, this one has {}",
            store.path().display(),
            hex_prefix(&recorded),
            hex_prefix(&offered)
        );
        return Err(Error::new(ErrorKind::WrongKek, message));
    }
    Ok(())
}

impl fmt::Display for EnvelopeProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl KeyProvider for EnvelopeProvider {
    fn get(&self, id: &KeyId) -> Result<Key> {
        self.with_name((|| match self.store.latest(id)? {
            Some(record) => self.unwrap_record(id, &record),
            None => Err(Error::not_found(id)),
        })())
    }

    fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
        self.with_name((|| match self.store.version(id, version)? {
            Some(record) => self.unwrap_record(id, &record),
            None => {
                let message = format!("key \"{id}\" has no version {version}");
                Err(Error::new(ErrorKind::NotFound, message).with_key_id(id))
            }
        })())
    }

    fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.with_name((|| match self.store_new(id, 1, spec)? {
            Ok(key) => Ok(key),
            Err(_) => Err(Error::already_exists(id)),
        })())
    }

    fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.with_name((|| {
            if let Some(record) = self.store.latest(id)? {
                return self.unwrap_record(id, &record);
            }
            match self.store_new(id, 1, spec)? {
                Ok(key) => Ok(key),
                Err(existing) => self.unwrap_record(id, &existing),
            }
        })())
    }

    fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.with_name((|| {
            for _ in 0..16 {
                let latest = self.store.latest(id)?.ok_or_else(|| Error::not_found(id))?;
                let next = latest.version.checked_add(1).ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!("key \"{id}\" has run out of versions"),
                    )
                })?;
                if let Ok(key) = self.store_new(id, next, spec)? {
                    return Ok(key);
                }
            }
            let message = format!("key \"{id}\" is being rotated by others too fast; retry");
            Err(Error::new(ErrorKind::Unavailable, message).with_key_id(id))
        })())
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        let rows = self.with_name(self.store.list(prefix))?;
        let listed = rows.into_iter().map(|row| KeyInfo {
            id: row.id,
            version: row.version,
            bytes: row.len,
            created: row.created,
        });
        Ok(listed.collect())
    }

    fn import(&self, id: &KeyId, secret: &SecretBytes) -> Result<Key> {
        self.with_name((|| {
            if secret.is_empty() || secret.len() > MAX_SECRET_LEN {
                let message = format!(
                    "a secret has 1 to {MAX_SECRET_LEN} bytes, not {}",
                    secret.len()
                );
                return Err(Error::new(ErrorKind::InvalidInput, message).with_key_id(id));
            }
            let wrapper = self.wrapper(self.writing, id)?;
            let wrapped = wrapper.wrap(id, 1, secret)?;
            let record = Record::new(1, self.writing, secret.len() as u32, wrapped);
            match self.store.insert(id, record)? {
                Inserted::Stored => Key::new(id.clone(), 1, secret.clone()),
                Inserted::Exists(_) => Err(Error::already_exists(id)),
                Inserted::RetiredKek => {
                    let message =
                        format!("secret \"{id}\" was not stored: the KEK was retired; reopen");
                    Err(Error::new(ErrorKind::WrongKek, message).with_key_id(id))
                }
            }
        })())
    }

    fn delete(&self, id: &KeyId) -> Result<()> {
        self.with_name((|| match self.store.delete(id)? {
            true => Ok(()),
            false => Err(Error::not_found(id)),
        })())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wrap::Kek;

    /// Two copies of one new random KEK.
    fn kek_twice() -> (Kek, Kek) {
        let material = SecretBytes::random(Kek::LEN).unwrap();
        (Kek::new(&material).unwrap(), Kek::new(&material).unwrap())
    }

    /// A provider opened before a KEK rotation began (the CLI beside a running kmsd) was told
    /// to "finish or resume the KEK rotation" when it met a re-wrapped key, even after the
    /// rotation had finished: advice that cannot help it (running `kms rotate-kek` again only
    /// starts another rotation). It must say that it needs reopening.
    #[test]
    fn a_provider_opened_before_a_rotation_says_reopen_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let ((old, old_copy), (new, new_copy)) = (kek_twice(), kek_twice());
        let store = Store::create(&path, &EnvelopeProvider::initial_meta(&old)).unwrap();
        let stale = EnvelopeProvider::open("stale", store, Box::new(old)).unwrap();
        let id = KeyId::new("db/1").unwrap();
        stale.create(&id, KeySpec::default()).unwrap();

        // A rotation from generation 1 to 2 by another opener, run to the end.
        let store = Store::open(&path).unwrap();
        store
            .update_meta(
                vec![(fingerprint_meta_name(2), new.fingerprint())],
                Vec::new(),
            )
            .unwrap();
        let mut rotating = EnvelopeProvider::open("rotating", store, Box::new(old_copy)).unwrap();
        rotating.add_wrapper(2, Box::new(new)).unwrap();
        rotating.write_with(2).unwrap();
        assert_eq!(rotating.rewrap_all(1, 2, 512, |_| {}).unwrap(), 1);
        assert!(switch_generation(rotating.store(), 1, 2, Vec::new()).unwrap());

        let e = stale.get(&id).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongKek);
        assert!(
            e.message()
                .contains("a KEK rotation began since this provider opened"),
            "{e}"
        );
        assert!(e.message().ends_with("reopen it"), "{e}");
        assert!(!e.message().contains("finish or resume"), "{e}");

        // Reopened with the new KEK, it reads the key.
        let store = Store::open(&path).unwrap();
        let fresh = EnvelopeProvider::open("fresh", store, Box::new(new_copy)).unwrap();
        assert_eq!(fresh.get(&id).unwrap().version(), 1);
    }
}
