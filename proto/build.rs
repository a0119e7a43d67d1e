//! Compiles `proto/tollgate/v1/*.proto` with protox (pure Rust, no `protoc` on the machine) into
//! prost messages. The sidecar's tonic service code refers to these same types (`extern_path`),
//! so field numbers live in the `.proto` file only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tollgate/v1/tollgate.proto",
        "proto/tollgate/envoywire/v1/ext_authz.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
