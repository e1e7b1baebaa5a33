//! Generates Sluice's own gRPC API (`proto/sluice/quota/v1/quota.proto`)
//! with tonic. The `.proto` files are compiled by `protox`, a Rust protobuf
//! compiler that carries Google's well-known types, so the build needs
//! neither `protoc` nor system include files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["sluice/quota/v1/quota.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The same Duration type as Envoy's API, so both services share helpers.
        .extern_path(
            ".google.protobuf.Duration",
            "::envoy_types::pb::google::protobuf::Duration",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
