//! Compiles every `.proto` file under `proto/` with protox (pure Rust, no system `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&files, [&dir])?;
    // The descriptors the client port's reflection service answers with: the public protocol
    // our streaming extension and the operator calls only (not the raft, admin, etcd or example
    // packages).
    let mut public = fds.clone();
    public.file.retain(|f| {
        matches!(
            f.name(),
            "tsoracle.proto" | "tso_stream.proto" | "tso_ops.proto"
        )
    });
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("client_port_descriptors.bin"),
        prost::Message::encode_to_vec(&public),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
