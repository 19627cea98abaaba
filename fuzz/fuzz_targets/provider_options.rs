//! Fuzz target `provider_options`: see kms_tests::fuzzing::provider_options.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_tests::fuzzing::provider_options(data));
