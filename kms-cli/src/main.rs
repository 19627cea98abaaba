//! `kms`: create, read and list keys from the command line.
//!
//! The CLI opens the provider named in the configuration in-process, so front-end tools reach
//! the same keys as the database without any server running.
#![forbid(unsafe_code)]

mod crypt;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kms_core::config::{Config, Registry};
use kms_core::{Error, ErrorKind, KeyId, KeyLen, KeyProvider, KeySpec};

use crate::output::Format;

const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  other failure (store damaged, wrong KEK, insecure files, I/O, ...)
  2  usage or configuration error (including an invalid key id)
  3  key not found
  4  key already exists";

/// Keys for databases that encrypt their files: create, read and list them by key id.
#[derive(Parser, Debug)]
#[command(name = "kms", version, after_help = EXIT_CODES)]
struct Cli {
    /// The configuration file (TOML) naming the provider [env: KMS_CONFIG].
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Use the file provider in DIR, initialised on first use (for trying kms out).
    #[arg(long, global = true, value_name = "DIR", conflicts_with = "config")]
    dev: Option<PathBuf>,

    /// Ask kmsd on this Unix socket instead of opening a provider in-process [env: KMS_SOCKET].
    #[arg(
        long,
        short = 's',
        global = true,
        value_name = "PATH",
        conflicts_with_all = ["config", "dev"]
    )]
    socket: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Initialise the provider's storage (for the file provider: directory, master key, store).
    Init,
    /// Create a new random key; fails with exit status 4 if the id exists.
    Create {
        /// The key id, such as cluster/wal.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Print a key (its newest version, or --version N).
    Get {
        /// The key id.
        id: String,
        /// A given version instead of the newest.
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Print a key, creating it first if it does not exist (atomic across processes).
    GetOrCreate {
        /// The key id.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Add a new version of a key; `get` returns it from then on, older versions stay readable.
    Rotate {
        /// The key id.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        format: FormatArgs,
    },
    /// Store a secret read from stdin (a TLS key's passphrase, say) under ID.
    ///
    /// One trailing LF or CRLF is removed unless --raw is given; 1 to 1024 bytes.
    Import {
        /// The key id.
        id: String,
        /// Keep the input exactly as read, trailing newline included.
        #[arg(long)]
        raw: bool,
    },
    /// Print a stored secret as one line, for PostgreSQL's ssl_passphrase_command.
    Passphrase {
        /// The key id.
        id: String,
    },
    /// Encrypt IN to OUT under the newest version of a 256-bit key (`-`: stdin or stdout).
    ///
    /// OUT appears only once complete and fsynced; an existing OUT is kept unless --force.
    /// The format is in docs/file-format.md.
    Encrypt {
        /// The key id.
        #[arg(long, value_name = "ID")]
        key: String,
        /// Create the key (256 bits) if it does not exist yet.
        #[arg(long)]
        create: bool,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// The file to encrypt, or - for standard input.
        #[arg(value_name = "IN")]
        input: PathBuf,
        /// The encrypted file to write, or - for standard output.
        #[arg(value_name = "OUT")]
        output: PathBuf,
    },
    /// Decrypt IN to OUT; the key id and version come from IN's header.
    ///
    /// Nothing is written to a file OUT unless every chunk authenticates; an existing OUT is
    /// kept unless --force.
    Decrypt {
        /// Decrypt only the plaintext bytes from this offset on (IN must be a file).
        #[arg(long, value_name = "N")]
        offset: Option<u64>,
        /// Decrypt only this many bytes (from --offset, or from 0).
        #[arg(long, value_name = "M")]
        length: Option<u64>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// The encrypted file, or - for standard input.
        #[arg(value_name = "IN")]
        input: PathBuf,
        /// The file to write the plaintext to, or - for standard output.
        #[arg(value_name = "OUT")]
        output: PathBuf,
    },
    /// List keys (id, newest version, bits, creation time) whose id starts with PREFIX.
    List {
        /// The prefix; empty lists every key.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Delete every version of a key. Data encrypted under it becomes unreadable.
    Delete {
        /// The key id.
        id: String,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
    /// List the providers this kms knows by name.
    Providers,
    /// List the provider plugins found: name, plugin version, ABI version, path.
    Plugins,
    /// Manage the passphrase slots of a command-provider store.
    #[command(subcommand)]
    Slot(SlotCommand),
    /// Rotate the KEK (command: the master key; openbao: the Transit key; pkcs11: a new key in
    /// the token; aws-kms: ReEncrypt to a KMS key), re-wrap every key; resumable after a crash.
    RotateKek {
        /// aws-kms only: the KMS key to move to (key id, ARN or alias) [default: the configured
        /// key, after AWS rotated its material].
        #[arg(long, value_name = "KMS_KEY")]
        to: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SlotCommand {
    /// List the slots (after unlocking the store with the configured command).
    List,
    /// Add a slot whose passphrase NEW_PASSPHRASE_COMMAND prints.
    Add {
        /// The slot name (A-Z a-z 0-9 _ -, at most 32).
        name: String,
        /// A command printing the new passphrase (same rules as passphrase_command).
        #[arg(long, value_name = "COMMAND")]
        new_passphrase_command: String,
    },
    /// Replace a slot's passphrase, atomically.
    Change {
        /// The slot name.
        name: String,
        /// A command printing the new passphrase.
        #[arg(long, value_name = "COMMAND")]
        new_passphrase_command: String,
    },
    /// Remove a slot; the last slot cannot be removed.
    Remove {
        /// The slot name.
        name: String,
        /// Confirm the removal.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// Key length in bits: 128, 192 or 256 [default: 256; for rotate, the current length].
    #[arg(long, value_parser = parse_bits)]
    bits: Option<KeyLen>,
}

#[derive(clap::Args, Debug)]
struct FormatArgs {
    /// How to print the key: hex (one line), base64 (one line) or raw bytes.
    #[arg(long, value_enum, default_value_t = Format::Hex)]
    format: Format,
}

fn parse_bits(text: &str) -> Result<KeyLen, String> {
    let bits: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bits"))?;
    KeyLen::from_bits(bits).map_err(|e| e.to_string())
}

/// The registry of the providers linked into this binary.
fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.register(kms_file::registered());
    registry.register(kms_command::registered());
    registry.register(kms_openbao::registered());
    registry.register(kms_aws_kms::registered());
    registry.register(kms_client::exec::registered());
    registry.register(kms_pkcs11::registered());
    // A provider name finds its plugin (libkms_<name>.so) first; the linked-in providers
    // serve when there is none, so that a lone `kms` binary still works.
    registry.enable_plugins();
    registry
}

/// An error of the CLI: the exit status and the line for stderr.
struct Failure {
    code: u8,
    /// The kind of the failure, kept for a caller that turns it back into an [`Error`].
    kind: ErrorKind,
    message: String,
}

impl Failure {
    /// A failure that is not a usage error and has no more precise kind (exit status 1).
    fn other(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            kind: ErrorKind::Other,
            message: message.into(),
        }
    }
}

/// The exit status of an error of this kind (see EXIT_CODES).
fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::NotFound => 3,
        ErrorKind::AlreadyExists => 4,
        ErrorKind::InvalidConfig | ErrorKind::InvalidKeyId | ErrorKind::InvalidInput => 2,
        _ => 1,
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            code: exit_code(e.kind()),
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        kind: ErrorKind::InvalidInput,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // A usage error: one line, like every other error, then a pointer to --help.
            // clap's message runs over several lines until "Usage:" (the missing arguments
            // are listed under the first); they are joined, tips left out.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .filter(|l| !l.starts_with("For more information"))
                .collect();
            let line = match parts.join(" ") {
                joined if joined.is_empty() => "invalid usage".to_string(),
                joined => joined,
            };
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("kms: {line}; see kms --help");
            return ExitCode::from(2);
        }
    };
    apply_environment(&mut cli);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("kms: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Fills in what the command line left open from the environment. Options on the command line
/// win; then `KMS_SOCKET` is where keys are asked for, and `KMS_CONFIG` is the configuration of
/// the commands that work on a provider's storage (`init`, `slot`, `rotate-kek`), and of every
/// command when `KMS_SOCKET` is not set.
fn apply_environment(cli: &mut Cli) {
    if cli.config.is_some() || cli.dev.is_some() || cli.socket.is_some() {
        return;
    }
    cli.socket = std::env::var_os("KMS_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    cli.config = std::env::var_os("KMS_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
}

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    if cli.socket.is_some() && cli.config.is_none() {
        return Err(usage(
            "this command works on a provider's storage, not through kmsd: use --config",
        ));
    }
    if let Some(dir) = &cli.dev {
        let text = format!(
            "[provider]\nname = \"file\"\n[provider.options]\ndir = {:?}\n",
            dir.display().to_string()
        );
        return Ok(Config::parse(&text, PathBuf::new())?);
    }
    match &cli.config {
        Some(path) => Ok(Config::load(path)?),
        None => Err(usage(
            "no configuration: pass --config FILE, set KMS_CONFIG, or try --dev DIR",
        )),
    }
}

fn open(cli: &Cli, registry: &Registry) -> Result<Box<dyn KeyProvider>, Failure> {
    if let Some(socket) = &cli.socket {
        return Ok(Box::new(kms_client::RemoteProvider::connect(socket)?));
    }
    let config = load_config(cli)?;
    if cli.dev.is_some() {
        // The development default initialises itself on first use.
        match registry.init(&config) {
            Ok(line) => eprintln!("kms: {line}"),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(registry.open(&config)?)
}

fn key_id(raw: &str) -> Result<KeyId, Failure> {
    Ok(KeyId::new(raw)?)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let registry = registry();
    match &cli.command {
        Command::Init => {
            let config = load_config(&cli)?;
            let line = registry.init(&config)?;
            eprintln!("kms: {line}");
        }
        Command::Providers => {
            for entry in registry.entries() {
                println!("{}\t{}", entry.name, entry.summary);
            }
        }
        Command::Plugins => list_plugins(&cli)?,
        Command::Create { id, spec, format } => {
            let id = key_id(id)?;
            format.format.check_terminal()?;
            let key =
                open(&cli, &registry)?.create(&id, KeySpec::new(spec.bits.unwrap_or_default()))?;
            output::print_key(&key, format.format)?;
        }
        Command::Get {
            id,
            version,
            format,
        } => {
            let id = key_id(id)?;
            format.format.check_terminal()?;
            let provider = open(&cli, &registry)?;
            let key = match version {
                Some(v) => provider.get_version(&id, *v)?,
                None => provider.get(&id)?,
            };
            output::print_key(&key, format.format)?;
        }
        Command::GetOrCreate { id, spec, format } => {
            let id = key_id(id)?;
            format.format.check_terminal()?;
            let key = open(&cli, &registry)?
                .get_or_create(&id, KeySpec::new(spec.bits.unwrap_or_default()))?;
            output::print_key(&key, format.format)?;
        }
        Command::Rotate { id, spec, format } => {
            let id = key_id(id)?;
            format.format.check_terminal()?;
            let provider = open(&cli, &registry)?;
            // A new version keeps the key's length unless --bits says otherwise.
            let len = match spec.bits {
                Some(len) => len,
                None => provider.get(&id)?.aes_len().unwrap_or_default(),
            };
            let key = provider.rotate(&id, KeySpec::new(len))?;
            output::print_key(&key, format.format)?;
        }
        Command::List { prefix } => {
            kms_core::validate_prefix(prefix)?;
            let keys = open(&cli, &registry)?.list(prefix)?;
            output::print_list(&keys)?;
        }
        Command::Import { id, raw } => {
            let id = key_id(id)?;
            let secret = read_secret(*raw)?;
            let provider = open(&cli, &registry)?;
            let key = provider.import(&id, &secret)?;
            eprintln!(
                "kms: imported secret \"{id}\" ({} bytes) into {provider}",
                key.len()
            );
        }
        Command::Passphrase { id } => {
            let id = key_id(id)?;
            let key = open(&cli, &registry)?.get(&id)?;
            output::print_passphrase(&key)?;
        }
        Command::Encrypt {
            key,
            create,
            force,
            input,
            output,
        } => {
            let id = key_id(key)?;
            let files = crypt::Files {
                input,
                output,
                force: *force,
            };
            crypt::encrypt(|| open(&cli, &registry), &id, *create, files)?;
        }
        Command::Decrypt {
            offset,
            length,
            force,
            input,
            output,
        } => {
            let range = (offset.is_some() || length.is_some()).then(|| crypt::Range {
                offset: offset.unwrap_or(0),
                length: *length,
            });
            let files = crypt::Files {
                input,
                output,
                force: *force,
            };
            crypt::decrypt(|| open(&cli, &registry), range, files)?;
        }
        Command::Slot(slot) => run_slot(&cli, slot)?,
        Command::RotateKek { to } => rotate_kek(&cli, to.as_deref())?,
        Command::Delete { id, yes } => {
            let id = key_id(id)?;
            if !yes {
                return Err(usage(format!(
                    "refusing to delete key \"{id}\" without --yes: data encrypted under it becomes unreadable"
                )));
            }
            let provider = open(&cli, &registry)?;
            provider.delete(&id)?;
            eprintln!("kms: deleted key \"{id}\" from {provider}");
        }
    }
    Ok(())
}

/// `kms rotate-kek`: the KEK rotation of the configured provider, for the providers that have
/// one (command, openbao).
fn rotate_kek(cli: &Cli, to: Option<&str>) -> Result<(), Failure> {
    let config = load_config(cli)?;
    if to.is_some() && config.provider.name != kms_aws_kms::NAME {
        return Err(usage("--to is for the aws-kms provider"));
    }
    let progress = |done: usize| eprintln!("kms: re-wrapped {done} keys");
    let (from, to, resumed, rewrapped) = match config.provider.name.as_str() {
        "openbao" => {
            let context = kms_core::config::Context {
                base_dir: config.base_dir.clone(),
            };
            let options = kms_openbao::Options::from_table(&context, &config.provider.options)?;
            let r = kms_openbao::rotate_kek(&options, progress)?;
            (r.from, r.to, r.resumed, r.rewrapped)
        }
        kms_aws_kms::NAME => {
            let context = kms_core::config::Context {
                base_dir: config.base_dir.clone(),
            };
            let options = kms_aws_kms::Options::from_table(&context, &config.provider.options)?;
            let r = kms_aws_kms::rotate_kek(&options, to, progress)?;
            eprintln!(
                "kms: the KEK is now KMS key {}; key_id must now name it",
                r.arn
            );
            (r.from, r.to, r.resumed, r.rewrapped)
        }
        "pkcs11" => {
            let context = kms_core::config::Context {
                base_dir: config.base_dir.clone(),
            };
            let options = kms_pkcs11::Options::from_table(&context, &config.provider.options)?;
            let r = kms_pkcs11::rotate_kek(&options, progress)?;
            eprintln!("kms: the new KEK is token key \"{}\"", r.label);
            (r.from, r.to, r.resumed, r.rewrapped)
        }
        _ => {
            let options = command_options(cli)?;
            let r = kms_command::rotate_kek(&options, progress)?;
            (r.from, r.to, r.resumed, r.rewrapped)
        }
    };
    let how = if resumed {
        "resumed and finished"
    } else {
        "finished"
    };
    eprintln!(
        "kms: {how} the KEK rotation from generation {from} to {to}: {rewrapped} keys re-wrapped"
    );
    Ok(())
}

/// The command provider's options from the configuration, for its own commands.
fn command_options(cli: &Cli) -> Result<kms_command::Options, Failure> {
    let config = load_config(cli)?;
    if config.provider.name != "command" {
        return Err(usage(format!(
            "this command is for the command provider; the configuration names \"{}\"",
            config.provider.name.escape_debug()
        )));
    }
    let context = kms_core::config::Context {
        base_dir: config.base_dir.clone(),
    };
    Ok(kms_command::Options::from_table(
        &context,
        &config.provider.options,
    )?)
}

fn run_slot(cli: &Cli, command: &SlotCommand) -> Result<(), Failure> {
    let options = command_options(cli)?;
    let new_passphrase = |template: &str, slot: &str| {
        let new_options = kms_command::Options {
            passphrase_command: template.to_string(),
            ..options.clone()
        };
        new_options.passphrase(&format!("New passphrase for slot \"{slot}\": "))
    };
    let line = match command {
        SlotCommand::List => {
            for slot in kms_command::list_slots(&options)? {
                println!("{}\t{} iterations", slot.name, slot.iterations);
            }
            return Ok(());
        }
        SlotCommand::Add {
            name,
            new_passphrase_command,
        } => {
            let pass = new_passphrase(new_passphrase_command, name)?;
            kms_command::set_slot(&options, name, kms_command::SlotChange::Add, &pass)?
        }
        SlotCommand::Change {
            name,
            new_passphrase_command,
        } => {
            let pass = new_passphrase(new_passphrase_command, name)?;
            kms_command::set_slot(&options, name, kms_command::SlotChange::Change, &pass)?
        }
        SlotCommand::Remove { name, yes } => {
            if !yes {
                return Err(usage(format!(
                    "refusing to remove slot \"{name}\" without --yes"
                )));
            }
            kms_command::remove_slot(&options, name)?
        }
    };
    eprintln!("kms: {line}");
    Ok(())
}

/// `kms plugins`: every `libkms_*.so` in the plugin directories (those of the configuration,
/// if one is given, then this executable's directory), loaded and checked, one per line:
/// name, plugin version, ABI version, path. Refused plugins are reported on stderr.
fn list_plugins(cli: &Cli) -> Result<(), Failure> {
    use std::io::Write;

    let config = match &cli.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    let search = kms_core::plugin::PluginSearch::from_config(config.as_ref())?;
    let found = search.discover();
    if found.is_empty() {
        let dirs: Vec<String> = search
            .dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        eprintln!("kms: no plugins in {}", dirs.join(", "));
    }
    let mut out = String::new();
    let mut refused = 0;
    for path in found {
        match kms_core::plugin::Plugin::load(&path) {
            Ok(plugin) => out.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                plugin.name(),
                plugin.version(),
                plugin.abi_version(),
                path.display()
            )),
            Err(e) => {
                eprintln!("kms: {e}");
                refused += 1;
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
        .map_err(|e| Failure::other(format!("cannot write to standard output: {e}")))?;
    if refused > 0 {
        return Err(Failure::other(format!("{refused} plugin(s) refused")));
    }
    Ok(())
}

/// Reads a secret from stdin: at most 1024 bytes; one trailing LF or CRLF removed unless `raw`.
fn read_secret(raw: bool) -> Result<kms_core::SecretBytes, Failure> {
    use std::io::Read;
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(256));
    let limit = kms_core::MAX_SECRET_LEN as u64 + 2;
    std::io::stdin()
        .lock()
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| Failure::other(format!("cannot read the secret from standard input: {e}")))?;
    let mut secret: &[u8] = &buf;
    if !raw {
        secret = secret
            .strip_suffix(b"\r\n")
            .or_else(|| secret.strip_suffix(b"\n"))
            .unwrap_or(secret);
    }
    if secret.is_empty() {
        return Err(usage("the secret on standard input is empty"));
    }
    if secret.len() > kms_core::MAX_SECRET_LEN {
        return Err(usage(format!(
            "the secret on standard input is longer than {} bytes",
            kms_core::MAX_SECRET_LEN
        )));
    }
    Ok(kms_core::SecretBytes::copy_from(secret))
}
