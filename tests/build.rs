//! Generates the gRPC test services (`proto/user.proto`, `proto/chat.proto`)
//! with tonic. Needs `protoc`: `PROTOC`, else on `PATH` (`make setup`
//! installs Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/user.proto", "proto/chat.proto"], &["proto"])
        .map_err(|e| {
            format!(
                "compiling tests/proto (is protoc installed? set PROTOC or run `make setup`): {e}"
            )
            .into()
        })
}
