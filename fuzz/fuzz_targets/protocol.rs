//! Fuzz target `protocol`: see kms_tests::fuzzing::protocol.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_tests::fuzzing::protocol(data));
