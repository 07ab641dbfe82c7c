//! Policy engine benchmark (a program that prints numbers, not a test).
//!
//! Builds 100 AuthorizationPolicies of 10 rules each (10 DENY, 5 AUDIT, 85 ALLOW; rules mixing
//! principals exact and prefix, namespaces, service accounts, IP blocks, ports, methods, paths
//! and `when` conditions), all applying to the workload, and measures single-threaded
//! `PolicySet::evaluate` calls: a plain-TCP connection and an HTTP request that match nothing
//! (every rule of every policy is tried: the worst case, ending in `DENY default`), and an HTTP
//! request allowed by a rule of an ALLOW policy midway through them. Also times compiling the 100 policies.
//!
//! Run: `cargo bench --bench policy` (BENCH_SECONDS=3 per row by default).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use sigil_identity::SpiffeId;
use sigil_policy::file::parse_policy_set;
use sigil_policy::{HeaderMap, HttpRequest, Peer, PolicySet, Request, Workload};
use sigil_test_harness::load::env_or;

const POLICIES: usize = 100;
const RULES: usize = 10;
const DENY_POLICIES: usize = 10;
const AUDIT_POLICIES: usize = 5;
/// Decisions between clock reads, so reading the clock costs nothing measurable.
const BATCH: u32 = 10_000;

/// Rule `k` of policy `i`: five shapes, so every field kind is exercised.
fn rule(i: usize, k: usize) -> String {
    match k % 5 {
        0 => format!(
            "{{from: [{{source: {{principals: [cluster.local/ns/ns-{i}/sa/sa-{k}, \"cluster.local/ns/team-{i}-{k}/*\"]}}}}], to: [{{operation: {{ports: [\"{}\"]}}}}]}}",
            8000 + k
        ),
        1 => format!(
            "{{from: [{{source: {{namespaces: [ns-{i}-{k}, \"*-{i}x{k}\"], notIpBlocks: [10.255.0.0/16]}}}}]}}"
        ),
        2 => format!(
            "{{from: [{{source: {{serviceAccounts: [ns-{i}/sa-{k}, ns-{i}/db-{k}]}}}}], to: [{{operation: {{ports: [\"{}\", \"{}\"]}}}}]}}",
            9000 + k,
            9100 + k
        ),
        // With a port: an HTTP-only DENY rule would match every TCP connection.
        3 => format!(
            "{{to: [{{operation: {{ports: [\"{}\"], methods: [GET, HEAD], paths: [\"/api/v{i}/{k}/*\", /healthz-{i}-{k}]}}}}]}}",
            8500 + k
        ),
        _ => format!(
            "{{from: [{{source: {{ipBlocks: [10.{i}.{k}.0/24]}}}}], when: [{{key: source.principal, values: [\"*/sa/batch-{i}\"]}}]}}"
        ),
    }
}

fn policies() -> String {
    let mut text = String::new();
    for i in 0..POLICIES {
        let action = if i < DENY_POLICIES {
            "DENY"
        } else if i < DENY_POLICIES + AUDIT_POLICIES {
            "AUDIT"
        } else {
            "ALLOW"
        };
        // A tenth of the policies are mesh-wide, the rest in the workload's namespace with a
        // matching selector, so every one applies.
        let (namespace, selector) = if i % 10 == 0 {
            ("sigil-system", "")
        } else {
            ("demo", "selector: {matchLabels: {app: web}}, ")
        };
        let rules: Vec<String> = (0..RULES).map(|k| rule(i, k)).collect();
        text.push_str(&format!(
            "apiVersion: sigil.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i:03}, namespace: {namespace}}}\nspec: {{{selector}action: {action}, rules: [{}]}}\n---\n",
            rules.join(", ")
        ));
    }
    text
}

fn measure(set: &PolicySet, workload: &Workload<'_>, request: &Request<'_>, seconds: u64) -> f64 {
    let budget = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut decisions: u64 = 0;
    while start.elapsed() < budget {
        for _ in 0..BATCH {
            black_box(set.evaluate(black_box(workload), black_box(request)));
        }
        decisions += u64::from(BATCH);
    }
    start.elapsed().as_nanos() as f64 / decisions as f64
}

fn main() {
    let seconds = env_or("BENCH_SECONDS", 3u64);
    let text = policies();
    let compile_start = Instant::now();
    let set = parse_policy_set(&text).expect("benchmark policies are valid");
    let compile = compile_start.elapsed();

    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let workload = Workload {
        namespace: "demo",
        labels: &labels,
    };
    let outsider =
        Peer::new(&SpiffeId::parse("spiffe://cluster.local/ns/outsider/sa/x").expect("ID"));
    let insider = Peer::new(&SpiffeId::parse("spiffe://cluster.local/ns/ns-57/sa/x").expect("ID"));
    let headers = HeaderMap::new();
    let source_ip: IpAddr = [192, 168, 1, 1].into();
    let tcp = Request {
        peer: Some(&outsider),
        source_ip,
        destination_port: 7777,
        http: None,
    };
    let http_miss = Request {
        http: Some(HttpRequest {
            method: "POST",
            path: "/api/v999/0/items?limit=10",
            host: "web.demo.svc.cluster.local",
            headers: &headers,
        }),
        ..tcp
    };
    let http_hit = Request {
        peer: Some(&insider),
        destination_port: 8503,
        http: Some(HttpRequest {
            method: "GET",
            path: "/api/v57/3/items",
            host: "web.demo.svc.cluster.local",
            headers: &headers,
        }),
        ..tcp
    };

    println!(
        "{POLICIES} policies x {RULES} rules ({DENY_POLICIES} DENY, {AUDIT_POLICIES} AUDIT, {} ALLOW), all applying; compiled in {:.1} ms",
        POLICIES - DENY_POLICIES - AUDIT_POLICIES,
        compile.as_secs_f64() * 1e3
    );
    println!(
        "{:<46} {:>12} {:>12}",
        "request", "ns/decision", "decisions/s"
    );
    for (label, request) in [
        ("L4 (TCP), no rule matches: DENY default", &tcp),
        ("HTTP, no rule matches: DENY default", &http_miss),
        ("HTTP, allowed by an ALLOW policy midway", &http_hit),
    ] {
        let decision = set.evaluate(&workload, request).to_string();
        let ns = measure(&set, &workload, request, seconds);
        println!("{label:<46} {ns:>12.0} {:>12.0}   ({decision})", 1e9 / ns);
    }
}
