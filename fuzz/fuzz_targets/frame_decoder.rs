//! Feeds arbitrary bytes, split at arbitrary points, to both sides' frame decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbx_protocol::{Event, FrameDecoder, Request};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len().max(1));
    for decode_events in [true, false] {
        let mut decoder = FrameDecoder::new();
        for part in [&data[..split], &data[split..]] {
            decoder.push(part);
            loop {
                let next = if decode_events {
                    decoder.next_frame::<Event>().map(|f| f.is_some())
                } else {
                    decoder.next_frame::<Request>().map(|f| f.is_some())
                };
                if !matches!(next, Ok(true)) {
                    break;
                }
            }
        }
    }
});
