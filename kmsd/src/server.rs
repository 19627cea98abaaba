//! Serving protocol v1 on a Unix socket: one thread per connection, requests answered in
//! order, answers flushed when the client has nothing more pipelined.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind as IoKind, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kms_core::protocol::{self, MAX_LINE, Request};
use kms_core::{Error, ErrorKind, KeyProvider, KeySpec, Result};
use zeroize::Zeroizing;

use crate::audit::{AuditLog, Peer};
use crate::cache::KeyCache;
use crate::settings::{Op, Settings};
use crate::stats::{Stats, bump};

/// Stack size of connection threads: small, since key memory may be locked.
const THREAD_STACK: usize = 256 * 1024;

/// What every connection shares.
pub struct Shared {
    /// The provider keys come from.
    pub provider: Box<dyn KeyProvider>,
    /// Unwrapped keys.
    pub cache: KeyCache,
    /// Counters.
    pub stats: Stats,
    /// Settings.
    pub settings: Settings,
    /// The audit log, if configured.
    pub audit: Option<AuditLog>,
    /// kmsd's own uid, which may do anything.
    pub own_uid: u32,
    /// Set when the server is stopping.
    pub stopping: AtomicBool,
    /// Open connections, to shut their reading side down when stopping.
    connections: Mutex<HashMap<u64, UnixStream>>,
    next_connection: AtomicU64,
}

impl Shared {
    /// Shared state for a server of `provider`.
    pub fn new(
        provider: Box<dyn KeyProvider>,
        settings: Settings,
        audit: Option<AuditLog>,
    ) -> Shared {
        Shared {
            provider,
            cache: KeyCache::new(settings.cache_size, settings.cache_idle),
            stats: Stats::default(),
            settings,
            audit,
            own_uid: rustix::process::geteuid().as_raw(),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        }
    }

    /// Stops reading from every connection: each finishes the request it is on, answers it,
    /// and closes.
    pub fn stop_connections(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        for stream in connections.values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
    }

    fn is_allowed(&self, peer: Peer, op: Op, key: &str) -> bool {
        if peer.uid == self.own_uid {
            return true;
        }
        self.settings.allow.iter().any(|rule| {
            (rule.uids.contains(&peer.uid) || rule.gids.contains(&peer.gid))
                && rule.ops.contains(&op)
                && key.starts_with(&rule.prefix)
        })
    }
}

/// Accepts connections until `stop` says so; returns the connection threads to join.
pub fn accept_loop(
    listener: &UnixListener,
    shared: &Arc<Shared>,
    wake: &UnixStream,
) -> Vec<JoinHandle<()>> {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("poll on the listening socket failed: {e}");
                return threads;
            }
        }
        if !fds[1].revents().is_empty() || shared.stopping.load(Ordering::SeqCst) {
            return threads;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == IoKind::WouldBlock || e.kind() == IoKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if threads.len() >= shared.settings.max_connections {
            let mut stream = stream;
            let _ = writeln!(stream, "ERR unavailable too many connections; retry later");
            tracing::warn!("refused a connection: {} open", threads.len());
            continue;
        }
        let for_thread = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("kmsd-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || serve(stream, &for_thread));
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => tracing::error!("cannot start a connection thread: {e}"),
        }
    }
}

/// What reading one request line gave.
enum Read {
    Line(Vec<u8>),
    TooLong,
    /// End of input; the bytes of an unterminated last line, if any.
    Eof(Vec<u8>),
    Idle,
    Failed(std::io::Error),
}

/// Reads one line, never holding more than [`MAX_LINE`] bytes of it: a longer line is
/// consumed to its end and reported as too long.
fn read_line(reader: &mut BufReader<UnixStream>) -> Read {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == IoKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {
                return Read::Idle;
            }
            Err(e) => return Read::Failed(e),
        };
        if available.is_empty() {
            return if too_long {
                Read::TooLong
            } else {
                Read::Eof(line)
            };
        }
        let (taken, done) = match available.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if !too_long {
            line.extend_from_slice(&available[..taken]);
            if line.len() > MAX_LINE {
                too_long = true;
                line = Vec::new();
            }
        }
        reader.consume(taken);
        if done {
            if too_long {
                return Read::TooLong;
            }
            line.pop();
            return Read::Line(line);
        }
    }
}

/// Serves one connection.
fn serve(stream: UnixStream, shared: &Shared) {
    // 1. Who is calling.
    let peer = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(cred) => Peer {
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            pid: cred.pid.as_raw_nonzero().get(),
        },
        Err(e) => {
            tracing::warn!("cannot read the peer credentials of a connection: {e}");
            return;
        }
    };
    bump(&shared.stats.connections);
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    if let Ok(clone) = stream.try_clone() {
        shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, clone);
    }
    tracing::debug!(uid = peer.uid, pid = peer.pid, "connection opened");

    // 2. Requests until the client closes, goes idle, or the server stops.
    let _ = stream.set_read_timeout(Some(shared.settings.idle_timeout));
    let reader = stream
        .try_clone()
        .map(|r| BufReader::with_capacity(16 * 1024, r));
    if let Ok(mut reader) = reader {
        let mut writer = BufWriter::with_capacity(16 * 1024, &stream);
        let greeting = format!("{} {}\n", protocol::GREETING_PREFIX, shared.provider);
        if writer
            .write_all(greeting.as_bytes())
            .and_then(|_| writer.flush())
            .is_ok()
        {
            converse(&mut reader, &mut writer, shared, peer);
        }
        let _ = writer.flush();
    }

    shared
        .connections
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    tracing::debug!(uid = peer.uid, pid = peer.pid, "connection closed");
}

fn converse(
    reader: &mut BufReader<UnixStream>,
    writer: &mut impl Write,
    shared: &Shared,
    peer: Peer,
) {
    loop {
        let answer = match read_line(reader) {
            Read::Line(line) => handle_line(&line, shared, peer),
            Read::TooLong => {
                bump(&shared.stats.errors);
                let message = format!("request line longer than {} bytes", MAX_LINE - 1);
                Answer::error(&Error::new(ErrorKind::InvalidInput, message))
            }
            Read::Eof(partial) => {
                if !partial.is_empty() {
                    let message = "the connection closed in the middle of a request line";
                    let _ =
                        Answer::error(&Error::new(ErrorKind::InvalidInput, message)).write(writer);
                }
                return;
            }
            Read::Idle => {
                tracing::debug!(uid = peer.uid, "closing an idle connection");
                let _ = writer.write_all(b"ERR unavailable idle connection closed\n");
                return;
            }
            Read::Failed(e) => {
                tracing::debug!("connection read failed: {e}");
                return;
            }
        };
        if answer.write(writer).is_err() {
            return;
        }
        // Pipelined requests are answered together; flush once the client is waiting.
        if reader.buffer().is_empty() && writer.flush().is_err() {
            return;
        }
        if shared.stopping.load(Ordering::SeqCst) && reader.buffer().is_empty() {
            return;
        }
    }
}

/// An answer: one line, or a count line and lines after it.
enum Answer {
    Line(Zeroizing<String>),
    Lines(Vec<String>),
}

impl Answer {
    fn error(e: &Error) -> Answer {
        Answer::Line(Zeroizing::new(protocol::format_error(e)))
    }

    fn write(&self, writer: &mut impl Write) -> std::io::Result<()> {
        match self {
            Answer::Line(line) => {
                writer.write_all(line.as_bytes())?;
                writer.write_all(b"\n")
            }
            Answer::Lines(lines) => {
                for line in lines {
                    writer.write_all(line.as_bytes())?;
                    writer.write_all(b"\n")?;
                }
                Ok(())
            }
        }
    }
}

fn handle_line(line: &[u8], shared: &Shared, peer: Peer) -> Answer {
    bump(&shared.stats.requests);
    let request = match protocol::parse_request(line) {
        Ok(request) => request,
        Err(e) => {
            bump(&shared.stats.errors);
            return Answer::error(&e);
        }
    };
    let id_text = request.key_id().map(|id| id.as_str().to_string());
    let result = authorize(&request, shared, peer).and_then(|()| execute(&request, shared));
    let code = match &result {
        Ok(_) => "ok",
        Err(e) => e.kind().code(),
    };
    // Key operations are audited, and so is every refusal.
    let denied = matches!(&result, Err(e) if e.kind() == ErrorKind::Denied);
    if (denied || !matches!(request, Request::Ping | Request::Stats))
        && let Some(audit) = &shared.audit
    {
        let shown = match &request {
            Request::List(prefix) => format!("{prefix}*"),
            _ => id_text.unwrap_or_else(|| "-".into()),
        };
        audit.record(peer, request.verb(), &shown, code);
    }
    match result {
        Ok(answer) => answer,
        Err(e) => {
            bump(&shared.stats.errors);
            if e.kind() == ErrorKind::Denied {
                bump(&shared.stats.denied);
            }
            Answer::error(&e)
        }
    }
}

fn authorize(request: &Request, shared: &Shared, peer: Peer) -> Result<()> {
    let needs: &[Op] = match request {
        Request::Ping => &[],
        Request::Stats => &[Op::Stats],
        Request::Get(_) | Request::GetVersion(..) => &[Op::Get],
        Request::Create(..) | Request::Rotate(..) => &[Op::Create],
        Request::GetOrCreate(..) => &[Op::Get, Op::Create],
        Request::Delete(_) => &[Op::Delete],
        Request::List(_) => &[Op::List],
    };
    let key = match request {
        Request::List(prefix) => prefix.as_str(),
        other => other.key_id().map(|id| id.as_str()).unwrap_or(""),
    };
    for op in needs {
        if !shared.is_allowed(peer, *op, key) {
            tracing::warn!(
                uid = peer.uid,
                gid = peer.gid,
                pid = peer.pid,
                verb = request.verb(),
                key,
                "denied"
            );
            let message = format!("uid {} may not {} \"{key}\"", peer.uid, request.verb());
            return Err(Error::new(ErrorKind::Denied, message));
        }
    }
    Ok(())
}

fn key_answer(result: Result<kms_core::Key>) -> Result<Answer> {
    result.map(|key| Answer::Line(protocol::format_key(&key)))
}

fn execute(request: &Request, shared: &Shared) -> Result<Answer> {
    let stats = &shared.stats;
    let provider = shared.provider.as_ref();
    match request {
        Request::Ping => Ok(Answer::Line(Zeroizing::new("OK PONG".into()))),
        Request::Stats => {
            let extra = [("cached_keys", shared.cache.len() as u64)];
            Ok(Answer::Line(Zeroizing::new(format!(
                "OK {}",
                stats.render(&extra)
            ))))
        }
        Request::Get(id) => {
            if let Some(key) = shared.cache.get(id) {
                bump(&stats.cache_hits);
                return key_answer(Ok(key));
            }
            bump(&stats.cache_misses);
            let (result, _) = shared.cache.single_flight(id, || {
                bump(&stats.provider_get);
                provider.get(id)
            });
            key_answer(result)
        }
        Request::GetOrCreate(id, len) => {
            if let Some(key) = shared.cache.get(id) {
                bump(&stats.cache_hits);
                return key_answer(Ok(key));
            }
            bump(&stats.cache_misses);
            let (result, _) = shared.cache.single_flight(id, || {
                bump(&stats.provider_get_or_create);
                provider.get_or_create(id, KeySpec::new(*len))
            });
            key_answer(result)
        }
        Request::GetVersion(id, version) => {
            bump(&stats.provider_get_version);
            key_answer(provider.get_version(id, *version))
        }
        Request::Create(id, len) => {
            bump(&stats.provider_create);
            let result = provider.create(id, KeySpec::new(*len));
            if let Ok(key) = &result {
                shared.cache.put(key);
            }
            key_answer(result)
        }
        Request::Rotate(id, len) => {
            bump(&stats.provider_rotate);
            let result = provider.rotate(id, KeySpec::new(*len));
            match &result {
                Ok(key) => shared.cache.put(key),
                Err(_) => shared.cache.remove(id),
            }
            key_answer(result)
        }
        Request::Delete(id) => {
            bump(&stats.provider_delete);
            shared.cache.remove(id);
            let result = provider.delete(id);
            shared.cache.remove(id);
            result.map(|()| Answer::Line(Zeroizing::new("OK".into())))
        }
        Request::List(prefix) => {
            bump(&stats.provider_list);
            let keys = provider.list(prefix)?;
            let mut lines = Vec::with_capacity(keys.len() + 1);
            lines.push(format!("OK {}", keys.len()));
            lines.extend(keys.iter().map(protocol::format_listed));
            Ok(Answer::Lines(lines))
        }
    }
}
