use serde_json::json;
use sigil_policy::validate;

use super::*;

fn object(kind: Kind, name: &str, spec: serde_json::Value) -> Result<Compiled, Box<InvalidPolicy>> {
    let envelope = Envelope {
        creation_timestamp: Some("2026-01-02T03:04:05Z".into()),
        uid: Some(format!("uid-{name}")),
        ..Envelope::new(kind, "demo", name)
    };
    validate::object(&envelope, &spec)
}

#[test]
fn every_compiled_field_survives_the_wire() {
    let objects = [
        object(
            Kind::AuthorizationPolicy,
            "everything",
            json!({
                "action": "DENY",
                "selector": {"matchLabels": {"app": "db", "tier": "data"}},
                "rules": [{
                    "from": [{"source": {
                        "principals": ["cluster.local/ns/demo/sa/*"],
                        "notNamespaces": ["prod*"],
                        "ipBlocks": ["10.0.0.0/8", "2001:db8::/32"],
                    }}, {"source": {"serviceAccounts": ["demo/web"], "notIpBlocks": ["10.1.2.3"]}}],
                    "to": [{"operation": {
                        "hosts": ["example.com:*"], "notPorts": ["9090"],
                        "methods": ["GET"], "notPaths": ["*/admin", "/x"],
                    }}],
                    "when": [
                        {"key": "source.ip", "values": ["192.0.2.0/24"]},
                        {"key": "source.namespace", "notValues": ["kube-system"]},
                        {"key": "source.principal", "values": ["*"]},
                        {"key": "destination.port", "values": ["8080"]},
                        {"key": "request.headers[x-team]", "values": ["blue"]},
                    ],
                }],
            }),
        ),
        object(
            Kind::PeerAuthentication,
            "ports",
            json!({
                "selector": {"matchLabels": {"app": "db"}},
                "mtls": {"mode": "PERMISSIVE"},
                "portLevelMtls": {"9090": {"mode": "DISABLE"}, "8080": {"mode": "UNSET"}},
            }),
        ),
        object(
            Kind::AuthorizationPolicy,
            "broken",
            json!({"action": "ALLOW", "selector": {"matchLabels": {"app": "db"}}, "rules": [{"bogus": 1}]}),
        ),
    ];
    for object in &objects {
        let sent = to_wire(object);
        let received = from_wire(&sent, "demo");
        assert_eq!(to_wire(&received), sent, "{object:?}");
    }
    let Err(invalid) = &objects[2] else {
        panic!("an unknown field is invalid");
    };
    assert_eq!(invalid.stand_in, StandIn::AllowNothing);
    assert_eq!(invalid.selector, [("app".to_owned(), "db".to_owned())]);
    assert_eq!(
        invalid.envelope.creation_timestamp.as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
}

#[test]
fn an_entry_the_proxy_cannot_read_fails_closed() {
    let Ok(Compiled::AuthorizationPolicy(allow)) = object(
        Kind::AuthorizationPolicy,
        "allow",
        json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]}),
    ) else {
        panic!("valid");
    };
    let mut sent = to_wire(&Ok(Compiled::AuthorizationPolicy(allow)));
    let Some(WirePolicy::AuthorizationPolicy(p)) = sent.policy.as_mut() else {
        panic!("an AuthorizationPolicy");
    };
    // An action newer than this proxy: it denies what the policy selects.
    p.action = 42;
    let invalid = from_wire(&sent, "demo").unwrap_err();
    assert_eq!(invalid.stand_in, StandIn::DenySelected);
    assert_eq!(invalid.selector, [("app".to_owned(), "db".to_owned())]);
    assert!(
        invalid
            .to_string()
            .starts_with("demo/allow: unknown action 42")
    );

    // A kind newer than this proxy: everything in the workload's namespace is denied.
    let invalid = from_wire(&wire::Policy { policy: None }, "demo").unwrap_err();
    assert_eq!(invalid.stand_in, StandIn::DenySelected);
    assert_eq!(invalid.envelope.key.namespace, "demo");
    assert!(invalid.selector.is_empty());

    // A stand-in newer than this proxy is the strictest one.
    let unknown = wire::Policy {
        policy: Some(WirePolicy::Invalid(wire::InvalidPolicy {
            stand_in: 9,
            ..Default::default()
        })),
    };
    assert_eq!(
        from_wire(&unknown, "demo").unwrap_err().stand_in,
        StandIn::DenySelected
    );
}
