//! Fuzz target `file_reader`: see kms_tests::fuzzing::file_reader.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_tests::fuzzing::file_reader(data));
