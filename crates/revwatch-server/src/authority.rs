//! Tolerates the `:authority` that etcd 3.4's clients send for per-endpoint calls.
//!
//! `etcdctl --endpoints http://host:port endpoint status` (and `hashkv`, and any
//! clientv3 program dialing one endpoint directly) puts the endpoint URL itself, scheme
//! included, into the HTTP/2 `:authority` pseudo-header. etcd's Go server accepts that;
//! the `h2` crate under tonic refuses the stream as malformed (`PROTOCOL_ERROR`) and
//! offers no option to relax the check. So every accepted connection goes through
//! [`AuthorityFix`], which reads the client's frames before `h2` does and, in header
//! blocks only, replaces an authority of the form `scheme://host:port[/...]` by
//! `host:port`.
//!
//! A gRPC client sends one authority for every request of a connection, so the first
//! header block decides. If its authority is well formed, that block and everything
//! after it pass straight through: after its first request a connection costs nothing
//! more than a plain socket. Otherwise every header block of the connection is decoded
//! (HPACK's dynamic table is per connection, so all of them must be), fixed and
//! re-encoded by our own encoder, which `h2` decodes with the table it started with.
//! Other frames (DATA, SETTINGS, ...) are passed through untouched. Input the filter
//! cannot parse is passed on as is from then on, for `h2` to reject as it would have
//! anyway.
//!
//! Over 600 lines, kept whole on purpose: about 400 are the filter (one HTTP/2 frame
//! state machine and the thin `AsyncRead` shell that feeds it), the rest its tests, which
//! drive byte streams through the shell exactly as a connection does. Split, neither half
//! reads on its own.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 peer must accept; re-encoded blocks are split to it.
const MAX_FRAME: usize = 16_384;
/// Read granularity from the socket.
const READ_CHUNK: usize = 16 * 1024;
/// Largest header block collected: far above the 16 KiB header list h2 accepts, which
/// it enforces itself.
const MAX_BLOCK: usize = 256 * 1024;

/// An accepted connection whose inbound header blocks have their `:authority` fixed.
pub(crate) struct AuthorityFix<IO> {
    io: IO,
    filter: Filter,
    /// Where socket reads land before the filter takes them.
    scratch: Box<[u8]>,
    eof: bool,
}

impl<IO> AuthorityFix<IO> {
    pub(crate) fn new(io: IO) -> Self {
        AuthorityFix {
            io,
            filter: Filter::default(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.filter.is_passing() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            if !this.filter.out.is_empty() {
                let n = this.filter.out.len().min(buf.remaining());
                buf.put_slice(&this.filter.out[..n]);
                this.filter.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What is left is an incomplete frame: hand it on for h2 to judge.
                this.filter.flush_raw();
                if this.filter.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.filter.process();
            if !this.filter.out.is_empty() {
                continue;
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
            } else {
                this.filter.raw.extend_from_slice(rb.filled());
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for AuthorityFix<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The inbound byte stream's parser and rewriter: bytes go from `raw` (read from the
/// socket) to `out` (for h2), a frame at a time, until the filter is done with them.
struct Filter {
    raw: BytesMut,
    out: BytesMut,
    /// Preface bytes still to pass.
    preface: usize,
    /// Bytes of the current non-header frame still to pass.
    passing: usize,
    /// A header block split over CONTINUATION frames, until its last frame.
    block: Option<Block>,
    mode: Mode,
}

enum Mode {
    /// Until the first header block is complete.
    Probing,
    /// The first block needed a fix: every block is decoded, fixed and re-encoded.
    Rewriting {
        decoder: Box<Decoder<'static>>,
        encoder: Box<Encoder<'static>>,
    },
    /// Nothing to do for this connection (or nothing it could do): bytes pass as they
    /// come, once what is buffered has gone.
    Passing,
}

impl Default for Filter {
    fn default() -> Self {
        Filter {
            raw: BytesMut::new(),
            out: BytesMut::new(),
            preface: PREFACE_LEN,
            passing: 0,
            block: None,
            mode: Mode::Probing,
        }
    }
}

/// A header block being collected.
struct Block {
    stream: u32,
    /// END_STREAM and the priority fields of its HEADERS frame, to carry over.
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// Its frames as received, to pass on unchanged when no change is needed.
    original: Vec<u8>,
}

impl Filter {
    /// Moves as much of `raw` to `out` as can be decided without more input.
    fn process(&mut self) {
        loop {
            if matches!(self.mode, Mode::Passing) {
                self.flush_raw();
                return;
            }
            if self.preface > 0 || self.passing > 0 {
                let want = if self.preface > 0 {
                    &mut self.preface
                } else {
                    &mut self.passing
                };
                let n = (*want).min(self.raw.len());
                if n == 0 {
                    return;
                }
                *want -= n;
                self.out.extend_from_slice(&self.raw.split_to(n));
                continue;
            }
            if self.raw.len() < FRAME_HEADER_LEN {
                return;
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            let kind = self.raw[3];
            if kind != HEADERS && kind != CONTINUATION && self.block.is_none() {
                self.passing = FRAME_HEADER_LEN + len;
                continue;
            }
            if len > MAX_FRAME {
                // Larger than h2 accepts: it will refuse the frame itself.
                self.give_up(&[]);
                return;
            }
            if self.raw.len() < FRAME_HEADER_LEN + len {
                return;
            }
            let frame = self.raw.split_to(FRAME_HEADER_LEN + len);
            if self.header_frame(&frame).is_none() {
                self.give_up(&frame);
            }
        }
    }

    /// Takes one HEADERS or CONTINUATION frame; `None` if it breaks the protocol.
    fn header_frame(&mut self, frame: &[u8]) -> Option<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        match (kind, &mut self.block) {
            (HEADERS, None) => {
                let mut p = payload;
                let pad = if flags & PADDED != 0 {
                    let (&n, rest) = p.split_first()?;
                    p = rest;
                    n as usize
                } else {
                    0
                };
                let priority = if flags & PRIORITY != 0 {
                    let fields: [u8; 5] = p.get(..5)?.try_into().ok()?;
                    p = &p[5..];
                    Some(fields)
                } else {
                    None
                };
                let fragment = p.get(..p.len().checked_sub(pad)?)?;
                self.block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    original: frame.to_vec(),
                });
            }
            (CONTINUATION, Some(block))
                if block.stream == stream && block.original.len() + frame.len() <= MAX_BLOCK =>
            {
                block.fragment.extend_from_slice(payload);
                block.original.extend_from_slice(frame);
            }
            _ => return None,
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take()?;
            self.finish_block(block);
        }
        Some(())
    }

    /// True once bytes can go from the socket to h2 as they are.
    fn is_passing(&self) -> bool {
        matches!(self.mode, Mode::Passing) && self.raw.is_empty() && self.out.is_empty()
    }

    /// Decodes a complete block and passes it on, unchanged or re-encoded.
    fn finish_block(&mut self, block: Block) {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut needs_fix = false;
        let mut decode = |decoder: &mut Decoder<'static>| {
            decoder.decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                let value = match fixed_authority(&name, &value) {
                    Some(host) => {
                        needs_fix = true;
                        host.to_vec()
                    }
                    None => value.into_owned(),
                };
                fields.push((name.into_owned(), value));
            })
        };
        match &mut self.mode {
            Mode::Probing => {
                let mut decoder = Box::new(Decoder::new());
                // An undecodable block: h2 will find the same error in the same bytes.
                if decode(&mut decoder).is_err() || !needs_fix {
                    self.give_up(&block.original);
                    return;
                }
                self.mode = Mode::Rewriting {
                    decoder,
                    encoder: Box::new(Encoder::new()),
                };
            }
            Mode::Rewriting { decoder, .. } => {
                if decode(decoder).is_err() {
                    self.give_up(&block.original);
                    return;
                }
            }
            Mode::Passing => {
                self.out.extend_from_slice(&block.original);
                return;
            }
        }
        let Mode::Rewriting { encoder, .. } = &mut self.mode else {
            return;
        };
        let mut encoded = Vec::new();
        let headers = fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice()));
        if encoder.encode_into(headers, &mut encoded).is_err() {
            self.give_up(&block.original);
            return;
        }
        self.write_block(&block, &encoded);
    }

    /// Writes `encoded` as one HEADERS frame and as many CONTINUATION frames as needed.
    fn write_block(&mut self, block: &Block, encoded: &[u8]) {
        let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        let first = encoded.len().min(MAX_FRAME - priority.len());
        let (head, mut rest) = encoded.split_at(first);
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if !priority.is_empty() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame_header(priority.len() + head.len(), HEADERS, flags, block.stream);
        self.out.extend_from_slice(priority);
        self.out.extend_from_slice(head);
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let flags = if tail.is_empty() { END_HEADERS } else { 0 };
            self.frame_header(n, CONTINUATION, flags, block.stream);
            self.out.extend_from_slice(chunk);
            rest = tail;
        }
    }

    fn frame_header(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        self.out.put_uint(len as u64, 3);
        self.out.put_u8(kind);
        self.out.put_u8(flags);
        self.out.put_u32(stream);
    }

    /// Stops filtering: `pending` and everything after it pass unchanged.
    fn give_up(&mut self, pending: &[u8]) {
        self.mode = Mode::Passing;
        self.out.extend_from_slice(pending);
        self.flush_raw();
    }

    /// Passes whatever is buffered (a block in progress, then raw input) unchanged.
    fn flush_raw(&mut self) {
        if let Some(block) = self.block.take() {
            self.out.extend_from_slice(&block.original);
        }
        let raw = self.raw.split();
        self.out.extend_from_slice(&raw);
    }
}

/// For an `:authority` of the form `scheme://host[:port][/...]`, the `host[:port]`.
fn fixed_authority<'a>(name: &[u8], value: &'a [u8]) -> Option<&'a [u8]> {
    if name != b":authority" {
        return None;
    }
    let at = value.windows(3).position(|w| w == b"://")?;
    let rest = &value[at + 3..];
    let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;
    /// kind, flags, stream, payload.
    type Frame = (u8, u8, u32, Vec<u8>);

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn request(authority: &str, path: &str) -> Headers {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn encode(enc: &mut Encoder<'_>, headers: &Headers) -> Vec<u8> {
        enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// Runs `input` through the filter, fed `chunk` bytes at a time.
    async fn filtered(input: &[u8], chunk: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in input.chunks(chunk) {
                client.write_all(c).await.unwrap();
            }
        });
        let mut out = Vec::new();
        AuthorityFix::new(server)
            .read_to_end(&mut out)
            .await
            .unwrap();
        writer.await.unwrap();
        out
    }

    /// Splits `bytes` (after the preface) into frames.
    fn frames(bytes: &[u8]) -> Vec<Frame> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        let mut rest = &bytes[PREFACE_LEN..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    /// Decodes every header block of `frames` with one decoder, as h2 would.
    fn blocks(frames: &[Frame]) -> Vec<(u32, Headers)> {
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for (kind, flags, stream, payload) in frames {
            if *kind != HEADERS && *kind != CONTINUATION {
                continue;
            }
            let mut p = &payload[..];
            if *kind == HEADERS && flags & PRIORITY != 0 {
                p = &p[5..];
            }
            pending.extend_from_slice(p);
            if flags & END_HEADERS != 0 {
                out.push((*stream, dec.decode(&pending).unwrap()));
                pending.clear();
            }
        }
        out
    }

    /// A connection: the preface, SETTINGS, then per request a header block (split,
    /// padded, or with priority, by turns) and a DATA frame. Returns the bytes and the
    /// header lists sent.
    fn connection(authorities: &[&str]) -> (Vec<u8>, Vec<(u32, Headers)>) {
        // One encoder for the connection: later blocks refer to entries the first
        // ones added to its dynamic table, as grpc-go's do.
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let mut sent = Vec::new();
        for (i, authority) in authorities.iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            let headers = request(authority, &format!("/etcdserverpb.Maintenance/Status{i}"));
            let block = encode(&mut enc, &headers);
            match i % 4 {
                1 => {
                    let (a, b) = block.split_at(block.len() / 2);
                    input.extend(frame(HEADERS, 0, stream, a));
                    input.extend(frame(CONTINUATION, END_HEADERS, stream, b));
                }
                2 => {
                    let mut p = vec![3u8];
                    p.extend_from_slice(&block);
                    p.extend_from_slice(&[0, 0, 0]);
                    input.extend(frame(HEADERS, END_HEADERS | PADDED, stream, &p));
                }
                3 => {
                    let mut p = vec![0, 0, 0, 1, 16];
                    p.extend_from_slice(&block);
                    input.extend(frame(HEADERS, END_HEADERS | PRIORITY, stream, &p));
                }
                _ => input.extend(frame(HEADERS, END_HEADERS, stream, &block)),
            }
            input.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\x02hi")); // DATA
            sent.push((stream, headers));
        }
        (input, sent)
    }

    #[tokio::test]
    async fn passes_conforming_connections_byte_for_byte() {
        let (input, _) = connection(&["127.0.0.1:2379"; 6]);
        for chunk in [1, 7, 4096] {
            assert_eq!(filtered(&input, chunk).await, input, "chunk {chunk}");
        }
        // The first block decides: a later malformed authority is left for h2 to
        // refuse, as it would without the filter (gRPC clients never do this).
        let (input, _) = connection(&["127.0.0.1:2379", "http://127.0.0.1:2379"]);
        assert_eq!(filtered(&input, 64).await, input);
    }

    #[tokio::test]
    async fn strips_the_scheme_from_etcdctl_authorities() {
        let authority = "http://127.0.0.1:2379";
        let (input, sent) = connection(&[authority; 6]);
        for chunk in [1, 5, 4096] {
            let out = filtered(&input, chunk).await;
            let frames = frames(&out);
            let mut want = sent.clone();
            for (_, headers) in &mut want {
                headers[3].1 = b"127.0.0.1:2379".to_vec();
            }
            assert_eq!(blocks(&frames), want, "chunk {chunk}");
            // DATA frames and END_STREAM flags are kept; priority fields too.
            let data: Vec<u32> = frames.iter().filter(|f| f.0 == 0).map(|f| f.2).collect();
            assert_eq!(data, [1, 3, 5, 7, 9, 11]);
            let with_priority: Vec<u32> = frames
                .iter()
                .filter(|f| f.0 == HEADERS && f.1 & PRIORITY != 0)
                .map(|f| f.2)
                .collect();
            assert_eq!(with_priority, [7]);
        }
        assert_eq!(
            fixed_authority(b":authority", b"https://[::1]:2379/x"),
            Some(&b"[::1]:2379"[..])
        );
        assert_eq!(fixed_authority(b":authority", b"[::1]:2379"), None);
        assert_eq!(fixed_authority(b":path", b"http://a/"), None);
    }

    #[tokio::test]
    async fn splits_large_rewritten_blocks_into_continuations() {
        let mut enc = Encoder::new();
        let mut sent = request("http://h:1", "/big");
        sent.push((b"x-big".to_vec(), vec![b'v'; 3 * MAX_FRAME]));
        let block = encode(&mut enc, &sent);
        let mut input = PREFACE.to_vec();
        for (i, c) in block.chunks(MAX_FRAME).enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let last = (i + 1) * MAX_FRAME >= block.len();
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, c));
        }
        let frames = frames(&filtered(&input, 1000).await);
        assert!(frames.len() >= 4);
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        let mut want = sent.clone();
        want[3].1 = b"h:1".to_vec();
        assert_eq!(blocks(&frames), [(1, want)]);
    }

    #[tokio::test]
    async fn passes_garbage_through_unchanged() {
        let mut input = PREFACE.to_vec();
        // A CONTINUATION without a HEADERS, then an undecodable block, then a cut frame.
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b"abc"));
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0xff, 0xff, 0xff]));
        input.extend(&frame(0x0, 0, 3, b"0123456789")[..12]);
        assert_eq!(filtered(&input, 3).await, input);

        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]));
        input.extend(frame(0x0, 0, 1, b"data"));
        assert_eq!(filtered(&input, 64).await, input);

        // A header frame larger than h2 accepts.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME + 1]));
        assert_eq!(filtered(&input, 4096).await, input);
    }
}
