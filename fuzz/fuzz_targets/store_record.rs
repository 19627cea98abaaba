//! Fuzz target `store_record`: see kms_tests::fuzzing::store_record.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_tests::fuzzing::store_record(data));
