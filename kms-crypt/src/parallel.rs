//! Batches of chunks, and the two workers that read, seal or open, and write them.
//!
//! A stream goes in batches of [`BATCH_BYTES`] of plaintext. A stream of one batch is done on
//! the caller's thread. A longer one is shared by the caller's thread and one helper: each
//! worker takes the next batch from the input (in turn, under a lock), seals or opens it in its
//! own buffer with no lock held, and writes it when every earlier batch has been written. Both
//! cores of a small machine thus share the reading, the cryptography and the writing, and each
//! batch stays in the cache of the core that handles it.
//!
//! The first failure (a read, a chunk that fails authentication, a write) stops both workers:
//! no batch after it is written, and the failure of the earliest batch is the one returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::header::{Header, TAG_LEN};

/// Plaintext bytes per batch: small enough to stay in a core's L2 cache while it is read,
/// sealed and written.
pub(crate) const BATCH_BYTES: usize = 256 << 10;

/// A batch of chunks in one buffer of `count` slots of `chunk + 16` bytes.
pub(crate) struct Batch {
    pub buf: Zeroizing<Vec<u8>>,
    /// The index of the first chunk.
    pub first: u64,
    /// Per chunk: the plaintext length (encryption), or the stored length and then the
    /// plaintext length once opened (decryption).
    pub lens: Vec<usize>,
    /// Whether the batch ends the stream.
    pub last: bool,
}

/// The shape of the batches of one file.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub chunk: usize,
    pub segment: usize,
    pub count: usize,
}

impl Shape {
    pub fn of(header: &Header) -> Shape {
        let chunk = header.chunk_size();
        Shape {
            chunk,
            segment: chunk + TAG_LEN,
            count: (BATCH_BYTES / chunk).max(1),
        }
    }

    /// The bytes of a batch of full chunks as stored.
    pub fn stored(&self) -> usize {
        self.count * self.segment
    }

    /// An empty batch, with one byte more than a full batch: a read that fills it learns that
    /// the input goes on.
    pub fn batch(&self) -> Batch {
        Batch {
            buf: Zeroizing::new(vec![0u8; self.stored() + 1]),
            first: 0,
            lens: Vec::with_capacity(self.count),
            last: false,
        }
    }
}

/// The input side, taken in turn: the read step and the next batch number.
struct Reader<F> {
    fill: F,
    next: u64,
    done: bool,
}

/// The output side, taken in order: the write step, the next batch number to write and the
/// earliest failure.
struct Writer<D> {
    drain: D,
    next: u64,
    failure: Option<(u64, Error)>,
}

/// What the two workers share.
struct Shared<F, P, D> {
    reader: Mutex<Reader<F>>,
    process: P,
    writer: Mutex<Writer<D>>,
    /// Signalled when a batch is written or a worker fails.
    turn: Condvar,
    stop: AtomicBool,
}

/// Runs a stream: `fill` reads the next batch into a buffer (and marks the last), `process`
/// seals or opens it, `drain` writes it. Returns once the last batch is written, or with the
/// failure of the earliest batch that failed.
pub(crate) fn run<F, P, D>(shape: Shape, mut fill: F, process: P, mut drain: D) -> Result<()>
where
    F: FnMut(&mut Batch) -> Result<()> + Send,
    P: Fn(&mut Batch) -> Result<()> + Sync,
    D: FnMut(&Batch) -> Result<()> + Send,
{
    // 1. A stream of one batch (most small files) needs no thread.
    let mut first = shape.batch();
    fill(&mut first)?;
    if first.last {
        process(&mut first)?;
        return drain(&first);
    }

    // 2. Longer streams: this thread starts on batch 0, the helper by reading batch 1.
    let shared = Shared {
        reader: Mutex::new(Reader {
            fill,
            next: 1,
            done: false,
        }),
        process,
        writer: Mutex::new(Writer {
            drain,
            next: 0,
            failure: None,
        }),
        turn: Condvar::new(),
        stop: AtomicBool::new(false),
    };
    std::thread::scope(|scope| {
        scope.spawn(|| shared.work(shape.batch(), None));
        shared.work(first, Some(0));
    });
    let writer = shared
        .writer
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    match writer.failure {
        Some((_, error)) => Err(error),
        None => Ok(()),
    }
}

impl<F, P, D> Shared<F, P, D>
where
    F: FnMut(&mut Batch) -> Result<()>,
    P: Fn(&mut Batch) -> Result<()>,
    D: FnMut(&Batch) -> Result<()>,
{
    /// One worker: read, process and write batches until the stream ends or fails.
    fn work(&self, mut batch: Batch, mut held: Option<u64>) {
        // A panic here must not leave the other worker waiting for a turn forever.
        let _guard = StopOnPanic(self);
        loop {
            // 1. The next batch from the input, unless one is held already.
            let seq = match held.take() {
                Some(seq) => seq,
                None => {
                    let mut reader = lock(&self.reader);
                    if reader.done || self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let seq = reader.next;
                    reader.next += 1;
                    let filled = (reader.fill)(&mut batch);
                    reader.done = batch.last || filled.is_err();
                    drop(reader);
                    if let Err(error) = filled {
                        return self.fail(seq, error);
                    }
                    seq
                }
            };

            // 2. Seal or open it, with no lock held.
            if let Err(error) = (self.process)(&mut batch) {
                return self.fail(seq, error);
            }

            // 3. Write it once every earlier batch is written.
            let mut writer = lock(&self.writer);
            while writer.next != seq && !self.stop.load(Ordering::SeqCst) {
                writer = self
                    .turn
                    .wait(writer)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Err(error) = (writer.drain)(&batch) {
                drop(writer);
                return self.fail(seq, error);
            }
            writer.next += 1;
            drop(writer);
            self.turn.notify_all();
            if batch.last {
                return;
            }
        }
    }

    /// Records the failure of batch `seq` (the earliest one wins) and stops both workers.
    fn fail(&self, seq: u64, error: Error) {
        let mut writer = lock(&self.writer);
        if writer
            .failure
            .as_ref()
            .is_none_or(|(earlier, _)| seq < *earlier)
        {
            writer.failure = Some((seq, error));
        }
        self.stop.store(true, Ordering::SeqCst);
        drop(writer);
        self.turn.notify_all();
    }
}

/// Stops the workers when one unwinds from a panic.
struct StopOnPanic<'a, F, P, D>(&'a Shared<F, P, D>);

impl<F, P, D> Drop for StopOnPanic<'_, F, P, D> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Under the writer lock, so that a waiting worker cannot miss the wake-up.
            let guard = lock(&self.0.writer);
            self.0.stop.store(true, Ordering::SeqCst);
            drop(guard);
            self.0.turn.notify_all();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
