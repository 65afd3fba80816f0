//! The permessage-deflate codec (RFC 7692) without context takeover: every message is deflated
//! and inflated on its own, so that a connection keeps no compression state between messages
//! and one compressed broadcast can go to every subscriber. (Negotiation and framing are the
//! WebSocket layer's: `transport/ws.rs`.)
//!
//! The compressor and decompressor are one of each per thread, reset for every message: a
//! zlib compressor holds about 260 KB (window, hash chains, buffers) and a decompressor 40 KB,
//! far too much to keep per idle connection; a reset costs a few microseconds (zlib-rs, level
//! 2; miniz_oxide's reset took five times as long, measured on 106-byte to 74 KB JSON).

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Messages shorter than this are sent uncompressed. Deflated without a shared window, JSON
/// under ~130 bytes hardly shrinks (measured: a 65-byte reply and a 48-byte chat message not
/// at all, 83 → 78 and 106 → 93 bytes), while each compression resets the compressor (a few
/// µs).
pub(crate) const MIN_SIZE: usize = 128;

/// The compression level: zlib-rs's level 2 deflates JSON as well as level 6 (a 1,000-user
/// presence list 10.2× against 10.1×) in a third of the time; level 1 is its quick strategy,
/// 6.4× on the same list.
const LEVEL: u32 = 2;

/// Every sync-flushed deflate block ends with these bytes, which RFC 7692 §7.2.1 removes from
/// the message (and the receiver adds back, §7.2.2).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

thread_local! {
    static COMPRESS: RefCell<Option<Compress>> = const { RefCell::new(None) };
    static DECOMPRESS: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// `data` deflated as one message (RFC 7692 §7.2.1, no context takeover), when it is worth it:
/// `None` for a message under [`MIN_SIZE`] or one that would not get shorter.
pub(crate) fn compress(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < MIN_SIZE {
        return None;
    }
    COMPRESS.with(|c| {
        let mut c = c.borrow_mut();
        let c = c.get_or_insert_with(|| Compress::new(Compression::new(LEVEL), false));
        c.reset();
        // Room for the message as it is plus the tail: a compressed form that fills it is not
        // shorter, and is given up. When the output has room left, the flush is complete.
        let mut out = Vec::with_capacity(data.len() + TAIL.len());
        let done = c.compress_vec(data, &mut out, FlushCompress::Sync).is_ok()
            && c.total_in() == data.len() as u64
            && out.len() < out.capacity()
            && out.ends_with(&TAIL);
        if !done {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < data.len()).then_some(out)
    })
}

/// A compressor kept by one connection, its window carried from message to message: the usual
/// permessage-deflate with context takeover, Phoenix's way, which costs a zlib compressor
/// (~260 KB) per connection and compresses a broadcast once per subscriber. firebrand does not
/// compress this way; the benchmark that compares both does
/// ([`crate::benching::compress_per_connection`]). Made with the connection, as Phoenix does.
pub(crate) struct Kept(Box<Compress>);

impl Kept {
    pub(crate) fn new() -> Self {
        Kept(Box::new(Compress::new(Compression::new(LEVEL), false)))
    }

    /// `data` deflated as the next message of this connection's stream, or `None` for a
    /// message under [`MIN_SIZE`] (sent uncompressed, it stays out of the window). Once fed to
    /// the compressor a message is always sent compressed, even if no shorter: the client's
    /// window must hold what the compressor's holds.
    pub(crate) fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < MIN_SIZE {
            return None;
        }
        let c = &mut self.0;
        let start = c.total_in();
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        loop {
            let used = (c.total_in() - start) as usize;
            c.compress_vec(&data[used..], &mut out, FlushCompress::Sync)
                .ok()?;
            if c.total_in() - start == data.len() as u64 && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        out.truncate(out.len().saturating_sub(TAIL.len()));
        Some(out)
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates to more than the limit (it was not inflated further).
    TooBig,
    /// It is not valid deflate data, or refers to a window it does not carry.
    Invalid,
}

/// Inflates one compressed message (its frames' payloads, without the tail RFC 7692 removes)
/// to at most `max_size` bytes: a message that would be larger is refused as soon as its
/// output passes the limit, however much more it would inflate to.
pub(crate) fn inflate(data: &[u8], max_size: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESS.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let result = inflate_with(d, data, max_size);
        if result.is_err() {
            // Half-inflated state is not reused.
            d.reset(false);
        }
        result
    })
}

fn inflate_with(d: &mut Decompress, data: &[u8], max_size: usize) -> Result<Vec<u8>, InflateError> {
    // At most one byte past the limit is ever produced: that byte says the limit is passed.
    let cap = max_size.saturating_add(1);
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).max(64).min(cap));
    for input in [data, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let used = (d.total_in() - start) as usize;
            let status = d
                .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            if out.len() > max_size {
                return Err(InflateError::TooBig);
            }
            let used = (d.total_in() - start) as usize;
            if out.len() == out.capacity() {
                // Full: there may be more output, even with the input all read.
                out.reserve((out.capacity()).min(cap - out.len()));
                continue;
            }
            match status {
                Status::StreamEnd => break,
                _ if used == input.len() => break,
                // No progress with room to spare: the input is broken.
                Status::BufError => return Err(InflateError::Invalid),
                Status::Ok => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[null,null,\"room:lobby\",\"new_msg\",{\"items\":[");
        while s.len() < n {
            s.push_str("{\"user\":\"alice\",\"body\":\"hello\"},");
        }
        s.push_str("{}]}]");
        s.into_bytes()
    }

    #[test]
    fn messages_round_trip_and_small_ones_stay_as_they_are() {
        assert_eq!(compress(&json(110)[..100]), None);
        for n in [200, 5_000, 300_000] {
            let data = json(n);
            let z = compress(&data).unwrap();
            assert!(z.len() * 2 < data.len(), "{n}: {}", z.len());
            assert!(!z.ends_with(&TAIL));
            assert_eq!(inflate(&z, data.len()).unwrap(), data);
            assert_eq!(inflate(&z, data.len() - 1), Err(InflateError::TooBig));
        }
    }

    #[test]
    fn incompressible_messages_are_not_compressed() {
        // A pseudo-random sequence: deflate cannot shorten it.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(compress(&data), None);
    }

    #[test]
    fn a_deflate_bomb_is_never_inflated_past_the_limit() {
        // 4 MB of zeros deflate to about 4 KB.
        let zeros = vec![0u8; 4 << 20];
        let z = compress(&zeros).unwrap();
        assert!(z.len() < 10_000, "{}", z.len());
        assert_eq!(inflate(&z, 1 << 20), Err(InflateError::TooBig));
        // The decompressor is reset: the next message inflates.
        let data = json(1000);
        assert_eq!(inflate(&compress(&data).unwrap(), 1 << 20).unwrap(), data);
    }

    #[test]
    fn a_kept_context_refers_back_and_inflates_with_the_same_window() {
        let mut kept = Kept::new();
        assert_eq!(kept.compress(&json(110)[..100]), None);
        let data = json(600);
        let first = kept.compress(&data).unwrap();
        let second = kept.compress(&data).unwrap();
        assert!(
            second.len() * 4 < first.len(),
            "{} vs {}",
            second.len(),
            first.len()
        );
        // The client's inflater keeps its window too.
        let mut d = Decompress::new(false);
        for z in [first, second] {
            assert_eq!(inflate_with(&mut d, &z, 1 << 20).unwrap(), data);
        }
    }

    #[test]
    fn broken_data_is_refused() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 100),
            Err(InflateError::Invalid)
        );
        // A back-reference into a window that this message does not carry (a client that
        // kept its context although told not to).
        let data = json(1000);
        let mut c = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(4096);
        c.compress_vec(&data, &mut out, FlushCompress::Sync)
            .unwrap();
        let first = out.len();
        c.compress_vec(&data, &mut out, FlushCompress::Sync)
            .unwrap();
        let second = &out[first..out.len() - 4];
        assert_eq!(inflate(second, 1 << 20), Err(InflateError::Invalid));
        // An empty message (RFC 7692 §7.2.3.6: a single empty stored or fixed block).
        assert_eq!(inflate(&[0x02, 0x00], 100).unwrap(), b"");
        assert_eq!(inflate(&[], 100).unwrap(), b"");
        // Limits smaller than the first allocation.
        assert_eq!(
            inflate(&compress(&json(1000)).unwrap(), 5),
            Err(InflateError::TooBig)
        );
        assert_eq!(inflate(&[0x02, 0x00], 0).unwrap(), b"");
    }
}
