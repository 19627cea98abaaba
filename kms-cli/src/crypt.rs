//! `kms encrypt` and `kms decrypt`: files in the kms encrypted file format
//! (`docs/file-format.md`), under a key the provider keeps.
//!
//! A named output is written to an unnamed file in its directory and only gets its name once
//! it is complete and fsynced ([`kms_crypt::atomic::AtomicFile`]): after any failure the name
//! holds nothing new and no plaintext is left under any name. An existing output is never
//! replaced unless `--force` is given, so that an archive file once written stays as it is.

use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};

use kms_core::{Error, ErrorKind, Key, KeyId, KeyProvider, KeySpec};
use kms_crypt::atomic::AtomicFile;

use crate::Failure;

/// Reads of the input in this size: four chunks per system call.
const READ_BUFFER: usize = 256 << 10;

/// Where bytes come from or go to: a file, or `-` for standard input or output.
enum Place {
    Std,
    File(PathBuf),
}

impl Place {
    fn parse(arg: &Path) -> Place {
        if arg.as_os_str() == "-" {
            Place::Std
        } else {
            Place::File(arg.to_path_buf())
        }
    }

    fn name(&self, std: &str) -> String {
        match self {
            Place::Std => std.to_string(),
            Place::File(path) => show_path(path),
        }
    }
}

/// A path for a one-line message: control characters (a newline, an escape sequence) are
/// shown escaped, and bytes that are not UTF-8 as `\xNN`.
pub fn show_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_debug());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// What the two commands share: the input and output and whether the output may be replaced.
pub struct Files<'a> {
    pub input: &'a Path,
    pub output: &'a Path,
    pub force: bool,
}

/// `kms encrypt --key ID IN OUT`.
pub fn encrypt(
    open: impl FnOnce() -> Result<Box<dyn KeyProvider>, Failure>,
    id: &KeyId,
    create: bool,
    files: Files<'_>,
) -> Result<(), Failure> {
    let (input, output) = (Place::parse(files.input), Place::parse(files.output));
    if matches!(output, Place::Std) && io::stdout().is_terminal() {
        return Err(usage(
            "refusing to write an encrypted file to a terminal: give OUT a file name",
        ));
    }
    check_output_free(&output, files.force)?;
    let reader = open_input(&input)?;
    // The output file exists (unnamed) before the key is asked for, so that --create never
    // makes a key for an output that cannot be written.
    let out_file = match &output {
        Place::File(path) => Some(create_output(path)?),
        Place::Std => None,
    };

    let provider = open()?;
    let key = if create {
        provider.get_or_create(id, KeySpec::default())?
    } else {
        provider.get(id)?
    };
    drop(provider);

    let names = Names::of(&input, &output);
    let fail = |e: kms_crypt::Error| names.failure(&e);
    match out_file {
        None => {
            kms_crypt::encrypt(&key, reader, io::stdout()).map_err(fail)?;
        }
        Some(mut file) => {
            kms_crypt::encrypt(&key, reader, &mut file).map_err(fail)?;
            commit(file, files.force, &names.output)?;
        }
    }
    Ok(())
}

/// A byte range of the plaintext, for `kms decrypt --offset N --length M`.
pub struct Range {
    pub offset: u64,
    pub length: Option<u64>,
}

/// `kms decrypt IN OUT`, whole or a byte range.
pub fn decrypt(
    open: impl FnOnce() -> Result<Box<dyn KeyProvider>, Failure>,
    range: Option<Range>,
    files: Files<'_>,
) -> Result<(), Failure> {
    let (input, output) = (Place::parse(files.input), Place::parse(files.output));
    check_output_free(&output, files.force)?;
    let names = Names::of(&input, &output);
    let fail = |e: kms_crypt::Error| names.failure(&e);

    // The provider is opened only once the header named the key: input that is not an
    // encrypted file fails before any provider is asked.
    let lookup = |id: &KeyId, version: u32| -> kms_core::Result<Key> {
        let provider = open().map_err(|f| Error::new(f.kind, f.message))?;
        provider.get_version(id, version)
    };

    match range {
        None => {
            let reader = open_input(&input)?;
            match &output {
                Place::Std => {
                    kms_crypt::decrypt(lookup, reader, io::stdout()).map_err(fail)?;
                }
                Place::File(path) => {
                    let mut file = create_output(path)?;
                    kms_crypt::decrypt(lookup, reader, &mut file).map_err(fail)?;
                    commit(file, files.force, &names.output)?;
                }
            }
        }
        Some(range) => {
            let Place::File(path) = &input else {
                return Err(usage(
                    "a byte range (--offset, --length) needs IN to be a file, not -",
                ));
            };
            let file = File::open(path).map_err(|e| io_failure("open", &names.input, &e))?;
            if !file.metadata().is_ok_and(|m| m.is_file()) {
                return Err(usage(format!(
                    "a byte range (--offset, --length) needs IN to be a regular file; {} is not",
                    names.input
                )));
            }
            let input = BufReader::with_capacity(READ_BUFFER, file);
            let (offset, length) = (range.offset, range.length);
            match &output {
                Place::Std => {
                    let stdout = io::stdout().lock();
                    kms_crypt::decrypt_range(lookup, input, offset, length, stdout)
                        .map_err(fail)?;
                }
                Place::File(path) => {
                    let mut file = create_output(path)?;
                    kms_crypt::decrypt_range(lookup, input, offset, length, &mut file)
                        .map_err(fail)?;
                    commit(file, files.force, &names.output)?;
                }
            }
        }
    }
    Ok(())
}

/// The input and output as messages name them.
struct Names {
    input: String,
    output: String,
}

impl Names {
    fn of(input: &Place, output: &Place) -> Names {
        Names {
            input: input.name("standard input"),
            output: output.name("standard output"),
        }
    }

    /// The CLI failure for an error of kms-crypt: its exit status and a message naming the
    /// files (and, for a key that could not be had, the key id).
    fn failure(&self, e: &kms_crypt::Error) -> Failure {
        let kind = e.kind();
        Failure {
            code: crate::exit_code(kind),
            kind,
            message: e.message_for(&self.input, &self.output),
        }
    }
}

/// Refuses an output name that is taken, before anything is read or asked for. The check is
/// repeated when the output is committed ([`AtomicFile::commit_new`]), so a file that appears
/// meanwhile is not replaced either.
fn check_output_free(output: &Place, force: bool) -> Result<(), Failure> {
    match output {
        Place::File(path) if !force && std::fs::symlink_metadata(path).is_ok() => Err(Failure {
            code: 4,
            kind: ErrorKind::AlreadyExists,
            message: format!(
                "{} already exists; kms does not replace files unless --force is given",
                show_path(path)
            ),
        }),
        // --force replaces a file, never a device, a pipe or a socket (a symbolic link is
        // replaced as a link; its target is left alone).
        Place::File(path) => match std::fs::symlink_metadata(path) {
            Ok(md) if !(md.is_file() || md.is_symlink()) => Err(usage(format!(
                "{} is {}, not a regular file; kms writes only regular files (- is standard \
                 output)",
                show_path(path),
                file_type_name(&md.file_type())
            ))),
            _ => Ok(()),
        },
        Place::Std => Ok(()),
    }
}

fn file_type_name(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a named pipe"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

fn open_input(input: &Place) -> Result<Box<dyn Read + Send>, Failure> {
    match input {
        Place::Std => Ok(Box::new(io::stdin())),
        Place::File(path) => {
            let file = File::open(path).map_err(|e| io_failure("open", &show_path(path), &e))?;
            if file.metadata().is_ok_and(|m| m.is_dir()) {
                return Err(usage(format!("{} is a directory", show_path(path))));
            }
            Ok(Box::new(BufReader::with_capacity(READ_BUFFER, file)))
        }
    }
}

fn create_output(path: &Path) -> Result<AtomicFile, Failure> {
    AtomicFile::create(path).map_err(|e| io_failure("create", &show_path(path), &e))
}

fn commit(file: AtomicFile, force: bool, name: &str) -> Result<(), Failure> {
    let result = if force {
        file.commit()
    } else {
        file.commit_new()
    };
    result.map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => Failure {
            code: 4,
            kind: ErrorKind::AlreadyExists,
            message: format!("{name} appeared while it was written; it was left as it is"),
        },
        _ => io_failure("write", &name, &e),
    })
}

fn io_failure(what: &str, name: &dyn std::fmt::Display, e: &io::Error) -> Failure {
    let kind = if e.kind() == io::ErrorKind::StorageFull {
        ErrorKind::NoSpace
    } else {
        ErrorKind::Other
    };
    Failure {
        code: 1,
        kind,
        message: format!("cannot {what} {name}: {e}"),
    }
}

fn usage(message: impl Into<String>) -> Failure {
    crate::usage(message)
}
