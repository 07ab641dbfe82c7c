//! Wire types and gRPC stubs for every API sigil serves or calls.
//! Generated at build time from `protos/`; nothing here is written by hand.

pub mod sigil {
    pub mod ca {
        pub mod v1 {
            tonic::include_proto!("sigil.ca.v1");
        }
    }
    pub mod agent {
        pub mod v1 {
            tonic::include_proto!("sigil.agent.v1");
        }
    }
    pub mod mesh {
        pub mod v1 {
            tonic::include_proto!("sigil.mesh.v1");
        }
    }
    pub mod policy {
        pub mod v2 {
            tonic::include_proto!("sigil.policy.v2");
        }
    }
    pub mod route {
        pub mod v1 {
            tonic::include_proto!("sigil.route.v1");
        }
    }
}

/// The gRPC health checking protocol, which kubelet gRPC probes use.
pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

/// OpenTelemetry's OTLP trace types and its `TraceService` (vendored from
/// open-telemetry/opentelemetry-proto, see `protos/opentelemetry/VERSION`): what the proxy exports
/// spans with, and what the tests receive them with.
pub mod opentelemetry {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.common.v1");
            }
        }
        pub mod resource {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.resource.v1");
            }
        }
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.trace.v1");
            }
        }
        pub mod collector {
            pub mod trace {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
                }
            }
        }
    }
}

pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`). Its proto file declares no package, so prost
/// writes it to `_.rs` and its gRPC paths are `/SpiffeWorkloadAPI/<Method>`.
pub mod spiffe_workload {
    tonic::include_proto!("_");
}
