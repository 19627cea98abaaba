//! The mock provider in-process, as a trait object: conformance, fault injection, counters.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use kms_core::config::{Config, Registry};
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};
use kms_mock::{MockProvider, Options};

fn id(text: &str) -> KeyId {
    KeyId::new(text).unwrap()
}

#[test]
fn conforms_as_a_trait_object() {
    let provider: Box<dyn KeyProvider> = Box::new(MockProvider::new());
    kms_core::conformance::assert_conforms(provider.as_ref());
    assert_eq!(provider.to_string(), "mock provider");
    let caps = provider.capabilities();
    assert!(caps.list && caps.delete && caps.versions && !caps.durable);
}

#[test]
fn fail_next_fails_that_many_calls_with_the_kind_then_serves() {
    let mock = MockProvider::new();
    mock.fail_next(2, ErrorKind::Denied);
    for _ in 0..2 {
        let err = mock
            .get_or_create(&id("a"), KeySpec::default())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied);
        assert!(
            err.to_string()
                .starts_with("mock provider: injected denied failure")
        );
        assert_eq!(err.key_id(), Some(&id("a")));
    }
    let key = mock.get_or_create(&id("a"), KeySpec::default()).unwrap();
    assert_eq!(
        mock.get(&id("a")).unwrap().expose_secret(),
        key.expose_secret()
    );
}

#[test]
fn an_injected_unavailable_never_turns_into_a_create() {
    let mock = MockProvider::new();
    mock.fail_next(1, ErrorKind::Unavailable);
    let err = mock
        .get_or_create(&id("b"), KeySpec::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(mock.is_empty(), "a failed call stored a key");
}

#[test]
fn counters_count_every_call_failed_ones_included() {
    let mock = MockProvider::new();
    let _ = mock.get(&id("c"));
    mock.create(&id("c"), KeySpec::default()).unwrap();
    mock.fail_next(1, ErrorKind::Unavailable);
    let _ = mock.get(&id("c"));
    mock.get(&id("c")).unwrap();
    mock.rotate(&id("c"), KeySpec::default()).unwrap();
    mock.get_version(&id("c"), 1).unwrap();
    mock.list("").unwrap();
    mock.delete(&id("c")).unwrap();
    mock.get_or_create(&id("d"), KeySpec::default()).unwrap();
    let calls = mock.calls();
    assert_eq!(
        (calls.get, calls.create, calls.rotate, calls.get_version),
        (3, 1, 1, 1)
    );
    assert_eq!((calls.list, calls.delete, calls.get_or_create), (1, 1, 1));
    assert_eq!(calls.total(), 9);
}

#[test]
fn latency_delays_every_call() {
    let mock = MockProvider::new();
    mock.set_latency(Duration::from_millis(30));
    let started = Instant::now();
    let _ = mock.get(&id("slow"));
    let _ = mock.list("");
    assert!(started.elapsed() >= Duration::from_millis(60));
    mock.set_latency(Duration::ZERO);
}

#[test]
fn panic_on_panics_in_get_and_create_of_that_id_only() {
    let mock = MockProvider::new();
    mock.panic_on(Some(id("boom")));
    for call in [
        Box::new(|| drop(mock.get(&id("boom")))) as Box<dyn Fn()>,
        Box::new(|| drop(mock.create(&id("boom"), KeySpec::default()))),
    ] {
        let outcome = catch_unwind(AssertUnwindSafe(call));
        assert!(outcome.is_err(), "the call did not panic");
    }
    // The mock goes on serving other ids after the panics.
    mock.create(&id("calm"), KeySpec::default()).unwrap();
    mock.panic_on(None);
    assert_eq!(
        mock.get(&id("boom")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn options_arm_the_faults() {
    let options: Options = kms_core::config::parse_options(
        "mock",
        &"fail_next = 1\nfail_kind = \"wrong-kek\"\nlatency_ms = 1\npanic_on = \"p/q\""
            .parse()
            .unwrap(),
    )
    .unwrap();
    let mock = MockProvider::with_options(&options).unwrap();
    assert_eq!(mock.get(&id("x")).unwrap_err().kind(), ErrorKind::WrongKek);
    assert_eq!(mock.get(&id("x")).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(catch_unwind(AssertUnwindSafe(|| mock.get(&id("p/q")))).is_err());
}

#[test]
fn bad_options_are_invalid_config_naming_the_option() {
    let mut registry = Registry::new();
    registry.register(kms_mock::registered());
    for (options, needle) in [
        ("fail_kind = \"flaky\"", "fail_kind"),
        ("panic_on = \"../x\"", "panic_on"),
        ("fial_next = 1", "fial_next"),
    ] {
        let text = format!("[provider]\nname = \"mock\"\n[provider.options]\n{options}\n");
        let config = Config::parse(&text, Default::default()).unwrap();
        let err = registry
            .open(&config)
            .err()
            .expect("bad options are refused");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn the_registry_opens_it_by_name() {
    let mut registry = Registry::new();
    registry.register(kms_mock::registered());
    let config = Config::parse("[provider]\nname = \"mock\"\n", Default::default()).unwrap();
    let provider = registry.open(&config).unwrap();
    let key = provider
        .get_or_create(&id("r"), KeySpec::default())
        .unwrap();
    assert_eq!(key.expose_secret().len(), 32);
    let err = registry.init(&config).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
}
