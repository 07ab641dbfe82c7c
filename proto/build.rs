//! Compiles protos/ with protox (a protobuf compiler in pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "sigil/ca/v1/ca.proto",
        "sigil/agent/v1/agent.proto",
        "sigil/mesh/v1/mesh.proto",
        "sigil/policy/v2/policy.proto",
        "sigil/route/v1/route.proto",
        "istio/v1/auth/ca.proto",
        "workload.proto",
        "grpc/health/v1/health.proto",
        "opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    println!("cargo:rerun-if-changed=protos");
    let descriptors = protox::compile(protos, ["protos"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
