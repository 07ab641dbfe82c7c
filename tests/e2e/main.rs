//! sigil's end-to-end tests, one module per area, in one test binary: the real `sigil` binary
//! as child processes, real clients (Envoy, py-spiffe, kubectl, openssl), the Kubernetes API
//! test double (tests/kube-apiserver) and, for the tests that run as root, network namespaces.
//! The harness they share is the tests/harness crate. Run one area with
//! `cargo test --test e2e <module>::`, one test with `cargo test --test e2e <module>::<name>`.
//!
//! The tests run in parallel threads of this one process, so nothing they use may be global:
//! listening ports are free ones picked at run time (`free_addr`), network namespaces are named
//! `<module prefix>-<pid>-<role>` with a prefix per module and a role per test, and every
//! process a test starts gets its own temporary directory.

mod agent_certs;
mod agent_clients;
mod agent_envoy;
mod agent_kubernetes;
mod agent_routes;
mod agent_services;
mod ca_kubernetes;
mod ca_offline;
mod ca_webhook;
mod demo;
mod deploy_manifests;
mod deploy_prometheus;
mod deploy_rbac;
mod observability_dashboards;
mod policy_crds;
mod policy_inspect;
mod policy_netns;
mod policy_wire;
mod proxy_balance;
mod proxy_envoy;
mod proxy_explicit;
mod proxy_hardening;
mod proxy_inbound_l7;
mod proxy_init;
mod proxy_ipv6;
mod proxy_l7_peers;
mod proxy_netns;
mod proxy_peers;
mod proxy_policy;
mod proxy_tracing;
mod readme_quickstart;
mod route_inspect;
mod routes_gamma;
mod routes_resilience;
mod routes_status;
mod routes_unmeshed;
mod stat;
mod tls_key_exchange;
