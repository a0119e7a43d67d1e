//! Compiles `proto/tollgate/v1/*.proto` with protox (pure Rust, no `protoc` on the machine) into
//! prost messages; with the `client` feature, also the tonic client of `tollgate.v1`. The
//! sidecar's tonic service code refers to these same types (`extern_path`), so field numbers
//! live in the `.proto` file only.

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
    #[cfg(feature = "client")]
    {
        // The client only, in a folder of its own (its file would have the messages' name),
        // against the messages above.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("client");
        std::fs::create_dir_all(&out)?;
        let fds = protox::compile([files[0]], ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(false)
            .out_dir(out)
            .extern_path(".tollgate.v1", "crate::v1")
            .compile_fds(fds)?;
    }
    Ok(())
}
