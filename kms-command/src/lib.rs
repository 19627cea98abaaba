//! # kms-command: the KEK unlocked by a passphrase from an operator's command
//!
//! For a small installation whose operator keeps one secret, a passphrase, and hands it over
//! through a command, in the manner of PostgreSQL's `ssl_passphrase_command`.
//!
//! ## Hierarchy
//!
//! ```text
//! passphrase ──PBKDF2-HMAC-SHA256 (per-slot salt and iterations)──► slot key
//! slot key   ──AES-KWP, bound to ("kms-slot/<slot>", generation)──► master key (the KEK)
//! master key ──AES-KWP, bound to (key id, version)─────────────────► each DEK
//! ```
//!
//! A store has one or more named **slots** (an operator passphrase and a recovery passphrase,
//! say), each wrapping the same random master key. Slots live in the store's metadata:
//!
//! - `command.kdf.<slot>`: `pbkdf2-sha256 iterations=<n> salt=<hex>`;
//! - `command.slot.<slot>.<generation>`: the wrapped master key of that KEK generation,
//!   followed by the first 8 bytes of its SHA-256, so that a damaged slot is told apart from a
//!   wrong passphrase.
//!
//! ## Options
//!
//! ```toml
//! [provider]
//! name = "command"
//! [provider.options]
//! dir = "/var/lib/kms"
//! passphrase_command = "cat /run/secrets/kms-passphrase"
//! timeout = 30            # seconds
//! iterations = 600000     # PBKDF2 iterations for new slots; existing slots keep theirs
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod command;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_core::config::{self, Context, Registered};
use kms_core::envelope::{
    CURRENT_KEK_META, EnvelopeProvider, fingerprint_meta_name, switch_generation,
};
use kms_core::fsutil::create_private_dir;
use kms_core::kdf::{DEFAULT_ITERATIONS, KdfParams, MAX_ITERATIONS, MIN_ITERATIONS};
use kms_core::store::Store;
use kms_core::wrap::{Kek, KeyWrapper};
use kms_core::{Error, ErrorKind, KeyId, KeyProvider, Result, SecretBytes};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The name of the store file inside the directory.
pub const STORE_FILE: &str = "keys.db";

/// The slot made by `init`.
pub const FIRST_SLOT: &str = "primary";

const ROTATION_META: &str = "command.rotation";
use kms_core::store::PROVIDER_META;

/// The options of the command provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The provider's directory (the store).
    pub dir: PathBuf,
    /// The command template that prints the passphrase.
    pub passphrase_command: String,
    /// Seconds the command may take; default 30.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// PBKDF2 iterations for new slots.
    #[serde(default = "default_iterations")]
    pub iterations: u32,
}

fn default_timeout() -> f64 {
    30.0
}

fn default_iterations() -> u32 {
    DEFAULT_ITERATIONS
}

impl Options {
    fn resolved(mut self, context: &Context) -> Result<Options> {
        self.dir = config::resolve(&context.base_dir, &self.dir);
        if !(self.timeout > 0.0 && self.timeout <= 3600.0) {
            let message = format!(
                "timeout must be between 0 and 3600 seconds, not {}",
                self.timeout
            );
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&self.iterations) {
            let message = format!(
                "iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}, not {}",
                self.iterations
            );
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        Ok(self)
    }

    /// Parses provider options and resolves the directory against the configuration's.
    pub fn from_table(context: &Context, table: &toml::Table) -> Result<Options> {
        config::parse_options::<Options>("command", table)?.resolved(context)
    }

    fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    fn display_name(&self) -> String {
        format!("command provider at {}", self.dir.display())
    }

    /// Runs the passphrase command with `prompt`.
    pub fn passphrase(&self, prompt: &str) -> Result<SecretBytes> {
        let invocation = command::Invocation {
            template: &self.passphrase_command,
            prompt,
            dir: &self.dir,
            timeout: Duration::from_secs_f64(self.timeout),
        };
        command::run(&invocation)
    }

    fn unlock_prompt(&self) -> String {
        format!("Passphrase for kms store {}: ", self.dir.display())
    }
}

/// The registry entry of the command provider, under the name `command`.
pub fn registered() -> Registered {
    Registered {
        name: "command",
        summary: "keys under a master key unlocked by a passphrase from an operator's command",
        open: |context, table| {
            let options = Options::from_table(context, table)?;
            Ok(Box::new(open(&options)?) as Box<dyn KeyProvider>)
        },
        init: Some(|context, table| init(&Options::from_table(context, table)?)),
    }
}

/// The first 8 bytes of SHA-256 of `bytes`: not a MAC, only to tell a damaged slot from a wrong
/// passphrase.
fn checksum(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn kdf_meta(slot: &str) -> String {
    format!("command.kdf.{slot}")
}

fn slot_meta(slot: &str, generation: u32) -> String {
    format!("command.slot.{slot}.{generation}")
}

/// Checks a slot name: 1 to 32 bytes of `[A-Za-z0-9_-]`.
pub fn validate_slot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        let shown = kms_core::show_untrusted(name.as_bytes());
        let message = format!("invalid slot name {shown}: 1 to 32 characters of A-Z a-z 0-9 _ -");
        Err(Error::new(ErrorKind::InvalidInput, message))
    }
}

/// Renders KDF parameters as stored.
fn format_kdf(params: &KdfParams) -> Vec<u8> {
    let salt = hex::encode(&params.salt);
    format!("pbkdf2-sha256 iterations={} salt={salt}", params.iterations).into_bytes()
}

/// Parses and bounds-checks stored KDF parameters, before any derivation.
fn parse_kdf(slot: &str, raw: &[u8]) -> Result<KdfParams> {
    let invalid = |why: String| {
        let message = format!("invalid KDF parameters in slot \"{slot}\": {why}");
        Error::new(ErrorKind::Corrupted, message)
    };
    let text = std::str::from_utf8(raw).map_err(|_| invalid("not text".into()))?;
    let mut fields = text.split_whitespace();
    if fields.next() != Some("pbkdf2-sha256") {
        return Err(invalid("unknown algorithm".into()));
    }
    let iterations = fields
        .next()
        .and_then(|f| f.strip_prefix("iterations="))
        .ok_or_else(|| invalid("no iteration count".into()))?;
    let iterations: u64 = iterations
        .parse()
        .map_err(|_| invalid(format!("iteration count {iterations:?}")))?;
    if !(u64::from(MIN_ITERATIONS)..=u64::from(MAX_ITERATIONS)).contains(&iterations) {
        let why = format!("{iterations} iterations is outside {MIN_ITERATIONS}..={MAX_ITERATIONS}");
        return Err(invalid(why));
    }
    let salt = fields
        .next()
        .and_then(|f| f.strip_prefix("salt="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| invalid("no readable salt".into()))?;
    if fields.next().is_some() {
        return Err(invalid("trailing fields".into()));
    }
    let params = KdfParams {
        iterations: iterations as u32,
        salt,
    };
    params.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(params)
}

/// The binding id of a slot's wrapped master key.
fn slot_binding(slot: &str) -> KeyId {
    KeyId::new(&format!("kms-slot/{slot}")).expect("slot names are valid key id segments")
}

fn seal_master(
    slot_key: &Kek,
    slot: &str,
    generation: u32,
    master: &SecretBytes,
) -> Result<Vec<u8>> {
    let mut blob = slot_key.wrap(&slot_binding(slot), generation, master)?;
    let sum = checksum(&blob);
    blob.extend_from_slice(&sum);
    Ok(blob)
}

/// What opening a slot gave: `None` when the passphrase is not this slot's.
fn open_master(
    slot_key: &Kek,
    slot: &str,
    generation: u32,
    stored: &[u8],
) -> Result<Option<SecretBytes>> {
    let damaged = || {
        let message = format!("slot \"{slot}\" (KEK generation {generation}) is damaged");
        Error::new(ErrorKind::Corrupted, message)
    };
    if stored.len() < 8 + 16 {
        return Err(damaged());
    }
    let (blob, sum) = stored.split_at(stored.len() - 8);
    if checksum(blob) != sum {
        return Err(damaged());
    }
    match slot_key.unwrap(&slot_binding(slot), generation, blob) {
        Ok(master) => Ok(Some(master)),
        Err(e) if e.kind() == ErrorKind::Corrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// A store unlocked by a passphrase: its master keys by generation.
struct Unlocked {
    store: Store,
    /// The slot the passphrase opened.
    slot: String,
    /// The slots and their parameters, sorted by name.
    slots: Vec<(String, KdfParams)>,
    current: u32,
    /// The target generation of an unfinished rotation.
    target: Option<u32>,
    masters: Vec<(u32, SecretBytes)>,
}

impl Unlocked {
    fn master(&self, generation: u32) -> Result<&SecretBytes> {
        self.masters
            .iter()
            .find(|(g, _)| *g == generation)
            .map(|(_, m)| m)
            .ok_or_else(|| {
                let message = format!("no master key of generation {generation} was unlocked");
                Error::new(ErrorKind::Corrupted, message)
            })
    }

    fn live_generations(&self) -> Vec<u32> {
        std::iter::once(self.current).chain(self.target).collect()
    }

    /// The provider over this store, reading every live generation and writing the newest.
    fn into_provider(self, name: &str) -> Result<EnvelopeProvider> {
        let current = Kek::new(self.master(self.current)?)?;
        let target = match self.target {
            Some(t) => Some((t, Kek::new(self.master(t)?)?)),
            None => None,
        };
        let mut provider = EnvelopeProvider::open(name, self.store, Box::new(current))?;
        if let Some((generation, kek)) = target {
            provider.add_wrapper(generation, Box::new(kek))?;
            provider.write_with(generation)?;
        }
        Ok(provider)
    }
}

fn read_generation(store: &Store, name: &str) -> Result<Option<u32>> {
    match store.meta(name)? {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|g| *g >= 1)
            .map(Some)
            .ok_or_else(|| {
                let message = format!("store metadata {name} is unreadable");
                Error::new(ErrorKind::Corrupted, message)
            }),
    }
}

fn open_store(options: &Options) -> Result<Store> {
    let store = kms_core::store::open_initialised(&options.dir, &options.store_path())?;
    kms_core::store::check_made_by(&store, "command")?;
    Ok(store)
}

/// Opens the store and unlocks it with `passphrase`. Every slot's parameters are checked
/// before any derivation; a passphrase that opens no slot is [`ErrorKind::WrongPassphrase`],
/// and nothing is written either way.
fn unlock(options: &Options, passphrase: &SecretBytes) -> Result<Unlocked> {
    // 1. The store, its generations and its slots, all checked before any PBKDF2 work.
    let store = open_store(options)?;
    let current = read_generation(&store, CURRENT_KEK_META)?.unwrap_or(1);
    let target = read_generation(&store, ROTATION_META)?;
    let mut slots = Vec::new();
    for (name, raw) in store.meta_with_prefix("command.kdf.")? {
        let slot = name.trim_start_matches("command.kdf.").to_string();
        let params = parse_kdf(&slot, &raw)?;
        slots.push((slot, params));
    }
    if slots.is_empty() {
        let message = format!("store {} has no passphrase slot", store.path().display());
        return Err(Error::new(ErrorKind::Corrupted, message));
    }

    // 2. Try the passphrase on each slot.
    let generations: Vec<u32> = std::iter::once(current).chain(target).collect();
    for (slot, params) in &slots {
        let slot_key = Kek::new(&params.derive(passphrase.expose_secret(), Kek::LEN)?)?;
        let mut masters = Vec::new();
        for &generation in &generations {
            let stored = store.meta(&slot_meta(slot, generation))?.ok_or_else(|| {
                let message = format!("slot \"{slot}\" lacks KEK generation {generation}");
                Error::new(ErrorKind::Corrupted, message)
            })?;
            match open_master(&slot_key, slot, generation, &stored)? {
                Some(master) => masters.push((generation, master)),
                None => break,
            }
        }
        if masters.len() == generations.len() {
            let slot = slot.clone();
            return Ok(Unlocked {
                store,
                slot,
                slots,
                current,
                target,
                masters,
            });
        }
    }
    let message = format!(
        "wrong passphrase: it opens none of the {} slot(s) of store {}",
        slots.len(),
        store.path().display()
    );
    Err(Error::new(ErrorKind::WrongPassphrase, message))
}

/// Creates the directory (0700) and a store whose master key is wrapped by one slot,
/// `primary`, under the passphrase the command prints.
pub fn init(options: &Options) -> Result<String> {
    let name = options.display_name();
    let done = (|| {
        create_private_dir(&options.dir)?;
        let path = options.store_path();
        if std::fs::symlink_metadata(&path).is_ok() {
            let message = format!("{} already exists: already initialised", path.display());
            return Err(Error::new(ErrorKind::AlreadyExists, message));
        }
        let prompt = format!("New passphrase for kms store {}: ", options.dir.display());
        let passphrase = options.passphrase(&prompt)?;

        let master = SecretBytes::random(Kek::LEN)?;
        let kek = Kek::new(&master)?;
        let params = KdfParams::generate(options.iterations)?;
        let slot_key = Kek::new(&params.derive(passphrase.expose_secret(), Kek::LEN)?)?;
        let mut meta = EnvelopeProvider::initial_meta(&kek);
        meta.push((PROVIDER_META.to_string(), b"command".to_vec()));
        meta.push((kdf_meta(FIRST_SLOT), format_kdf(&params)));
        meta.push((
            slot_meta(FIRST_SLOT, 1),
            seal_master(&slot_key, FIRST_SLOT, 1, &master)?,
        ));
        Store::create(&path, &meta)?;
        Ok(format!(
            "initialised {name} with passphrase slot \"{FIRST_SLOT}\" ({} PBKDF2 iterations)",
            params.iterations
        ))
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// Opens the provider: runs the passphrase command and unlocks the store.
pub fn open(options: &Options) -> Result<EnvelopeProvider> {
    let name = options.display_name();
    let opened = (|| {
        let passphrase = options.passphrase(&options.unlock_prompt())?;
        unlock(options, &passphrase)?.into_provider(&name)
    })();
    opened.map_err(|e| e.with_backend(&name))
}

/// A slot as listed: its name and PBKDF2 iteration count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// The slot name.
    pub name: String,
    /// Its PBKDF2 iterations.
    pub iterations: u32,
}

/// The slots of the store (unlocking it first, so that only a passphrase holder sees them).
pub fn list_slots(options: &Options) -> Result<Vec<SlotInfo>> {
    let unlocked = unlock(options, &options.passphrase(&options.unlock_prompt())?)
        .map_err(|e| e.with_backend(options.display_name()))?;
    let slots = unlocked.slots.iter();
    Ok(slots
        .map(|(name, p)| SlotInfo {
            name: name.clone(),
            iterations: p.iterations,
        })
        .collect())
}

/// Whether [`set_slot`] may make a new slot, replace an existing one, or either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    /// The slot must not exist yet.
    Add,
    /// The slot must exist; its passphrase is replaced.
    Change,
}

/// Adds a slot or replaces its passphrase, in one transaction: afterwards exactly one of the
/// old and the new passphrase opens that slot, whatever crashes. The store is unlocked with the
/// configured passphrase command; the new passphrase is `new_passphrase`.
pub fn set_slot(
    options: &Options,
    slot: &str,
    change: SlotChange,
    new_passphrase: &SecretBytes,
) -> Result<String> {
    let name = options.display_name();
    let done = (|| {
        validate_slot_name(slot)?;
        if new_passphrase.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the new passphrase is empty",
            ));
        }
        let unlocked = unlock(options, &options.passphrase(&options.unlock_prompt())?)?;
        let exists = unlocked.slots.iter().any(|(s, _)| s == slot);
        match (change, exists) {
            (SlotChange::Add, true) => {
                let message = format!("slot \"{slot}\" already exists; change it instead");
                return Err(Error::new(ErrorKind::AlreadyExists, message));
            }
            (SlotChange::Change, false) => {
                let message = format!("slot \"{slot}\" does not exist");
                return Err(Error::new(ErrorKind::NotFound, message));
            }
            _ => {}
        }

        let params = KdfParams::generate(options.iterations)?;
        let slot_key = Kek::new(&params.derive(new_passphrase.expose_secret(), Kek::LEN)?)?;
        let mut set = vec![(kdf_meta(slot), format_kdf(&params))];
        for generation in unlocked.live_generations() {
            let master = unlocked.master(generation)?;
            set.push((
                slot_meta(slot, generation),
                seal_master(&slot_key, slot, generation, master)?,
            ));
        }
        unlocked.store.update_meta(set, Vec::new())?;
        let verb = if exists {
            "changed the passphrase of"
        } else {
            "added"
        };
        Ok(format!(
            "{verb} slot \"{slot}\" ({} PBKDF2 iterations)",
            params.iterations
        ))
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// Removes a slot. Removing the last slot is refused: the store would be lost.
pub fn remove_slot(options: &Options, slot: &str) -> Result<String> {
    let name = options.display_name();
    let done = (|| {
        validate_slot_name(slot)?;
        let unlocked = unlock(options, &options.passphrase(&options.unlock_prompt())?)?;
        if !unlocked.slots.iter().any(|(s, _)| s == slot) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("slot \"{slot}\" does not exist"),
            ));
        }
        if unlocked.slots.len() == 1 {
            let message = format!(
                "refusing to remove slot \"{slot}\": it is the last one, and without it no key \
                 of the store can ever be read"
            );
            return Err(Error::new(ErrorKind::InvalidInput, message));
        }
        if unlocked.slot == slot {
            let message = format!(
                "refusing to remove slot \"{slot}\": it is the one the configured \
                 passphrase_command opens, so kms could not open the store afterwards; \
                 configure another slot's passphrase first"
            );
            return Err(Error::new(ErrorKind::InvalidInput, message));
        }
        let mut delete = vec![kdf_meta(slot)];
        delete.extend(
            unlocked
                .live_generations()
                .into_iter()
                .map(|g| slot_meta(slot, g)),
        );
        unlocked.store.update_meta(Vec::new(), delete)?;
        Ok(format!("removed slot \"{slot}\""))
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// What a KEK rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The generation the store was at.
    pub from: u32,
    /// The generation it is at now.
    pub to: u32,
    /// Whether this call resumed an interrupted rotation.
    pub resumed: bool,
    /// Keys re-wrapped by this call.
    pub rewrapped: usize,
}

/// Rotates the master key: a new random master key, sealed in every slot, then every DEK
/// re-wrapped, then the switch. Crash-safe and resumable: a rotation interrupted at any point
/// leaves every key readable, and calling this again finishes it.
///
/// Every slot must be unlocked to seal the new master key in it: the configured command is run
/// once, and again with a prompt naming each slot the first passphrase does not open.
pub fn rotate_kek(options: &Options, mut progress: impl FnMut(usize)) -> Result<Rotated> {
    let name = options.display_name();
    let done = (|| {
        let passphrase = options.passphrase(&options.unlock_prompt())?;
        let unlocked = unlock(options, &passphrase)?;
        let from = unlocked.current;

        // 1. Start, or find, the rotation: the new master key sealed in every slot, in one
        //    transaction with the record of the target generation.
        let (to, resumed) = match unlocked.target {
            Some(target) => (target, true),
            None => {
                let to = from
                    .checked_add(1)
                    .ok_or_else(|| Error::new(ErrorKind::Other, "KEK generations are exhausted"))?;
                let master = SecretBytes::random(Kek::LEN)?;
                let kek = Kek::new(&master)?;
                let mut set = vec![(fingerprint_meta_name(to), kek.fingerprint())];
                for (slot, params) in &unlocked.slots {
                    let slot_pass = if *slot == unlocked.slot {
                        passphrase.clone()
                    } else {
                        let prompt = format!(
                            "Passphrase of slot \"{slot}\" of kms store {}: ",
                            options.dir.display()
                        );
                        options.passphrase(&prompt)?
                    };
                    let slot_key = Kek::new(&params.derive(slot_pass.expose_secret(), Kek::LEN)?)?;
                    let stored = unlocked
                        .store
                        .meta(&slot_meta(slot, from))?
                        .unwrap_or_default();
                    if open_master(&slot_key, slot, from, &stored)?.is_none() {
                        let message = format!("wrong passphrase for slot \"{slot}\"");
                        return Err(Error::new(ErrorKind::WrongPassphrase, message));
                    }
                    set.push((
                        slot_meta(slot, to),
                        seal_master(&slot_key, slot, to, &master)?,
                    ));
                }
                set.push((ROTATION_META.to_string(), to.to_string().into_bytes()));
                unlocked.store.update_meta(set, Vec::new())?;
                (to, false)
            }
        };

        // 2. Re-wrap every key of the old generation, batch by batch.
        let unlocked = unlock(options, &passphrase)?;
        let slots: Vec<String> = unlocked
            .slots
            .iter()
            .map(|(slot, _)| slot.clone())
            .collect();
        let provider = unlocked.into_provider(&name)?;
        let mut rewrapped = 0;
        loop {
            rewrapped += provider.rewrap_all(from, to, 512, &mut progress)?;

            // 3. The switch, only once no row is left under the old generation.
            let mut retired = vec![ROTATION_META.to_string()];
            retired.extend(slots.iter().map(|slot| slot_meta(slot, from)));
            if switch_generation(provider.store(), from, to, retired)? {
                return Ok(Rotated {
                    from,
                    to,
                    resumed,
                    rewrapped,
                });
            }
        }
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// The path of the store file of `options`.
pub fn store_path(options: &Options) -> PathBuf {
    options.store_path()
}

/// Whether `dir` holds an initialised command-provider store.
pub fn is_initialised(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(STORE_FILE)).is_ok()
}
