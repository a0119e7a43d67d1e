//! Generates the tonic service for `tollgate.v1` against the messages of `tollgate-proto`
//! (`extern_path`), so the field numbers are compiled from one `.proto` file only; and copies
//! the portal's browser libraries, installed from npm as `portal/package-lock.json` pins
//! them, next to the build so the binary embeds them.

/// The npm files the portal serves, and the names it serves them under.
const PORTAL_ASSETS: [(&str, &str); 3] = [
    ("htmx.org/dist/htmx.min.js", "htmx.min.js"),
    ("uplot/dist/uPlot.iife.min.js", "uPlot.iife.min.js"),
    ("uplot/dist/uPlot.min.css", "uPlot.min.css"),
];

fn portal_assets() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("portal");
    std::fs::create_dir_all(&out)?;
    println!("cargo:rerun-if-changed=portal/package-lock.json");
    for (from, to) in PORTAL_ASSETS {
        let path = std::path::Path::new("portal/node_modules").join(from);
        println!("cargo:rerun-if-changed={}", path.display());
        std::fs::copy(&path, out.join(to)).map_err(|e| {
            format!(
                "the portal's browser library {} is missing ({e}): run `make setup-portal` (npm ci in decision-server/portal) first",
                path.display()
            )
        })?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    portal_assets()?;
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
