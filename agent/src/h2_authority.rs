//! Lets gRPC clients built on grpc's C core (py-spiffe, C++, Ruby...) use the agent socket.
//!
//! Since grpc 1.57 those clients send the %-encoded socket path as `:authority` on a `unix:`
//! target (grpc/grpc#38142), which h2 rejects as a malformed authority by resetting every stream
//! (hyperium/h2#487). This module owns the byte-level adapter between the socket and h2: on the
//! client-to-agent side it HPACK-decodes every header block (with one decoder for the whole
//! connection, as the client's encoder expects), replaces an `:authority` that is not a valid URI
//! authority with `localhost`, and re-encodes the block without the dynamic table, so h2's own
//! decoder never sees a reference to entries only this adapter holds. Every other frame, and the
//! whole agent-to-client side, passes through untouched.
//!
//! Memory is bounded although HPACK lets a few bytes stand for kilobytes: a re-encoded block may
//! not exceed what h2 would accept anyway, and input is left unread while more than
//! [`MAX_PENDING_OUTPUT`] bytes of output wait for h2.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use fluke_hpack::Decoder;
use fluke_hpack::decoder::DecoderError;
use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::attest::procfs::Procfs;
use crate::metrics::RefusedReason;
use crate::peer::{ConnectionSlot, ConnectionSlots, PeerAtAccept};

/// RFC 9113 §3.4: what every client sends before its first frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Stream dependency (4 bytes) and weight (1 byte) of a HEADERS frame with PRIORITY.
const PRIORITY_LEN: usize = 5;
/// The largest frame payload a client may send: the agent keeps h2's default
/// SETTINGS_MAX_FRAME_SIZE, so re-encoded blocks are split at this size.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The dynamic table the client's encoder may use: h2 advertises the default
/// SETTINGS_HEADER_TABLE_SIZE, so a size update beyond it is a compression error.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Bound on a header block as re-encoded: h2's default SETTINGS_MAX_HEADER_LIST_SIZE (as hyper
/// serves it), which counts each field as more than its literal takes here, so h2 would refuse a
/// larger block anyway. It also bounds what decoding a block full of references to large
/// dynamic-table entries may produce.
const MAX_REENCODED_BLOCK: usize = 16 * 1024;
/// Bound on a header block as received: a block never takes much more room encoded than its
/// fields re-encoded as literals (Huffman coding is used only where shorter, table size updates
/// are a few bytes), so a larger one would be refused anyway once decoded. Every connection may
/// buffer this much, so it is what a connection flood costs.
const MAX_HEADER_BLOCK: usize = MAX_REENCODED_BLOCK + 1024;
/// The preface, and every header block once begun (and any frame header), must be complete
/// within this: a connection cannot hold its buffer by sending a block slowly or never ending it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Once a read has produced this much output for h2, the rest of the input waits (buffered, and
/// no more read from the socket) until h2 has read it all: a few KiB of tiny HEADERS frames each
/// referring to a 4 KiB dynamic-table entry would otherwise expand a hundredfold at once.
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;
/// What replaces an `:authority` h2 would reject. Nothing on the socket routes by authority.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Why a client's byte stream could not be passed on to h2; the connection is closed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum H2AuthorityError {
    #[error("the client did not open with the HTTP/2 connection preface")]
    BadPreface,
    #[error("header block of at least {0} bytes exceeds the {MAX_HEADER_BLOCK}-byte limit")]
    HeaderBlockTooLarge(usize),
    #[error(
        "header block decodes to {0} bytes, beyond the {MAX_REENCODED_BLOCK}-byte header list limit"
    )]
    HeaderListTooLarge(usize),
    #[error("frame of type {frame_type:#x} on stream {stream_id} interrupts a header block")]
    InterruptedHeaderBlock { frame_type: u8, stream_id: u32 },
    #[error("CONTINUATION frame on stream {0} without a header block to continue")]
    UnexpectedContinuation(u32),
    #[error("HEADERS frame's padding and priority exceed its {0}-byte payload")]
    MalformedHeadersFrame(usize),
    #[error("header block is not well-formed HPACK")]
    MalformedHpack,
    #[error("dynamic table size update after the first field of a header block")]
    MisplacedTableSizeUpdate,
    #[error("HPACK decoding failed: {0:?}")]
    Hpack(DecoderError),
    #[error(
        "the preface, a frame header or a header block was not complete within {HEADER_TIMEOUT:?}"
    )]
    HeaderTimeout,
}

impl From<H2AuthorityError> for io::Error {
    fn from(e: H2AuthorityError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// An accepted agent-socket connection whose client-to-agent bytes are rewritten as this module
/// describes. Its connection info is the peer as recorded at accept, for attestation.
pub struct H2AuthorityStream {
    inner: UnixStream,
    peer: PeerAtAccept,
    rewriter: Rewriter,
    /// Rewritten bytes h2 has not read yet, from `unread` on.
    ready: Vec<u8>,
    unread: usize,
    /// Set while the client owes the rest of its preface, a frame header or a header block:
    /// when the connection is closed if it has not sent it.
    header_deadline: Option<Pin<Box<Sleep>>>,
    /// The connection's place in the socket's limits, given back when it closes.
    slot: Option<ConnectionSlot>,
}

impl H2AuthorityStream {
    /// A connection just accepted on the agent socket, its peer recorded (from the procfs
    /// attestation reads) and its client-to-agent bytes adapted for h2; `None` (the connection
    /// is closed) when the socket or the peer's process has no connection slot left.
    pub fn accept(
        stream: UnixStream,
        procfs: &Procfs,
        slots: &Arc<ConnectionSlots>,
    ) -> Option<H2AuthorityStream> {
        let peer = PeerAtAccept::record(&stream, procfs);
        let slot = slots.take(&peer)?;
        Some(H2AuthorityStream::new(stream, peer, Some(slot)))
    }

    /// Wraps a connection accepted on the agent socket, before h2 reads anything from it.
    pub fn new(inner: UnixStream, peer: PeerAtAccept, slot: Option<ConnectionSlot>) -> Self {
        H2AuthorityStream {
            inner,
            peer,
            rewriter: Rewriter::new(),
            ready: Vec::new(),
            unread: 0,
            header_deadline: Some(Box::pin(tokio::time::sleep(HEADER_TIMEOUT))),
            slot,
        }
    }

    /// Counts a connection the agent closes, by why.
    fn refused(&self, reason: RefusedReason) {
        if let Some(slot) = &self.slot {
            slot.refused(reason);
        }
    }

    /// Feeds the rewriter, keeping the header deadline armed while the client owes header
    /// bytes (from when it started owing them, not from its last byte).
    fn feed(&mut self, data: &[u8]) -> io::Result<()> {
        if let Err(e) = self.rewriter.feed(data, &mut self.ready) {
            if matches!(e, H2AuthorityError::HeaderBlockTooLarge(_)) {
                self.refused(RefusedReason::HeaderTooLarge);
            }
            debug!(pid = ?self.peer.cred.and_then(|c| c.pid()), error = %e, "closing an agent-socket connection");
            return Err(e.into());
        }
        if !self.rewriter.owes_header_bytes() {
            self.header_deadline = None;
        } else if self.header_deadline.is_none() {
            self.header_deadline = Some(Box::pin(tokio::time::sleep(HEADER_TIMEOUT)));
        }
        Ok(())
    }
}

impl Connected for H2AuthorityStream {
    type ConnectInfo = PeerAtAccept;

    fn connect_info(&self) -> PeerAtAccept {
        self.peer
    }
}

impl AsyncRead for H2AuthorityStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.unread < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.unread);
                buf.put_slice(&this.ready[this.unread..this.unread + n]);
                this.unread += n;
                if this.unread == this.ready.len() {
                    this.ready.clear();
                    this.unread = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.backlogged {
                this.feed(&[])?;
                continue;
            }
            if let Some(deadline) = &mut this.header_deadline
                && deadline.as_mut().poll(cx).is_ready()
            {
                this.refused(RefusedReason::HeaderTimeout);
                debug!(pid = ?this.peer.cred.and_then(|c| c.pid()), "header bytes not sent in time; closing the connection");
                return Poll::Ready(Err(H2AuthorityError::HeaderTimeout.into()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                // End of stream: whatever partial frame is still buffered is dropped, as h2
                // would drop it too.
                return Poll::Ready(Ok(()));
            }
            this.feed(chunk.filled())?;
        }
    }
}

impl AsyncWrite for H2AuthorityStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The client-to-agent rewriting, independent of I/O: bytes in, bytes for h2 out.
struct Rewriter {
    /// One decoder for the connection: the client's encoder indexes across header blocks.
    decoder: Decoder<'static>,
    /// How much of the connection preface is still to come.
    preface_left: usize,
    /// Received bytes not yet handled: a partial frame header, or a header-block frame still
    /// arriving.
    pending: Vec<u8>,
    /// Payload bytes of a frame being passed through that have not arrived yet.
    passthrough_left: usize,
    /// A header block waiting for its CONTINUATION frames.
    block: Option<HeaderBlock>,
    /// Whether the last `feed` stopped at [`MAX_PENDING_OUTPUT`] with complete frames left in
    /// `pending`: they are to be handled (with `feed(&[], ..)`) before anything more is read.
    backlogged: bool,
}

struct HeaderBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragments: Vec<u8>,
}

impl Rewriter {
    /// Whether the client is in the middle of its preface, a frame header or a header block
    /// (bytes it must send before h2 can go on), rather than between frames or in a frame's
    /// payload that flow control bounds.
    fn owes_header_bytes(&self) -> bool {
        self.preface_left > 0
            || self.block.is_some()
            || (!self.pending.is_empty() && !self.backlogged)
    }

    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            decoder,
            preface_left: PREFACE.len(),
            pending: Vec::new(),
            passthrough_left: 0,
            block: None,
            backlogged: false,
        }
    }

    /// Takes the next bytes from the client, appending to `out` what h2 should read: at most
    /// about [`MAX_PENDING_OUTPUT`] bytes (plus one frame's worth) per call, the rest of the
    /// input kept for the next call.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), H2AuthorityError> {
        let mut input = std::mem::take(&mut self.pending);
        input.extend_from_slice(data);
        let result = self.consume(&input, out);
        // Whatever `consume` could not handle yet waits for more bytes; on error the connection
        // is closed, so what is left behind does not matter.
        if let Ok(handled) = result {
            input.drain(..handled);
            self.pending = input;
        }
        result.map(|_| ())
    }

    /// Handles as much of `input` as is complete, or until [`MAX_PENDING_OUTPUT`] bytes have been
    /// appended to `out`, returning how many bytes of input that was.
    fn consume(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, H2AuthorityError> {
        let output_limit = out.len() + MAX_PENDING_OUTPUT;
        self.backlogged = false;
        let mut at = 0;
        if self.preface_left > 0 {
            let expected = &PREFACE[PREFACE.len() - self.preface_left..];
            let n = expected.len().min(input.len());
            if input[..n] != expected[..n] {
                return Err(H2AuthorityError::BadPreface);
            }
            out.extend_from_slice(&input[..n]);
            self.preface_left -= n;
            at = n;
        }
        loop {
            if out.len() >= output_limit && at < input.len() {
                self.backlogged = true;
                return Ok(at);
            }
            if self.passthrough_left > 0 {
                let n = self.passthrough_left.min(input.len() - at);
                out.extend_from_slice(&input[at..at + n]);
                self.passthrough_left -= n;
                at += n;
                if self.passthrough_left > 0 {
                    return Ok(at);
                }
            }
            let Some(header) = input.get(at..at + FRAME_HEADER_LEN) else {
                return Ok(at);
            };
            let length =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (frame_type, flags) = (header[3], header[4]);
            let stream_id =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;

            if frame_type != HEADERS && frame_type != CONTINUATION {
                if self.block.is_some() {
                    return Err(H2AuthorityError::InterruptedHeaderBlock {
                        frame_type,
                        stream_id,
                    });
                }
                out.extend_from_slice(header);
                self.passthrough_left = length;
                at += FRAME_HEADER_LEN;
                continue;
            }

            let buffered = self.block.as_ref().map_or(0, |b| b.fragments.len());
            if buffered + length > MAX_HEADER_BLOCK {
                return Err(H2AuthorityError::HeaderBlockTooLarge(buffered + length));
            }
            let Some(payload) = input.get(at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + length)
            else {
                return Ok(at);
            };
            at += FRAME_HEADER_LEN + length;
            let block = if frame_type == HEADERS {
                if let Some(block) = &self.block {
                    return Err(H2AuthorityError::InterruptedHeaderBlock {
                        frame_type,
                        stream_id: block.stream_id,
                    });
                }
                self.block
                    .insert(HeaderBlock::start(flags, stream_id, payload)?)
            } else {
                match &mut self.block {
                    Some(block) if block.stream_id == stream_id => {
                        block.fragments.extend_from_slice(payload);
                        block
                    }
                    Some(_) => {
                        return Err(H2AuthorityError::InterruptedHeaderBlock {
                            frame_type,
                            stream_id,
                        });
                    }
                    None => return Err(H2AuthorityError::UnexpectedContinuation(stream_id)),
                }
            };
            if flags & END_HEADERS != 0 {
                let fields = reencode(&mut self.decoder, &block.fragments)?;
                block.write_frames(&fields, out);
                self.block = None;
            }
        }
    }
}

impl HeaderBlock {
    /// The block a HEADERS frame opens: its first fragment, without padding.
    fn start(flags: u8, stream_id: u32, payload: &[u8]) -> Result<Self, H2AuthorityError> {
        let malformed = || H2AuthorityError::MalformedHeadersFrame(payload.len());
        let mut rest = payload;
        let mut padding = 0;
        if flags & PADDED != 0 {
            let (&pad_length, after) = rest.split_first().ok_or_else(malformed)?;
            padding = usize::from(pad_length);
            rest = after;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let (fields, after) = rest
                .split_first_chunk::<PRIORITY_LEN>()
                .ok_or_else(malformed)?;
            priority = Some(*fields);
            rest = after;
        }
        let fragment = rest
            .get(..rest.len().checked_sub(padding).ok_or_else(malformed)?)
            .ok_or_else(malformed)?;
        Ok(HeaderBlock {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            fragments: fragment.to_vec(),
        })
    }

    /// Emits `fields` (the re-encoded block) as a HEADERS frame with this block's END_STREAM
    /// and priority, followed by CONTINUATION frames if it does not fit in one.
    fn write_frames(&self, fields: &[u8], out: &mut Vec<u8>) {
        let priority: &[u8] = self.priority.as_ref().map_or(&[], |p| p.as_slice());
        let (first, mut rest) =
            fields.split_at(fields.len().min(MAX_FRAME_PAYLOAD - priority.len()));
        let mut flags = if self.end_stream { END_STREAM } else { 0 };
        if !priority.is_empty() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        write_frame_header(
            out,
            priority.len() + first.len(),
            HEADERS,
            flags,
            self.stream_id,
        );
        out.extend_from_slice(priority);
        out.extend_from_slice(first);
        while !rest.is_empty() {
            let (fragment, after) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
            rest = after;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            write_frame_header(out, fragment.len(), CONTINUATION, flags, self.stream_id);
            out.extend_from_slice(fragment);
        }
    }
}

fn write_frame_header(out: &mut Vec<u8>, length: usize, frame_type: u8, flags: u8, stream_id: u32) {
    // Lengths here are at most MAX_FRAME_PAYLOAD, so the u24 never truncates.
    out.extend_from_slice(&(length as u32).to_be_bytes()[1..]);
    out.push(frame_type);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// Decodes a complete header block and encodes its fields again, each as a literal without
/// indexing (RFC 7541 §6.2.2), with an invalid `:authority` replaced.
fn reencode(decoder: &mut Decoder<'static>, block: &[u8]) -> Result<Vec<u8>, H2AuthorityError> {
    check_representations(block)?;
    let mut fields = Vec::with_capacity((block.len() * 2).min(MAX_REENCODED_BLOCK));
    // Once over the bound, decoding goes on (to keep the dynamic table in step) but the output
    // stops growing: only its size is counted.
    let mut too_large: Option<usize> = None;
    decoder
        .decode_with_cb(block, |name, value| {
            let value: &[u8] = if &*name == b":authority" && Authority::try_from(&*value).is_err() {
                FALLBACK_AUTHORITY
            } else {
                &value
            };
            if let Some(size) = &mut too_large {
                *size += 1 + name.len() + value.len();
                return;
            }
            fields.push(0x00);
            encode_string(&mut fields, &name);
            encode_string(&mut fields, value);
            if fields.len() > MAX_REENCODED_BLOCK {
                too_large = Some(fields.len());
            }
        })
        .map_err(H2AuthorityError::Hpack)?;
    if let Some(size) = too_large {
        return Err(H2AuthorityError::HeaderListTooLarge(size));
    }
    Ok(fields)
}

/// A raw (not Huffman-coded) string literal: its length as a 7-bit-prefix integer, then the
/// octets.
fn encode_string(out: &mut Vec<u8>, octets: &[u8]) {
    let mut length = octets.len();
    if length < 0x7f {
        out.push(length as u8);
    } else {
        out.push(0x7f);
        length -= 0x7f;
        while length >= 0x80 {
            out.push((length & 0x7f) as u8 | 0x80);
            length >>= 7;
        }
        out.push(length as u8);
    }
    out.extend_from_slice(octets);
}

/// Checks that every representation in `block` is complete, without decoding strings (RFC 7541
/// §6), and that table size updates come only first (§4.2). fluke-hpack panics on a truncated
/// size update where it should fail, so its decoder sees only blocks that pass this.
fn check_representations(mut block: &[u8]) -> Result<(), H2AuthorityError> {
    let mut field_seen = false;
    while let Some(&first) = block.first() {
        if first & 0xe0 == 0x20 {
            if field_seen {
                return Err(H2AuthorityError::MisplacedTableSizeUpdate);
            }
            block = hpack_integer(block, 5)?.1;
            continue;
        }
        field_seen = true;
        block = match first {
            b if b & 0x80 != 0 => hpack_integer(block, 7)?.1,
            b if b & 0x40 != 0 => skip_literal(block, 6)?,
            _ => skip_literal(block, 4)?,
        };
    }
    Ok(())
}

/// Skips a literal field whose name index has a `prefix`-bit prefix; index 0 means the name is
/// a literal too.
fn skip_literal(block: &[u8], prefix: u8) -> Result<&[u8], H2AuthorityError> {
    let (name_index, mut rest) = hpack_integer(block, prefix)?;
    if name_index == 0 {
        rest = skip_string(rest)?;
    }
    skip_string(rest)
}

fn skip_string(block: &[u8]) -> Result<&[u8], H2AuthorityError> {
    let (length, rest) = hpack_integer(block, 7)?;
    rest.get(length..).ok_or(H2AuthorityError::MalformedHpack)
}

/// An HPACK integer (RFC 7541 §5.1) with a `prefix`-bit prefix, and what follows it. At most
/// four continuation octets, as fluke-hpack decodes.
fn hpack_integer(block: &[u8], prefix: u8) -> Result<(usize, &[u8]), H2AuthorityError> {
    let max_prefix = (1usize << prefix) - 1;
    let (&first, mut rest) = block
        .split_first()
        .ok_or(H2AuthorityError::MalformedHpack)?;
    let mut value = usize::from(first) & max_prefix;
    if value < max_prefix {
        return Ok((value, rest));
    }
    for shift in [0, 7, 14, 21] {
        let (&octet, after) = rest.split_first().ok_or(H2AuthorityError::MalformedHpack)?;
        rest = after;
        value += usize::from(octet & 0x7f) << shift;
        if octet & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
    Err(H2AuthorityError::MalformedHpack)
}

#[cfg(test)]
mod tests;
