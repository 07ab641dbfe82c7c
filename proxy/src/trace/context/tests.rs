use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const OURS: SpanId = SpanId([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    headers
}

fn trace_id(hex: &str) -> TraceId {
    let padded = format!("{hex:0>32}");
    TraceId(parse_hex(padded.as_bytes()).unwrap())
}

fn span_id(hex: &str) -> SpanId {
    SpanId(parse_hex(hex.as_bytes()).unwrap())
}

fn continued(sampled: Option<bool>) -> Incoming {
    Incoming {
        trace_id: trace_id(TRACE),
        parent: Some(span_id(PARENT)),
        sampled,
        debug: false,
        random: false,
        short_trace_id: false,
    }
}

#[test]
fn traceparent_rules() {
    let valid = |flags: &str| format!("00-{TRACE}-{PARENT}-{flags}");
    // (header value, the expected context)
    let cases: Vec<(String, Option<Incoming>)> = vec![
        (valid("01"), Some(continued(Some(true)))),
        (valid("00"), Some(continued(Some(false)))),
        // Level 2's random flag is kept, the unknown ones ignored.
        (
            valid("03"),
            Some(Incoming {
                random: true,
                ..continued(Some(true))
            }),
        ),
        (
            valid("fd"),
            Some(Incoming {
                random: false,
                ..continued(Some(true))
            }),
        ),
        // A later version may append fields after a dash.
        (
            format!("cc-{TRACE}-{PARENT}-01"),
            Some(continued(Some(true))),
        ),
        (
            format!("cc-{TRACE}-{PARENT}-01-what-the-future-holds"),
            Some(continued(Some(true))),
        ),
        // Version 00 is exactly 55 bytes.
        (format!("{}-extra", valid("01")), None),
        (format!("cc-{TRACE}-{PARENT}-01x"), None),
        (format!("ff-{TRACE}-{PARENT}-01"), None),
        // Lowercase hex only.
        (valid("01").to_uppercase(), None),
        (format!("00-{}-{PARENT}-01", TRACE.to_uppercase()), None),
        (format!("0g-{TRACE}-{PARENT}-01"), None),
        // All-zero ids.
        (format!("00-{}-{PARENT}-01", "0".repeat(32)), None),
        (format!("00-{TRACE}-{}-01", "0".repeat(16)), None),
        // Lengths and separators.
        (format!("00-{}-{PARENT}-01", &TRACE[1..]), None),
        (format!("00_{TRACE}-{PARENT}-01"), None),
        (format!("00-{TRACE}_{PARENT}-01"), None),
        (format!("00-{TRACE}-{PARENT}_01"), None),
        (String::new(), None),
    ];
    for (value, expected) in cases {
        assert_eq!(
            extract(&headers(&[("traceparent", &value)])),
            expected,
            "traceparent: {value:?}"
        );
    }
    // Exactly one header.
    let twice = headers(&[("traceparent", &valid("01")), ("traceparent", &valid("01"))]);
    assert_eq!(extract(&twice), None);
}

#[test]
fn b3_single_rules() {
    let short = "a3ce929d0e0e4736";
    let cases: Vec<(String, Option<Incoming>)> = vec![
        (format!("{TRACE}-{PARENT}-1"), Some(continued(Some(true)))),
        (format!("{TRACE}-{PARENT}-0"), Some(continued(Some(false)))),
        // No decision: deferred to us.
        (format!("{TRACE}-{PARENT}"), Some(continued(None))),
        (
            format!("{TRACE}-{PARENT}-d"),
            Some(Incoming {
                debug: true,
                ..continued(Some(true))
            }),
        ),
        (
            format!("{TRACE}-{PARENT}-1-{}", "e457b5a2e4d86bd1"),
            Some(continued(Some(true))),
        ),
        // A 64-bit trace id is padded, and remembered as short.
        (
            format!("{short}-{PARENT}-1"),
            Some(Incoming {
                trace_id: trace_id(short),
                short_trace_id: true,
                ..continued(Some(true))
            }),
        ),
        (format!("{TRACE}-{PARENT}-2"), None),
        (format!("{TRACE}-{PARENT}-1-{}", "0".repeat(16)), None),
        (format!("{TRACE}-{PARENT}-1-e457b5a2e4d86bd1-x"), None),
        (format!("{}-{PARENT}-1", &TRACE[..20]), None),
        (format!("{}-{PARENT}-1", "0".repeat(16)), None),
        (format!("{TRACE}-{}-1", "0".repeat(16)), None),
        (format!("{TRACE}-{}-1", PARENT.to_uppercase()), None),
        (TRACE.to_owned(), None),
        ("2".to_owned(), None),
    ];
    for (value, expected) in cases {
        assert_eq!(
            extract(&headers(&[("b3", &value)])),
            expected,
            "b3: {value:?}"
        );
    }
}

#[test]
fn b3_decisions_without_ids_start_a_trace_with_that_decision() {
    for (value, sampled, debug) in [("1", true, false), ("0", false, false), ("d", true, true)] {
        let incoming = extract(&headers(&[("b3", value)])).unwrap();
        assert_eq!(incoming.parent, None, "b3: {value}");
        assert_eq!(incoming.sampled, Some(sampled), "b3: {value}");
        assert_eq!(incoming.debug, debug, "b3: {value}");
        assert_ne!(incoming.trace_id, TraceId([0; 16]));
    }
    let incoming = extract(&headers(&[("x-b3-sampled", "0")])).unwrap();
    assert_eq!((incoming.parent, incoming.sampled), (None, Some(false)));
    let incoming = extract(&headers(&[("x-b3-flags", "1")])).unwrap();
    assert_eq!((incoming.sampled, incoming.debug), (Some(true), true));
}

#[test]
fn b3_multi_rules() {
    let ids = [("x-b3-traceid", TRACE), ("x-b3-spanid", PARENT)];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut pairs = ids.to_vec();
        pairs.extend_from_slice(extra);
        headers(&pairs)
    };
    assert_eq!(extract(&with(&[])), Some(continued(None)));
    for (sampled, decision) in [("1", true), ("true", true), ("0", false), ("false", false)] {
        assert_eq!(
            extract(&with(&[("x-b3-sampled", sampled)])),
            Some(continued(Some(decision))),
            "X-B3-Sampled: {sampled}"
        );
    }
    assert_eq!(extract(&with(&[("x-b3-sampled", "yes")])), None);
    assert_eq!(
        extract(&with(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")])),
        Some(Incoming {
            debug: true,
            ..continued(Some(true))
        })
    );
    assert_eq!(
        extract(&with(&[("x-b3-parentspanid", "e457b5a2e4d86bd1")])),
        Some(continued(None))
    );
    // Both ids are required.
    assert_eq!(extract(&headers(&[("x-b3-traceid", TRACE)])), None);
    assert_eq!(
        extract(&headers(&[("x-b3-spanid", PARENT), ("x-b3-sampled", "1")])),
        None
    );
    let short = extract(&headers(&[
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", PARENT),
    ]))
    .unwrap();
    assert_eq!(short.trace_id, trace_id("a3ce929d0e0e4736"));
    assert!(short.short_trace_id);
}

#[test]
fn precedence_is_traceparent_then_b3_then_x_b3() {
    let other = "0af7651916cd43dd8448eb211c80319c";
    let all = headers(&[
        ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
        ("b3", &format!("{other}-{PARENT}-1")),
        ("x-b3-traceid", "11111111111111111111111111111111"),
        ("x-b3-spanid", PARENT),
    ]);
    assert_eq!(extract(&all).unwrap().trace_id, trace_id(TRACE));
    // An invalid traceparent counts as absent: b3 wins.
    let mut fallback = all.clone();
    fallback.insert(TRACEPARENT, HeaderValue::from_static("00-zz"));
    assert_eq!(extract(&fallback).unwrap().trace_id, trace_id(other));
    fallback.insert(B3, HeaderValue::from_static("garbage"));
    assert_eq!(
        extract(&fallback).unwrap().trace_id,
        trace_id("11111111111111111111111111111111")
    );
    assert_eq!(extract(&HeaderMap::new()), None);
}

fn outgoing(incoming: &Incoming, sampled: bool) -> Outgoing {
    Outgoing {
        trace_id: incoming.trace_id,
        span_id: OURS,
        parent: incoming.parent,
        sampled,
        debug: incoming.debug,
        random: incoming.random,
        short_trace_id: incoming.short_trace_id,
    }
}

#[test]
fn inject_rewrites_every_format_present_with_our_span() {
    let mut all = headers(&[
        ("traceparent", &format!("00-{TRACE}-{PARENT}-03")),
        ("tracestate", "vendor=opaque,other=1"),
        ("tracestate", "third=3"),
        ("b3", &format!("{TRACE}-{PARENT}-1")),
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", PARENT),
        ("x-b3-sampled", "1"),
    ]);
    let incoming = extract(&all).unwrap();
    inject(&mut all, &outgoing(&incoming, true), false);
    assert_eq!(
        all["traceparent"],
        format!("00-{TRACE}-1122334455667788-03")
    );
    let states: Vec<_> = all.get_all("tracestate").iter().collect();
    assert_eq!(states, ["vendor=opaque,other=1", "third=3"]);
    assert_eq!(all["b3"], format!("{TRACE}-1122334455667788-1-{PARENT}"));
    assert_eq!(all["x-b3-traceid"], TRACE);
    assert_eq!(all["x-b3-spanid"], "1122334455667788");
    assert_eq!(all["x-b3-parentspanid"], PARENT);
    assert_eq!(all["x-b3-sampled"], "1");
    // What we wrote reads back as our span, in every format.
    for format in ["traceparent", "b3", "x-b3-traceid"] {
        let mut only = all.clone();
        for name in ["traceparent", "b3", "x-b3-traceid"] {
            if name != format {
                only.remove(name);
            }
        }
        let read = extract(&only).unwrap();
        assert_eq!(
            (read.trace_id, read.parent, read.sampled),
            (incoming.trace_id, Some(OURS), Some(true)),
            "{format}"
        );
    }
}

#[test]
fn inject_keeps_b3_widths_and_debug() {
    let short = "a3ce929d0e0e4736";
    let mut single = headers(&[("b3", &format!("{short}-{PARENT}-d"))]);
    let incoming = extract(&single).unwrap();
    inject(&mut single, &outgoing(&incoming, true), false);
    assert_eq!(single["b3"], format!("{short}-1122334455667788-d-{PARENT}"));
    assert!(!single.contains_key("traceparent"));

    let mut multi = headers(&[
        ("x-b3-traceid", short),
        ("x-b3-spanid", PARENT),
        ("x-b3-flags", "1"),
    ]);
    let incoming = extract(&multi).unwrap();
    inject(&mut multi, &outgoing(&incoming, true), false);
    assert_eq!(multi["x-b3-traceid"], short);
    assert_eq!(multi["x-b3-flags"], "1");
    assert!(!multi.contains_key("x-b3-sampled"));
    let read = extract(&multi).unwrap();
    assert_eq!(
        read,
        Incoming {
            parent: Some(OURS),
            ..incoming
        }
    );
}

#[test]
fn a_root_gets_traceparent_only() {
    let mut plain = HeaderMap::new();
    let root = Outgoing {
        trace_id: trace_id(TRACE),
        span_id: OURS,
        parent: None,
        sampled: false,
        debug: false,
        random: false,
        short_trace_id: false,
    };
    inject(&mut plain, &root, true);
    assert_eq!(plain.len(), 1);
    assert_eq!(
        plain["traceparent"],
        format!("00-{TRACE}-1122334455667788-00")
    );
    inject(
        &mut plain,
        &Outgoing {
            sampled: true,
            ..root.clone()
        },
        true,
    );
    assert_eq!(
        plain["traceparent"],
        format!("00-{TRACE}-1122334455667788-01")
    );

    // A B3 decision without ids: b3 is rewritten whole, and the root's traceparent added.
    let mut decided = headers(&[("b3", "1")]);
    inject(
        &mut decided,
        &Outgoing {
            sampled: true,
            ..root
        },
        true,
    );
    assert_eq!(decided["b3"], format!("{TRACE}-1122334455667788-1"));
    assert_eq!(
        decided["traceparent"],
        format!("00-{TRACE}-1122334455667788-01")
    );
}

#[test]
fn an_invalid_traceparent_is_replaced_and_its_tracestate_dropped() {
    let mut invalid = headers(&[
        ("traceparent", "00-nonsense"),
        ("tracestate", "vendor=opaque"),
        ("b3", &format!("{TRACE}-{PARENT}-1")),
    ]);
    let incoming = extract(&invalid).unwrap();
    inject(&mut invalid, &outgoing(&incoming, true), false);
    assert_eq!(
        invalid["traceparent"],
        format!("00-{TRACE}-1122334455667788-01")
    );
    assert!(!invalid.contains_key("tracestate"));
    // A stray tracestate does not join the trace a root starts.
    let mut stray = headers(&[("tracestate", "vendor=opaque")]);
    assert_eq!(extract(&stray), None);
    let root = Outgoing {
        parent: None,
        ..outgoing(&incoming, false)
    };
    inject(&mut stray, &root, true);
    assert!(stray.contains_key("traceparent"));
    assert!(!stray.contains_key("tracestate"));
}

#[test]
fn random_ids_are_never_zero_and_differ() {
    let a = (TraceId::random(), SpanId::random());
    let b = (TraceId::random(), SpanId::random());
    assert_ne!(a, b);
    assert_ne!(a.0, TraceId([0; 16]));
    assert_ne!(a.1, SpanId([0; 8]));
    assert_eq!(a.0.to_string().len(), 32);
    assert_eq!(a.1.to_string().len(), 16);
}
