//! Generates the `sluice.quota.v1` messages with prost. `protox` compiles
//! the `.proto` file (it carries Google's well-known types), so the build
//! needs neither `protoc` nor system include files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["sluice/quota/v1/quota.proto"], ["proto"])?;
    // Duration comes from prost-types (its default mapping), built without std.
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
