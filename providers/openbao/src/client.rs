//! A small synchronous client of the OpenBao (Vault) HTTP API: the few Transit and AppRole calls
//! the provider needs, over ureq with rustls on ring.
//!
//! Every request goes through [`Client::call`], which
//!
//! 1. tries the configured addresses in order, starting with the one that answered last; a
//!    connection failure, a sealed or standby node (503, or a redirect) moves on to the next;
//! 2. retries transient failures (connection refused or reset, timeouts, 5xx other than 501,
//!    429) with exponential backoff, a bounded number of times;
//! 3. logs in again through AppRole, once, when the server answers 403 (an expired token);
//! 4. turns what is left into an [`Error`] of the right kind that names the address.

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kms_core::{Error, ErrorKind, Result};
use serde_json::{Value, json};
use ureq::Agent;
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use zeroize::{Zeroize, Zeroizing};

/// A JSON value whose strings are zeroized when it is dropped: request bodies that carry a
/// plaintext or a secret id.
pub struct Scrubbed(pub Value);

impl std::ops::Deref for Scrubbed {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.0
    }
}

impl Drop for Scrubbed {
    fn drop(&mut self) {
        scrub(&mut self.0);
    }
}

/// Zeroizes every string of a JSON value.
pub fn scrub(value: &mut Value) {
    match value {
        Value::String(text) => text.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(scrub),
        Value::Object(map) => map.values_mut().for_each(scrub),
        _ => {}
    }
}

/// Where the client token comes from.
#[derive(Clone)]
pub enum Auth {
    /// A token read once from an environment variable or a file.
    Token(Zeroizing<String>),
    /// AppRole: a role id (not secret) and a secret id; the token comes from logging in.
    AppRole {
        /// The mount of the AppRole method (`approle` by default).
        mount: String,
        /// The role id.
        role_id: String,
        /// The secret id.
        secret_id: Zeroizing<String>,
    },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Token(_) => f.debug_tuple("Token").field(&"[redacted]").finish(),
            Auth::AppRole { mount, role_id, .. } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", role_id)
                .field("secret_id", &"[redacted]")
                .finish(),
        }
    }
}

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Base addresses (`http://127.0.0.1:8200`), tried in order.
    pub addresses: Vec<String>,
    /// The namespace (`X-Vault-Namespace`), if any.
    pub namespace: Option<String>,
    /// A PEM file of the CA certificates to trust for `https` addresses.
    pub ca_file: Option<PathBuf>,
    /// The time limit of one HTTP request.
    pub timeout: Duration,
    /// How many times a transient failure is retried.
    pub retries: u32,
    /// The first backoff delay; it doubles after each retry, up to two seconds.
    pub backoff: Duration,
    /// How to authenticate.
    pub auth: Auth,
}

/// An answer that was not a success, kept apart for the caller to word.
#[derive(Debug)]
pub enum Failure {
    /// No address could be used: the last address tried and why.
    Unreachable {
        /// The address.
        address: String,
        /// The transport error.
        why: String,
    },
    /// The server refused the AppRole login (wrong role or secret id, or a 4xx).
    LoginRefused {
        /// The address that answered.
        address: String,
        /// The HTTP status.
        status: u16,
        /// The server's `errors`, joined.
        errors: String,
    },
    /// The server answered with an error status.
    Status {
        /// The address that answered.
        address: String,
        /// The HTTP status.
        status: u16,
        /// The server's `errors`, joined.
        errors: String,
    },
}

/// A client of one OpenBao cluster.
pub struct Client {
    agent: Agent,
    settings: Settings,
    /// The index of the address that answered last.
    preferred: AtomicUsize,
    /// The current token (for AppRole, the one from the last login).
    token: Mutex<Option<Zeroizing<String>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addresses", &self.settings.addresses)
            .field("namespace", &self.settings.namespace)
            .field("auth", &self.settings.auth)
            .finish_non_exhaustive()
    }
}

/// A transient outcome is retried; any other is final.
enum Attempt {
    Done(u16, Value),
    Transient(Failure),
}

impl Client {
    /// Builds a client; reads the CA file, contacts nobody.
    pub fn new(settings: Settings) -> Result<Client> {
        let mut tls = TlsConfig::builder();
        if let Some(path) = &settings.ca_file {
            tls = tls.root_certs(RootCerts::new_with_certs(&read_ca_file(path)?));
        }
        let config = Agent::config_builder()
            .timeout_global(Some(settings.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .tls_config(tls.build())
            .build();
        let token = match &settings.auth {
            Auth::Token(token) => Some(token.clone()),
            Auth::AppRole { .. } => None,
        };
        Ok(Client {
            agent: config.into(),
            settings,
            preferred: AtomicUsize::new(0),
            token: Mutex::new(token),
        })
    }

    /// The addresses, for messages.
    pub fn addresses(&self) -> &[String] {
        &self.settings.addresses
    }

    /// The address that answered last (or the first one), for messages.
    pub fn current_address(&self) -> &str {
        let i = self.preferred.load(Ordering::Relaxed) % self.settings.addresses.len();
        &self.settings.addresses[i]
    }

    /// Calls `method` on `/v1/{path}` with an optional JSON body; the JSON answer of a success.
    /// With AppRole, logs in first if needed and once more after a 403.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let mut relogged = false;
        loop {
            let token = self.token()?;
            match self.call_with_token(method, path, body, &token) {
                Err(Failure::Status { status: 403, .. })
                    if !relogged && matches!(self.settings.auth, Auth::AppRole { .. }) =>
                {
                    // The token may have expired: one new login, then the request again.
                    relogged = true;
                    *self.lock_token() = None;
                }
                other => return other,
            }
        }
    }

    fn lock_token(&self) -> std::sync::MutexGuard<'_, Option<Zeroizing<String>>> {
        self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token, logging in through AppRole when there is none yet.
    fn token(&self) -> Result<Zeroizing<String>, Failure> {
        let mut slot = self.lock_token();
        if let Some(token) = slot.as_ref() {
            return Ok(token.clone());
        }
        let Auth::AppRole {
            mount,
            role_id,
            secret_id,
        } = &self.settings.auth
        else {
            unreachable!("a token client always holds its token");
        };
        let body = Scrubbed(json!({ "role_id": role_id, "secret_id": secret_id.as_str() }));
        let path = format!("auth/{mount}/login");
        let mut answer = match self.call_with_token("POST", &path, Some(&body), "") {
            Ok(answer) => answer,
            Err(Failure::Status {
                address,
                status,
                errors,
            }) if (400..500).contains(&status) => {
                return Err(Failure::LoginRefused {
                    address,
                    status,
                    errors,
                });
            }
            Err(other) => return Err(other),
        };
        let token = match answer.pointer_mut("/auth/client_token").map(Value::take) {
            Some(Value::String(token)) => Zeroizing::new(token),
            _ => {
                return Err(Failure::Status {
                    address: self.current_address().to_string(),
                    status: 200,
                    errors: "the AppRole login answer holds no client token".to_string(),
                });
            }
        };
        *slot = Some(token.clone());
        Ok(token)
    }

    /// One request with retries and failover, without any login.
    fn call_with_token(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        token: &str,
    ) -> Result<Value, Failure> {
        let body = body.map(|value| {
            Zeroizing::new(serde_json::to_vec(value).expect("a JSON value serialises"))
        });
        let mut delay = self.settings.backoff;
        let mut attempt = 0;
        loop {
            match self.try_addresses(method, path, body.as_deref().map(|b| &b[..]), token) {
                Attempt::Done(status, value) => return finish(self, status, value),
                Attempt::Transient(failure) if attempt >= self.settings.retries => {
                    return Err(failure);
                }
                Attempt::Transient(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
            }
        }
    }

    /// Tries every address once, from the preferred one on, until one gives a final answer.
    fn try_addresses(&self, method: &str, path: &str, body: Option<&[u8]>, token: &str) -> Attempt {
        let n = self.settings.addresses.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            let address = &self.settings.addresses[i];
            match self.send(address, method, path, body, token) {
                Ok((status, value)) => {
                    // A sealed, standby or uninitialised-for-us node: the next one may serve.
                    let next_node = status == 503 || (300..400).contains(&status);
                    if next_node || status == 429 || (status >= 500 && status != 501) {
                        last = Some(Failure::Status {
                            address: address.clone(),
                            status,
                            errors: error_text(&value),
                        });
                        if next_node || status >= 500 {
                            continue;
                        }
                        // 429: the cluster is throttling; back off rather than hop.
                        break;
                    }
                    self.preferred.store(i, Ordering::Relaxed);
                    return Attempt::Done(status, value);
                }
                Err(why) => {
                    last = Some(Failure::Unreachable {
                        address: address.clone(),
                        why,
                    });
                }
            }
        }
        Attempt::Transient(last.expect("at least one address"))
    }

    /// One HTTP exchange; `Err` is a transport failure (no HTTP answer).
    fn send(
        &self,
        address: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: &str,
    ) -> std::result::Result<(u16, Value), String> {
        let url = format!("{}/v1/{path}", address.trim_end_matches('/'));
        let namespace = self.settings.namespace.as_deref();
        let response = match (method, body) {
            ("GET", _) => {
                let mut request = self.agent.get(&url);
                if !token.is_empty() {
                    request = request.header("X-Vault-Token", token);
                }
                if let Some(ns) = namespace {
                    request = request.header("X-Vault-Namespace", ns);
                }
                request.call()
            }
            (_, body) => {
                let mut request = self.agent.post(&url);
                if !token.is_empty() {
                    request = request.header("X-Vault-Token", token);
                }
                if let Some(ns) = namespace {
                    request = request.header("X-Vault-Namespace", ns);
                }
                request
                    .header("Content-Type", "application/json")
                    .send(body.unwrap_or(b"{}"))
            }
        };
        let mut response = response.map_err(describe_transport)?;
        let status = response.status().as_u16();
        let raw = Zeroizing::new(
            response
                .body_mut()
                .with_config()
                .limit(16 << 20)
                .read_to_vec()
                .map_err(describe_transport)?,
        );
        let value = if raw.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match serde_json::from_slice(&raw) {
                Ok(value) => value,
                Err(_) if status >= 300 => Value::Null,
                Err(e) => return Err(format!("the answer is not JSON: {e}")),
            }
        };
        Ok((status, value))
    }
}

fn finish(client: &Client, status: u16, value: Value) -> Result<Value, Failure> {
    if (200..300).contains(&status) {
        return Ok(value);
    }
    Err(Failure::Status {
        address: client.current_address().to_string(),
        status,
        errors: error_text(&value),
    })
}

/// The `errors` list of an error answer, joined.
fn error_text(value: &Value) -> String {
    match value.get("errors").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list
            .iter()
            .map(|e| {
                e.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string())
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => "no error message".to_string(),
    }
}

fn describe_transport(e: ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(what) => format!("timed out ({what})"),
        ureq::Error::ConnectionFailed => "connection failed".to_string(),
        ureq::Error::HostNotFound => "host not found".to_string(),
        other => other.to_string(),
    }
}

fn read_ca_file(path: &std::path::Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| {
        let message = format!("cannot read ca_file {shown}: {e}");
        Error::new(ErrorKind::InvalidConfig, message)
    })?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => certs.push(cert.to_owned()),
            Ok(_) => {}
            Err(e) => {
                let message = format!("ca_file {shown} is not valid PEM: {e}");
                return Err(Error::new(ErrorKind::InvalidConfig, message));
            }
        }
    }
    if certs.is_empty() {
        let message = format!("ca_file {shown} holds no certificate");
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    Ok(certs)
}
