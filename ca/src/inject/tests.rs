//! The injector against AdmissionReview documents shaped as the API server sends them
//! (`tests/fixtures/admission/`): what it patches, what it leaves alone, what it refuses.

use super::*;
use base64::Engine;

const WEB_REVIEW: &str = include_str!("../../../tests/fixtures/admission/web-pod.review.json");
const WEB_INJECTED: &str = include_str!("../../../tests/fixtures/admission/web-pod.injected.json");

fn config() -> InjectConfig {
    InjectConfig {
        image: "registry.example/sigil:0.1.0".into(),
        proxy_uid: sigil_proxy_api::PROXY_UID,
        excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES.map(String::from).into(),
        trace_collector: None,
    }
}

/// A named change to the web pod's review.
type Change = Box<dyn Fn(&mut Value)>;

fn web_review() -> Value {
    serde_json::from_str(WEB_REVIEW).unwrap()
}

/// Answers `review` and returns the response object and the outcome.
fn answer(review: &Value) -> (Value, Outcome) {
    let (response, outcome, _) = super::review(&serde_json::to_vec(review).unwrap(), &config());
    (response["response"].clone(), outcome)
}

/// The pod the API server would store: the request's object with the response's patch applied.
fn patched(review: &Value, response: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    pod
}

#[test]
fn a_deployment_pod_gets_the_expected_injected_pod() {
    let review = web_review();
    let (response, outcome) = answer(&review);
    assert_eq!(outcome, Outcome::Injected);
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    let pod = patched(&review, &response);
    let expected: Value = serde_json::from_str(WEB_INJECTED).unwrap();
    assert_eq!(
        pod,
        expected,
        "injected pod differs from tests/fixtures/admission/web-pod.injected.json:\n{}",
        serde_json::to_string_pretty(&pod).unwrap()
    );
    // It is still a pod the typed model reads.
    let pod: Pod = serde_json::from_value(pod).unwrap();
    let spec = pod.spec.unwrap();
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, [INIT_CONTAINER, PROXY_CONTAINER]);
    // Every probe could be carried: nothing to warn about.
    assert!(
        response.get("warnings").is_none_or(Value::is_null),
        "{response}"
    );
}

#[test]
fn http_probes_go_through_the_proxy_with_matching_flags() {
    let review = web_review();
    let pod = patched(&review, &answer(&review).0);
    let web = &pod["spec"]["containers"][0];
    // A named port is resolved from the container's ports.
    assert_eq!(
        web["livenessProbe"]["httpGet"],
        json!({"path": "/app-health/web-live", "port": 15020, "scheme": "HTTP"})
    );
    // Headers stay (the kubelet sends them to the proxy, which ignores them); timings stay.
    assert_eq!(web["readinessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(
        web["readinessProbe"]["httpGet"]["httpHeaders"][0]["name"],
        "X-Probe"
    );
    assert_eq!(web["readinessProbe"]["periodSeconds"], 5);
    assert_eq!(
        pod["spec"]["initContainers"][1]["command"],
        json!(["/sigil-proxy"])
    );
    let proxy_args = pod["spec"]["initContainers"][1]["args"].clone();
    assert_eq!(
        proxy_args,
        json!([
            "run",
            "--concurrency",
            "2",
            "--app-probe",
            "web-live=8080/healthz",
            "--app-probe",
            "web-ready=8080/ready#X-Probe=kubelet",
            "--app-probe",
            "metrics-exporter-live=tcp:9100"
        ])
    );
    // The TCP probe becomes an HTTP GET of the proxy, which connects to the app's port.
    assert_eq!(
        pod["spec"]["containers"][1]["livenessProbe"],
        json!({
            "httpGet": {"path": "/app-health/metrics-exporter-live", "port": 15020, "scheme": "HTTP"},
            "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3
        })
    );
}

#[test]
fn https_and_grpc_probes_become_proxy_probes_of_the_same_kind() {
    let mut review = web_review();
    let web = &mut review["request"]["object"]["spec"]["containers"][0];
    web["livenessProbe"]["httpGet"]["scheme"] = json!("HTTPS");
    web["readinessProbe"] =
        json!({"grpc": {"port": 8080, "service": "orders"}, "periodSeconds": 5});
    web["startupProbe"] = json!({"grpc": {"port": 8080}});
    let (response, _) = answer(&review);
    assert!(
        response.get("warnings").is_none_or(Value::is_null),
        "{response}"
    );
    let pod = patched(&review, &response);
    let web = &pod["spec"]["containers"][0];
    // The kubelet speaks plain HTTP to the proxy; the proxy speaks HTTPS or gRPC to the app.
    assert_eq!(
        web["livenessProbe"]["httpGet"],
        json!({"path": "/app-health/web-live", "port": 15020, "scheme": "HTTP"})
    );
    assert_eq!(
        web["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/web-ready", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 5})
    );
    let args = pod["spec"]["initContainers"][1]["args"].as_array().unwrap();
    for flag in [
        "web-live=https:8080/healthz",
        "web-ready=grpc:8080/orders",
        "web-startup=grpc:8080/",
    ] {
        assert!(args.contains(&json!(flag)), "{flag} not in {args:?}");
    }
}

#[test]
fn probe_headers_travel_in_the_flag_and_odd_probes_warn_in_plain_words() {
    let mut review = web_review();
    let web = &mut review["request"]["object"]["spec"]["containers"][0];
    web["livenessProbe"]["httpGet"]["httpHeaders"] = json!([
        {"name": "Host", "value": "shop.example"},
        {"name": "Authorization", "value": "Bearer a#b%c"},
    ]);
    web["startupProbe"] = json!({"httpGet": {"port": "admin", "path": "/up"}});
    let (response, _) = answer(&review);
    assert_eq!(
        response["warnings"],
        json!([
            "sigil: the startup probe of container \"web\" names port \"admin\", which the \
             container does not declare; not rewritten"
        ])
    );
    let pod = patched(&review, &response);
    let args = pod["spec"]["initContainers"][1]["args"].as_array().unwrap();
    let flag = "web-live=8080/healthz#Host=shop.example#Authorization=Bearer a%23b%25c";
    assert!(args.contains(&json!(flag)), "{args:?}");
}

#[test]
fn an_injected_pod_is_not_injected_twice() {
    let review = web_review();
    let pod = patched(&review, &answer(&review).0);
    let mut again = review.clone();
    again["request"]["object"] = pod;
    let (response, outcome) = answer(&again);
    assert_eq!(outcome, Outcome::Skipped(SkipReason::AlreadyInjected));
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none_or(Value::is_null));
}

#[test]
fn pods_left_alone_are_admitted_unchanged() {
    let cases: Vec<(&str, Change, SkipReason)> = vec![
        (
            "host network",
            Box::new(|r| r["request"]["object"]["spec"]["hostNetwork"] = json!(true)),
            SkipReason::HostNetwork,
        ),
        (
            "excluded namespace",
            Box::new(|r| {
                r["request"]["namespace"] = json!("kube-system");
                r["request"]["object"]["metadata"]["namespace"] = json!("kube-system");
            }),
            SkipReason::ExcludedNamespace,
        ),
        (
            "opt-out annotation",
            Box::new(|r| {
                r["request"]["object"]["metadata"]["annotations"] = json!({INJECT_KEY: "false"})
            }),
            SkipReason::OptedOut,
        ),
        (
            "opt-out label",
            Box::new(|r| r["request"]["object"]["metadata"]["labels"][INJECT_KEY] = json!("false")),
            SkipReason::OptedOut,
        ),
        (
            "a container already named sigil-proxy",
            Box::new(|r| {
                r["request"]["object"]["spec"]["containers"][1]["name"] = json!(PROXY_CONTAINER)
            }),
            SkipReason::AlreadyInjected,
        ),
        (
            "an update",
            Box::new(|r| r["request"]["operation"] = json!("UPDATE")),
            SkipReason::NotPodCreate,
        ),
        (
            "the ephemeral-containers subresource",
            Box::new(|r| r["request"]["subResource"] = json!("ephemeralcontainers")),
            SkipReason::NotPodCreate,
        ),
    ];
    for (what, change, reason) in cases {
        let mut review = web_review();
        change(&mut review);
        let (response, outcome) = answer(&review);
        assert_eq!(outcome, Outcome::Skipped(reason), "{what}");
        assert_eq!(response["allowed"], true, "{what}");
        assert_eq!(response["uid"], review["request"]["uid"], "{what}");
        assert!(
            response.get("patch").is_none_or(Value::is_null),
            "{what}: {response}"
        );
    }
}

#[test]
fn pods_that_cannot_be_meshed_are_refused_with_the_reason() {
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "an app port the proxy uses",
            Box::new(|r| {
                r["request"]["object"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                    json!(15006)
            }),
            "declares port 15006",
        ),
        (
            "an app running as the proxy's uid",
            Box::new(|r| {
                r["request"]["object"]["spec"]["securityContext"]["runAsUser"] = json!(1337)
            }),
            "runs as uid 1337",
        ),
        (
            "an init container running as the proxy's uid",
            Box::new(|r| {
                r["request"]["object"]["spec"]["initContainers"] = json!([{
                    "name": "migrate", "image": "registry.example/shop/migrate:1",
                    "securityContext": {"runAsUser": 1337},
                }])
            }),
            "container \"migrate\" runs as uid 1337",
        ),
        (
            "a native sidecar on the proxy's inbound port",
            Box::new(|r| {
                r["request"]["object"]["spec"]["initContainers"] = json!([{
                    "name": "logs", "image": "registry.example/tools/logs:1",
                    "restartPolicy": "Always",
                    "ports": [{"containerPort": 15006}],
                }])
            }),
            "container \"logs\" declares port 15006",
        ),
        (
            "a CIDR that is not one",
            Box::new(|r| {
                r["request"]["object"]["metadata"]["annotations"] =
                    json!({EXCLUDE_OUTBOUND_CIDRS: "169.254.169.254/32, 10.0.0.0/33"})
            }),
            "\"10.0.0.0/33\" is not valid",
        ),
        (
            "a port that is not one",
            Box::new(|r| {
                r["request"]["object"]["metadata"]["annotations"] =
                    json!({EXCLUDE_INBOUND_PORTS: "8080,http"})
            }),
            "\"http\" is not valid",
        ),
        (
            "an app mounting the agent's socket directory (writable, to replace the socket)",
            Box::new(|r| {
                r["request"]["object"]["spec"]["containers"][0]["volumeMounts"] =
                    json!([{"name": AGENT_VOLUME, "mountPath": "/run/sigil"}])
            }),
            "container \"web\" mounts volume \"sigil-agent\", which the sigil injector reserves",
        ),
        (
            "an init container mounting it",
            Box::new(|r| {
                r["request"]["object"]["spec"]["initContainers"] = json!([{
                    "name": "setup", "image": "registry.example/tools/setup:1",
                    "volumeMounts": [{"name": AGENT_VOLUME, "mountPath": "/x"}],
                }])
            }),
            "container \"setup\" mounts volume \"sigil-agent\"",
        ),
        (
            "a pod defining a volume of that name",
            Box::new(|r| {
                r["request"]["object"]["spec"]["volumes"] =
                    json!([{"name": AGENT_VOLUME, "emptyDir": {}}])
            }),
            "the pod defines volume \"sigil-agent\"",
        ),
        (
            "an object that is not a pod",
            Box::new(|r| r["request"]["object"]["spec"]["containers"] = json!("web")),
            "not a valid Pod",
        ),
    ];
    for (what, change, message) in cases {
        let mut review = web_review();
        change(&mut review);
        let (response, outcome) = answer(&review);
        assert!(matches!(outcome, Outcome::Denied(_)), "{what}: {outcome:?}");
        assert_eq!(response["allowed"], false, "{what}");
        assert_eq!(response["uid"], review["request"]["uid"], "{what}");
        let status = response["status"]["message"].as_str().unwrap_or_default();
        assert!(status.contains(message), "{what}: {status}");
    }
}

#[test]
fn exclusion_annotations_reach_the_init_container() {
    let mut review = web_review();
    review["request"]["object"]["metadata"]["annotations"] = json!({
        EXCLUDE_INBOUND_PORTS: "9100",
        EXCLUDE_OUTBOUND_PORTS: "5432, 6379",
        EXCLUDE_OUTBOUND_CIDRS: "169.254.169.254/32",
    });
    let pod = patched(&review, &answer(&review).0);
    assert_eq!(
        pod["spec"]["initContainers"][0]["args"],
        json!([
            "proxy",
            "init",
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "9100,15020",
            "--exclude-outbound-ports",
            "5432,6379",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32"
        ])
    );
    // The proxy's metrics port stays out of the redirection whatever the pod lists, or the
    // kubelet's probes would meet the inbound listener.
    let mut review = web_review();
    review["request"]["object"]["metadata"]["annotations"] =
        json!({EXCLUDE_INBOUND_PORTS: "15020,9100"});
    let again = patched(&review, &answer(&review).0);
    assert_eq!(
        again["spec"]["initContainers"][0]["args"]
            .as_array()
            .unwrap()[4..],
        [json!("--exclude-inbound-ports"), json!("15020,9100")]
    );
    // The user's annotations stay, ours are added.
    assert_eq!(
        pod["metadata"]["annotations"][EXCLUDE_INBOUND_PORTS],
        "9100"
    );
    assert_eq!(
        pod["metadata"]["annotations"][STATUS_ANNOTATION],
        "injected"
    );
}

#[test]
fn cidr_annotations_take_ipv4_and_ipv6_with_their_prefix() {
    for good in [
        "169.254.169.254/32",
        "0.0.0.0/0",
        "2001:2:0:20::/64",
        "fd00:ec2::254/128",
        "::/0",
    ] {
        assert!(check_cidr(good), "{good}");
    }
    for bad in [
        // Without a prefix `sigil proxy init` refuses it, so the pod would never start.
        "169.254.169.254",
        "2001:2:0:20::1",
        "198.18.0.0/33",
        "2001:2:0:20::/129",
        "2001:2:0:20:::/64",
        "[2001:2:0:20::]/64",
        "example.com/32",
        "198.18.0.0/x",
    ] {
        assert!(!check_cidr(bad), "{bad}");
    }
    let mut review = web_review();
    review["request"]["object"]["metadata"]["annotations"] =
        json!({EXCLUDE_OUTBOUND_CIDRS: "169.254.169.254/32, fd00:ec2::254/128"});
    let args = patched(&review, &answer(&review).0)["spec"]["initContainers"][0]["args"].clone();
    assert_eq!(
        args.as_array().unwrap()[4..],
        [
            json!("--exclude-outbound-cidrs"),
            json!("169.254.169.254/32,fd00:ec2::254/128")
        ]
    );
    review["request"]["object"]["metadata"]["annotations"] =
        json!({EXCLUDE_OUTBOUND_CIDRS: "fd00:ec2::254/129"});
    let (response, outcome) = answer(&review);
    assert!(matches!(outcome, Outcome::Denied(_)), "{outcome:?}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("\"fd00:ec2::254/129\" is not valid (expected a comma-separated list of IPv4 or IPv6 CIDRs"),
        "{message}"
    );
}

#[test]
fn the_ipv6_annotation_reaches_the_init_container_and_a_bad_one_is_refused() {
    let init_args = |annotations: Value| {
        let mut review = web_review();
        review["request"]["object"]["metadata"]["annotations"] = annotations;
        let (response, outcome) = answer(&review);
        (outcome, response, review)
    };
    for mode in ["auto", "on", "off"] {
        let (outcome, response, review) = init_args(json!({IPV6_ANNOTATION: mode}));
        assert_eq!(outcome, Outcome::Injected, "{response}");
        let args = patched(&review, &response)["spec"]["initContainers"][0]["args"].clone();
        assert_eq!(
            args.as_array().unwrap()[4..],
            [json!("--ipv6"), json!(mode)],
            "{mode}"
        );
    }
    let (outcome, response, review) = init_args(json!({}));
    let args = patched(&review, &response)["spec"]["initContainers"][0]["args"].to_string();
    assert_eq!(outcome, Outcome::Injected);
    assert!(!args.contains("--ipv6"), "{args}");
    let (outcome, response, _) = init_args(json!({IPV6_ANNOTATION: "false"}));
    assert!(matches!(outcome, Outcome::Denied(_)), "{outcome:?}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("sigil.dev/ipv6: \"false\" is not valid"),
        "{message}"
    );
}

#[test]
fn the_access_log_annotation_turns_on_the_proxys_access_log_and_a_bad_one_is_refused() {
    let proxy_args = |annotations: Value| {
        let mut review = web_review();
        review["request"]["object"]["metadata"]["annotations"] = annotations;
        let (response, outcome) = answer(&review);
        (outcome, response, review)
    };
    let (outcome, response, review) = proxy_args(json!({ACCESS_LOG_ANNOTATION: "true"}));
    assert_eq!(outcome, Outcome::Injected, "{response}");
    let args = patched(&review, &response)["spec"]["initContainers"][1]["args"].clone();
    assert!(
        args.as_array().unwrap().iter().any(|a| a == "--access-log"),
        "{args}"
    );
    // Off, and absent: no flag.
    for annotations in [json!({ACCESS_LOG_ANNOTATION: "false"}), json!({})] {
        let (outcome, response, review) = proxy_args(annotations.clone());
        assert_eq!(outcome, Outcome::Injected, "{response}");
        let args = patched(&review, &response)["spec"]["initContainers"][1]["args"].to_string();
        assert!(!args.contains("--access-log"), "{annotations}: {args}");
    }
    let (outcome, response, _) = proxy_args(json!({ACCESS_LOG_ANNOTATION: "yes"}));
    assert!(matches!(outcome, Outcome::Denied(_)), "{outcome:?}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    for part in [
        ACCESS_LOG_ANNOTATION,
        "\"yes\" is not valid",
        "write \"true\"",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }
}

/// The injected proxy container's args and env for a pod with `annotations`, injected with
/// `config`; or the refusal's message.
fn injected_proxy(
    annotations: Value,
    config: &InjectConfig,
) -> Result<(Vec<String>, Value), String> {
    let mut review = web_review();
    review["request"]["object"]["metadata"]["annotations"] = annotations;
    let (response, outcome, _) = super::review(&serde_json::to_vec(&review).unwrap(), config);
    let response = response["response"].clone();
    if outcome != Outcome::Injected {
        return Err(response["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned());
    }
    let proxy = patched(&review, &response)["spec"]["initContainers"][1].clone();
    assert_eq!(proxy["name"], PROXY_CONTAINER);
    let args = proxy["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned());
    Ok((args.collect(), proxy["env"].clone()))
}

/// The value following `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

#[test]
fn an_access_log_ratio_samples_the_log_and_a_bad_one_says_what_to_write() {
    let (args, _) = injected_proxy(json!({ACCESS_LOG_ANNOTATION: "0.1"}), &config()).unwrap();
    assert!(args.iter().any(|a| a == "--access-log"), "{args:?}");
    assert_eq!(
        flag_value(&args, "--access-log-sampling"),
        Some("0.1"),
        "{args:?}"
    );
    let (args, _) = injected_proxy(json!({ACCESS_LOG_ANNOTATION: "1"}), &config()).unwrap();
    assert_eq!(
        flag_value(&args, "--access-log-sampling"),
        Some("1"),
        "{args:?}"
    );
    for bad in ["0", "1.5", "-0.2", "half"] {
        let message = injected_proxy(json!({ACCESS_LOG_ANNOTATION: bad}), &config()).unwrap_err();
        for part in [
            ACCESS_LOG_ANNOTATION,
            "is not valid",
            "between 0 and 1",
            "\"0.1\"",
        ] {
            assert!(message.contains(part), "{bad}: {part:?} not in {message:?}");
        }
    }
}

#[test]
fn the_trace_collector_reaches_every_proxy_with_the_pods_sampling_and_its_name() {
    // No collector: no trace flag, no env; the pod's sampling is passed all the same (harmless
    // without a collector) and checked.
    let (args, env) = injected_proxy(json!({}), &config()).unwrap();
    assert!(!args.iter().any(|a| a.starts_with("--trace")), "{args:?}");
    assert!(env.is_null(), "{env}");
    let traced = InjectConfig {
        trace_collector: Some(TraceCollector {
            url: "http://otel-collector.observability:4318".into(),
            protocol: "http/protobuf".into(),
        }),
        ..config()
    };
    let (args, env) = injected_proxy(json!({TRACE_SAMPLING_ANNOTATION: "0.25"}), &traced).unwrap();
    assert_eq!(
        flag_value(&args, "--trace-collector"),
        Some("http://otel-collector.observability:4318")
    );
    assert_eq!(flag_value(&args, "--trace-protocol"), Some("http/protobuf"));
    assert_eq!(flag_value(&args, "--trace-sampling"), Some("0.25"));
    assert_eq!(
        env,
        json!([
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ])
    );
    let (args, _) = injected_proxy(json!({}), &traced).unwrap();
    assert_eq!(
        flag_value(&args, "--trace-sampling"),
        None,
        "the proxy's default"
    );
    for bad in ["1.01", "10%", ""] {
        let message = injected_proxy(json!({TRACE_SAMPLING_ANNOTATION: bad}), &traced).unwrap_err();
        for part in [
            TRACE_SAMPLING_ANNOTATION,
            "is not valid",
            "between 0 and 1",
            "\"0.05\"",
        ] {
            assert!(
                message.contains(part),
                "{bad:?}: {part:?} not in {message:?}"
            );
        }
    }
}

#[test]
fn the_opaque_ports_annotation_reaches_the_proxy_and_a_bad_one_is_refused() {
    let mut review = web_review();
    review["request"]["object"]["metadata"]["annotations"] =
        json!({OPAQUE_PORTS_ANNOTATION: "3306, 25,4000-4010"});
    let (response, outcome) = answer(&review);
    assert_eq!(outcome, Outcome::Injected, "{response}");
    let pod = patched(&review, &response);
    let args = pod["spec"]["initContainers"][1]["args"]
        .as_array()
        .unwrap()
        .clone();
    let at = args
        .iter()
        .position(|a| a == "--opaque-ports")
        .unwrap_or_else(|| panic!("no --opaque-ports in {args:?}"));
    assert_eq!(args[at + 1], "3306,25,4000-4010");
    // The value as the proxy itself parses it.
    let parsed: PortSet = args[at + 1].as_str().unwrap().parse().unwrap();
    assert!(parsed.contains(3306) && parsed.contains(4005) && !parsed.contains(80));
    // Without the annotation the proxy gets no such flag.
    let plain = patched(&web_review(), &answer(&web_review()).0);
    let plain_args = plain["spec"]["initContainers"][1]["args"].to_string();
    assert!(!plain_args.contains("--opaque-ports"), "{plain_args}");

    for (value, says) in [
        ("mysql", "\"mysql\" is not a port"),
        ("3306,70000", "\"70000\" is not a port"),
        ("4010-4000", "ends before it starts"),
    ] {
        let mut review = web_review();
        review["request"]["object"]["metadata"]["annotations"] =
            json!({OPAQUE_PORTS_ANNOTATION: value});
        let (response, outcome) = answer(&review);
        assert!(
            matches!(outcome, Outcome::Denied(_)),
            "{value}: {outcome:?}"
        );
        assert_eq!(response["allowed"], false, "{value}");
        let message = response["status"]["message"].as_str().unwrap_or_default();
        for part in [OPAQUE_PORTS_ANNOTATION, says, "e.g. \"3306,25,4000-4010\""] {
            assert!(message.contains(part), "{value}: {part:?} not in {message}");
        }
    }
}

#[test]
fn a_malformed_review_gets_an_error_response() {
    for (what, body) in [
        ("empty body", b"".to_vec()),
        ("not JSON", b"{\"kind\": \"AdmissionReview\"".to_vec()),
        (
            "no request",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(),
        ),
        (
            "a request of the wrong shape",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":7}}"#
                .to_vec(),
        ),
        ("binary garbage", vec![0xff, 0x00, 0x13, 0x37]),
    ] {
        let (response, outcome, _) = super::review(&body, &config());
        assert!(
            matches!(outcome, Outcome::Malformed(_)),
            "{what}: {outcome:?}"
        );
        assert_eq!(response["kind"], "AdmissionReview", "{what}");
        assert_eq!(response["response"]["allowed"], false, "{what}");
        assert!(
            response["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .starts_with("sigil injector: "),
            "{what}: {response}"
        );
    }
}

/// The annotations many scrape configs honour point at the proxy, and its metrics port is named,
/// as a PodMonitor selects it (deploy/overlays/prometheus-operator).
#[test]
fn injected_pods_are_scrapeable_at_the_proxys_named_metrics_port() {
    let review = web_review();
    let pod = patched(&review, &answer(&review).0);
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        sigil_proxy_api::METRICS_PORT.to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == PROXY_CONTAINER)
        .unwrap();
    assert_eq!(
        proxy["ports"],
        json!([{
            "name": METRICS_PORT_NAME,
            "containerPort": sigil_proxy_api::METRICS_PORT,
            "protocol": "TCP",
        }])
    );
}

/// A pod with scrape annotations of its own keeps exactly those (they describe the app's
/// metrics): none is overridden, and none of ours is added beside them.
#[test]
fn a_pods_own_scrape_annotations_win() {
    for own in [
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9090"}),
        json!({"prometheus.io/port": "9090"}),
        json!({"prometheus.io/scrape": "false"}),
        json!({"prometheus.io/path": "/stats", "team": "shop"}),
    ] {
        let mut review = web_review();
        review["request"]["object"]["metadata"]["annotations"] = own.clone();
        let (response, outcome) = answer(&review);
        assert_eq!(outcome, Outcome::Injected, "{own}");
        let pod = patched(&review, &response);
        let scrape: serde_json::Map<String, Value> = pod["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(key, _)| key.starts_with("prometheus.io/"))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let expected: serde_json::Map<String, Value> = own
            .as_object()
            .unwrap()
            .iter()
            .filter(|(key, _)| key.starts_with("prometheus.io/"))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        assert_eq!(scrape, expected, "{own}");
        // The proxy is injected all the same, its metrics port named for the PodMonitor.
        assert_eq!(
            pod["spec"]["initContainers"][1]["ports"][0]["name"], METRICS_PORT_NAME,
            "{own}"
        );
    }
}
