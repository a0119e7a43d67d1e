//! `tollgate-xtask`: builds the filter's OCI image layout and rewrites the pins in `k8s/`;
//! prints and checks the module graphs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Tollgate's release tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes the filter's OCI image layout (Istio's Wasm *oci* variant) and prints its digests.
    WasmImage {
        /// The built module.
        #[arg(long)]
        wasm: PathBuf,
        /// The layout's folder (copy it to a registry with `skopeo copy oci:<dir>:<tag> ...`).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "0.1.0")]
        tag: String,
        /// Also rewrite the pins in this `k8s/` folder.
        #[arg(long)]
        pin: Option<PathBuf>,
    },
    /// Prints which module names which in the sidecar and the filter, then any circle or
    /// arrow against the layers (ARCHITECTURE.md); fails if there is one.
    Modules,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::WasmImage {
            wasm,
            out,
            tag,
            pin,
        } => {
            let bytes = std::fs::read(&wasm)
                .map_err(|e| anyhow::anyhow!("cannot read the module {}: {e}", wasm.display()))?;
            let image = tollgate_xtask::write_wasm_image(&bytes, &out, &tag)?;
            println!("image layout: {} (tag {tag})", out.display());
            println!("module sha256: {}", image.module_sha256);
            println!("image digest:  sha256:{}", image.manifest_sha256);
            if let Some(k8s) = pin {
                for file in tollgate_xtask::write_pins(&k8s, &image)? {
                    println!("pinned: {}", k8s.join(file).display());
                }
            }
        }
        Command::Modules => {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let mut clean = true;
            for (name, src, layers) in [
                (
                    "decision-server",
                    "decision-server/src",
                    tollgate_xtask::modules::SIDECAR_LAYERS,
                ),
                (
                    "filter",
                    "filter/src",
                    tollgate_xtask::modules::FILTER_LAYERS,
                ),
            ] {
                let graph = tollgate_xtask::modules::ModuleGraph::of(&root.join(src))?;
                println!("# {name}\n{}", graph.render());
                let findings = graph.check(layers);
                print!("{findings}");
                clean &= findings.is_clean();
            }
            anyhow::ensure!(clean, "the module graph breaks its layers");
        }
    }
    Ok(())
}
