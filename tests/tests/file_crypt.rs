//! `kms encrypt` and `kms decrypt` driven as real processes: round trips, byte ranges, and
//! damaged archives (a flipped byte, a chunk cut off, a chunk from another file, appended
//! bytes), each refused with a clear error that leaves the output name untouched and no
//! plaintext anywhere in the output directory.
//!
//! The offsets below follow `docs/file-format.md`: a header of 39 bytes plus the key id, then
//! chunks of 64 KiB of plaintext, each stored with its 16-byte tag.

use std::fs;
use std::path::{Path, PathBuf};

use kms_tests::{Kms, Rng, assert_failure};

const CHUNK: usize = 64 << 10;
const STORED_CHUNK: usize = CHUNK + 16;

fn header_len(id: &str) -> usize {
    8 + 2 + 1 + 1 + id.len() + 4 + 16 + 7
}

/// A plaintext of `len` pseudo-random bytes with a recognisable marker in every chunk.
fn plaintext(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::seeded(seed);
    let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    for start in (0..len.saturating_sub(32)).step_by(CHUNK) {
        data[start..start + 16].copy_from_slice(b"PLAINTEXT-MARKER");
    }
    data
}

struct Files {
    kms: Kms,
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let kms = Kms::new();
        let dir = kms.root().join("files");
        fs::create_dir(&dir).unwrap();
        Files { kms, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn encrypt(&self, id: &str, plain: &[u8], name: &str) -> Vec<u8> {
        let input = self.path(&format!("{name}.plain"));
        fs::write(&input, plain).unwrap();
        let output = self.path(name);
        let run = self.kms.run([
            "encrypt".as_ref(),
            "--key".as_ref(),
            id.as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ]);
        assert_eq!(run.code, 0, "{run}");
        fs::remove_file(&input).unwrap();
        fs::read(&output).unwrap()
    }

    /// Asserts that decrypting `encrypted` fails with exit status 1 and an error naming the
    /// damage, and that the output name stays free and the directory holds no plaintext.
    fn refuses(&self, encrypted: &[u8], fragments: &[&str]) {
        let input = self.path("damaged.kms");
        fs::write(&input, encrypted).unwrap();
        let output = self.path("restored");
        let run = self
            .kms
            .run(["decrypt".as_ref(), input.as_os_str(), output.as_os_str()]);
        assert_failure(&run, 1, fragments);
        assert!(!output.exists(), "decrypt left {}: {run}", output.display());
        fs::remove_file(&input).unwrap();
        assert_no_plaintext(&self.dir);
    }
}

fn assert_no_plaintext(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        assert!(
            !bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"),
            "{} holds plaintext",
            path.display()
        );
    }
}

#[test]
fn round_trip_of_files_of_every_shape() {
    let files = Files::new();
    files.kms.create("pg/wal");
    for (i, len) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17]
        .into_iter()
        .enumerate()
    {
        let plain = plaintext(len, i as u64);
        let name = format!("f{i}.kms");
        let encrypted = files.encrypt("pg/wal", &plain, &name);
        // The header, then full chunks with their tags, then a last chunk (possibly empty).
        let full = if len > 0 { (len - 1) / CHUNK } else { 0 };
        let expected = header_len("pg/wal") + len + 16 * (full + 1);
        assert_eq!(encrypted.len(), expected, "length {len}");
        assert_eq!(&encrypted[..8], b"\x89KMSENC\n");
        assert!(!encrypted.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));

        let out = files.path(&format!("f{i}.out"));
        let input = files.path(&name);
        let run = files
            .kms
            .run(["decrypt".as_ref(), input.as_os_str(), out.as_os_str()]);
        assert_eq!(run.code, 0, "{run}");
        assert_eq!(fs::read(&out).unwrap(), plain, "length {len}");
        fs::remove_file(&out).unwrap();
    }
}

#[test]
fn two_encryptions_of_one_file_differ_and_a_wrong_key_is_refused() {
    let files = Files::new();
    files.kms.create("pg/wal");
    let plain = plaintext(2 * CHUNK, 7);
    let a = files.encrypt("pg/wal", &plain, "a.kms");
    let b = files.encrypt("pg/wal", &plain, "b.kms");
    // Same key, same plaintext: a fresh salt and nonce prefix make every byte after the key
    // version differ with overwhelming probability.
    let h = header_len("pg/wal");
    assert_eq!(a[..h - 23], b[..h - 23]);
    assert_ne!(a[h - 23..h], b[h - 23..h]);
    assert_ne!(a[h..], b[h..]);

    // The same file moved to another key id in its header fails authentication.
    files.kms.create("pg/wa1");
    let mut moved = a.clone();
    moved[12..18].copy_from_slice(b"pg/wa1");
    files.refuses(&moved, &["damaged", "chunk 0 fails authentication"]);
}

#[test]
fn damaged_archives_are_refused_and_nothing_is_written() {
    let files = Files::new();
    files.kms.create("pg/wal");
    let plain = plaintext(5 * CHUNK + 100, 11);
    let file = files.encrypt("pg/wal", &plain, "seg.kms");
    let other = files.encrypt("pg/wal", &plaintext(5 * CHUNK + 100, 12), "other.kms");
    let h = header_len("pg/wal");
    let chunk = |i: usize| h + i * STORED_CHUNK..h + (i + 1) * STORED_CHUNK;

    // One byte flipped: in the header, in a middle chunk, in the last chunk's tag.
    for at in [9 + 2, h - 1, chunk(2).start + 1000, file.len() - 1] {
        let mut flipped = file.clone();
        flipped[at] ^= 0x01;
        files.refuses(&flipped, &["damaged.kms", "damaged"]);
    }
    let mut flipped = file.clone();
    flipped[chunk(3).start + 5] ^= 0x80;
    files.refuses(&flipped, &["chunk 3 fails authentication"]);

    // The last chunk cut off: the file now ends on a full chunk that is not marked last.
    files.refuses(
        &file[..chunk(4).end],
        &["truncated", "last chunk is missing"],
    );
    // Cut inside a chunk, and cut down to the header alone.
    files.refuses(&file[..chunk(2).start + 100], &["damaged"]);
    files.refuses(&file[..h], &["truncated"]);
    files.refuses(&file[..20], &["truncated"]);

    // A chunk of another file under the same key, at the same position.
    let mut mixed = file.clone();
    mixed[chunk(1)].copy_from_slice(&other[chunk(1)]);
    files.refuses(&mixed, &["chunk 1 fails authentication"]);

    // Two chunks swapped.
    let mut swapped = file.clone();
    swapped[chunk(1)].copy_from_slice(&file[chunk(2)]);
    swapped[chunk(2)].copy_from_slice(&file[chunk(1)]);
    files.refuses(&swapped, &["chunk 1 fails authentication"]);

    // Bytes appended after the last chunk.
    let mut appended = file.clone();
    appended.extend_from_slice(b"trailing");
    files.refuses(&appended, &["damaged"]);

    // Not an encrypted file at all.
    files.refuses(
        b"just some plaintext, PLAINTEXT-MARKER",
        &["not a kms encrypted file"],
    );

    // The intact file still decrypts.
    let input = files.path("seg.kms");
    let out = files.path("seg.out");
    let run = files
        .kms
        .run(["decrypt".as_ref(), input.as_os_str(), out.as_os_str()]);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(fs::read(&out).unwrap(), plain);
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let files = Files::new();
    files.kms.create("pg/wal");
    let plain = plaintext(CHUNK + 5, 3);
    files.encrypt("pg/wal", &plain, "seg.kms");
    let input = files.path("seg.kms");
    let out = files.path("seg.out");
    fs::write(&out, b"earlier contents").unwrap();

    let run = files
        .kms
        .run(["decrypt".as_ref(), input.as_os_str(), out.as_os_str()]);
    assert_failure(&run, 4, &["already exists", "--force"]);
    assert_eq!(fs::read(&out).unwrap(), b"earlier contents");

    // --force with a damaged input: the earlier file stays as it was.
    let mut damaged = fs::read(&input).unwrap();
    let last = damaged.len() - 3;
    damaged[last] ^= 1;
    let bad = files.path("bad.kms");
    fs::write(&bad, &damaged).unwrap();
    let run = files.kms.run([
        "decrypt".as_ref(),
        "--force".as_ref(),
        bad.as_os_str(),
        out.as_os_str(),
    ]);
    assert_failure(&run, 1, &["damaged"]);
    assert_eq!(fs::read(&out).unwrap(), b"earlier contents");

    let run = files.kms.run([
        "decrypt".as_ref(),
        "--force".as_ref(),
        input.as_os_str(),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(fs::read(&out).unwrap(), plain);
}

#[test]
fn byte_ranges_match_the_plaintext() {
    let files = Files::new();
    files.kms.create("pg/wal");
    let plain = plaintext(4 * CHUNK + 321, 5);
    files.encrypt("pg/wal", &plain, "seg.kms");
    let input = files.path("seg.kms");
    let cases: [(usize, Option<usize>); 5] = [
        (0, Some(10)),
        (CHUNK - 3, Some(7)),
        (2 * CHUNK + 1, None),
        (plain.len(), Some(0)),
        (100, Some(3 * CHUNK)),
    ];
    for (i, (offset, length)) in cases.into_iter().enumerate() {
        let out = files.path(&format!("range{i}"));
        let mut args: Vec<std::ffi::OsString> = vec!["decrypt".into()];
        args.extend(["--offset".into(), offset.to_string().into()]);
        if let Some(length) = length {
            args.extend(["--length".into(), length.to_string().into()]);
        }
        args.extend([input.clone().into_os_string(), out.clone().into_os_string()]);
        let run = files.kms.run(&args);
        assert_eq!(run.code, 0, "{run}");
        let end = length.map_or(plain.len(), |l| offset + l);
        assert_eq!(
            fs::read(&out).unwrap(),
            &plain[offset..end],
            "{offset} {length:?}"
        );
    }

    // A range past the end is a usage error, and nothing is written.
    let out = files.path("past");
    let offset = (plain.len() + 1).to_string();
    let run = files.kms.run([
        "decrypt".as_ref(),
        "--offset".as_ref(),
        offset.as_ref(),
        input.as_os_str(),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, 2, "{run}");
    assert!(!out.exists());
}

#[test]
fn a_missing_key_is_not_found_and_creates_nothing() {
    let files = Files::new();
    let input = files.path("in");
    fs::write(&input, b"x").unwrap();
    let out = files.path("out.kms");
    let run = files.kms.run([
        "encrypt".as_ref(),
        "--key".as_ref(),
        "pg/none".as_ref(),
        input.as_os_str(),
        out.as_os_str(),
    ]);
    assert_failure(&run, 3, &["pg/none"]);
    assert!(!out.exists());
    assert!(files.kms.list().is_empty(), "encrypt created a key");

    // A hostile key id is refused before anything else.
    let run = files.kms.run([
        "encrypt".as_ref(),
        "--key".as_ref(),
        "../../etc/passwd".as_ref(),
        input.as_os_str(),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, 2, "{run}");
    assert!(!out.exists());
}

/// Regression: `--force` replaced a device node under the output name (as root, `/dev/null`)
/// with a regular file holding the plaintext.
#[test]
fn force_never_replaces_a_device_or_a_pipe() {
    let files = Files::new();
    files.kms.create("dev/key");
    files.encrypt("dev/key", b"secret words", "e.kms");
    let fifo = files.path("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let encrypted = files.path("e.kms");
    let run = files.kms.fails(
        [
            "decrypt".as_ref(),
            "--force".as_ref(),
            encrypted.as_os_str(),
            fifo.as_os_str(),
        ],
        2,
        &["is a named pipe, not a regular file"],
    );
    assert!(!run.stderr.contains("secret words"));
    let md = fs::symlink_metadata(&fifo).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&md.file_type()));
}

/// Regression: `kms passphrase` printed a generated key's raw bytes whenever they happened to
/// hold no line break; a key is now refused every time, an imported passphrase printed.
#[test]
fn passphrase_prints_imported_text_and_refuses_keys() {
    let kms = Kms::new();
    for i in 0..8 {
        kms.create(&format!("gen/{i}"));
        kms.fails(
            ["passphrase", &format!("gen/{i}")],
            1,
            &["not a one-line text passphrase", "gen/"],
        );
    }
    let mut import = kms_tests::kms_command(["--config".as_ref(), kms.config.as_os_str()]);
    import.args(["import", "pg/ssl"]);
    import.stdin(std::process::Stdio::piped());
    import.stdout(std::process::Stdio::null());
    import.stderr(std::process::Stdio::null());
    let mut child = import.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"tls key words\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let run = kms.run(["passphrase", "pg/ssl"]);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout, b"tls key words\n");
}

/// Regression: `encrypt --create` made the key even when the output could not be written.
#[test]
fn create_makes_no_key_for_an_unwritable_output() {
    let files = Files::new();
    let input = files.path("in");
    fs::write(&input, b"data").unwrap();
    let output = files.path("missing-dir/out.kms");
    files.kms.fails(
        [
            "encrypt".as_ref(),
            "--create".as_ref(),
            "--key".as_ref(),
            "side/b".as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ],
        1,
        &["cannot create", "missing-dir/out.kms"],
    );
    files.kms.fails(["get", "side/b"], 3, &["not found"]);
}

/// Regression: a file name holding a newline or an escape sequence broke the one-line error
/// into several lines (and reached the terminal raw); a missing argument was not named.
#[test]
fn messages_stay_one_line_and_name_what_is_missing() {
    let files = Files::new();
    let input = files.path("no\nsuch\x1b[31mfile");
    let out = files.path("out");
    let run = files.kms.fails(
        ["decrypt".as_ref(), input.as_os_str(), out.as_os_str()],
        1,
        &["no\\nsuch"],
    );
    assert!(!run.stderr.contains('\x1b'), "{run}");
    files.kms.fails(
        ["encrypt", "--key", "a/b", "only-in"],
        2,
        &["required arguments were not provided: <OUT>"],
    );
}
