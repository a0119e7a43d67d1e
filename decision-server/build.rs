//! Generates the tonic service for `tollgate.v1` against the messages of `tollgate-proto`
//! (`extern_path`), so the field numbers are compiled from one `.proto` file only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "../proto/proto/tollgate/v1/tollgate.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["../proto/proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".tollgate.v1", "::tollgate_proto::v1")
        .compile_fds(fds)?;
    Ok(())
}
