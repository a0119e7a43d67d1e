//! The `tollgate` command line: serve a config, validate one, make credentials for one, or
//! make a trial identity provider's key and tokens.

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
        /// What the customer's key may do: `app` (reads and decisions), `viewer` (reads
        /// only) or `admin` (also the customer's limits, alerts and webhooks).
        #[arg(long, requires = "customer", value_parser = ["app", "viewer", "admin"])]
        role: Option<String>,
        /// Print only shell `export` lines (the secret and its SHA-256) for scripts:
        /// `TOLLGATE_GATEWAY_TOKEN`/`_SHA256`, `TOLLGATE_API_KEY`/`_SHA256`/`_ID`, or
        /// `TOLLGATE_OPERATOR_TOKEN`/`_SHA256`.
        #[arg(long)]
        env: bool,
    },
    /// For trials without an identity provider: make an Ed25519 signing key
    /// (`<dir>/signing-key.pem`, kept secret) and the JWKS that verifies its tokens
    /// (`<dir>/jwks.json`, one line, for Envoy's `jwt_authn`). Production uses the company's
    /// identity provider instead.
    TrialKey {
        /// Where to write the two files (made if missing).
        #[arg(long, default_value = "trial")]
        dir: PathBuf,
        /// Replace a key that is already there.
        #[arg(long)]
        force: bool,
    },
    /// For trials: print a JWT signed with the trial key, naming the customer who pays
    /// (claim `org`) and the user (claim `sub`).
    TrialToken {
        /// The signing key `tollgate trial-key` made.
        #[arg(long, default_value = "trial/signing-key.pem")]
        key: PathBuf,
        /// The customer (claim `org`).
        #[arg(long)]
        customer: String,
        /// The user (claim `sub`).
        #[arg(long)]
        user: Option<String>,
        /// The issuer (claim `iss`); Envoy's `jwt_authn` provider must name the same.
        #[arg(long, default_value = tollgate::trial::TRIAL_ISSUER)]
        issuer: String,
        /// The audience (claim `aud`), if the verifier asks for one.
        #[arg(long)]
        audience: Option<String>,
        /// How long the token is good for, in minutes.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// More claims, `name=value` (for example `team=research`); repeatable.
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
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

/// What `keygen` made: the secret, its SHA-256, and how to print them.
struct Made {
    /// What it is, for people.
    what: String,
    /// The shell variable prefix, for `--env`.
    var: &'static str,
    secret: String,
    /// The config section and the line that accepts it.
    section: &'static str,
    config_line: String,
    id: Option<String>,
}

fn keygen(
    customer: Option<String>,
    gateway: Option<String>,
    id: Option<String>,
    role: Option<String>,
    env: bool,
) {
    let secret = tollgate::auth::random_secret();
    let made = if let Some(gateway) = gateway {
        let token = format!("{gateway}.{secret}");
        let sha = hex::encode(tollgate::auth::sha256(&token));
        Made {
            what: "gateway token (keep it secret; give it to Envoy)".into(),
            var: "TOLLGATE_GATEWAY_TOKEN",
            config_line: format!("  - {{ id: {gateway}, sha256: {sha} }}"),
            section: "config, under server.credentials.gatewayTokens:",
            secret: token,
            id: None,
        }
    } else if let Some(customer) = customer {
        let id = id.unwrap_or_else(|| format!("{customer}-key"));
        let key = format!("{id}.{secret}");
        let role = role.as_deref().unwrap_or("app");
        let sha = hex::encode(tollgate::auth::sha256(&key));
        Made {
            what: format!("API key for `{customer}`, role {role} (keep it secret)"),
            var: "TOLLGATE_API_KEY",
            config_line: format!(
                "  - {{ id: {id}, customer: {customer}, role: {role}, sha256: {sha} }}"
            ),
            section: "config, under server.credentials.apiKeys:",
            secret: key,
            id: Some(id),
        }
    } else {
        let sha = hex::encode(tollgate::auth::sha256(&secret));
        Made {
            what: "operator token (keep it secret)".into(),
            var: "TOLLGATE_OPERATOR_TOKEN",
            config_line: format!("  server:\n    credentials:\n      operatorTokenSha256: {sha}"),
            section: "config:",
            secret,
            id: None,
        }
    };
    if env {
        // Hex, dots and dashes only: safe unquoted in a shell.
        println!("export {}={}", made.var, made.secret);
        println!(
            "export {}_SHA256={}",
            made.var,
            hex::encode(tollgate::auth::sha256(&made.secret))
        );
        if let Some(id) = &made.id {
            println!("export {}_ID={id}", made.var);
        }
        return;
    }
    println!("{}: {}", made.what, made.secret);
    println!("{}", made.section);
    println!("{}", made.config_line);
}

fn trial_key(dir: &std::path::Path, force: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let key_path = dir.join("signing-key.pem");
    let jwks_path = dir.join("jwks.json");
    // Idempotent: a key already there stays (`--force` replaces it), and its JWKS is written
    // again from it.
    let kept = key_path.exists() && !force;
    let jwks = if kept {
        let pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        tollgate::trial::jwks_of(&pem).with_context(|| key_path.display().to_string())?
    } else {
        let (pem, jwks) = tollgate::trial::new_key()?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
        // Readable by its owner only: whoever reads it can sign tokens for any customer.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("cannot write {}", key_path.display()))?;
        file.write_all(pem.as_bytes())
            .with_context(|| format!("cannot write {}", key_path.display()))?;
        jwks
    };
    std::fs::write(&jwks_path, format!("{jwks}\n"))
        .with_context(|| format!("cannot write {}", jwks_path.display()))?;
    if kept {
        println!(
            "{} is already there (kept; --force makes a new one); {} written from it",
            key_path.display(),
            jwks_path.display()
        );
    } else {
        println!(
            "signing key (for trials; keep it secret): {}\nits JWKS (for Envoy's jwt_authn, issuer `{}`): {}",
            key_path.display(),
            tollgate::trial::TRIAL_ISSUER,
            jwks_path.display()
        );
    }
    Ok(())
}

fn trial_token(key: &std::path::Path, claims: tollgate::trial::TokenClaims) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(key).with_context(|| {
        format!(
            "cannot read the signing key {} (make one with `tollgate trial-key`)",
            key.display()
        )
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let token =
        tollgate::trial::token(&pem, &claims, now).with_context(|| key.display().to_string())?;
    println!("{token}");
    Ok(())
}

fn claim_pairs(pairs: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--claim `{p}` is not NAME=VALUE"))
        })
        .collect()
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
            role,
            env,
        } => {
            keygen(customer, gateway, id, role, env);
            ExitCode::SUCCESS
        }
        Command::TrialKey { dir, force } => finish(trial_key(&dir, force)),
        Command::TrialToken {
            key,
            customer,
            user,
            issuer,
            audience,
            minutes,
            claims,
        } => finish(claim_pairs(&claims).and_then(|extra| {
            trial_token(
                &key,
                tollgate::trial::TokenClaims {
                    issuer,
                    customer,
                    user,
                    audience,
                    ttl_seconds: minutes.saturating_mul(60),
                    extra,
                },
            )
        })),
        Command::Serve { config, workers } => finish(serve(config, workers)),
    }
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
