//! Streaming encryption and decryption, and decryption of a byte range.
//!
//! Streams go in batches (see [`crate::parallel`]). A chunk's tag sits right after its
//! plaintext in the batch buffer, so a sealed batch is already in file order. Batch buffers
//! are zeroized when they drop, and a batch of plaintext is written only once every chunk in
//! it has authenticated.

use std::io::{self, IoSlice, IoSliceMut, Read, Seek, SeekFrom, Write};

use kms_core::{Key, KeyId};
use zeroize::Zeroizing;

use crate::chunk::ChunkCipher;
use crate::error::{Damage, Error, Result};
use crate::header::{Header, MAX_CHUNKS, TAG_LEN, read_full};
use crate::parallel::{self, Batch, Shape};

/// Encrypts `input` to `output` under `key` with `header`; returns the plaintext length.
pub(crate) fn encrypt(
    header: &Header,
    key: &Key,
    mut input: impl Read + Send,
    mut output: impl Write + Send,
) -> Result<u64> {
    let cipher = ChunkCipher::new(header, key)?;
    output.write_all(header.as_bytes()).map_err(Error::Output)?;

    let shape = Shape::of(header);
    // A byte read past a full chunk, to learn that another chunk follows: it starts the next.
    let mut carry: Option<u8> = None;
    let mut next_index = 0u64;
    let mut total = 0u64;

    // Fills the plaintext slots with one vectored read. The last slot asks for one byte more
    // (it lands in its tag space), to tell a full last chunk from one with a successor.
    let fill = |batch: &mut Batch| -> Result<()> {
        batch.first = next_index;
        batch.lens.clear();
        let mut got = 0;
        if let Some(byte) = carry.take() {
            batch.buf[0] = byte;
            got = 1;
        }
        let capacity = shape.count * shape.chunk;
        let mut slots: Vec<IoSliceMut<'_>> = batch.buf[..shape.stored()]
            .chunks_mut(shape.segment)
            .enumerate()
            .map(|(i, segment)| {
                let end = if i + 1 == shape.count {
                    shape.chunk + 1
                } else {
                    shape.chunk
                };
                let from = if i == 0 { got } else { 0 };
                IoSliceMut::new(&mut segment[from..end])
            })
            .collect();
        got += read_full_vectored(&mut input, &mut slots).map_err(Error::Input)?;
        drop(slots);

        batch.last = got <= capacity;
        if !batch.last {
            carry = Some(batch.buf[(shape.count - 1) * shape.segment + shape.chunk]);
            got = capacity;
        }
        // Full chunks, then the rest; an empty input is one empty chunk.
        let (full, rest) = (got / shape.chunk, got % shape.chunk);
        batch.lens.resize(full, shape.chunk);
        if rest > 0 || got == 0 {
            batch.lens.push(rest);
        }
        next_index += batch.lens.len() as u64;
        if next_index > MAX_CHUNKS {
            return Err(Error::TooLarge);
        }
        Ok(())
    };

    // Seals every chunk in place, its tag right after it.
    let seal = |batch: &mut Batch| -> Result<()> {
        let count = batch.lens.len();
        for (i, len) in batch.lens.iter().enumerate() {
            let start = i * shape.segment;
            let last = batch.last && i + 1 == count;
            let slot = &mut batch.buf[start..start + len + TAG_LEN];
            cipher.seal(batch.first + i as u64, last, slot, *len)?;
        }
        Ok(())
    };

    // Writes the batch: full chunks and, at the end, the short last one, contiguous.
    let drain = |batch: &Batch| -> Result<()> {
        let count = batch.lens.len();
        let sealed = (count - 1) * shape.segment + batch.lens[count - 1] + TAG_LEN;
        output
            .write_all(&batch.buf[..sealed])
            .map_err(Error::Output)?;
        total += batch.lens.iter().map(|len| *len as u64).sum::<u64>();
        Ok(())
    };

    parallel::run(shape, fill, seal, drain)?;
    output.flush().map_err(Error::Output)?;
    Ok(total)
}

/// Decrypts the chunks that follow `header` in `input` to `output`; returns the plaintext
/// length. A batch of chunks is written only once every chunk in it has authenticated.
pub(crate) fn decrypt(
    header: &Header,
    key: &Key,
    mut input: impl Read + Send,
    mut output: impl Write + Send,
) -> Result<u64> {
    check_key(header, key)?;
    let cipher = ChunkCipher::new(header, key)?;

    let shape = Shape::of(header);
    let full = shape.stored();
    let mut carry: Option<u8> = None;
    let mut next_index = 0u64;
    let mut total = 0u64;

    // Reads a batch of stored chunks, one byte more to learn whether the input goes on.
    let fill = |batch: &mut Batch| -> Result<()> {
        let mut filled = 0;
        if let Some(byte) = carry.take() {
            batch.buf[0] = byte;
            filled = 1;
        }
        filled += read_full(&mut input, &mut batch.buf[filled..]).map_err(Error::Input)?;
        batch.last = filled <= full;
        if !batch.last {
            carry = Some(batch.buf[full]);
            filled = full;
        }
        if filled == 0 {
            // Only the first batch can be empty: a later one starts with the carried byte.
            return Err(Damage::NoChunk.into());
        }
        batch.first = next_index;
        batch.lens.clear();
        for start in (0..filled).step_by(shape.segment) {
            if next_index >= MAX_CHUNKS {
                return Err(Damage::TooManyChunks.into());
            }
            batch.lens.push((filled - start).min(shape.segment));
            next_index += 1;
        }
        Ok(())
    };

    // Opens every chunk in place; the lengths become plaintext lengths.
    let open = |batch: &mut Batch| -> Result<()> {
        let count = batch.lens.len();
        for i in 0..count {
            let start = i * shape.segment;
            let last = batch.last && i + 1 == count;
            let stored = &mut batch.buf[start..start + batch.lens[i]];
            batch.lens[i] = open_chunk(&cipher, batch.first + i as u64, last, stored)?;
        }
        Ok(())
    };

    // Writes the authenticated plaintext with one vectored write.
    let drain = |batch: &Batch| -> Result<()> {
        let mut plain: Vec<IoSlice<'_>> = batch
            .lens
            .iter()
            .enumerate()
            .map(|(i, len)| IoSlice::new(&batch.buf[i * shape.segment..i * shape.segment + len]))
            .collect();
        write_all_vectored(&mut output, &mut plain).map_err(Error::Output)?;
        total += batch.lens.iter().map(|len| *len as u64).sum::<u64>();
        Ok(())
    };

    parallel::run(shape, fill, open, drain)?;
    output.flush().map_err(Error::Output)?;
    Ok(total)
}

/// Opens the stored chunk `index` in place; the plaintext length. A failing last chunk is
/// tried again as a chunk with a successor, to tell a file cut at a chunk boundary.
fn open_chunk(
    cipher: &ChunkCipher<'_>,
    index: u64,
    last: bool,
    stored: &mut [u8],
) -> Result<usize> {
    if stored.len() < TAG_LEN {
        return Err(Damage::ShortChunk { chunk: index }.into());
    }
    if !last {
        return cipher
            .open(index, false, stored)
            .ok_or(Error::Damaged(Damage::Authentication {
                chunk: index,
                last,
            }));
    }

    // ring zeroes a buffer that fails, so the retry needs a copy (one chunk per file).
    let copy = stored.to_vec();
    match cipher.open(index, true, stored) {
        Some(0) if index > 0 => Err(Damage::EmptyLastChunk { chunk: index }.into()),
        Some(len) => Ok(len),
        None => {
            stored.copy_from_slice(&copy);
            let damage = match cipher.open(index, false, stored) {
                Some(_) => Damage::MissingLastChunk,
                None => Damage::Authentication { chunk: index, last },
            };
            Err(damage.into())
        }
    }
}

/// Refuses a key that is not the one the header names (a provider that answered with another
/// version, say).
fn check_key(header: &Header, key: &Key) -> Result<()> {
    if key.id() != header.key_id() || key.version() != header.key_version() {
        let message = format!(
            "asked for key \"{}\" version {}, the provider returned \"{}\" version {}",
            header.key_id(),
            header.key_version(),
            key.id(),
            key.version()
        );
        let error = kms_core::Error::new(kms_core::ErrorKind::Other, message);
        return Err(Error::Key(error.with_key_id(header.key_id())));
    }
    Ok(())
}

/// Looks the key of `header` up.
pub(crate) fn lookup<L>(header: &Header, lookup: L) -> Result<Key>
where
    L: FnOnce(&KeyId, u32) -> kms_core::Result<Key>,
{
    lookup(header.key_id(), header.key_version())
        .map_err(|e| Error::Key(e.with_key_id(header.key_id())))
}

/// Decrypts plaintext bytes `offset..offset + length` (to the end without a length), reading
/// only the chunks that hold them and the last chunk, whose authentication proves the
/// plaintext length.
pub(crate) fn decrypt_range<L, R, W>(
    lookup_key: L,
    mut input: R,
    offset: u64,
    length: Option<u64>,
    mut output: W,
) -> Result<u64>
where
    L: FnOnce(&KeyId, u32) -> kms_core::Result<Key>,
    R: Read + Seek,
    W: Write,
{
    // 1. The header, the file length and the layout they imply.
    input.seek(SeekFrom::Start(0)).map_err(Error::Input)?;
    let header = Header::read(&mut input)?;
    let file_len = input.seek(SeekFrom::End(0)).map_err(Error::Input)?;
    let layout = header.layout(file_len)?;
    let key = lookup(&header, lookup_key)?;
    check_key(&header, &key)?;
    let cipher = ChunkCipher::new(&header, &key)?;

    // 2. The last chunk: it authenticates the header and the plaintext length.
    let last_index = layout.chunks - 1;
    let mut last = Zeroizing::new(vec![0u8; layout.stored_len(last_index) as usize]);
    read_at(&mut input, layout.chunk_offset(last_index), &mut last)?;
    let last_len = open_chunk(&cipher, last_index, true, &mut last)?;
    last.truncate(last_len);

    // 3. The range, checked against the authenticated length.
    let plaintext_len = layout.plaintext_len;
    if offset > plaintext_len {
        return Err(Error::Range(format!(
            "offset {offset} is past the end of the plaintext ({plaintext_len} bytes)"
        )));
    }
    let end = match length {
        None => plaintext_len,
        Some(length) => match offset.checked_add(length) {
            Some(end) if end <= plaintext_len => end,
            _ => {
                return Err(Error::Range(format!(
                    "the range of {length} bytes at offset {offset} goes past the end of the \
                     plaintext ({plaintext_len} bytes)"
                )));
            }
        },
    };

    // 4. The chunks that hold the range, each authenticated before any of it is written.
    let chunk = layout.chunk_size;
    let mut buf = Zeroizing::new(vec![0u8; header.chunk_size() + TAG_LEN]);
    let mut at = offset;
    while at < end {
        let index = at / chunk;
        let plain: &[u8] = if index == last_index {
            &last
        } else {
            read_at(&mut input, layout.chunk_offset(index), &mut buf)?;
            let len = open_chunk(&cipher, index, false, &mut buf)?;
            &buf[..len]
        };
        let from = (at - index * chunk) as usize;
        let to = (end - index * chunk).min(plain.len() as u64) as usize;
        output.write_all(&plain[from..to]).map_err(Error::Output)?;
        at = index * chunk + to as u64;
    }
    output.flush().map_err(Error::Output)?;
    Ok(end - offset)
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_at(input: &mut (impl Read + Seek), offset: u64, buf: &mut [u8]) -> Result<()> {
    input.seek(SeekFrom::Start(offset)).map_err(Error::Input)?;
    let got = read_full(input, buf).map_err(Error::Input)?;
    if got < buf.len() {
        // The file shrank since its length was taken.
        return Err(Damage::MissingLastChunk.into());
    }
    Ok(())
}

/// Reads until `slots` are full or the input ends; returns the bytes read.
fn read_full_vectored(
    input: &mut impl Read,
    mut slots: &mut [IoSliceMut<'_>],
) -> io::Result<usize> {
    let mut got = 0;
    while !slots.is_empty() {
        match input.read_vectored(slots) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                IoSliceMut::advance_slices(&mut slots, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Writes every byte of `slices`.
fn write_all_vectored(output: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match output.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
