//! The `tollgate` command line: serve a config, validate one, or make credentials for one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

// Trade-off: glibc's allocator spent about a quarter of the sidecar's CPU under gRPC load
// (per-request buffers freed on other threads); mimalloc's thread-local free lists do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), before the
/// sidecar allocates its working memory. Trade-off: mimalloc asks for huge pages on its arenas,
/// and every first touch of one makes the kernel zero 2 MiB on the request's thread; as holds,
/// usage records and buffers grow, that put up to 19 % of the sidecar's CPU in `clear_page_erms`
/// and stalls of 15–100 ms on a decision. Ordinary 4 KiB pages fault in small steps: in one
/// run, 54,000/s with p99 14 ms became 67,000/s with p99 2 ms (bench/README.md). A kernel
/// that refuses the call (not Linux, a sandbox) leaves the setting as it is.
fn no_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("tollgate: transparent huge pages stay as the system sets them: {e}");
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Tollgate usage-governance decision sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar: ext_authz, gRPC and HTTP listeners, as the config says.
    Serve {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Tokio worker threads. Default: the CPUs this process may use, which on Linux is the
        /// cgroup CPU quota rounded down (at least 1) or the affinity mask, not the host's
        /// core count. A pod sets it from its CPU limit (see `k8s/`).
        #[arg(long, env = "TOLLGATE_WORKERS")]
        workers: Option<usize>,
    },
    /// Validate a config file: print every problem with its file and YAML path, exit non-zero
    /// if there is any.
    Validate {
        /// The YAML config file.
        file: PathBuf,
    },
    /// Make a new operator token, customer API key or gateway token, and print the config
    /// lines that accept it.
    Keygen {
        /// Make an API key for this customer (otherwise an operator token).
        #[arg(long, conflicts_with = "gateway")]
        customer: Option<String>,
        /// Make a gateway token for Envoy's calls to the ext_authz listener, with this id.
        #[arg(long)]
        gateway: Option<String>,
        /// The key's public id (default `<customer>-key`).
        #[arg(long)]
        id: Option<String>,
    },
}

fn validate(file: &std::path::Path) -> ExitCode {
    match tollgate::config::load_path(file) {
        Ok(loaded) => {
            for w in loaded
                .server
                .warnings()
                .into_iter()
                .chain(loaded.model.skippable_limits())
            {
                eprintln!("{}: warning: {w}", file.display());
            }
            let model = &loaded.model;
            let limits: usize = model.customers.values().map(|c| c.limits.len()).sum();
            println!(
                "{}: ok ({} customers, {} limits, {} features)",
                file.display(),
                model.customers.len(),
                limits,
                model.features.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} problem(s) found", file.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

fn keygen(customer: Option<String>, gateway: Option<String>, id: Option<String>) {
    let secret = tollgate::auth::random_secret();
    if let Some(gateway) = gateway {
        let token = format!("{gateway}.{secret}");
        println!("gateway token (keep it secret; give it to Envoy): {token}");
        println!("config, under server.credentials.gatewayTokens:");
        println!(
            "  - {{ id: {gateway}, sha256: {} }}",
            hex::encode(tollgate::auth::sha256(&token))
        );
        return;
    }
    match customer {
        None => {
            let token = secret;
            println!("operator token (keep it secret): {token}");
            println!("config:");
            println!("  server:\n    credentials:");
            println!(
                "      operatorTokenSha256: {}",
                hex::encode(tollgate::auth::sha256(&token))
            );
        }
        Some(customer) => {
            let id = id.unwrap_or_else(|| format!("{customer}-key"));
            let key = format!("{id}.{secret}");
            println!("API key for `{customer}` (keep it secret): {key}");
            println!("config, under server.credentials.apiKeys:");
            println!(
                "  - {{ id: {id}, customer: {customer}, sha256: {} }}",
                hex::encode(tollgate::auth::sha256(&key))
            );
        }
    }
}

fn serve(config: PathBuf, workers: Option<usize>) -> anyhow::Result<()> {
    let workers = match workers {
        Some(n) => tollgate::server::Workers {
            threads: n.max(1),
            from: "--workers / TOLLGATE_WORKERS",
        },
        // std reads the cgroup v2 `cpu.max` (or v1 CFS quota) and the affinity mask: in a
        // container with a 1.5-CPU limit on a 32-core node this is 1, not 32. Oversizing
        // hurt: on 2 cores beside the load, 2 workers made about 21,700 checks/s and 1
        // made about 24,500/s (bench/README.md).
        None => tollgate::server::Workers {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            from: "the CPU quota and affinity",
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(workers.threads)
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(tollgate::server::run(config, workers))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve { .. } = cli.command {
        no_huge_pages();
    }
    match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Keygen {
            customer,
            gateway,
            id,
        } => {
            keygen(customer, gateway, id);
            ExitCode::SUCCESS
        }
        Command::Serve { config, workers } => match serve(config, workers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
