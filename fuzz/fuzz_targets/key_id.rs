//! Fuzz target `key_id`: see kms_tests::fuzzing::key_id.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_tests::fuzzing::key_id(data));
