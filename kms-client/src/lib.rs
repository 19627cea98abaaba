//! # kms-client: protocol v1 from the client's side
//!
//! - [`Client`]: one connection to `kmsd` (a Unix socket) or to any peer speaking protocol v1
//!   over a pair of byte streams, with a timeout on every answer.
//! - [`RemoteProvider`]: a [`KeyProvider`] over a [`Client`], so that a program (the `kms` CLI
//!   among them) uses a server exactly like an in-process provider, with the same errors.
//! - [`exec`]: the `exec` provider: a helper program of any language, spoken to over its
//!   standard input and output, for crash isolation.
//!
//! ```no_run
//! use kms_client::RemoteProvider;
//! use kms_core::{KeyId, KeyProvider, KeySpec};
//!
//! let keys = RemoteProvider::connect("/run/kms/kms.sock".as_ref())?;
//! let key = keys.get_or_create(&KeyId::new("cluster/wal")?, KeySpec::default())?;
//! # Ok::<(), kms_core::Error>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod exec;

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kms_core::protocol::{self, Answer, Request};
use kms_core::{Error, ErrorKind, Key, KeyId, KeyInfo, KeySpec, Result, show_untrusted};
use zeroize::Zeroizing;

/// The longest answer line read, in bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// The default time allowed for one answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Something a client reads answers from: a socket or a pipe.
pub trait Source: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> Source for T {}

/// One protocol v1 connection.
pub struct Client {
    reader: BufReader<Box<dyn Source>>,
    writer: Box<dyn Write + Send>,
    peer: String,
    server_name: String,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .field("server", &self.server_name)
            .finish()
    }
}

impl Client {
    /// Connects to kmsd's socket and reads its greeting.
    pub fn connect(socket: &Path) -> Result<Client> {
        let peer = format!("kmsd at {}", socket.display());
        let stream = UnixStream::connect(socket).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot connect to {peer}: {e}"),
            )
        })?;
        let reader = stream.try_clone().map_err(|e| {
            Error::new(
                ErrorKind::Other,
                format!("cannot use the connection to {peer}: {e}"),
            )
        })?;
        Client::over(Box::new(reader), Box::new(stream), peer, DEFAULT_TIMEOUT)
    }

    /// Speaks protocol v1 over a pair of streams (a helper's stdout and stdin) and reads the
    /// greeting. `peer` names the other side in errors.
    pub fn over(
        reader: Box<dyn Source>,
        writer: Box<dyn Write + Send>,
        peer: String,
        timeout: Duration,
    ) -> Result<Client> {
        let mut client = Client {
            reader: BufReader::new(reader),
            writer,
            peer,
            server_name: String::new(),
            timeout,
        };
        let greeting = client.read_line()?;
        let name = greeting
            .strip_prefix(protocol::GREETING_PREFIX)
            .and_then(|rest| {
                if rest.is_empty() {
                    Some("")
                } else {
                    rest.strip_prefix(' ')
                }
            })
            .ok_or_else(|| {
                let message = format!(
                    "{} does not speak kms protocol v1: it greeted with {}",
                    client.peer,
                    show_untrusted(greeting.as_bytes())
                );
                Error::new(ErrorKind::Unavailable, message)
            })?;
        client.server_name = name.to_string();
        Ok(client)
    }

    /// The server's name from its greeting.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Who this client talks to, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one request and returns the payload of its `OK` answer, or its `ERR` as an error.
    pub fn call(&mut self, request: &Request) -> Result<Zeroizing<String>> {
        let mut line = request.to_line();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(|e| {
                let message = format!("cannot send {} to {}: {e}", request.verb(), self.peer);
                Error::new(ErrorKind::Unavailable, message)
            })?;
        let answer = self.read_line()?;
        match protocol::parse_answer(&answer)? {
            Answer::Ok(payload) => Ok(Zeroizing::new(payload.to_string())),
            Answer::Err(e) => Err(e),
        }
    }

    /// `PING`.
    pub fn ping(&mut self) -> Result<()> {
        self.call(&Request::Ping).map(|_| ())
    }

    /// `STATS`: the counters as (name, value) pairs.
    pub fn stats(&mut self) -> Result<Vec<(String, u64)>> {
        let payload = self.call(&Request::Stats)?;
        let pairs = payload.split(' ').filter(|p| !p.is_empty()).map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        });
        pairs.collect::<Option<Vec<_>>>().ok_or_else(|| {
            Error::new(
                ErrorKind::Other,
                format!("malformed STATS answer from {}", self.peer),
            )
        })
    }

    /// A request whose answer is a key.
    pub fn key(&mut self, request: &Request) -> Result<Key> {
        let id = request.key_id().cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("{} has no key id", request.verb()),
            )
        })?;
        let payload = self.call(request).map_err(|e| e.with_key_id(&id))?;
        protocol::parse_key(&id, &payload)
    }

    /// `LIST prefix`.
    pub fn list(&mut self, prefix: &str) -> Result<Vec<KeyInfo>> {
        let payload = self.call(&Request::List(prefix.to_string()))?;
        let count: usize = payload.trim().parse().map_err(|_| {
            Error::new(
                ErrorKind::Other,
                format!("malformed LIST answer from {}", self.peer),
            )
        })?;
        let mut keys = Vec::with_capacity(count.min(1 << 20));
        for _ in 0..count {
            let line = self.read_line()?;
            keys.push(protocol::parse_listed(&line)?);
        }
        Ok(keys)
    }

    /// Reads one line within the timeout, without its terminator.
    fn read_line(&mut self) -> Result<String> {
        let deadline = Instant::now() + self.timeout;
        let mut line = Vec::new();
        loop {
            if self.reader.buffer().is_empty() {
                self.wait_readable(deadline)?;
            }
            let peer = &self.peer;
            let available = self.reader.fill_buf().map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("cannot read from {peer}: {e}"),
                )
            })?;
            if available.is_empty() {
                let message = format!("{} closed the connection", self.peer);
                return Err(Error::new(ErrorKind::Unavailable, message));
            }
            let (taken, done) = match available.iter().position(|b| *b == b'\n') {
                Some(at) => (at + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..taken]);
            self.reader.consume(taken);
            if line.len() > MAX_ANSWER {
                let message = format!(
                    "{} sent an answer longer than {MAX_ANSWER} bytes",
                    self.peer
                );
                return Err(Error::new(ErrorKind::Other, message));
            }
            if done {
                line.pop();
                return String::from_utf8(line).map_err(|_| {
                    Error::new(
                        ErrorKind::Other,
                        format!("{} sent an answer that is not UTF-8", self.peer),
                    )
                });
            }
        }
    }

    fn wait_readable(&self, deadline: Instant) -> Result<()> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let message = format!(
                    "{} did not answer within {}s",
                    self.peer,
                    self.timeout.as_secs_f64()
                );
                return Err(Error::new(ErrorKind::Unavailable, message));
            }
            let fd = self.reader.get_ref().as_fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let timeout = Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) => continue,
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.io_error("wait for", e.into())),
            }
        }
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot {what} {}: {e}", self.peer),
        )
    }
}

/// A [`KeyProvider`] served by a protocol v1 peer: kmsd, or an exec helper.
pub struct RemoteProvider {
    name: String,
    client: Mutex<Client>,
}

impl RemoteProvider {
    /// Connects to kmsd's socket.
    pub fn connect(socket: &Path) -> Result<RemoteProvider> {
        let client = Client::connect(socket)?;
        Ok(RemoteProvider::new(client))
    }

    /// Wraps a connected client.
    pub fn new(client: Client) -> RemoteProvider {
        let name = if client.server_name().is_empty() {
            client.peer().to_string()
        } else {
            format!("{} ({})", client.peer(), client.server_name())
        };
        RemoteProvider {
            name,
            client: Mutex::new(client),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut client)
    }

    /// The server's counters.
    pub fn stats(&self) -> Result<Vec<(String, u64)>> {
        self.with(Client::stats)
    }
}

impl fmt::Display for RemoteProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Implements [`KeyProvider`] for a type with a method
/// `with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T>` that runs `f` on its
/// connection: every operation is one protocol v1 request.
macro_rules! protocol_provider {
    ($provider:ty) => {
        impl kms_core::KeyProvider for $provider {
            fn get(&self, id: &KeyId) -> Result<Key> {
                self.with(|c| c.key(&Request::Get(id.clone())))
            }
            fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
                self.with(|c| c.key(&Request::Create(id.clone(), spec.len)))
            }
            fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
                self.with(|c| c.key(&Request::GetOrCreate(id.clone(), spec.len)))
            }
            fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
                self.with(|c| c.key(&Request::GetVersion(id.clone(), version)))
            }
            fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
                self.with(|c| c.key(&Request::Rotate(id.clone(), spec.len)))
            }
            fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
                self.with(|c| c.list(prefix))
            }
            fn delete(&self, id: &KeyId) -> Result<()> {
                self.with(|c| {
                    c.call(&Request::Delete(id.clone()))
                        .map(|_| ())
                        .map_err(|e| e.with_key_id(id))
                })
            }
            fn capabilities(&self) -> kms_core::Capabilities {
                // The peer answers `ERR unsupported` for what its provider cannot do.
                kms_core::Capabilities::ALL
            }
        }
    };
}
pub(crate) use protocol_provider;

protocol_provider!(RemoteProvider);

/// The socket path from `--socket` or `KMS_SOCKET`, if any.
pub fn socket_from_env() -> Option<PathBuf> {
    std::env::var_os("KMS_SOCKET").map(PathBuf::from)
}
