//! Compiles `proto/abide/agent/v1/agent.proto` with protox (pure Rust, no `protoc`) and
//! generates the messages (prost, with `serde::Serialize` for `--json` output) and the gRPC
//! server and client (tonic, without its transport: `abide-agent-api` serves and dials over hyper).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["abide/agent/v1/agent.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(files)?;
    Ok(())
}
