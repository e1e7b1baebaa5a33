//! Generates the tonic service of Sluice's own gRPC API
//! (`proto/proto/sluice/quota/v1/quota.proto`, in the `sluice-proto` crate)
//! over the messages `sluice-proto` already defines. The `.proto` files are
//! compiled by `protox`, a Rust protobuf compiler that carries Google's
//! well-known types, so the build needs neither `protoc` nor system include
//! files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO_ROOT: &str = "../proto/proto";
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(["sluice/quota/v1/quota.proto"], [PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // One definition of the messages, shared with the filter.
        .extern_path(".sluice.quota.v1", "::sluice_proto::quota::v1")
        .compile_fds(descriptors)?;
    Ok(())
}
