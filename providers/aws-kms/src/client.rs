//! The AWS KMS client: the SDK, the runtime that drives it from synchronous code, and the
//! mapping of its failures onto [`ErrorKind`]s.
//!
//! # Driving the async SDK from sync code
//!
//! The SDK is async; [`KeyProvider`](kms_core::KeyProvider) methods are sync and are called from
//! many threads at once, from kmsd's worker threads, and possibly from inside another program's
//! tokio runtime (where `Runtime::block_on` would panic). So the provider owns a small tokio
//! runtime with one worker thread of its own: every call is *spawned* onto that runtime and the
//! calling thread waits on a plain channel for the answer. No caller ever enters the runtime,
//! so the caller's own context does not matter, and any number of threads may wait at once
//! (their requests run concurrently on the worker; HTTP connections are pooled). The runtime
//! is shut down in the background when the provider is dropped, which is allowed anywhere.

use std::fmt;
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::types::{KeyState, KeyUsageType};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use kms_core::{Error, ErrorKind, Result};

use crate::Options;

/// A connection to AWS KMS (or a stand-in at `endpoint`), with its own runtime.
pub struct Kms {
    runtime: Option<tokio::runtime::Runtime>,
    client: aws_sdk_kms::Client,
    /// Where requests go, for messages: the endpoint override, else the region.
    location: String,
    /// How long a caller waits for an answer at most: the SDK's operation timeout, plus slack.
    wait: Duration,
}

impl fmt::Debug for Kms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kms")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// What DescribeKey says about a KMS key, as far as this provider needs it.
#[derive(Clone, Debug)]
pub struct KeyDescription {
    /// The key's ARN.
    pub arn: String,
    /// Its state, as KMS names it (`Enabled`, `Disabled`, `PendingDeletion`, ...).
    pub state: String,
}

impl Kms {
    /// Builds the client from `options` and the standard credential chain.
    pub fn connect(options: &Options) -> Result<Kms> {
        let location = options.location();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kms-aws-kms")
            .enable_all()
            .build()
            .map_err(|e| {
                let message = format!("cannot start the runtime of the aws-kms provider: {e}");
                Error::new(ErrorKind::Other, message)
            })?;

        // One TLS stack: rustls over ring, which the rest of kms already uses.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(options.connect_timeout())
            .operation_attempt_timeout(options.attempt_timeout())
            .operation_timeout(options.operation_timeout())
            .build();

        // Standard retries: only transient failures (throttling, 5xx, timeouts, connection
        // errors) are retried, with backoff; a refusal is never retried.
        let retries = RetryConfig::standard().with_max_attempts(options.max_attempts.max(1));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts)
            .retry_config(retries);
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let Some(profile) = &options.profile {
            loader = loader.profile_name(profile.clone());
        }
        let config =
            run_on(&runtime, loader.load(), options.operation_timeout() * 2).ok_or_else(|| {
                let message = format!("loading the AWS configuration for {location} timed out");
                Error::new(ErrorKind::Unavailable, message)
            })?;
        if config.region().is_none() {
            let message = "no AWS region: set `region` in the options or AWS_REGION";
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        Ok(Kms {
            runtime: Some(runtime),
            client: aws_sdk_kms::Client::new(&config),
            location,
            wait: options.operation_timeout() + Duration::from_secs(5),
        })
    }

    /// The SDK client, for callers that build their own requests (tests, tools).
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    /// Where requests go: the endpoint override, else the region.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Runs `future` on the provider's runtime and waits for its answer.
    pub fn call<F>(&self, what: &str, future: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        run_on(runtime, future, self.wait).ok_or_else(|| {
            let message = format!(
                "{what} at {} did not answer within {} s",
                self.location,
                self.wait.as_secs()
            );
            Error::new(ErrorKind::Unavailable, message)
        })
    }

    /// DescribeKey: the key's ARN and state. A key that cannot encrypt (asymmetric, HMAC) is
    /// refused as [`ErrorKind::InvalidConfig`].
    pub fn describe(&self, key_id: &str) -> Result<KeyDescription> {
        let request = self.client.describe_key().key_id(key_id).send();
        let what = format!("DescribeKey of KMS key {key_id}");
        let output = self
            .call(&what, request)?
            .map_err(|e| self.sdk_error(&what, key_id, e))?;
        let metadata = output.key_metadata().ok_or_else(|| {
            let message = format!(
                "{what} at {}: the answer has no key metadata",
                self.location
            );
            Error::new(ErrorKind::Other, message)
        })?;
        let arn = metadata.arn().unwrap_or(metadata.key_id()).to_string();
        // Real KMS always names the usage; a stand-in that does not is given the benefit of
        // the doubt (Encrypt would refuse a key of another usage anyway).
        if metadata
            .key_usage()
            .is_some_and(|usage| *usage != KeyUsageType::EncryptDecrypt)
        {
            let message = format!(
                "KMS key {arn} at {} is not a symmetric encryption key (usage {:?})",
                self.location,
                metadata.key_usage().map(|u| u.as_str())
            );
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        let state = metadata
            .key_state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| "Unknown".to_string());
        Ok(KeyDescription { arn, state })
    }

    /// DescribeKey, refusing a key that is not enabled with the "key disabled" error.
    pub fn describe_enabled(&self, key_id: &str) -> Result<KeyDescription> {
        let described = self.describe(key_id)?;
        if described.state != KeyState::Enabled.as_str() {
            return Err(key_disabled(
                &described.arn,
                &self.location,
                &format!("its state is {}", described.state),
            ));
        }
        Ok(described)
    }

    /// Maps a failed SDK call onto an [`Error`] naming the KMS key and where it was asked.
    pub fn sdk_error<E, R>(&self, what: &str, key: &str, err: SdkError<E, R>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let service = err.as_service_error();
        let service_code = service.and_then(|e| e.code()).map(String::from);
        let detail = match service {
            Some(e) => format!(
                "{} ({})",
                e.code().unwrap_or("an unnamed error"),
                e.message().unwrap_or("no message")
            ),
            None => error_chain(&err),
        };
        let kind = match &err {
            SdkError::ServiceError(_) => None,
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Some(ErrorKind::Unavailable),
            SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => {
                Some(ErrorKind::Unavailable)
            }
            // Failed before anything was sent: most often no credentials in the chain.
            SdkError::DispatchFailure(_) => {
                return before_sending(what, &self.location, &detail);
            }
            // Building the request failed: a bad endpoint, a bad parameter, ...
            SdkError::ConstructionFailure(_) => Some(ErrorKind::InvalidConfig),
            _ => Some(ErrorKind::Other),
        };
        match kind {
            Some(ErrorKind::Unavailable) => {
                let message = format!(
                    "{what} failed: AWS KMS at {} is unreachable or did not answer: {detail}",
                    self.location
                );
                Error::new(ErrorKind::Unavailable, message)
            }
            Some(kind) => Error::new(
                kind,
                format!("{what} at {} failed: {detail}", self.location),
            ),
            None => classify(
                service_code.as_deref().unwrap_or(""),
                what,
                key,
                &self.location,
                &detail,
            ),
        }
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        // Never blocks, so dropping the provider is safe inside an async context too.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A call that failed before reaching KMS: missing credentials are a configuration error,
/// anything else (a credential source that did not answer, say) may pass.
fn before_sending(what: &str, location: &str, detail: &str) -> Error {
    let missing = ["no credentials", "credential provider was not enabled"];
    if missing.iter().any(|m| detail.contains(m)) {
        let message = format!(
            "{what} at {location} was not sent: no AWS credentials (set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, a profile, or a role): {detail}"
        );
        return Error::new(ErrorKind::InvalidConfig, message);
    }
    let message = format!("{what} at {location} was not sent: {detail}");
    Error::new(ErrorKind::Unavailable, message)
}

/// An error and its sources, by their `Display` only: the `Debug` forms of SDK errors dump the
/// raw HTTP response, which does not belong in a message.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    for _ in 0..8 {
        let Some(next) = source else { break };
        let shown = next.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = next.source();
    }
    // One line: the SDK lists the credential sources it tried on lines of their own.
    text.split('\n')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Spawns `future` on `runtime` and waits at most `wait` for its output; `None` on timeout or
/// when the task died.
fn run_on<F>(runtime: &tokio::runtime::Runtime, future: F, wait: Duration) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let task = runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    let answer = rx.recv_timeout(wait).ok();
    if answer.is_none() {
        task.abort();
    }
    answer
}

/// The "key disabled" error: [`ErrorKind::Denied`], since KMS refuses to use the key until an
/// operator enables it (or cancels its deletion); retrying does not help.
pub fn key_disabled(arn: &str, location: &str, why: &str) -> Error {
    let message = format!(
        "KMS key {arn} at {location} is disabled or not usable ({why}): enable the key (or \
         cancel its scheduled deletion) and retry"
    );
    Error::new(ErrorKind::Denied, message)
}

/// The kind and message of a KMS service error with error code `code`.
pub fn classify(code: &str, what: &str, key: &str, location: &str, detail: &str) -> Error {
    let (kind, message) = match code {
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidGrantTokenException" => (
            ErrorKind::Denied,
            format!("{what} was denied by AWS KMS at {location} for KMS key {key}: {detail}"),
        ),
        "ThrottlingException" | "LimitExceededException" | "RequestLimitExceeded" => (
            ErrorKind::Unavailable,
            format!("{what} was throttled by AWS KMS at {location} for KMS key {key}: {detail}"),
        ),
        "DependencyTimeoutException"
        | "KMSInternalException"
        | "KeyUnavailableException"
        | "ServiceUnavailableException"
        | "InternalFailure" => (
            ErrorKind::Unavailable,
            format!("{what} failed: AWS KMS at {location} is unavailable: {detail}"),
        ),
        "DisabledException" | "KMSInvalidStateException" => {
            return key_disabled(key, location, &format!("{what}: {detail}"));
        }
        "InvalidCiphertextException" | "IncorrectKeyException" => (
            ErrorKind::Corrupted,
            format!(
                "{what}: AWS KMS at {location} refused the wrapped key for KMS key {key} (altered, \
                 or moved from another key id or version): {detail}"
            ),
        ),
        // Not the kms NotFound: the key is the KEK, not a kms key.
        "NotFoundException" => (
            ErrorKind::InvalidConfig,
            format!(
                "{what}: KMS key {key} does not exist at {location} (check key_id and region): \
                 {detail}"
            ),
        ),
        "InvalidKeyUsageException" => (
            ErrorKind::InvalidConfig,
            format!("{what}: KMS key {key} at {location} cannot encrypt: {detail}"),
        ),
        _ => (
            ErrorKind::Other,
            format!("{what} at {location} for KMS key {key} failed: {detail}"),
        ),
    };
    Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(code: &str) -> ErrorKind {
        classify(code, "Decrypt", "arn:k", "http://127.0.0.1:1", "d").kind()
    }

    #[test]
    fn service_errors_map_to_kinds() {
        assert_eq!(kind("AccessDeniedException"), ErrorKind::Denied);
        assert_eq!(kind("ThrottlingException"), ErrorKind::Unavailable);
        assert_eq!(kind("DisabledException"), ErrorKind::Denied);
        assert_eq!(kind("KMSInvalidStateException"), ErrorKind::Denied);
        assert_eq!(kind("InvalidCiphertextException"), ErrorKind::Corrupted);
        assert_eq!(kind("NotFoundException"), ErrorKind::InvalidConfig);
        assert_eq!(kind("KMSInternalException"), ErrorKind::Unavailable);
        assert_eq!(kind("SomethingNew"), ErrorKind::Other);
        for code in [
            "AccessDeniedException",
            "NotFoundException",
            "DisabledException",
            "x",
        ] {
            assert_ne!(kind(code), ErrorKind::NotFound);
        }
    }

    #[test]
    fn messages_name_the_key_and_the_endpoint() {
        let throttled = classify("ThrottlingException", "Encrypt", "arn:k", "http://h:1", "d");
        assert!(throttled.message().contains("throttled"), "{throttled}");
        let disabled = classify("DisabledException", "Decrypt", "arn:k", "http://h:1", "d");
        assert!(disabled.message().contains("is disabled"), "{disabled}");
        for err in [throttled, disabled] {
            assert!(err.message().contains("arn:k"), "{err}");
            assert!(err.message().contains("http://h:1"), "{err}");
        }
    }
}
