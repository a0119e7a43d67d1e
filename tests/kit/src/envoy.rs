//! Envoy from the project's `.tools` folder, running a config rendered from a template under
//! `envoy/` with the release filter.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::credentials::{GATEWAY_TOKEN, JWT_ISSUER, jwks};
use crate::proc::{Proc, root};

/// Envoy 1.40 from the project's `.tools` folder (`make setup-envoy`), or `TOLLGATE_ENVOY`.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("TOLLGATE_ENVOY").map_or_else(
        || root().join(".tools/envoy-1.40.0/envoy/_bin/envoy"),
        PathBuf::from,
    );
    if !p.is_file() {
        bail!(
            "Envoy is not installed at {}: run `make setup-envoy` (or `make test`)",
            p.display()
        );
    }
    Ok(p)
}

/// The release filter, built by `make wasm`, or `TOLLGATE_WASM`.
pub fn wasm_module() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("TOLLGATE_WASM").map_or_else(
        || root().join("target/wasm32-wasip1/release/tollgate_filter.wasm"),
        PathBuf::from,
    );
    if !p.is_file() {
        bail!(
            "the filter is not built at {}: run `make wasm` (or `make test`)",
            p.display()
        );
    }
    Ok(p)
}

/// Envoy running a config rendered from a template under `envoy/`.
#[derive(Debug)]
pub struct Envoy {
    pub proc: Proc,
    /// `http://127.0.0.1:<port>` of the listener.
    pub url: String,
    pub admin: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Fills `{{NAME}}` placeholders; every placeholder must be given.
pub fn render(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(i) = out.find("{{") {
        let rest: String = out[i..].chars().take(40).collect();
        bail!("an unfilled placeholder is left in the Envoy config: {rest}");
    }
    Ok(out)
}

impl Envoy {
    /// Starts Envoy on `config` (rendered, with `LISTEN_PORT` and `ADMIN_PORT` left at 0).
    /// Envoy runs in its own process group so that signals meant for the test runner (or a
    /// script that exits) do not reach it; the handle kills it.
    pub fn start(config: &str) -> anyhow::Result<Self> {
        Self::start_env(config, &[])
    }

    /// [`Envoy::start`] with more environment variables (a provider's key).
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot make a temp dir")?;
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).context("cannot write the Envoy config")?;
        let admin_file = dir.path().join("admin.txt");
        let log = dir.path().join("envoy.log");
        let log_file = std::fs::File::create(&log).context("cannot create the Envoy log")?;
        let child = Command::new(envoy_binary()?)
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            .args(["--component-log-level", "wasm:info"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .env("TOLLGATE_GATEWAY_TOKEN", GATEWAY_TOKEN)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .context("cannot start Envoy")?;
        let mut proc = Proc::new(child, "envoy");
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Some(status) = proc.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("Envoy exited ({status}) before it was ready:\n{text}");
            }
            if let Ok(a) = std::fs::read_to_string(&admin_file)
                && !a.trim().is_empty()
            {
                break a.trim().to_string();
            }
            if Instant::now() > deadline {
                bail!("Envoy wrote no admin address within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let port = loop {
            if let Some(p) = listener_port(&admin) {
                break p;
            }
            if let Some(status) = proc.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("Envoy exited ({status}) before it was ready:\n{text}");
            }
            if Instant::now() > deadline {
                bail!("Envoy's listener was not up within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self {
            proc,
            url: format!("http://127.0.0.1:{port}"),
            admin,
            log,
            _dir: dir,
        })
    }

    /// One Envoy stat's value, from `/stats?filter=`.
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let text = http_get(&self.admin, &format!("/stats?filter=^{name}$"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no stat `{name}` in {text:?}"))
    }

    /// The Tollgate filter's counter `name` (`granted`, `fail_open`...), as the filter names it
    /// in Envoy's stats (`wasmcustom.tollgate_filter.<name>_total`).
    pub fn filter_stat(&self, name: &str) -> anyhow::Result<u64> {
        self.stat(&format!("wasmcustom.tollgate_filter.{name}_total"))
    }

    /// Envoy's `/stats/prometheus` page.
    /// The `/stats` lines of the stats whose names contain `filter` (for a histogram, its
    /// quantiles as Envoy prints them).
    pub fn stats_text(&self, filter: &str) -> anyhow::Result<String> {
        let text = http_get(&self.admin, &format!("/stats?filter={filter}"))?;
        Ok(text.lines().collect::<Vec<_>>().join("; "))
    }

    pub fn prometheus(&self) -> anyhow::Result<String> {
        http_get(&self.admin, "/stats/prometheus")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 GET over loopback for Envoy's admin endpoint (no client runtime needed).
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {addr}{path}"))?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(body.to_string());
    }
    // De-chunk: "<hex size>\r\n<data>\r\n" ... "0\r\n\r\n".
    let mut rest = body;
    let mut data = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if n == 0 || tail.len() < n {
            break;
        }
        data.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    Ok(data)
}

/// The port of Envoy's first listener, once it is bound.
fn listener_port(admin: &str) -> Option<u16> {
    let text = http_get(admin, "/listeners?format=json").ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let port =
        v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()?;
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// Renders `envoy/<file>` with the listeners on free ports, the given sidecar port, the
/// release filter, the tests' identity provider and gateway token, and `more` placeholders.
fn render_envoy(
    file: &str,
    sidecar_port: u16,
    more: Vec<(&str, String)>,
) -> anyhow::Result<String> {
    let path = root().join("envoy").join(file);
    let template = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut values = vec![
        ("LISTEN_PORT", "0".into()),
        ("ADMIN_PORT", "0".into()),
        ("SIDECAR_PORT", sidecar_port.to_string()),
        ("WASM", wasm_module()?.display().to_string()),
        ("JWT_ISSUER", JWT_ISSUER.to_string()),
        ("JWT_JWKS", jwks()),
        ("GATEWAY_TOKEN", GATEWAY_TOKEN.to_string()),
    ];
    values.extend(more);
    render(&template, &values)
}

/// Renders `envoy/<file>` for the given sidecar and upstream ports, with the release filter.
pub fn envoy_config(file: &str, sidecar_port: u16, upstream_port: u16) -> anyhow::Result<String> {
    render_envoy(
        file,
        sidecar_port,
        vec![("UPSTREAM_PORT", upstream_port.to_string())],
    )
}

/// A rendered `wasm-filter.yaml` with pay as you stream on: its filter settlement given
/// `streaming` (the JSON object of `settlement.streaming`, such as `{ "mode": "extend",
/// "firstSlice": 64, "slice": 64, "askAhead": 32 }`). Fails if the config changed shape.
pub fn with_streaming(config: &str, streaming: &str) -> anyhow::Result<String> {
    const SETTLEMENT: &str = r#""settlement": { "onMissingUsage": "estimate", "timeoutMs": 1000 }"#;
    anyhow::ensure!(
        config.contains(SETTLEMENT),
        "the WASM config's settlement changed shape"
    );
    Ok(config.replace(
        SETTLEMENT,
        &format!(
            r#""settlement": {{ "onMissingUsage": "estimate", "timeoutMs": 1000, "streaming": {streaming} }}"#
        ),
    ))
}

/// Where a provider config (`envoy/openai-provider.yaml`, `envoy/anthropic-provider.yaml`)
/// sends calls: the provider's name (SNI, `Host`, the certificate's name), its address and
/// port, and the CA file that verifies it.
#[derive(Debug, Clone)]
pub struct ProviderTarget {
    pub host: String,
    pub address: String,
    pub port: u16,
    pub ca: String,
}

/// Renders a provider config for the given sidecar port and provider, with the release filter.
pub fn provider_config(
    file: &str,
    sidecar_port: u16,
    provider: &ProviderTarget,
) -> anyhow::Result<String> {
    render_envoy(
        file,
        sidecar_port,
        vec![
            ("PROVIDER_HOST", provider.host.clone()),
            ("PROVIDER_ADDRESS", provider.address.clone()),
            ("PROVIDER_PORT", provider.port.to_string()),
            ("PROVIDER_CA", provider.ca.clone()),
        ],
    )
}
