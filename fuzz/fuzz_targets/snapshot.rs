#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| exitless::fuzzing::snapshot(data));
