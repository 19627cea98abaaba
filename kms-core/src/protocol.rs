//! Protocol v1: the line protocol spoken by `kmsd` on its Unix socket and by `exec` helper
//! programs on their standard input and output. Specified in `docs/protocol.md`; this module
//! parses and formats lines and does no I/O, so the server, the client and the fuzzers share it.
//!
//! ```text
//! server: KMS/1 <name>                  greeting, once per connection
//! client: GET-OR-CREATE cluster/wal 256
//! server: OK 1 3q2+7w...=               version and base64 key
//! client: GET nope
//! server: ERR not-found key "nope" not found
//! ```

use base64::Engine;

use crate::error::{Error, ErrorKind, Result};
use crate::id::{KeyId, show_untrusted, validate_prefix};
use crate::secret::{Key, KeyInfo, KeyLen, MAX_SECRET_LEN, SecretBytes};

/// The protocol version this code speaks.
pub const VERSION: u32 = 1;

/// The prefix of the greeting line: `KMS/1`, then a space and the server's name.
pub const GREETING_PREFIX: &str = "KMS/1";

/// The longest request line accepted, terminator included.
pub const MAX_LINE: usize = 4096;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `PING`: answered `OK PONG`.
    Ping,
    /// `STATS`: counters as `OK name=value ...`.
    Stats,
    /// `GET id`: the newest version.
    Get(KeyId),
    /// `GET-VERSION id n`.
    GetVersion(KeyId, u32),
    /// `CREATE id [bits]`.
    Create(KeyId, KeyLen),
    /// `GET-OR-CREATE id [bits]`.
    GetOrCreate(KeyId, KeyLen),
    /// `ROTATE id [bits]`.
    Rotate(KeyId, KeyLen),
    /// `DELETE id`.
    Delete(KeyId),
    /// `LIST [prefix]`.
    List(String),
}

impl Request {
    /// The verb, for logs and counters.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Ping => "PING",
            Request::Stats => "STATS",
            Request::Get(_) => "GET",
            Request::GetVersion(..) => "GET-VERSION",
            Request::Create(..) => "CREATE",
            Request::GetOrCreate(..) => "GET-OR-CREATE",
            Request::Rotate(..) => "ROTATE",
            Request::Delete(_) => "DELETE",
            Request::List(_) => "LIST",
        }
    }

    /// The key id the request is about, if any.
    pub fn key_id(&self) -> Option<&KeyId> {
        match self {
            Request::Get(id)
            | Request::GetVersion(id, _)
            | Request::Create(id, _)
            | Request::GetOrCreate(id, _)
            | Request::Rotate(id, _)
            | Request::Delete(id) => Some(id),
            Request::Ping | Request::Stats | Request::List(_) => None,
        }
    }

    /// The request as a line, without terminator.
    pub fn to_line(&self) -> String {
        match self {
            Request::Ping => "PING".into(),
            Request::Stats => "STATS".into(),
            Request::Get(id) => format!("GET {id}"),
            Request::GetVersion(id, v) => format!("GET-VERSION {id} {v}"),
            Request::Create(id, len) => format!("CREATE {id} {}", len.bits()),
            Request::GetOrCreate(id, len) => format!("GET-OR-CREATE {id} {}", len.bits()),
            Request::Rotate(id, len) => format!("ROTATE {id} {}", len.bits()),
            Request::Delete(id) => format!("DELETE {id}"),
            Request::List(prefix) if prefix.is_empty() => "LIST".into(),
            Request::List(prefix) => format!("LIST {prefix}"),
        }
    }
}

fn bad(message: String) -> Error {
    Error::new(ErrorKind::InvalidInput, message)
}

/// Parses one request line (terminator already removed; a trailing CR is accepted).
pub fn parse_request(line: &[u8]) -> Result<Request> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() >= MAX_LINE {
        return Err(bad(format!(
            "request line longer than {} bytes",
            MAX_LINE - 1
        )));
    }
    if let Some(b) = line.iter().find(|b| !(b.is_ascii_graphic() || **b == b' ')) {
        return Err(bad(format!(
            "request holds the byte 0x{b:02x}; requests are printable ASCII: {}",
            show_untrusted(line)
        )));
    }
    // Validated as ASCII above.
    let text = std::str::from_utf8(line).map_err(|_| bad("request is not text".into()))?;
    let mut words = text.split(' ');
    let verb = words.next().unwrap_or("");
    let args: Vec<&str> = words.collect();
    if args.iter().any(|a| a.is_empty()) {
        return Err(bad(format!(
            "request has an empty argument (two spaces?): {}",
            show_untrusted(line)
        )));
    }

    let arity = |min: usize, max: usize| -> Result<()> {
        if args.len() < min || args.len() > max {
            let want = if min == max {
                min.to_string()
            } else {
                format!("{min} to {max}")
            };
            return Err(bad(format!(
                "{verb} takes {want} argument(s), got {}",
                args.len()
            )));
        }
        Ok(())
    };
    let bits = |at: usize| -> Result<KeyLen> {
        match args.get(at) {
            None => Ok(KeyLen::default()),
            Some(text) => {
                let n: u32 = text.parse().map_err(|_| {
                    bad(format!(
                        "bits must be 128, 192 or 256, not {}",
                        show_untrusted(text.as_bytes())
                    ))
                })?;
                KeyLen::from_bits(n)
            }
        }
    };
    match verb {
        "PING" => arity(0, 0).map(|_| Request::Ping),
        "STATS" => arity(0, 0).map(|_| Request::Stats),
        "GET" => {
            arity(1, 1)?;
            Ok(Request::Get(KeyId::new(args[0])?))
        }
        "GET-VERSION" => {
            arity(2, 2)?;
            let version: u32 = args[1].parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
                bad(format!(
                    "version must be a number from 1, not {}",
                    show_untrusted(args[1].as_bytes())
                ))
            })?;
            Ok(Request::GetVersion(KeyId::new(args[0])?, version))
        }
        "CREATE" => {
            arity(1, 2)?;
            Ok(Request::Create(KeyId::new(args[0])?, bits(1)?))
        }
        "GET-OR-CREATE" => {
            arity(1, 2)?;
            Ok(Request::GetOrCreate(KeyId::new(args[0])?, bits(1)?))
        }
        "ROTATE" => {
            arity(1, 2)?;
            Ok(Request::Rotate(KeyId::new(args[0])?, bits(1)?))
        }
        "DELETE" => {
            arity(1, 1)?;
            Ok(Request::Delete(KeyId::new(args[0])?))
        }
        "LIST" => {
            arity(0, 1)?;
            let prefix = args.first().copied().unwrap_or("");
            validate_prefix(prefix)?;
            Ok(Request::List(prefix.to_string()))
        }
        "" => Err(bad("empty request".into())),
        other => Err(bad(format!(
            "unknown verb {}; known: PING STATS GET GET-VERSION CREATE GET-OR-CREATE ROTATE DELETE LIST",
            show_untrusted(other.as_bytes())
        ))),
    }
}

/// Formats an error answer: `ERR <code> <message>`, on one line.
pub fn format_error(error: &Error) -> String {
    let message: String = error
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    format!("ERR {} {message}", error.kind().code())
}

/// Formats a key answer: `OK <version> <base64>`. The returned string holds key material:
/// callers write it and let it drop (it is zeroized on drop).
pub fn format_key(key: &Key) -> zeroize::Zeroizing<String> {
    let mut line = zeroize::Zeroizing::new(String::with_capacity(64));
    line.push_str("OK ");
    line.push_str(&key.version().to_string());
    line.push(' ');
    encode(key.expose_secret(), &mut line);
    line
}

/// Formats one line of a `LIST` answer (after the `OK <count>` line).
pub fn format_listed(info: &KeyInfo) -> String {
    format!(
        "{} {} {} {}",
        info.id,
        info.version,
        info.bytes * 8,
        info.created
    )
}

/// What a server answered to one request line.
#[derive(Debug)]
pub enum Answer<'a> {
    /// `OK` and the rest of the line.
    Ok(&'a str),
    /// `ERR code message`, as an error of that kind.
    Err(Error),
}

/// Parses an answer line (terminator removed).
pub fn parse_answer(line: &str) -> Result<Answer<'_>> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line == "OK" {
        return Ok(Answer::Ok(""));
    }
    if let Some(rest) = line.strip_prefix("OK ") {
        return Ok(Answer::Ok(rest));
    }
    if let Some(rest) = line.strip_prefix("ERR ") {
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        let kind = ErrorKind::from_code(code).unwrap_or(ErrorKind::Other);
        return Ok(Answer::Err(Error::new(kind, message.to_string())));
    }
    Err(Error::new(
        ErrorKind::Other,
        format!(
            "malformed answer from the server: {}",
            show_untrusted(line.as_bytes())
        ),
    ))
}

/// Parses the payload of a key answer (`<version> <base64>`) into a key for `id`.
pub fn parse_key(id: &KeyId, payload: &str) -> Result<Key> {
    let malformed = || {
        Error::new(
            ErrorKind::Other,
            format!("malformed key answer for \"{id}\""),
        )
        .with_key_id(id)
    };
    let (version, encoded) = payload.split_once(' ').ok_or_else(malformed)?;
    let version: u32 = version.parse().map_err(|_| malformed())?;
    let bytes = decode(encoded).ok_or_else(malformed)?;
    Key::new(id.clone(), version, SecretBytes::new(bytes))
}

/// Parses one line of a `LIST` answer.
pub fn parse_listed(line: &str) -> Result<KeyInfo> {
    let malformed = || {
        Error::new(
            ErrorKind::Other,
            format!("malformed LIST line: {}", show_untrusted(line.as_bytes())),
        )
    };
    let mut fields = line.split(' ');
    let id = KeyId::new(fields.next().ok_or_else(malformed)?)?;
    let version = fields
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(malformed)?;
    let bits: u32 = fields
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(malformed)?;
    let created = fields
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(malformed)?;
    if fields.next().is_some()
        || bits == 0
        || !bits.is_multiple_of(8)
        || bits / 8 > MAX_SECRET_LEN as u32
    {
        return Err(malformed());
    }
    Ok(KeyInfo {
        id,
        version,
        bytes: bits / 8,
        created,
    })
}

/// Appends standard base64 (RFC 4648, padded) of `bytes` to `out`, whose capacity is reserved
/// first so that no reallocation leaves a copy of key material behind.
fn encode(bytes: &[u8], out: &mut String) {
    out.reserve(bytes.len().div_ceil(3) * 4);
    base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
}

/// Strict standard base64 (canonical padding and trailing bits).
fn decode(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_answers() {
        // RFC 4648 section 10.
        for (plain, encoded) in [
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = String::new();
            encode(plain.as_bytes(), &mut out);
            assert_eq!(out, encoded);
            assert_eq!(decode(encoded).unwrap(), plain.as_bytes());
        }
        for bad in [
            "", "Zg=", "Zh==", "Z===", "Zg==Zg==", "Zm9v!A==", "Zm8=Zm9v",
        ] {
            assert!(decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn requests_round_trip() {
        let id = KeyId::new("db/1").unwrap();
        for request in [
            Request::Ping,
            Request::Stats,
            Request::Get(id.clone()),
            Request::GetVersion(id.clone(), 3),
            Request::Create(id.clone(), KeyLen::Aes128),
            Request::GetOrCreate(id.clone(), KeyLen::Aes256),
            Request::Rotate(id.clone(), KeyLen::Aes192),
            Request::Delete(id.clone()),
            Request::List(String::new()),
            Request::List("db/".into()),
        ] {
            assert_eq!(
                parse_request(request.to_line().as_bytes()).unwrap(),
                request
            );
        }
        assert_eq!(
            parse_request(b"GET db/1\r").unwrap(),
            Request::Get(id.clone())
        );
        assert_eq!(
            parse_request(b"CREATE db/1").unwrap(),
            Request::Create(id, KeyLen::Aes256)
        );
    }

    #[test]
    fn malformed_requests() {
        let cases: &[(&[u8], ErrorKind)] = &[
            (b"", ErrorKind::InvalidInput),
            (b"GET", ErrorKind::InvalidInput),
            (b"GET a b", ErrorKind::InvalidInput),
            (b"GET  a", ErrorKind::InvalidInput),
            (b"GET ../x", ErrorKind::InvalidKeyId),
            (b"GET a\0b", ErrorKind::InvalidInput),
            (b"GET \xff", ErrorKind::InvalidInput),
            (b"get a", ErrorKind::InvalidInput),
            (b"CREATE a 512", ErrorKind::InvalidInput),
            (b"CREATE a x", ErrorKind::InvalidInput),
            (b"GET-VERSION a 0", ErrorKind::InvalidInput),
            (b"LIST /", ErrorKind::InvalidKeyId),
            (b"PING x", ErrorKind::InvalidInput),
            (b"FLY a", ErrorKind::InvalidInput),
        ];
        for (line, kind) in cases {
            let err = parse_request(line).unwrap_err();
            assert_eq!(err.kind(), *kind, "{line:?}: {err}");
            let answer = format_error(&err);
            assert!(
                !answer.contains('\n') && !answer.contains('\0'),
                "{answer:?}"
            );
        }
        assert!(parse_request(&vec![b'A'; MAX_LINE]).is_err());
    }

    #[test]
    fn answers() {
        let id = KeyId::new("k").unwrap();
        let key = Key::new(id.clone(), 2, SecretBytes::copy_from(&[7; 32])).unwrap();
        let line = format_key(&key);
        let Answer::Ok(payload) = parse_answer(&line).unwrap() else {
            panic!("not ok")
        };
        assert_eq!(parse_key(&id, payload).unwrap(), key);
        let err = Error::not_found(&id);
        let Answer::Err(back) = parse_answer(&format_error(&err)).unwrap() else {
            panic!()
        };
        assert_eq!(back.kind(), ErrorKind::NotFound);
        assert_eq!(back.message(), "key \"k\" not found");
        let info = KeyInfo {
            id,
            version: 3,
            bytes: 16,
            created: 17,
        };
        assert_eq!(parse_listed(&format_listed(&info)).unwrap(), info);
        assert!(parse_answer("HELLO").is_err());
    }
}
