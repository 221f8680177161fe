#![no_main]

libfuzzer_sys::fuzz_target!(init: moda_tests::fuzz::init(), |data: &[u8]| moda_tests::fuzz::tokenizer(data));
