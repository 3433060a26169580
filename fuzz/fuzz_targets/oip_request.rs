//! Any bytes as an inference request body, with and without a binary section.
#![no_main]

use falaj_agent::oip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = oip::decode_request(data, None);
    if let Some((&split, rest)) = data.split_first() {
        let _ = oip::decode_request(rest, Some(usize::from(split).min(rest.len())));
    }
});
