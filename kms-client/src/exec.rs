//! The `exec` provider: keys served by a helper program of any language, spoken to in
//! protocol v1 over its standard input and output. The helper lives in its own process, so a
//! crash in it cannot take kms down: the call fails with "unavailable", and the next call
//! starts the helper again.
//!
//! ```toml
//! [provider]
//! name = "exec"
//! [provider.options]
//! command = ["python3", "/usr/lib/kms/json_provider.py", "/var/lib/kms/keys.json"]
//! timeout = 30     # seconds allowed for each answer
//! ```
//!
//! The helper prints the greeting `KMS/1 <name>` first, then answers one line per request.
//! Its standard error is passed through to kms's; it must never print key material there.

use std::fmt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use kms_core::config::{self, Context, Registered};
use kms_core::protocol::Request;
use kms_core::{Error, ErrorKind, Key, KeyId, KeyInfo, KeyProvider, KeySpec, Result};
use serde::Deserialize;

use crate::Client;

/// The options of the exec provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The program and its arguments; relative paths resolve against the configuration file.
    pub command: Vec<String>,
    /// Seconds allowed for each answer (and for the greeting); default 30.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

fn default_timeout() -> f64 {
    30.0
}

/// The registry entry of the exec provider, under the name `exec`.
pub fn registered() -> Registered {
    Registered {
        name: "exec",
        summary: "keys served by a helper program over protocol v1 on stdin/stdout",
        open: |context, table| {
            Ok(Box::new(ExecProvider::open(context, table)?) as Box<dyn KeyProvider>)
        },
        init: None,
    }
}

struct Running {
    child: Child,
    client: Client,
}

/// A provider whose keys are served by a helper process.
pub struct ExecProvider {
    name: String,
    program: std::path::PathBuf,
    args: Vec<String>,
    timeout: Duration,
    running: Mutex<Option<Running>>,
}

impl ExecProvider {
    /// Checks the options and starts the helper.
    pub fn open(context: &Context, table: &toml::Table) -> Result<ExecProvider> {
        let options: Options = config::parse_options("exec", table)?;
        let Some((program, args)) = options.command.split_first() else {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "exec: command is empty",
            ));
        };
        if !(options.timeout > 0.0 && options.timeout <= 3600.0) {
            let message = format!(
                "exec: timeout must be between 0 and 3600 s, not {}",
                options.timeout
            );
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        let program = if program.contains('/') {
            config::resolve(&context.base_dir, program.as_ref())
        } else {
            program.into()
        };
        let provider = ExecProvider {
            name: format!("exec provider {}", program.display()),
            program,
            args: args.to_vec(),
            timeout: Duration::from_secs_f64(options.timeout),
            running: Mutex::new(None),
        };
        let started = provider.start()?;
        *provider.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
        Ok(provider)
    }

    fn start(&self) -> Result<Running> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                let message = format!("cannot start {}: {e}", self.name);
                Error::new(ErrorKind::Unavailable, message)
            })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        match Client::over(
            Box::new(stdout),
            Box::new(stdin),
            self.name.clone(),
            self.timeout,
        ) {
            Ok(client) => Ok(Running { child, client }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Runs `f` on the helper, starting it if it is not running. A transport failure stops the
    /// helper, so that the next call starts a fresh one.
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let mut slot = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.start()?);
        }
        let running = slot.as_mut().expect("just started");
        let result = f(&mut running.client);
        let broken = matches!(&result, Err(e) if e.kind() == ErrorKind::Unavailable && e.message().contains(&self.name));
        if broken && let Some(mut dead) = slot.take() {
            let _ = dead.child.kill();
            let status = dead.child.wait().ok();
            if let Some(status) = status.filter(|s| !s.success()) {
                let e = result.err().expect("broken means failed");
                return Err(e.context(format!("helper exited ({status})")));
            }
        }
        result
    }
}

impl Drop for ExecProvider {
    fn drop(&mut self) {
        let slot = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut running) = slot.take() {
            // Closing stdin asks the helper to exit; it is killed if it does not.
            drop(running.client);
            std::thread::sleep(Duration::from_millis(1));
            if running.child.try_wait().ok().flatten().is_none() {
                let _ = running.child.kill();
            }
            let _ = running.child.wait();
        }
    }
}

impl fmt::Display for ExecProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

crate::protocol_provider!(ExecProvider);
