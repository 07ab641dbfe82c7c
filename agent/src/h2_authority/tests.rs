use fluke_hpack::Encoder;
use fluke_hpack::huffman::HuffmanDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::attest::procfs::Procfs;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// A whole client connection captured from grpcio 1.85.1 (grpc-c 58.0.0) making two calls on
/// one channel to `unix:///run/sigil/agent.sock`: preface, SETTINGS, WINDOW_UPDATE, SETTINGS
/// ack, then per call HEADERS, WINDOW_UPDATE, DATA, RST_STREAM. The first HEADERS block adds
/// `:authority: run%2Fsigil%2Fagent.sock` to the dynamic table; the second refers to it.
const GRPC_CORE_CONNECTION: &str = "\
        505249202a20485454502f322e300d0a0d0a534d0d0a0d0a0000240400000000000002000000000003000000\
        00000400400000000500400000000600004000fe0300000001000004080000000000003f0001000000040100\
        00000000011201040000000140053a70617468202f537069666665576f726b6c6f61644150492f4665746368\
        5835303953564944400a3a617574686f726974791872756e253246736967696c2532466167656e742e736f63\
        6b8386400c636f6e74656e742d74797065106170706c69636174696f6e2f677270634002746508747261696c\
        6572734014677270632d6163636570742d656e636f64696e67176964656e746974792c206465666c6174652c\
        20677a6970400c677270632d74696d656f7574043639366d400a757365722d6167656e7430677270632d7079\
        74686f6e2f312e38352e3120677270632d632f35382e302e3020286c696e75783b2063687474703229001277\
        6f726b6c6f61642e7370696666652e696f047472756500000408000000000100000005000005000100000001\
        00000000000000040800000000000000000500000403000000000100000008000034010400000003c4c38386\
        c2c1c0400c677270632d74696d656f7574043730306dbf0012776f726b6c6f61642e7370696666652e696f04\
        7472756500000408000000000300000005000005000100000003000000000000000403000000000300000008";

const DATA: u8 = 0x0;
const WINDOW_UPDATE: u8 = 0x8;

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame_header(&mut out, payload.len(), frame_type, flags, stream_id);
    out.extend_from_slice(payload);
    out
}

struct Frame {
    frame_type: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

/// Splits a byte stream (after the preface) into frames.
fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        frames.push(Frame {
            frame_type: bytes[3],
            flags: bytes[4],
            stream_id: u32::from_be_bytes(bytes[5..9].try_into().unwrap()),
            payload: bytes[9..9 + length].to_vec(),
        });
        bytes = &bytes[9 + length..];
    }
    frames
}

/// Feeds `data`, then whatever input was held back for the output limit.
fn feed_all(
    rewriter: &mut Rewriter,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), H2AuthorityError> {
    rewriter.feed(data, out)?;
    while rewriter.backlogged {
        rewriter.feed(&[], out)?;
    }
    Ok(())
}

/// Runs a whole connection through a rewriter, once in one piece and once a byte at a time
/// (which must give the same bytes), checking the preface passes and returning the rest.
fn rewrite(frames: &[u8]) -> Result<Vec<u8>, H2AuthorityError> {
    let input = [PREFACE, frames].concat();
    let mut whole = Vec::new();
    feed_all(&mut Rewriter::new(), &input, &mut whole)?;
    let mut rewriter = Rewriter::new();
    let mut bytewise = Vec::new();
    for byte in &input {
        feed_all(&mut rewriter, std::slice::from_ref(byte), &mut bytewise)?;
    }
    assert_eq!(whole, bytewise, "the same bytes whatever the read sizes");
    assert!(rewriter.pending.is_empty() && rewriter.block.is_none());
    assert_eq!(&whole[..PREFACE.len()], PREFACE);
    Ok(whole.split_off(PREFACE.len()))
}

/// Decodes a header block with a decoder that has seen nothing before: what h2 can decode
/// whatever the client's dynamic table held.
fn decode_fresh(block: &[u8]) -> Fields {
    Decoder::new()
        .decode(block)
        .expect("re-encoded block decodes")
}

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn with_authority(mut fields: Fields, authority: &str) -> Fields {
    for (name, value) in &mut fields {
        if name == b":authority" {
            *value = authority.as_bytes().to_vec();
        }
    }
    fields
}

/// The header blocks of single-frame HEADERS frames, each decoded from scratch.
fn header_blocks(out: &[u8]) -> Vec<Fields> {
    frames(out)
        .into_iter()
        .filter(|f| f.frame_type == HEADERS)
        .map(|f| {
            assert_ne!(f.flags & END_HEADERS, 0);
            decode_fresh(&f.payload)
        })
        .collect()
}

#[test]
fn grpc_core_authority_becomes_localhost_and_every_other_frame_passes_unchanged() {
    let input = unhex(GRPC_CORE_CONNECTION);
    let out = rewrite(&input[PREFACE.len()..]).unwrap();

    let (before, after) = (frames(&input[PREFACE.len()..]), frames(&out));
    assert_eq!(before.len(), after.len());
    let mut client_decoder = Decoder::new();
    let mut authorities = Vec::new();
    for (sent, got) in before.iter().zip(&after) {
        assert_eq!(
            (sent.frame_type, sent.flags, sent.stream_id),
            (got.frame_type, got.flags, got.stream_id)
        );
        if sent.frame_type != HEADERS {
            assert_eq!(sent.payload, got.payload);
            continue;
        }
        let sent_fields = client_decoder.decode(&sent.payload).unwrap();
        let authority = sent_fields
            .iter()
            .find(|(n, _)| n == b":authority")
            .unwrap();
        authorities.push(authority.1.clone());
        assert_eq!(
            decode_fresh(&got.payload),
            with_authority(sent_fields, "localhost")
        );
    }
    assert_eq!(
        authorities, [b"run%2Fsigil%2Fagent.sock"; 2],
        "both calls carried the socket path, the second through the dynamic table"
    );
    // The DATA frames (the gRPC messages) are among those compared byte for byte.
    assert_eq!(after.iter().filter(|f| f.frame_type == DATA).count(), 2);
}

#[test]
fn huffman_coded_authority_in_the_dynamic_table_is_replaced_in_both_blocks() {
    // :method GET, :scheme http, :path /, then `:authority: %2F` as a literal with incremental
    // indexing and a Huffman-coded value (RFC 7541 Appendix B: '%' 010101, '2' 00010,
    // 'F' 1100001, padded with ones).
    let huffman_value = [0x54, 0x58, 0x7f];
    assert_eq!(
        HuffmanDecoder::new().decode(&huffman_value).unwrap(),
        b"%2F"
    );
    let first = [&[0x82, 0x86, 0x84, 0x41, 0x83][..], &huffman_value].concat();
    // The same request again, the authority as a reference to dynamic-table entry 62.
    let second = [0x82, 0x86, 0x84, 0xbe];
    let out = rewrite(
        &[
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &first),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
        ]
        .concat(),
    )
    .unwrap();

    let expected = fields(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "localhost"),
    ]);
    assert_eq!(header_blocks(&out), [expected.clone(), expected]);
    let streams: Vec<_> = frames(&out)
        .iter()
        .map(|f| (f.stream_id, f.flags))
        .collect();
    assert_eq!(
        streams,
        [(1, END_HEADERS | END_STREAM), (3, END_HEADERS | END_STREAM)]
    );
}

#[test]
fn valid_authorities_survive_huffman_and_dynamic_table_references() {
    // RFC 7541 Appendix C.4: three requests with Huffman coding and dynamic-table references.
    let blocks = [
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        "828684be5886a8eb10649cbf",
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
    ];
    let input: Vec<u8> = blocks
        .iter()
        .zip([1, 3, 5])
        .flat_map(|(block, stream)| frame(HEADERS, END_HEADERS, stream, &unhex(block)))
        .collect();
    let out = rewrite(&input).unwrap();

    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    assert_eq!(
        header_blocks(&out),
        [
            fields(&first),
            fields(&[&first[..], &[("cache-control", "no-cache")]].concat()),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ]),
        ]
    );
}

#[test]
fn an_encoder_indexing_across_blocks_gets_the_path_authority_replaced_and_localhost_kept() {
    let mut encoder = Encoder::new();
    let request = |authority: &str| {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("workload.spiffe.io", "true"),
        ])
    };
    let mut encode =
        |fields: &Fields| encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
    let path_socket = request("%2Frun%2Fsigil%2Fagent.sock");
    let local = request("localhost");
    let blocks = [encode(&path_socket), encode(&path_socket), encode(&local)];
    assert!(
        blocks[1].len() < blocks[0].len(),
        "the second block refers to the first's dynamic-table entries"
    );
    let input: Vec<u8> = blocks
        .iter()
        .zip([1, 3, 5])
        .flat_map(|(block, stream)| frame(HEADERS, END_HEADERS, stream, block))
        .collect();

    let out = rewrite(&input).unwrap();
    assert_eq!(header_blocks(&out), [local.clone(), local.clone(), local]);
}

#[test]
fn padding_is_dropped_and_priority_and_end_stream_are_kept() {
    let block =
        Encoder::new().encode([(&b":method"[..], &b"GET"[..]), (b":authority", b"%2Fsock")]);
    let priority = [0x80, 0, 0, 1, 15];
    let payload = [&[3][..], &priority, &block, &[0, 0, 0]].concat();
    let flags = PADDED | PRIORITY | END_STREAM | END_HEADERS;
    let out = rewrite(&frame(HEADERS, flags, 3, &payload)).unwrap();

    let [got] = frames(&out).try_into().ok().unwrap();
    assert_eq!(got.frame_type, HEADERS);
    assert_eq!(got.flags, PRIORITY | END_STREAM | END_HEADERS);
    assert_eq!(got.stream_id, 3);
    assert_eq!(got.payload[..PRIORITY_LEN], priority);
    assert_eq!(
        decode_fresh(&got.payload[PRIORITY_LEN..]),
        fields(&[(":method", "GET"), (":authority", "localhost")])
    );
}

#[test]
fn continuation_frames_are_joined_into_one_headers_frame() {
    let block = Encoder::new().encode([
        (&b":method"[..], &b"POST"[..]),
        (b":authority", b"%2Fsock"),
        (b"x-trace", b"abc"),
    ]);
    let (a, rest) = block.split_at(4);
    let (b, c) = rest.split_at(7);
    let input = [
        frame(HEADERS, END_STREAM, 5, a),
        frame(CONTINUATION, 0, 5, b),
        frame(CONTINUATION, END_HEADERS, 5, c),
        frame(DATA, END_STREAM, 7, b"body"),
    ]
    .concat();
    let out = rewrite(&input).unwrap();

    let got = frames(&out);
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].frame_type, got[0].flags, got[0].stream_id),
        (HEADERS, END_STREAM | END_HEADERS, 5)
    );
    assert_eq!(
        decode_fresh(&got[0].payload),
        fields(&[
            (":method", "POST"),
            (":authority", "localhost"),
            ("x-trace", "abc")
        ])
    );
    assert_eq!(
        out[out.len() - 13..],
        frame(DATA, END_STREAM, 7, b"body")[..]
    );
}

#[test]
fn a_block_larger_than_a_frame_is_split_into_continuations() {
    // Re-encoded: `:authority: localhost` takes 22 bytes, `x-big` 10 plus its value, so the
    // block is exactly the 16,384-byte limit, and with the priority fields one frame too big.
    let big = vec![b'x'; MAX_REENCODED_BLOCK - 32];
    let block = Encoder::new().encode([(&b":authority"[..], &b"%2F"[..]), (b"x-big", &big)]);
    let priority = [0, 0, 0, 0, 200];
    let payload = [&priority[..], &block].concat();
    let out = rewrite(&frame(HEADERS, PRIORITY | END_HEADERS, 1, &payload)).unwrap();

    let got = frames(&out);
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].frame_type, got[0].flags), (HEADERS, PRIORITY));
    assert_eq!(got[0].payload.len(), MAX_FRAME_PAYLOAD);
    assert_eq!(got[1].payload.len(), PRIORITY_LEN);
    assert_eq!(got[0].payload[..PRIORITY_LEN], priority);
    assert_eq!(
        (got[1].frame_type, got[1].flags),
        (CONTINUATION, END_HEADERS)
    );
    assert_eq!(got[1].stream_id, 1);
    let joined = [&got[0].payload[PRIORITY_LEN..], &got[1].payload[..]].concat();
    assert_eq!(
        Decoder::new().decode(&joined).unwrap(),
        vec![
            (b":authority".to_vec(), b"localhost".to_vec()),
            (b"x-big".to_vec(), big)
        ]
    );
}

#[test]
fn non_header_frames_pass_through_byte_for_byte() {
    let input = [
        frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]),
        frame(WINDOW_UPDATE, 0, 0, &[0, 1, 0, 0]),
        frame(DATA, 0, 1, &vec![7; 40_000]),
        frame(0x6, 0, 0, b"pingpong"),
        frame(0x3, 0, 1, &[0, 0, 0, 8]),
        frame(0x7, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
    ]
    .concat();
    assert_eq!(rewrite(&input).unwrap(), input);
}

#[test]
fn a_connection_not_starting_with_the_preface_is_refused() {
    let mut out = Vec::new();
    assert_eq!(
        Rewriter::new().feed(b"GET / HTTP/1.1\r\n", &mut out),
        Err(H2AuthorityError::BadPreface)
    );
    // A preface that goes wrong only in a later read is refused too.
    let mut rewriter = Rewriter::new();
    rewriter.feed(&PREFACE[..10], &mut out).unwrap();
    assert_eq!(
        rewriter.feed(b"X", &mut out),
        Err(H2AuthorityError::BadPreface)
    );
}

#[test]
fn frames_breaking_up_a_header_block_are_refused() {
    let block = Encoder::new().encode([(&b":method"[..], &b"GET"[..])]);
    assert_eq!(
        rewrite(&[frame(HEADERS, 0, 1, &block), frame(DATA, 0, 1, b"x")].concat()),
        Err(H2AuthorityError::InterruptedHeaderBlock {
            frame_type: DATA,
            stream_id: 1
        })
    );
    assert_eq!(
        rewrite(
            &[
                frame(HEADERS, 0, 1, &block),
                frame(HEADERS, END_HEADERS, 3, &block)
            ]
            .concat()
        ),
        Err(H2AuthorityError::InterruptedHeaderBlock {
            frame_type: HEADERS,
            stream_id: 1
        })
    );
    assert_eq!(
        rewrite(
            &[
                frame(HEADERS, 0, 1, &block),
                frame(CONTINUATION, END_HEADERS, 3, &[])
            ]
            .concat()
        ),
        Err(H2AuthorityError::InterruptedHeaderBlock {
            frame_type: CONTINUATION,
            stream_id: 3
        })
    );
    assert_eq!(
        rewrite(&frame(CONTINUATION, END_HEADERS, 1, &block)),
        Err(H2AuthorityError::UnexpectedContinuation(1))
    );
}

#[test]
fn padding_or_priority_beyond_the_payload_is_refused() {
    // Pad length 5 with only 3 bytes after it.
    assert_eq!(
        rewrite(&frame(HEADERS, PADDED | END_HEADERS, 1, &[5, 0x82, 0, 0])),
        Err(H2AuthorityError::MalformedHeadersFrame(4))
    );
    assert_eq!(
        rewrite(&frame(HEADERS, PADDED | END_HEADERS, 1, &[])),
        Err(H2AuthorityError::MalformedHeadersFrame(0))
    );
    assert_eq!(
        rewrite(&frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0, 1])),
        Err(H2AuthorityError::MalformedHeadersFrame(3))
    );
}

#[test]
fn oversized_header_blocks_are_refused_before_they_are_buffered() {
    // Only the frame header has arrived: a 70,000-byte block is refused already.
    let mut header = Vec::new();
    write_frame_header(&mut header, 70_000, HEADERS, END_HEADERS, 1);
    let mut out = Vec::new();
    let mut rewriter = Rewriter::new();
    rewriter.feed(PREFACE, &mut out).unwrap();
    assert_eq!(
        rewriter.feed(&header, &mut out),
        Err(H2AuthorityError::HeaderBlockTooLarge(70_000))
    );
    // The same across CONTINUATION frames.
    let chunk = vec![0x82; 16_384];
    let mut input = frame(HEADERS, 0, 1, &chunk);
    for _ in 0..3 {
        input.extend(frame(CONTINUATION, 0, 1, &chunk));
    }
    input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
    assert_eq!(
        rewrite(&input),
        Err(H2AuthorityError::HeaderBlockTooLarge(2 * 16_384))
    );
}

#[test]
fn a_small_block_expanding_past_the_bound_is_refused() {
    // One 4,000-byte entry in the dynamic table, then referenced 20 times: 80 KB decoded
    // from a few hundred bytes.
    let value = vec![b'v'; 4_000];
    let mut block = vec![0x40, 0x01, b'x', 0x7f];
    encode_integer_tail(&mut block, value.len() - 0x7f);
    block.extend_from_slice(&value);
    block.extend([0xbe; 20]);
    let result = rewrite(&frame(HEADERS, END_HEADERS, 1, &block));
    assert!(
        matches!(result, Err(H2AuthorityError::HeaderListTooLarge(size)) if size > 80_000),
        "{result:?}"
    );
}

#[test]
fn a_block_re_encoded_past_h2s_header_list_limit_is_refused() {
    let block_of = |value_len: usize| {
        let value = vec![b'v'; value_len];
        Encoder::new().encode([(&b":authority"[..], &b"%2F"[..]), (b"x-big", &value)])
    };
    // 32 bytes of field overhead (see the continuation test): 16,384 passes, 16,385 not.
    rewrite(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &block_of(MAX_REENCODED_BLOCK - 32),
    ))
    .unwrap();
    assert_eq!(
        rewrite(&frame(
            HEADERS,
            END_HEADERS,
            1,
            &block_of(MAX_REENCODED_BLOCK - 31)
        )),
        Err(H2AuthorityError::HeaderListTooLarge(
            MAX_REENCODED_BLOCK + 1
        ))
    );
}

/// A dynamic-table entry of about 4 KB (`x: vvvv...`, inserted by the first block), then
/// `count` one-byte HEADERS frames each referring to it: each is re-encoded as the whole
/// 4 KB field.
fn amplifying_frames(count: u32) -> (Vec<u8>, Fields) {
    let value = vec![b'v'; 4_000];
    let mut block = vec![0x40, 0x01, b'x', 0x7f];
    encode_integer_tail(&mut block, value.len() - 0x7f);
    block.extend_from_slice(&value);
    let mut input = frame(HEADERS, END_HEADERS, 1, &block);
    for i in 0..count {
        input.extend(frame(HEADERS, END_HEADERS, 3 + 2 * i, &[0xbe]));
    }
    (input, vec![(b"x".to_vec(), value)])
}

/// Output held at once may be the limit plus one frame (a re-encoded block, with its frame
/// headers).
const MAX_HELD: usize = MAX_PENDING_OUTPUT + MAX_REENCODED_BLOCK + 2 * FRAME_HEADER_LEN;

#[test]
fn tiny_frames_referring_to_a_large_entry_wait_while_output_is_pending() {
    let (frames_in, field) = amplifying_frames(300);
    let input = [PREFACE, &frames_in].concat();
    assert!(input.len() < 8 * 1024, "one read's worth of input");
    let mut rewriter = Rewriter::new();
    let mut out = Vec::new();
    let mut produced = Vec::new();
    rewriter.feed(&input, &mut out).unwrap();
    let mut feeds = 1;
    loop {
        assert!(out.len() <= MAX_HELD, "{} bytes held at once", out.len());
        produced.append(&mut out);
        if !rewriter.backlogged {
            break;
        }
        rewriter.feed(&[], &mut out).unwrap();
        feeds += 1;
    }
    // 301 blocks of ~4 KB: about 1.2 MB, handed over ~64 KiB at a time.
    assert!(produced.len() > 300 * 4_000, "{}", produced.len());
    assert!(feeds >= produced.len() / MAX_HELD, "{feeds} feeds");
    assert!(rewriter.pending.is_empty());
    let blocks = header_blocks(&produced[PREFACE.len()..]);
    assert_eq!(blocks.len(), 301);
    assert!(blocks.iter().all(|block| *block == field));
    let streams: Vec<u32> = frames(&produced[PREFACE.len()..])
        .iter()
        .map(|f| f.stream_id)
        .collect();
    assert_eq!(streams, (0..301).map(|i| 1 + 2 * i).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_stream_holds_little_output_however_much_one_read_expands() {
    let (client, server) = UnixStream::pair().unwrap();
    let peer = PeerAtAccept {
        cred: None,
        start_time: None,
    };
    let mut server = H2AuthorityStream::new(server, peer, None);
    let (frames_in, field) = amplifying_frames(300);
    let (_client_read, mut client_write) = client.into_split();
    client_write
        .write_all(&[PREFACE, &frames_in].concat())
        .await
        .unwrap();
    drop(client_write);

    // h2 reading slowly: 1,000 bytes at a time.
    let mut got = Vec::new();
    let mut most_held = 0;
    loop {
        let mut buf = [0; 1_000];
        let n = server.read(&mut buf).await.unwrap();
        most_held = most_held.max(server.ready.len());
        assert!(server.ready.len() <= MAX_HELD, "{}", server.ready.len());
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(most_held >= MAX_PENDING_OUTPUT, "{most_held}");
    assert_eq!(&got[..PREFACE.len()], PREFACE);
    let blocks = header_blocks(&got[PREFACE.len()..]);
    assert_eq!(blocks.len(), 301);
    assert!(blocks.iter().all(|block| *block == field));
}

/// The continuation octets of an HPACK integer, after a prefix of all ones.
fn encode_integer_tail(out: &mut Vec<u8>, mut rest: usize) {
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[test]
fn malformed_hpack_is_refused_without_panicking() {
    let refused = |block: &[u8]| rewrite(&frame(HEADERS, END_HEADERS, 1, block)).unwrap_err();
    // A table size update cut short (fluke-hpack would panic on it).
    assert_eq!(refused(&[0x3f]), H2AuthorityError::MalformedHpack);
    assert_eq!(
        refused(&[0x3f, 0xff, 0xff]),
        H2AuthorityError::MalformedHpack
    );
    // An integer with more continuation octets than any table size needs.
    assert_eq!(
        refused(&[0x3f, 0x80, 0x80, 0x80, 0x80, 0x01]),
        H2AuthorityError::MalformedHpack
    );
    // A string longer than the block, a literal with no value.
    assert_eq!(
        refused(&[0x41, 0x0a, b'a']),
        H2AuthorityError::MalformedHpack
    );
    assert_eq!(
        refused(&[0x00, 0x01, b'a']),
        H2AuthorityError::MalformedHpack
    );
    assert_eq!(refused(&[0x82, 0x10]), H2AuthorityError::MalformedHpack);
    // Size updates: only first, and never above what h2 advertises.
    assert_eq!(
        refused(&[0x82, 0x20]),
        H2AuthorityError::MisplacedTableSizeUpdate
    );
    assert_eq!(
        refused(&[0x3f, 0xe2, 0x1f, 0x82]),
        H2AuthorityError::Hpack(DecoderError::InvalidMaxDynamicSize)
    );
    assert_eq!(
        refused(&[0x20]),
        H2AuthorityError::Hpack(DecoderError::SizeUpdateAtEnd)
    );
    // An index past both tables; a Huffman string with the EOS symbol in it.
    assert_eq!(
        refused(&[0xbe]),
        H2AuthorityError::Hpack(DecoderError::HeaderIndexOutOfBounds)
    );
    assert!(matches!(
        refused(&[0x41, 0x84, 0xff, 0xff, 0xff, 0xff]),
        H2AuthorityError::Hpack(DecoderError::StringDecodingError(_))
    ));
}

#[test]
fn a_size_update_at_the_start_is_accepted_and_not_forwarded() {
    // Shrink the table to 0 and back to 4,096, then one field.
    let out = rewrite(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &[0x20, 0x3f, 0xe1, 0x1f, 0x82],
    ))
    .unwrap();
    let [got] = frames(&out).try_into().ok().unwrap();
    assert_eq!(
        got.payload,
        [
            0x00, 7, b':', b'm', b'e', b't', b'h', b'o', b'd', 3, b'G', b'E', b'T'
        ]
    );
}

#[tokio::test]
async fn the_stream_rewrites_what_it_reads_passes_what_it_writes_and_keeps_the_peer() {
    let (client, server) = UnixStream::pair().unwrap();
    let procfs = Procfs::host();
    let peer = PeerAtAccept::record(&server, &procfs);
    let mut server = H2AuthorityStream::new(server, peer, None);
    assert_eq!(server.connect_info(), peer);
    let cred = peer.cred.expect("peer credentials");
    let pid = std::process::id() as i32;
    assert_eq!(cred.pid(), Some(pid));
    assert_eq!(peer.start_time, Some(procfs.start_time(pid).unwrap()));

    let block = Encoder::new().encode([(&b":authority"[..], &b"%2Fa.sock"[..])]);
    let (mut client_read, mut client_write) = client.into_split();
    client_write
        .write_all(&[PREFACE, &frame(HEADERS, END_HEADERS, 1, &block)].concat())
        .await
        .unwrap();
    let expected = [
        PREFACE,
        &frame(HEADERS, END_HEADERS, 1, b"\x00\x0a:authority\x09localhost"),
    ]
    .concat();
    let mut got = vec![0; expected.len()];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(got, expected);

    let reply = frame(0x4, 0, 0, &[]);
    server.write_all(&reply).await.unwrap();
    let mut echoed = vec![0; reply.len()];
    client_read.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, reply);

    // Garbage after that closes the connection with the reason.
    client_write
        .write_all(&frame(CONTINUATION, END_HEADERS, 9, &[]))
        .await
        .unwrap();
    let error = server.read(&mut [0; 64]).await.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert_eq!(
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<H2AuthorityError>()),
        Some(&H2AuthorityError::UnexpectedContinuation(9))
    );

    // End of stream from the client is end of stream for h2.
    drop(client_write);
    drop(client_read);
    assert_eq!(server.read(&mut [0; 64]).await.unwrap(), 0);
}
