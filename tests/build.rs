//! Generates the gRPC test services (`proto/user.proto`, `proto/chat.proto`)
//! with tonic. `protox` compiles the `.proto` files, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["user.proto", "chat.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
