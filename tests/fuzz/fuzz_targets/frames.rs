//! The daemon's first contact with a client: arbitrary bytes, cut into arbitrary reads, through
//! the frame decoder and the request parser. Nothing may panic, and a frame the decoder hands
//! out is never larger than the cap.
#![no_main]

use amidala::proto::{decode, encode_frame, FrameDecoder, Request, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the stream is cut into reads.
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut % 64) + 1;
    let mut decoder = FrameDecoder::new();
    for chunk in stream.chunks(step) {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX_FRAME);
                    if let Ok(request) = decode::<Request>(&body) {
                        // What parses must encode again, within the cap, and parse the same.
                        let frame = encode_frame(&request).expect("a decoded request encodes");
                        let again: Request = decode(&frame[4..]).expect("and decodes");
                        assert_eq!(again, request);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
