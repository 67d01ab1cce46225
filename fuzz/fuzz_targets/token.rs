//! p2p network token (agent/p2p/src/token.rs): decode, and what decodes re-encodes to a
//! token that decodes to the same value.
#![no_main]

use kairos_p2p::token::Token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(t) = Token::decode(&text) {
        let again = Token::decode(&t.encode()).expect("an encoded token must decode");
        assert_eq!(again, t);
    }
});
