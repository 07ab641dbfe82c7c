use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};
use sigil_identity::SpiffeId;
use sigil_policy::{Envelope, Kind, Peer, Request};
use sigil_proto::sigil::policy::v2 as wire;

use super::*;

fn state_of(policies: Vec<wire::Policy>) -> PolicyState {
    PolicyState::from_wire(&WirePolicySet {
        version: 1,
        namespace: "demo".into(),
        labels: [("app".to_string(), "db".to_string())].into(),
        policies,
    })
}

/// `objects` as the agent sends them: each validated and compiled, or invalid.
fn state(objects: &[Value]) -> PolicyState {
    state_of(objects.iter().map(sent).collect())
}

fn sent(object: &Value) -> wire::Policy {
    let kind = Kind::from_name(object["kind"].as_str().unwrap()).unwrap();
    let metadata = &object["metadata"];
    let envelope = Envelope::new(
        kind,
        metadata["namespace"].as_str().unwrap(),
        metadata["name"].as_str().unwrap(),
    );
    let checked = sigil_policy::validate::object(&envelope, &object["spec"]);
    sigil_proxy_api::policy::to_wire(&checked)
}

fn authz(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    })
}

fn decide(state: &PolicyState, peer: Option<&str>) -> String {
    let peer = peer.map(|id| Peer::new(&SpiffeId::parse(id).unwrap()));
    let request = Request {
        peer: peer.as_ref(),
        source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        destination_port: 8080,
        http: None,
    };
    state.set.evaluate(&state.workload(), &request).to_string()
}

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";

#[test]
fn invalid_objects_fail_closed() {
    // A DENY with a lowercase method (invalid) denies everything it selects.
    let s = state(&[authz(
        "bad-deny",
        json!({"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
               "rules": [{"to": [{"operation": {"methods": ["get"]}}]}]}),
    )]);
    assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
    assert!(s.rejected[0].contains("demo/bad-deny"), "{:?}", s.rejected);
    assert_eq!(decide(&s, Some(WEB)), "DENY demo/bad-deny");

    // An invalid ALLOW allows nothing but still takes away the default allow.
    let s = state(&[authz(
        "bad-allow",
        json!({"rules": [{"from": [{"source": {"principals": ["x"], "serviceAccounts": ["demo/web"]}}]}]}),
    )]);
    assert_eq!(s.rejected.len(), 1);
    assert_eq!(decide(&s, Some(WEB)), "DENY default");

    // An invalid AUDIT policy is dropped: it never decides.
    let s = state(&[authz(
        "bad-audit",
        json!({"action": "AUDIT", "rules": [{"unknown": 1}]}),
    )]);
    assert_eq!(s.rejected.len(), 1);
    assert_eq!(decide(&s, Some(WEB)), "ALLOW default");

    // An unknown field in a PeerAuthentication makes that scope STRICT.
    let s = state(&[json!({
        "apiVersion": "sigil.dev/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "bad-peer", "namespace": "demo"},
        "spec": {"mtls": {"mode": "PERMISSIVE"}, "typo": true},
    })]);
    assert_eq!(s.rejected.len(), 1);
    assert_eq!(s.mtls_mode(8080, MtlsMode::Disable), MtlsMode::Strict);

    // An entry of a kind this proxy does not know (a newer agent's): it denies everything in
    // the workload's namespace, and is reported (the log line and
    // sigil_proxy_policies_rejected come from this list).
    let s = state_of(vec![wire::Policy { policy: None }]);
    assert_eq!(s.rejected.len(), 1);
    assert!(
        s.rejected[0].contains("no policy of a kind"),
        "{:?}",
        s.rejected
    );
    assert_eq!(decide(&s, None), "DENY demo/unknown-policy");
    assert_eq!(decide(&s, Some(WEB)), "DENY demo/unknown-policy");
    // An AuthorizationPolicy with an action this proxy does not know stands in as a DENY of
    // everything it selects.
    let mut future = sent(&authz("future", json!({"action": "DENY", "rules": [{}]})));
    if let Some(wire::policy::Policy::AuthorizationPolicy(p)) = future.policy.as_mut() {
        p.action = 42;
    }
    let s = state_of(vec![future]);
    assert_eq!(s.rejected.len(), 1);
    assert_eq!(decide(&s, Some(WEB)), "DENY demo/future");
}

#[test]
fn valid_objects_decide_and_http_fields_are_noticed() {
    let s = state(&[authz(
        "allow-web",
        json!({"selector": {"matchLabels": {"app": "db"}},
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/web"]}}],
                          "to": [{"operation": {"paths": ["/api/*"]}}]}]}),
    )]);
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert!(s.needs_http);
    // At L4 the HTTP field cannot match in an ALLOW rule.
    assert_eq!(decide(&s, Some(WEB)), "DENY default");
    let s = state(&[authz(
        "allow-web-l4",
        json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/web"]}}]}]}),
    )]);
    assert!(!s.needs_http);
    assert_eq!(decide(&s, Some(WEB)), "ALLOW demo/allow-web-l4");
    assert_eq!(decide(&s, None), "DENY default");
}
