//! Splits a remote stream into a step's output and the end-of-step marker that the root shell
//! prints after each request (`\n<marker> <exit code>\n`).

/// Scans one stream (stdout or stderr) of the root shell channel.
///
/// Bytes that cannot be part of a marker are released at once, so output streams live; a possible
/// marker prefix at the end of the buffer is held back until the next chunk decides it.
#[derive(Debug)]
pub struct MarkerScanner {
    needle: Vec<u8>,
    pending: Vec<u8>,
}

/// What one [`MarkerScanner::feed`] produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    /// Output of the current request, in order.
    pub output: Vec<u8>,
    /// The exit code, once the marker line has been seen.
    pub done: Option<i32>,
}

impl MarkerScanner {
    pub fn new(marker: &str) -> Self {
        let mut needle = Vec::with_capacity(marker.len() + 2);
        needle.push(b'\n');
        needle.extend_from_slice(marker.as_bytes());
        needle.push(b' ');
        MarkerScanner {
            needle,
            pending: Vec::new(),
        }
    }

    /// Feeds a chunk. Once `done` is returned, bytes after the marker line stay buffered for the
    /// next request (a background process of the previous step may still write).
    pub fn feed(&mut self, data: &[u8]) -> Scanned {
        self.pending.extend_from_slice(data);
        self.scan()
    }

    /// Scans what is buffered without adding anything (after a request finished).
    pub fn scan(&mut self) -> Scanned {
        if let Some(at) = find(&self.pending, &self.needle) {
            let after = at + self.needle.len();
            if let Some(nl) = self.pending[after..].iter().position(|&b| b == b'\n') {
                let code = std::str::from_utf8(&self.pending[after..after + nl])
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .unwrap_or(-1);
                let output = self.pending[..at].to_vec();
                self.pending.drain(..after + nl + 1);
                return Scanned {
                    output,
                    done: Some(code),
                };
            }
            // Marker seen but its line is incomplete: release what precedes it.
            let output: Vec<u8> = self.pending.drain(..at).collect();
            return Scanned { output, done: None };
        }
        let keep = partial_suffix(&self.pending, &self.needle);
        let release = self.pending.len() - keep;
        Scanned {
            output: self.pending.drain(..release).collect(),
            done: None,
        }
    }

    /// Whatever is still held back (used when the stream ends without a marker).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `buf` that is a proper prefix of `needle`.
fn partial_suffix(buf: &[u8], needle: &[u8]) -> usize {
    let max = needle.len().saturating_sub(1).min(buf.len());
    (1..=max)
        .rev()
        .find(|&n| buf[buf.len() - n..] == needle[..n])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "JBAKE-0123";

    #[test]
    fn whole_marker_in_one_chunk() {
        let mut s = MarkerScanner::new(M);
        let r = s.feed(b"hello\nworld\n\nJBAKE-0123 7\nnext");
        assert_eq!(r.output, b"hello\nworld\n");
        assert_eq!(r.done, Some(7));
        assert_eq!(s.take_rest(), b"next");
    }

    #[test]
    fn output_without_trailing_newline() {
        let mut s = MarkerScanner::new(M);
        let r = s.feed(b"no newline\nJBAKE-0123 0\n");
        assert_eq!(r.output, b"no newline");
        assert_eq!(r.done, Some(0));
    }

    #[test]
    fn marker_split_across_every_byte() {
        let mut s = MarkerScanner::new(M);
        let input = b"abc\n\nJBAKE-0123 42\n";
        let mut out = Vec::new();
        let mut done = None;
        for b in input.iter() {
            let r = s.feed(std::slice::from_ref(b));
            out.extend(r.output);
            if r.done.is_some() {
                done = r.done;
            }
        }
        assert_eq!(out, b"abc\n");
        assert_eq!(done, Some(42));
    }

    #[test]
    fn lookalike_is_released() {
        let mut s = MarkerScanner::new(M);
        let r = s.feed(b"x\nJBAKE-01");
        assert_eq!(r.output, b"x");
        let r = s.feed(b"99 not it\n");
        assert_eq!(r.output, b"\nJBAKE-0199 not it");
        assert_eq!(r.done, None);
        // A final newline may start the marker: it is held until the next chunk decides.
        assert_eq!(s.take_rest(), b"\n");
    }

    #[test]
    fn leftover_is_scanned_for_the_next_request() {
        let mut s = MarkerScanner::new(M);
        let r = s.feed(b"a\nJBAKE-0123 0\nb\nJBAKE-0123 1\n");
        assert_eq!((r.output.as_slice(), r.done), (&b"a"[..], Some(0)));
        let r = s.scan();
        assert_eq!((r.output.as_slice(), r.done), (&b"b"[..], Some(1)));
    }
}
