//! Feeds arbitrary bytes to the token-response parser: it must never panic, and a
//! token it accepts must be a sensitive header with a clamped lifetime.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    eshopbox_auth::__fuzz_token_response(body);
});
