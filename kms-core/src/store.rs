//! The wrapped-key store: one SQLite file per store directory, shared by every envelope provider.
//!
//! # Guarantees
//! - Durable before acknowledged: WAL journal with `synchronous = FULL`; a write returns only
//!   after its transaction committed and the WAL was fsynced.
//! - Several processes at once: every write runs in a `BEGIN IMMEDIATE` transaction, which takes
//!   SQLite's write lock, so an insert-if-absent is atomic across threads and processes.
//! - Group commit: writes from threads of one process that arrive while a commit is in progress
//!   are committed together in the next transaction, one fsync for the lot.
//! - Never re-initialised: [`Store::open`] never creates a file, and refuses an empty,
//!   truncated, foreign or damaged one with [`ErrorKind::Corrupted`]; only [`Store::create`]
//!   makes a store, and only where no file exists.
//!
//! The store keeps opaque wrapped blobs; it knows nothing of KEKs. Each row records which KEK
//! generation wrapped it, for rotations that re-wrap row by row.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use crate::error::{Error, ErrorKind, Result};
use crate::id::{KeyId, validate_prefix};

/// `PRAGMA application_id` of a kms store: "kms1".
const APPLICATION_ID: i32 = 0x6b6d_7331;

/// `PRAGMA user_version`: the schema version this code reads and writes.
const SCHEMA_VERSION: i32 = 1;

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE keys (
    id      TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    kek     INTEGER NOT NULL,
    len     INTEGER NOT NULL,
    created INTEGER NOT NULL,
    wrapped BLOB NOT NULL,
    PRIMARY KEY (id, version)
) WITHOUT ROWID;
CREATE INDEX keys_by_kek ON keys (kek);
";

/// One stored version of a key.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// The version, from 1.
    pub version: u32,
    /// The generation of the KEK that wrapped it.
    pub kek: u32,
    /// The length of the unwrapped key in bytes.
    pub len: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The wrapped key (opaque to the store).
    pub wrapped: Vec<u8>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("version", &self.version)
            .field("kek", &self.kek)
            .field("len", &self.len)
            .field("created", &self.created)
            .field("wrapped_len", &self.wrapped.len())
            .finish()
    }
}

/// A row of [`Store::list`]: the newest version of a key, without its blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The key id.
    pub id: KeyId,
    /// The newest version.
    pub version: u32,
    /// Its length in bytes.
    pub len: u32,
    /// Its creation time.
    pub created: u64,
}

/// What [`Store::insert`] did.
#[derive(Debug)]
pub enum Inserted {
    /// The record was stored and is durable.
    Stored,
    /// The id already had this version or a newer one; this is the newest stored record.
    Exists(Record),
    /// The record's KEK generation has been retired by a rotation since the provider opened.
    RetiredKek,
}

/// The metadata name under which the fingerprint of KEK generation `generation` is kept. A row
/// may be inserted only while its generation has this record.
pub fn fingerprint_meta_name(generation: u32) -> String {
    format!("kek.{generation}.fingerprint")
}

enum WriteOp {
    Insert {
        id: KeyId,
        record: Record,
    },
    Delete {
        id: KeyId,
    },
    Meta {
        set: Vec<(String, Vec<u8>)>,
        delete: Vec<String>,
    },
    RewrapBatch {
        rows: Vec<Rewrapped>,
    },
    MetaIfNoneWrappedBy {
        kek: u32,
        set: Vec<(String, Vec<u8>)>,
        delete: Vec<String>,
    },
}

enum WriteDone {
    Insert(Inserted),
    Changed(bool),
    Count(usize),
}

/// One row re-wrapped by a KEK rotation.
pub struct Rewrapped {
    /// The key id.
    pub id: KeyId,
    /// The version.
    pub version: u32,
    /// The KEK generation the row must still be wrapped by.
    pub from_kek: u32,
    /// The KEK generation of the new blob.
    pub to_kek: u32,
    /// The new blob.
    pub wrapped: Vec<u8>,
}

struct Pending {
    op: WriteOp,
    done: Mutex<Option<Result<WriteDone>>>,
}

/// A wrapped-key store on one SQLite file.
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    queue: Mutex<Vec<Arc<Pending>>>,
    /// Signalled, with `queue` held, each time a leader has committed a batch.
    committed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Creates a new, empty store at `path` with the given metadata. Fails if anything exists
    /// at `path`: an existing store, even an empty file, is never overwritten.
    pub fn create(path: &Path, meta: &[(String, Vec<u8>)]) -> Result<Store> {
        if fs::symlink_metadata(path).is_ok() {
            let message = format!(
                "store file {} already exists; refusing to overwrite it",
                path.display()
            );
            return Err(Error::new(ErrorKind::AlreadyExists, message));
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            let side = sidecar(path, suffix);
            if fs::symlink_metadata(&side).is_ok() {
                let message = format!(
                    "{} exists without its store file; refusing to create a store over it",
                    side.display()
                );
                return Err(Error::new(ErrorKind::Corrupted, message));
            }
        }

        // The file is made here, private to its owner; SQLite gives its WAL and shared-memory
        // files the same mode.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Other,
                    format!("cannot create store file {}: {e}", path.display()),
                )
            })?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_EXRESCODE;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_error(path, e))?;
        let setup = || -> rusqlite::Result<()> {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch("BEGIN IMMEDIATE")?;
            conn.pragma_update(None, "application_id", APPLICATION_ID)?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            conn.execute_batch(SCHEMA)?;
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('format', ?1)",
                [b"kms-store/1".as_slice()],
            )?;
            for (name, value) in meta {
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES (?1, ?2)",
                    params![name, value],
                )?;
            }
            conn.execute_batch("COMMIT")
        };
        setup().map_err(|e| sql_error(path, e))?;
        drop(conn);
        crate::fsutil::sync_parent(path)?;
        Store::open(path)
    }

    /// Opens an existing store. Never creates one: a missing, empty, truncated, foreign or
    /// damaged file is an error.
    pub fn open(path: &Path) -> Result<Store> {
        check_file(path)?;
        let writer = open_connection(path)?;
        verify_schema(path, &writer)?;
        Ok(Store {
            path: path.to_path_buf(),
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            queue: Mutex::new(Vec::new()),
            committed: Condvar::new(),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
                .query_row([name], |row| row.get(0))
                .optional()
        })
    }

    /// The metadata entries whose name starts with `prefix`, sorted by name.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, value FROM meta WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name",
            )?;
            let rows = stmt.query_map([prefix], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    /// Sets a metadata value, durably.
    pub fn set_meta(&self, name: &str, value: &[u8]) -> Result<()> {
        self.update_meta(vec![(name.to_string(), value.to_vec())], Vec::new())
    }

    /// Sets and deletes metadata entries in one transaction: all or none, durably.
    pub fn update_meta(&self, set: Vec<(String, Vec<u8>)>, delete: Vec<String>) -> Result<()> {
        self.write(WriteOp::Meta { set, delete }).map(|_| ())
    }

    /// The newest version of `id`.
    pub fn latest(&self, id: &KeyId) -> Result<Option<Record>> {
        self.read(|conn| latest(conn, id))
            .map_err(|e| e.with_key_id(id))
    }

    /// Version `version` of `id`.
    pub fn version(&self, id: &KeyId, version: u32) -> Result<Option<Record>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT version, kek, len, created, wrapped FROM keys WHERE id = ?1 AND version = ?2",
            )?
            .query_row(params![id.as_str(), version], record_from_row)
            .optional()
        })
        .map_err(|e| e.with_key_id(id))
    }

    /// Stores `record` for `id` unless the id already has that version or a newer one, in
    /// which case the newest stored record is returned instead. Durable when it returns.
    pub fn insert(&self, id: &KeyId, record: Record) -> Result<Inserted> {
        match self.write(WriteOp::Insert {
            id: id.clone(),
            record,
        }) {
            Ok(WriteDone::Insert(outcome)) => Ok(outcome),
            Ok(_) => unreachable_outcome(),
            Err(e) => Err(e.with_key_id(id)),
        }
    }

    /// Deletes every version of `id`; whether there was any.
    pub fn delete(&self, id: &KeyId) -> Result<bool> {
        match self.write(WriteOp::Delete { id: id.clone() }) {
            Ok(WriteDone::Changed(any)) => Ok(any),
            Ok(_) => unreachable_outcome(),
            Err(e) => Err(e.with_key_id(id)),
        }
    }

    /// Like [`update_meta`](Store::update_meta), but only if no row is wrapped by KEK
    /// generation `kek` any more, checked in the same transaction; whether it was applied. Ends
    /// a rotation without stranding a row that a concurrent writer added meanwhile.
    pub fn update_meta_if_none_wrapped_by(
        &self,
        kek: u32,
        set: Vec<(String, Vec<u8>)>,
        delete: Vec<String>,
    ) -> Result<bool> {
        match self.write(WriteOp::MetaIfNoneWrappedBy { kek, set, delete }) {
            Ok(WriteDone::Changed(applied)) => Ok(applied),
            Ok(_) => unreachable_outcome(),
            Err(e) => Err(e),
        }
    }

    /// Replaces the blobs of the given rows, each only if it is still wrapped by its
    /// `from_kek`, in one transaction; the number of rows replaced. For KEK rotations.
    pub fn rewrap_batch(&self, rows: Vec<Rewrapped>) -> Result<usize> {
        match self.write(WriteOp::RewrapBatch { rows }) {
            Ok(WriteDone::Count(n)) => Ok(n),
            Ok(_) => unreachable_outcome(),
            Err(e) => Err(e),
        }
    }

    /// The newest version of every key whose id starts with `prefix`, sorted by id.
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        validate_prefix(prefix)?;
        // Every key id byte is below 0x7f, so ids starting with `prefix` sort in
        // [prefix, prefix + "\x7f").
        let upper = format!("{prefix}\u{7f}");
        let rows: Vec<(String, u32, u32, u64)> = self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, MAX(version), len, created FROM keys \
                 WHERE id >= ?1 AND id < ?2 GROUP BY id ORDER BY id",
            )?;
            let rows = stmt.query_map([prefix, upper.as_str()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, unsigned(row.get(3)?)))
            })?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, version, len, created)| {
                let id = KeyId::new(&id)
                    .map_err(|e| self.corrupted(&format!("a stored key id is invalid: {e}")))?;
                Ok(Listed {
                    id,
                    version,
                    len,
                    created,
                })
            })
            .collect()
    }

    /// Every record wrapped by KEK generation `kek`, at most `limit` of them, as (id, record).
    pub fn wrapped_by(&self, kek: u32, limit: u32) -> Result<Vec<(KeyId, Record)>> {
        let rows: Vec<(String, Record)> = self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, version, kek, len, created, wrapped FROM keys WHERE kek = ?1 LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![kek, limit], |row| {
                Ok((row.get(0)?, record_from_row_at(row, 1)?))
            })?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(id, rec)| {
                let id = KeyId::new(&id)
                    .map_err(|e| self.corrupted(&format!("a stored key id is invalid: {e}")))?;
                Ok((id, rec))
            })
            .collect()
    }

    /// The number of stored versions wrapped by each KEK generation, as (generation, count).
    pub fn count_by_kek(&self) -> Result<Vec<(u32, u64)>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT kek, COUNT(*) FROM keys GROUP BY kek ORDER BY kek")?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, unsigned(row.get(1)?))))?;
            rows.collect()
        })
    }

    /// Runs SQLite's full integrity check (slow on large stores: for `kms verify`, not open).
    pub fn integrity_check(&self) -> Result<()> {
        let report: Vec<String> = self.read(|conn| {
            let mut stmt = conn.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            rows.collect()
        })?;
        if report == ["ok"] {
            Ok(())
        } else {
            Err(self.corrupted(&format!("integrity check failed: {}", report.join("; "))))
        }
    }

    fn corrupted(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::Corrupted,
            format!("store {} is damaged: {why}", self.path.display()),
        )
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = match lock(&self.readers).pop() {
            Some(conn) => conn,
            None => open_connection(&self.path)?,
        };
        let result = f(&conn).map_err(|e| sql_error(&self.path, e));
        lock(&self.readers).push(conn);
        result
    }

    /// Queues `op` and commits it, together with whatever else is queued, in one transaction.
    ///
    /// A thread that finds the writer connection free is the leader: it drains the queue,
    /// commits the batch and wakes the waiting threads. The others wait on `committed`, not on
    /// the writer connection, so that a thread whose op another leader committed returns at
    /// once instead of queueing behind the next batch's fsync.
    fn write(&self, op: WriteOp) -> Result<WriteDone> {
        let pending = Arc::new(Pending {
            op,
            done: Mutex::new(None),
        });
        let mut queue = lock(&self.queue);
        queue.push(Arc::clone(&pending));

        // Checked with `queue` held: a leader signals `committed` only after taking it, so a
        // result or a free writer connection cannot slip by unseen.
        let conn = loop {
            if let Some(done) = lock(&pending.done).take() {
                return done;
            }
            match self.writer.try_lock() {
                Ok(conn) => break conn,
                Err(TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    queue = self
                        .committed
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
        };
        let batch = std::mem::take(&mut *queue);
        drop(queue);
        let leader = Leader {
            store: self,
            conn: Some(conn),
        };
        // Empty when this thread's op was committed between its check and taking the writer.
        let outcome = match batch.is_empty() {
            true => Ok(Vec::new()),
            false => commit_batch(leader.conn(), &batch),
        };
        match outcome {
            Ok(results) => {
                for (p, result) in batch.iter().zip(results) {
                    *lock(&p.done) = Some(Ok(result));
                }
            }
            Err(e) => {
                let e = sql_error(&self.path, e);
                for p in &batch {
                    *lock(&p.done) = Some(Err(e.clone()));
                }
            }
        }
        drop(leader);

        let done = lock(&pending.done).take();
        done.unwrap_or_else(|| {
            Err(Error::new(
                ErrorKind::Other,
                "a store write was lost after an internal panic; retry",
            ))
        })
    }
}

/// The writer connection held by a leader. Dropped, even by a panic, it releases the
/// connection first and then wakes the waiting threads, so that one of them can take it.
struct Leader<'a> {
    store: &'a Store,
    conn: Option<MutexGuard<'a, Connection>>,
}

impl Leader<'_> {
    fn conn(&self) -> &Connection {
        self.conn.as_deref().expect("held until drop")
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        drop(self.conn.take());
        let _queue = lock(&self.store.queue);
        self.store.committed.notify_all();
    }
}

fn unreachable_outcome<T>() -> Result<T> {
    Err(Error::new(
        ErrorKind::Other,
        "store write returned an outcome of another kind",
    ))
}

fn commit_batch(conn: &Connection, batch: &[Arc<Pending>]) -> rusqlite::Result<Vec<WriteDone>> {
    // A panic in an earlier leader may have left a transaction open.
    if !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK")?;
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let run = || -> rusqlite::Result<Vec<WriteDone>> {
        let mut results = Vec::with_capacity(batch.len());
        for pending in batch {
            results.push(apply(conn, &pending.op)?);
        }
        conn.execute_batch("COMMIT")?;
        Ok(results)
    };
    let results = run();
    if results.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    results
}

fn apply(conn: &Connection, op: &WriteOp) -> rusqlite::Result<WriteDone> {
    match op {
        WriteOp::Insert { id, record } => {
            // A process that opened the store before a KEK rotation finished must not add
            // rows under the retired KEK: every row's generation must still be recorded.
            let live: Option<i64> = conn
                .prepare_cached("SELECT 1 FROM meta WHERE name = ?1")?
                .query_row([fingerprint_meta_name(record.kek)], |row| row.get(0))
                .optional()?;
            if live.is_none() {
                return Ok(WriteDone::Insert(Inserted::RetiredKek));
            }
            if let Some(existing) = latest(conn, id)?
                && existing.version >= record.version
            {
                return Ok(WriteDone::Insert(Inserted::Exists(existing)));
            }
            conn.prepare_cached(
                "INSERT INTO keys (id, version, kek, len, created, wrapped) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                id.as_str(),
                record.version,
                record.kek,
                record.len,
                i64::try_from(record.created).unwrap_or(i64::MAX),
                record.wrapped
            ])?;
            Ok(WriteDone::Insert(Inserted::Stored))
        }
        WriteOp::Delete { id } => {
            let n = conn
                .prepare_cached("DELETE FROM keys WHERE id = ?1")?
                .execute([id.as_str()])?;
            Ok(WriteDone::Changed(n > 0))
        }
        WriteOp::RewrapBatch { rows } => {
            let mut stmt = conn.prepare_cached(
                "UPDATE keys SET kek = ?1, wrapped = ?2 \
                 WHERE id = ?3 AND version = ?4 AND kek = ?5",
            )?;
            let mut changed = 0;
            for row in rows {
                changed += stmt.execute(params![
                    row.to_kek,
                    row.wrapped,
                    row.id.as_str(),
                    row.version,
                    row.from_kek
                ])?;
            }
            Ok(WriteDone::Count(changed))
        }
        WriteOp::MetaIfNoneWrappedBy { kek, set, delete } => {
            let left: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM keys WHERE kek = ?1")?
                .query_row([kek], |row| row.get(0))?;
            if left > 0 {
                return Ok(WriteDone::Changed(false));
            }
            apply(
                conn,
                &WriteOp::Meta {
                    set: set.clone(),
                    delete: delete.clone(),
                },
            )
        }
        WriteOp::Meta { set, delete } => {
            for (name, value) in set {
                conn.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?
                    .execute(params![name, value])?;
            }
            for name in delete {
                conn.prepare_cached("DELETE FROM meta WHERE name = ?1")?
                    .execute([name])?;
            }
            Ok(WriteDone::Changed(true))
        }
    }
}

fn latest(conn: &Connection, id: &KeyId) -> rusqlite::Result<Option<Record>> {
    conn.prepare_cached(
        "SELECT version, kek, len, created, wrapped FROM keys WHERE id = ?1 ORDER BY version DESC LIMIT 1",
    )?
    .query_row([id.as_str()], record_from_row)
    .optional()
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    record_from_row_at(row, 0)
}

fn record_from_row_at(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Record> {
    Ok(Record {
        version: row.get(at)?,
        kek: row.get(at + 1)?,
        len: row.get(at + 2)?,
        created: unsigned(row.get(at + 3)?),
        wrapped: row.get(at + 4)?,
    })
}

impl Record {
    /// A new record created now.
    pub fn new(version: u32, kek: u32, len: u32, wrapped: Vec<u8>) -> Record {
        Record {
            version,
            kek,
            len,
            created: now(),
            wrapped,
        }
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Checks the file before SQLite sees it: SQLite would happily treat an empty file as a new,
/// empty database, which for a key store means every key silently gone.
fn check_file(path: &Path) -> Result<()> {
    let shown = path.display();
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let message =
                format!("store file {shown} does not exist; a store is made only by `kms init`");
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Other,
                format!("cannot inspect store file {shown}: {e}"),
            ));
        }
    };
    if md.file_type().is_symlink() {
        return Err(Error::new(
            ErrorKind::Insecure,
            format!("store file {shown} is a symbolic link; refusing it"),
        ));
    }
    if !md.is_file() {
        return Err(Error::new(
            ErrorKind::Corrupted,
            format!("store file {shown} is not a regular file"),
        ));
    }
    let wal_len = fs::metadata(sidecar(path, "-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    if md.len() == 0 && wal_len == 0 {
        let message = format!(
            "store {shown} is damaged: the file is empty (truncated?); refusing to treat it as a new store"
        );
        return Err(Error::new(ErrorKind::Corrupted, message));
    }

    // The SQLite header: a file cut short of the size it declares lost pages. Only checked
    // without a WAL: during WAL recovery the main file may legitimately lag its header.
    let mut header = [0u8; 100];
    let read = fs::File::open(path).and_then(|mut f| f.read(&mut header));
    let read = read.map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("cannot read store file {shown}: {e}"),
        )
    })?;
    if read == 0 {
        return Ok(());
    }
    if read < 100 || &header[..16] != b"SQLite format 3\0" {
        let message = format!(
            "store {shown} is damaged: it does not start with a database header ({} bytes on disk)",
            md.len()
        );
        return Err(Error::new(ErrorKind::Corrupted, message));
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    let header_valid = header[24..28] == header[92..96];
    if wal_len == 0 && header_valid && md.len() < pages * page_size {
        let message = format!(
            "store {shown} is damaged: truncated to {} bytes, its header declares {}",
            md.len(),
            pages * page_size
        );
        return Err(Error::new(ErrorKind::Corrupted, message));
    }
    Ok(())
}

fn open_connection(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_EXRESCODE;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_error(path, e))?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Refuse to follow a journal_mode change by another program: WAL is what makes readers
        // and the writer independent.
        let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "journal_mode", "WAL")?;
        }
        Ok(())
    };
    setup().map_err(|e| sql_error(path, e))?;
    Ok(conn)
}

fn verify_schema(path: &Path, conn: &Connection) -> Result<()> {
    let shown = path.display();
    let (app_id, version): (i32, i32) = conn
        .query_row(
            "SELECT * FROM pragma_application_id, pragma_user_version",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(|e| sql_error(path, e))?;
    if app_id != APPLICATION_ID {
        let message = format!(
            "store {shown} is damaged or foreign: it is not a kms store (application id {app_id:#x})"
        );
        return Err(Error::new(ErrorKind::Corrupted, message));
    }
    if version > SCHEMA_VERSION {
        let message = format!(
            "store {shown} has schema version {version}; this kms reads up to {SCHEMA_VERSION}"
        );
        return Err(Error::new(ErrorKind::Unsupported, message));
    }
    if version != SCHEMA_VERSION {
        let message = format!("store {shown} is damaged: schema version {version}");
        return Err(Error::new(ErrorKind::Corrupted, message));
    }
    let format: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE name = 'format'", [], |row| {
            row.get(0)
        })
        .optional()
        .map_err(|e| sql_error(path, e))?;
    if format.as_deref() != Some(b"kms-store/1".as_slice()) {
        return Err(Error::new(
            ErrorKind::Corrupted,
            format!("store {shown} is damaged: its format record is missing"),
        ));
    }
    Ok(())
}

/// The metadata entry naming the provider that made a store (`command`, `pkcs11`, ...).
pub const PROVIDER_META: &str = "provider";

/// Opens the store at `path` of a provider whose private directory is `dir`: the directory
/// must pass [`crate::fsutil::check_private`], and a missing store is "not initialised" (an
/// invalid configuration), never created here.
pub fn open_initialised(dir: &Path, path: &Path) -> Result<Store> {
    crate::fsutil::check_private(dir, true)?;
    if fs::symlink_metadata(path).is_err() {
        let message = format!("{} is not initialised: run `kms init` first", dir.display());
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    Store::open(path)
}

/// Refuses a store whose [`PROVIDER_META`] entry does not name `provider`: another provider's
/// store would open with the wrong key hierarchy.
pub fn check_made_by(store: &Store, provider: &str) -> Result<()> {
    match store.meta(PROVIDER_META)? {
        Some(p) if p == provider.as_bytes() => Ok(()),
        other => {
            let made_by = other.map(|p| String::from_utf8_lossy(&p).into_owned());
            let message = format!(
                "store {} was not made by the {provider} provider (made by {})",
                store.path().display(),
                made_by.as_deref().unwrap_or("an unknown provider")
            );
            Err(Error::new(ErrorKind::InvalidConfig, message))
        }
    }
}

/// Whether the file system holding `path` has no block left for an unprivileged write.
fn file_system_full(path: &Path) -> bool {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    rustix::fs::statvfs(dir.unwrap_or(Path::new(".")))
        .map(|st| st.f_bavail == 0 || st.f_bfree == 0)
        .unwrap_or(false)
}

/// Maps a SQLite failure to the kind a caller acts on.
fn sql_error(path: &Path, e: rusqlite::Error) -> Error {
    let shown = path.display();
    let (kind, message) = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => (
                ErrorKind::Corrupted,
                format!("store {shown} is damaged: {e}"),
            ),
            ErrorCode::DiskFull => (
                ErrorKind::NoSpace,
                format!("no space left for store {shown}: {e}"),
            ),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => (
                ErrorKind::Unavailable,
                format!(
                    "store {shown} stayed locked by another process for {}s: {e}",
                    BUSY_TIMEOUT.as_secs()
                ),
            ),
            ErrorCode::PermissionDenied
            | ErrorCode::ReadOnly
            | ErrorCode::AuthorizationForStatementDenied => (
                ErrorKind::Denied,
                format!("store {shown} cannot be written: {e}"),
            ),
            ErrorCode::CannotOpen => (
                ErrorKind::Unavailable,
                format!("cannot open store {shown}: {e}"),
            ),
            // SQLite reports a write that ran out of space in the WAL or its index as an I/O
            // error, without the OS error; a file system with no free block is the cause.
            ErrorCode::SystemIoFailure if file_system_full(path) => (
                ErrorKind::NoSpace,
                format!("no space left for store {shown}: the file system is full ({e})"),
            ),
            _ => (ErrorKind::Other, format!("store {shown}: {e}")),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => (
            ErrorKind::Corrupted,
            format!("store {shown} is damaged: a stored value has the wrong type: {e}"),
        ),
        _ => (ErrorKind::Other, format!("store {shown}: {e}")),
    };
    Error::new(kind, message)
}
