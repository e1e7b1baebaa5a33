//! Generates Sluice's own gRPC API (`proto/sluice/quota/v1/quota.proto`)
//! with tonic. Needs `protoc`: `PROTOC`, else on `PATH` (`make setup`
//! installs Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The same Duration type as Envoy's API, so both services share helpers.
        .extern_path(".google.protobuf.Duration", "::envoy_types::pb::google::protobuf::Duration")
        .compile_protos(&["proto/sluice/quota/v1/quota.proto"], &["proto"])
        .map_err(|e| format!("compiling proto/sluice/quota/v1/quota.proto (is protoc installed? set PROTOC or run `make setup`): {e}").into())
}
