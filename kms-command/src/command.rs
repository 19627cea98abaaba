//! Running the operator's passphrase command.
//!
//! The template is run by `/bin/sh -c` after its placeholders are replaced: `%p` a prompt,
//! `%R` the terminal's file descriptor (or -1), `%d` the store directory, `%%` a percent sign.
//! `%p` and `%d` are inserted shell-quoted. The command runs in its own process group; on
//! timeout the whole group is killed, background children included.

use std::io::{IsTerminal, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kms_core::{Error, ErrorKind, Result, SecretBytes};
use zeroize::Zeroizing;

/// The most output a passphrase command may print, in bytes.
pub const MAX_OUTPUT: usize = 4096;

/// What a run needs besides the template.
pub struct Invocation<'a> {
    /// The command template.
    pub template: &'a str,
    /// The prompt for `%p`.
    pub prompt: &'a str,
    /// The store directory for `%d`.
    pub dir: &'a Path,
    /// How long the command may take.
    pub timeout: Duration,
}

/// Quotes `text` for `/bin/sh`: single quotes, with each inner `'` as `'\''`.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Replaces the placeholders of `template`. Returns the command line and whether `%R` is used.
pub fn expand(template: &str, prompt: &str, dir: &Path, tty_fd: i32) -> Result<(String, bool)> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut uses_tty = false;
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('p') => out.push_str(&shell_quote(prompt)),
            Some('d') => out.push_str(&shell_quote(&dir.display().to_string())),
            Some('R') => {
                uses_tty = true;
                out.push_str(&tty_fd.to_string());
            }
            Some('%') => out.push('%'),
            other => {
                let shown = other
                    .map(|c| format!("%{c}"))
                    .unwrap_or_else(|| "a lone % at the end".into());
                let message = format!(
                    "passphrase_command has an unknown placeholder {shown}; known are %p %R %d %%"
                );
                return Err(Error::new(ErrorKind::InvalidConfig, message));
            }
        }
    }
    Ok((out, uses_tty))
}

/// Runs the command and returns the passphrase it printed.
pub fn run(inv: &Invocation<'_>) -> Result<SecretBytes> {
    // 1. The command line. %R is the terminal on stdin, passed through only when used.
    let tty_fd = if std::io::stdin().is_terminal() {
        0
    } else {
        -1
    };
    let (line, uses_tty) = expand(inv.template, inv.prompt, inv.dir, tty_fd)?;

    // 2. Start it in its own process group.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&line)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    command.stdin(if uses_tty && tty_fd >= 0 {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().map_err(|e| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("cannot start passphrase command: {e}"),
        )
    })?;
    let pgid = child.id();

    // 3. Read stdout (bounded) and stderr on threads; they end at EOF, which a background
    //    child holding the pipe can delay until the group is killed.
    let (out_tx, out_rx) = mpsc::channel();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        let mut buf = Zeroizing::new(Vec::with_capacity(256));
        let result = (&mut stdout)
            .take(MAX_OUTPUT as u64 + 1)
            .read_to_end(&mut buf)
            .map(|_| ());
        // Drain whatever is left so the writer is not blocked, without keeping it.
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        let _ = out_tx.send(result.map(|_| buf));
    });
    let (err_tx, err_rx) = mpsc::channel();
    let mut stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut buf);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        let _ = err_tx.send(buf);
    });

    // 4. Wait for both the exit and the end of stdout, until the deadline.
    let deadline = Instant::now() + inv.timeout;
    let kill_group = || {
        if let Some(pid) = rustix::process::Pid::from_raw(pgid as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    };
    let output = out_rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .ok();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) if output.is_some() => break Some(status),
            Ok(_) if Instant::now() >= deadline => break None,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group();
                let _ = child.wait();
                return Err(Error::new(
                    ErrorKind::Other,
                    format!("cannot wait for passphrase command: {e}"),
                ));
            }
        }
    };
    let (Some(status), Some(output)) = (status, output) else {
        kill_group();
        let _ = child.wait();
        let message = format!(
            "passphrase command timed out after {}s and was killed with its process group",
            inv.timeout.as_secs_f64()
        );
        return Err(Error::new(ErrorKind::Unavailable, message));
    };
    // Whatever the shell left behind in its group goes too.
    kill_group();
    let stderr = err_rx
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();

    // 5. The exit status, then the output.
    if !status.success() {
        let how = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            _ => "failed".to_string(),
        };
        let first = String::from_utf8_lossy(&stderr);
        let first = first.lines().next().unwrap_or("").trim();
        let detail = if first.is_empty() {
            String::new()
        } else {
            format!(": {}", kms_core::show_untrusted(first.as_bytes()))
        };
        let message = format!("passphrase command {how}{detail}");
        return Err(Error::new(ErrorKind::Denied, message));
    }
    let output = output.map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("cannot read the passphrase command's output: {e}"),
        )
    })?;
    parse_output(&output)
}

/// Checks and trims the command's output: one trailing LF or CRLF is removed; an empty result,
/// any other CR or LF, a NUL, or more than [`MAX_OUTPUT`] bytes is refused. Spaces are kept.
pub fn parse_output(output: &[u8]) -> Result<SecretBytes> {
    let refuse = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("passphrase command output {why}"),
        ))
    };
    if output.len() > MAX_OUTPUT {
        return refuse(&format!("is longer than {MAX_OUTPUT} bytes"));
    }
    let trimmed = output
        .strip_suffix(b"\r\n")
        .or_else(|| output.strip_suffix(b"\n"))
        .unwrap_or(output);
    if trimmed.is_empty() {
        return refuse("is empty");
    }
    if trimmed.contains(&0) {
        return refuse("holds a NUL byte");
    }
    if trimmed.iter().any(|b| *b == b'\n' || *b == b'\r') {
        return refuse("holds more than one line");
    }
    Ok(SecretBytes::copy_from(trimmed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let (line, tty) = expand("get %p %d %R 100%%", "it's", Path::new("/a b"), -1).unwrap();
        assert_eq!(line, "get 'it'\\''s' '/a b' -1 100%");
        assert!(tty);
        assert!(expand("x %q", "", Path::new("/"), -1).is_err());
        assert!(expand("x %", "", Path::new("/"), -1).is_err());
    }

    #[test]
    fn output_rules() {
        for ok in [&b"pw"[..], b"pw\n", b"pw\r\n"] {
            assert_eq!(parse_output(ok).unwrap().expose_secret(), b"pw");
        }
        assert_eq!(parse_output(b" pw \n").unwrap().expose_secret(), b" pw ");
        for bad in [
            &b""[..],
            b"\n",
            b"\r\n",
            b"a\nb",
            b"a\rb",
            b"pw\n\n",
            b"p\0w",
            b"pw\r",
        ] {
            let err = parse_output(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(parse_output(&[b'a'; MAX_OUTPUT + 1]).is_err());
    }
}
