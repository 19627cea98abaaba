//! AES key wrap with padding (RFC 5649) over many independent inputs at once.
//!
//! Wrapping a 48-byte plaintext (a binding and a 32-byte DEK) takes 36 AES block encryptions,
//! each fed by the one before: a single wrap waits out the full latency of every encryption in
//! turn while the processor's AES unit, which can have several blocks in flight, stays mostly
//! idle. This engine keeps up to [`LANES`] wraps (or unwraps) going side by side. Each round
//! takes one step of every lane and hands all of that round's blocks to the cipher in one
//! `encrypt_blocks` (or `decrypt_blocks`) call, which the `aes` crate pipelines. A lane whose
//! input is done takes the next input at once, so inputs of different lengths mix freely.
//!
//! The output is RFC 5649 byte for byte, the same as the `aes-kw` crate's: only the order in
//! which the independent block operations run changes. [`Kek::wrap_many`] and
//! [`Kek::unwrap_many`] build on it; it is public so that the RFC and Wycheproof known answers
//! can be run through it directly, for any AES key size.
//!
//! The engine works in place on buffers that the caller owns and zeroizes: a buffer being
//! wrapped holds the plaintext until its last step, and an unwrapped one holds it afterwards.
//! The one buffer of its own, the blocks of a round, is zeroized when the call ends.
//!
//! [`Kek::wrap_many`]: crate::wrap::KeyWrapper::wrap_many
//! [`Kek::unwrap_many`]: crate::wrap::KeyWrapper::unwrap_many

use aes_kw::cipher::array::Array;
use aes_kw::cipher::consts::U16;
use aes_kw::cipher::{BlockCipherDecrypt, BlockCipherEncrypt};
use zeroize::{Zeroize, Zeroizing};

/// How many inputs are processed side by side: the number of blocks the `aes` crate's AES-NI
/// and ARMv8 backends encrypt in parallel per call.
pub const LANES: usize = 8;

/// A semiblock: half an AES block.
const SEMIBLOCK: usize = 8;

/// An AES block.
const BLOCK: usize = 16;

/// The constant first half of the alternative initial value of RFC 5649 section 3; the second
/// half is the message length indicator (MLI), the plaintext length in bytes, big-endian.
const AIV_CONSTANT: [u8; 4] = [0xA6, 0x59, 0x59, 0xA6];

/// Length of the RFC 5649 wrapping of `plain_len` bytes: the plaintext padded to whole
/// semiblocks, plus one semiblock.
pub fn wrapped_len(plain_len: usize) -> usize {
    plain_len.div_ceil(SEMIBLOCK) * SEMIBLOCK + SEMIBLOCK
}

/// One plaintext to wrap in place: a buffer of [`wrapped_len`]`(len)` bytes holding the
/// plaintext at `8..8 + len`. After [`wrap_in_place`] the whole buffer is the wrapped key.
pub struct WrapItem<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> WrapItem<'a> {
    /// An input of `len` plaintext bytes laid out in `buf` as described above; `None` when
    /// `len` is 0 (RFC 5649 wraps at least one byte), does not fit the 32-bit MLI, or `buf` is
    /// not [`wrapped_len`]`(len)` bytes long.
    pub fn new(buf: &'a mut [u8], len: usize) -> Option<WrapItem<'a>> {
        let fits = len >= 1 && u32::try_from(len).is_ok() && buf.len() == wrapped_len(len);
        fits.then_some(WrapItem { buf, len })
    }
}

/// Wraps every item in place (RFC 5649 section 4.1).
pub fn wrap_in_place<C>(cipher: &C, items: &mut [WrapItem<'_>])
where
    C: BlockCipherEncrypt<BlockSize = U16>,
{
    // 1. Append the padding to P and prefix the AIV (section 4.1, step 1). `WrapItem::new` has
    //    checked that the length fits the MLI.
    for item in items.iter_mut() {
        let mli = u32::try_from(item.len).expect("checked by WrapItem::new");
        item.buf[..4].copy_from_slice(&AIV_CONSTANT);
        item.buf[4..SEMIBLOCK].copy_from_slice(&mli.to_be_bytes());
        item.buf[SEMIBLOCK + item.len..].fill(0);
    }

    // 2. One semiblock of padded plaintext: one AES encryption of AIV || P[1]; more: the
    //    wrapping process W of RFC 3394 (section 4.1, step 2). The lanes do either.
    let mut bufs: Vec<&mut [u8]> = items.iter_mut().map(|item| &mut *item.buf).collect();
    run_lanes(&mut bufs, Direction::Wrap, |blocks| {
        cipher.encrypt_blocks(blocks)
    });
}

/// Unwraps every buffer in place (RFC 5649 section 4.2). For each, in order, the length of the
/// plaintext, which then sits at `8..8 + len` of the buffer; or `None` when the buffer cannot
/// be an RFC 5649 wrapping (under 16 bytes, not whole semiblocks) or fails the integrity check
/// (a wrong key or an altered blob), in which case the buffer is zeroized.
pub fn unwrap_in_place<C>(cipher: &C, bufs: &mut [&mut [u8]]) -> Vec<Option<usize>>
where
    C: BlockCipherDecrypt<BlockSize = U16>,
{
    // 1. Buffers of an impossible length are refused before any work.
    let possible = |buf: &[u8]| buf.len() >= BLOCK && buf.len().is_multiple_of(SEMIBLOCK);
    let mut lengths: Vec<Option<usize>> = vec![None; bufs.len()];
    let mut work: Vec<&mut [u8]> = Vec::with_capacity(bufs.len());
    let mut work_index = Vec::with_capacity(bufs.len());
    for (k, buf) in bufs.iter_mut().enumerate() {
        if possible(buf) {
            work.push(&mut **buf);
            work_index.push(k);
        } else {
            buf.zeroize();
        }
    }

    // 2. One AES decryption for a single-block blob, else the unwrapping process W^-1 of
    //    RFC 3394 (section 4.2, step 1).
    run_lanes(&mut work, Direction::Unwrap, |blocks| {
        cipher.decrypt_blocks(blocks)
    });

    // 3. The integrity check of section 4.2, step 3: the AIV constant, the MLI in range and the
    //    padding all zero.
    for (buf, k) in work.iter_mut().zip(work_index) {
        lengths[k] = check_unwrapped(buf);
        if lengths[k].is_none() {
            buf.zeroize();
        }
    }
    lengths
}

/// The integrity check of RFC 5649 section 4.2, step 3, on an unwrapped buffer `A || P`: the
/// plaintext length if it passes. The comparisons of secret-dependent bytes do not branch on
/// their values; the outcome itself is not secret.
fn check_unwrapped(buf: &[u8]) -> Option<usize> {
    let n = buf.len() / SEMIBLOCK - 1;
    let (a, padded) = buf.split_at(SEMIBLOCK);

    // a) MSB(32, A) is the AIV constant.
    let constant_diff = a[..4]
        .iter()
        .zip(AIV_CONSTANT)
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));

    // b) 8 * (n - 1) < MLI <= 8 * n.
    let mli = u32::from_be_bytes(a[4..SEMIBLOCK].try_into().expect("a semiblock")) as usize;
    let in_range = 8 * (n - 1) < mli && mli <= 8 * n;

    // c) The bytes after the MLI, all in the last semiblock, are zero.
    let last = 8 * (n - 1);
    let padding = padded[last..]
        .iter()
        .enumerate()
        .fold(0u8, |acc, (k, byte)| {
            let is_padding = 0u8.wrapping_sub(u8::from(last + k >= mli));
            acc | (byte & is_padding)
        });

    ((constant_diff | padding) == 0 && in_range).then_some(mli)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Wrap,
    Unwrap,
}

/// One input in progress.
struct Lane {
    /// Index of its buffer.
    item: usize,
    /// Semiblocks of plaintext, `n` of RFC 3394.
    n: usize,
    /// The semiblock `R[i]` of this step, 1-based.
    i: usize,
    /// The step counter `t = n * j + i` of RFC 3394; not used when `n` is 1.
    t: u64,
    /// Steps left.
    remaining: usize,
}

impl Lane {
    fn start(item: usize, buf_len: usize, direction: Direction) -> Lane {
        let n = buf_len / SEMIBLOCK - 1;
        // A single semiblock is one encryption (RFC 5649 section 4.1), W is 6 * n steps.
        let steps = if n == 1 { 1 } else { 6 * n };
        let (i, t) = match direction {
            Direction::Wrap => (1, 1),
            Direction::Unwrap => (n, steps as u64),
        };
        Lane {
            item,
            n,
            i,
            t,
            remaining: steps,
        }
    }

    /// The value to XOR into A at this step: `t` inside W and W^-1, nothing for the single
    /// encryption of a one-semiblock input.
    fn t_mask(&self) -> u64 {
        if self.n == 1 { 0 } else { self.t }
    }

    /// Moves to the next step: forward through `t = 1..=6n` when wrapping, backward when
    /// unwrapping, with `i` cycling through `1..=n`.
    fn advance(&mut self, direction: Direction) {
        self.remaining -= 1;
        match direction {
            Direction::Wrap => {
                self.t += 1;
                self.i = if self.i == self.n { 1 } else { self.i + 1 };
            }
            Direction::Unwrap => {
                self.t -= 1;
                self.i = if self.i == 1 { self.n } else { self.i - 1 };
            }
        }
    }
}

/// Runs W (wrap) or W^-1 (unwrap) over every buffer, `A || R[1] || ... || R[n]` in place,
/// [`LANES`] at a time, with one call of `cipher` per round on that round's blocks.
///
/// A wrap step (RFC 3394 section 2.2.1, index-based):
///   `B = AES(K, A | R[i])`, `A = MSB(64, B) ^ t`, `R[i] = LSB(64, B)`.
/// An unwrap step (section 2.2.2), with `t` counting down:
///   `B = AES-1(K, (A ^ t) | R[i])`, `A = MSB(64, B)`, `R[i] = LSB(64, B)`.
///
/// A lane's A never leaves its block between steps: the first half of the cipher's output is
/// the next input's first half once `t` is applied. It is written back to the buffer when the
/// lane's input is done.
fn run_lanes(
    bufs: &mut [&mut [u8]],
    direction: Direction,
    mut cipher: impl FnMut(&mut [Array<u8, U16>]),
) {
    let mut lanes: Vec<Lane> = Vec::with_capacity(LANES);
    let mut blocks = Zeroizing::new([[0u8; BLOCK]; LANES]);

    // 1. The first inputs take the lanes.
    let mut next = 0;
    while lanes.len() < LANES && next < bufs.len() {
        let lane = Lane::start(next, bufs[next].len(), direction);
        load(&mut blocks[lanes.len()], &lane, bufs[next], direction);
        lanes.push(lane);
        next += 1;
    }

    while !lanes.is_empty() {
        // 2. One cipher call for the whole round.
        cipher(Array::cast_slice_from_core_mut(&mut blocks[..lanes.len()]));

        // 3. Each lane's result goes back into its buffer, and its next block is set up. A lane
        //    whose input is done takes the next input, or gives its place to the last lane.
        let mut k = 0;
        while k < lanes.len() {
            let lane = &mut lanes[k];
            let block = &mut blocks[k];
            let buf = &mut *bufs[lane.item];
            if direction == Direction::Wrap {
                xor_t(block, lane.t_mask());
            }
            let at = lane.i * SEMIBLOCK;
            buf[at..at + SEMIBLOCK].copy_from_slice(&block[SEMIBLOCK..]);
            lane.advance(direction);

            if lane.remaining > 0 {
                let at = lane.i * SEMIBLOCK;
                block[SEMIBLOCK..].copy_from_slice(&buf[at..at + SEMIBLOCK]);
                if direction == Direction::Unwrap {
                    xor_t(block, lane.t_mask());
                }
                k += 1;
                continue;
            }

            buf[..SEMIBLOCK].copy_from_slice(&block[..SEMIBLOCK]);
            if next < bufs.len() {
                *lane = Lane::start(next, bufs[next].len(), direction);
                load(block, lane, bufs[next], direction);
                next += 1;
                k += 1;
            } else {
                // The last lane, not yet seen this round, moves into this place.
                lanes.swap_remove(k);
                let last = lanes.len();
                if k < last {
                    blocks[k] = blocks[last];
                }
            }
        }
    }
}

/// Sets up the first block of a lane: A (XOR t when unwrapping) and its first R[i].
fn load(block: &mut [u8; BLOCK], lane: &Lane, buf: &[u8], direction: Direction) {
    block[..SEMIBLOCK].copy_from_slice(&buf[..SEMIBLOCK]);
    let at = lane.i * SEMIBLOCK;
    block[SEMIBLOCK..].copy_from_slice(&buf[at..at + SEMIBLOCK]);
    if direction == Direction::Unwrap {
        xor_t(block, lane.t_mask());
    }
}

/// A ^ t, with A the first half of `block` read as a big-endian number.
fn xor_t(block: &mut [u8; BLOCK], t: u64) {
    let a = u64::from_be_bytes(block[..SEMIBLOCK].try_into().expect("a semiblock"));
    block[..SEMIBLOCK].copy_from_slice(&(a ^ t).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_kw::aes::Aes256;
    use aes_kw::{KeyInit, KwpAes256};

    fn wrap_one(cipher: &Aes256, plain: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; wrapped_len(plain.len())];
        buf[8..8 + plain.len()].copy_from_slice(plain);
        let mut items = [WrapItem::new(&mut buf, plain.len()).unwrap()];
        wrap_in_place(cipher, &mut items);
        buf
    }

    #[test]
    fn every_length_matches_aes_kw_and_round_trips() {
        let key = [0x42u8; 32];
        let cipher = Aes256::new_from_slice(&key).unwrap();
        let kwp = KwpAes256::new_from_slice(&key).unwrap();
        for len in 1..=80 {
            let plain: Vec<u8> = (0..len).map(|b| b as u8 ^ 0x5a).collect();
            let ours = wrap_one(&cipher, &plain);
            let mut theirs = vec![0u8; wrapped_len(len)];
            kwp.wrap_key(&plain, &mut theirs).unwrap();
            assert_eq!(ours, theirs, "{len} bytes");

            let mut buf = ours.clone();
            let got = unwrap_in_place(&cipher, &mut [&mut buf[..]]);
            assert_eq!(got, vec![Some(len)]);
            assert_eq!(&buf[8..8 + len], &plain[..]);
        }
    }

    #[test]
    fn refuses_impossible_lengths() {
        let mut buf = [0u8; 48];
        assert!(WrapItem::new(&mut buf, 0).is_none());
        assert!(WrapItem::new(&mut buf, 31).is_none());
        assert!(WrapItem::new(&mut buf, 33).is_some());
        assert!(WrapItem::new(&mut buf, 40).is_some());

        let cipher = Aes256::new_from_slice(&[1u8; 32]).unwrap();
        let (mut short, mut odd) = ([7u8; 8], [7u8; 17]);
        let got = unwrap_in_place(&cipher, &mut [&mut short[..], &mut odd[..]]);
        assert_eq!(got, vec![None, None]);
        assert_eq!(
            (short, odd),
            ([0u8; 8], [0u8; 17]),
            "refused buffers are zeroized"
        );
    }
}
