//! Starts and stops the real processes: the sidecar binary, the mock OpenAI upstream and Envoy
//! with a config rendered from `envoy/`. Every process listens on loopback, on a port the OS
//! picked, and is killed when its handle drops.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The gateway token Envoy presents to the sidecar in the tests and the demo (loopback only,
/// processes that live as long as one run). Its SHA-256 goes in the sidecar's
/// `server.credentials.gatewayTokens`.
pub const GATEWAY_TOKEN: &str = "envoy.loopback-gateway-token";

/// The issuer and HS256 key of the JWTs the tests and the demo sign, as a platform's identity
/// provider would; Envoy's `jwt_authn` verifies them with [`jwks`].
pub const JWT_ISSUER: &str = "tollgate-gateway";
pub const JWT_KEY: &[u8] = b"tollgate-e2e-shared-secret-32-bytes!";

/// The sidecar config lines that accept [`GATEWAY_TOKEN`].
pub fn gateway_token_config() -> String {
    use sha2::Digest as _;
    format!(
        "    gatewayTokens:\n      - {{ id: envoy, sha256: {} }}\n",
        hex::encode(sha2::Sha256::digest(GATEWAY_TOKEN.as_bytes()))
    )
}

/// The JWKS holding [`JWT_KEY`], for `jwt_authn`'s `local_jwks`.
pub fn jwks() -> String {
    use base64::Engine as _;
    serde_json::json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "k1",
        "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(JWT_KEY)}]})
    .to_string()
}

/// An HS256 JWT with `claims`, signed with `key`.
pub fn signed_jwt(claims: &serde_json::Value, key: &[u8]) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let signing_input = format!(
        "{}.{}",
        b(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#),
        b(claims.to_string().as_bytes())
    );
    // An HMAC takes a key of any length; this cannot fail.
    let tag = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .map(|mut mac| {
            mac.update(signing_input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        })
        .unwrap_or_default();
    format!("{signing_input}.{}", b(&tag))
}

/// `Bearer <jwt>` for a caller of `customer` (claim `org`) with the other `claims` (such as
/// `sub`), issued by [`JWT_ISSUER`] and signed with [`JWT_KEY`].
pub fn bearer_for(customer: &str, claims: serde_json::Value) -> String {
    let mut c = claims;
    if let Some(map) = c.as_object_mut() {
        map.insert("iss".into(), JWT_ISSUER.into());
        map.insert("org".into(), customer.into());
    }
    format!("Bearer {}", signed_jwt(&c, JWT_KEY))
}

/// `Bearer <jwt>` with these claims and no real signature. The filter reads claims without
/// verifying them (that is `jwt_authn`'s job), so tests, the demo and the load generator can
/// name any user.
pub fn unsigned_bearer(claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "Bearer {}.{}.{}",
        b(r#"{"alg":"none"}"#),
        b(&claims.to_string()),
        b("unsigned")
    )
}

/// A loopback socket that accepts connections and never answers: a hung sidecar. Returns its
/// port; it holds up to 64 connections open for as long as the process runs.
pub fn hung_listener() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a hung listener")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().take(64).flatten() {
            held.push(c);
        }
        // Keep them open until the process ends.
        std::thread::park();
        drop(held);
    });
    Ok(port)
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A binary of this workspace, next to the running executable's profile directory, or named
/// by `env` (for example `TOLLGATE_BIN`).
fn workspace_bin(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    // target/<profile>/deps/test-xxxx or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the `{name}` binary near {}; build the workspace (`make test`) or set {env}",
        exe.display()
    )
}

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

/// The Python with the official `openai` and `anthropic` SDKs (`make setup-python` makes it in
/// `.tools/venv`), or `TOLLGATE_PYTHON`.
pub fn sdk_python() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("TOLLGATE_PYTHON")
        .map_or_else(|| root().join(".tools/venv/bin/python"), PathBuf::from);
    if !p.is_file() {
        bail!(
            "the SDKs' Python is not installed at {}: run `make setup-python` (or `make test`)",
            p.display()
        );
    }
    Ok(p)
}

/// Runs one scenario of `tests/sdk/client.py` (the official SDKs) against `base_url` with
/// `token`, and returns what the client printed. Bounded by `timeout`.
pub fn sdk(
    base_url: &str,
    token: &str,
    scenario: &str,
    extra: &[&str],
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let script = root().join("tests/sdk/client.py");
    let mut child = Command::new(sdk_python()?)
        .arg(&script)
        .args(["--base-url", base_url, "--token", token])
        .args(extra)
        .arg(scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the SDK client")?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the SDK client ran past {timeout:?} on `{scenario}`");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the SDK client failed on `{scenario}`: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_str(stdout.trim()).with_context(|| format!("not JSON: {stdout}"))
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    name: &'static str,
}

impl Proc {
    fn new(child: Child, name: &'static str) -> Self {
        Self {
            child: Some(child),
            name,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (a name such as `KILL` or `TERM`).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("the process was already stopped")?;
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .with_context(|| format!("cannot run kill for {}", self.name))?
            .success();
        if !ok {
            bail!("kill -{signal} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the child's first stdout line (its "ready" line), with a deadline.
fn ready_line(child: &mut Child, what: &str, timeout: Duration) -> anyhow::Result<String> {
    let stdout = child
        .stdout
        .take()
        .with_context(|| format!("{what}: no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = tx.send(reader.read_line(&mut line).map(|_| line.clone()));
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.is_empty() => Ok(line),
        Ok(Ok(_)) => bail!("{what} exited before it was ready"),
        Ok(Err(e)) => bail!("{what}: cannot read its stdout: {e}"),
        Err(_) => bail!("{what} was not ready within {timeout:?}"),
    }
}

fn field(line: &str, name: &str) -> anyhow::Result<String> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .map(str::to_string)
        .with_context(|| format!("no `{name}=` in {line:?}"))
}

/// The sidecar binary with a config file.
#[derive(Debug)]
pub struct Sidecar {
    pub proc: Proc,
    pub ext_authz: String,
    pub grpc: String,
    pub http: String,
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `tollgate serve` on `config_text`, whose `server.listeners` should use port 0.
    pub fn start(config_text: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot make a temp dir")?;
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, config_text).context("cannot write the sidecar config")?;
        Self::start_at(config, dir)
    }

    /// Starts `tollgate serve` on `config_text` with at most `fds` file descriptors (soft and
    /// hard limit, set by util-linux's `prlimit`).
    pub fn start_with_fd_limit(config_text: &str, fds: u64) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot make a temp dir")?;
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, config_text).context("cannot write the sidecar config")?;
        Self::launch(config, dir, Some(fds))
    }

    fn start_at(config: PathBuf, dir: tempfile::TempDir) -> anyhow::Result<Self> {
        Self::launch(config, dir, None)
    }

    fn launch(config: PathBuf, dir: tempfile::TempDir, fds: Option<u64>) -> anyhow::Result<Self> {
        let bin = workspace_bin("tollgate", "TOLLGATE_BIN")?;
        let mut command = match fds {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--workers", "2"])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let line = ready_line(&mut child, "the sidecar", Duration::from_secs(30))?;
        Ok(Self {
            ext_authz: field(&line, "ext_authz")?,
            grpc: field(&line, "grpc")?,
            http: field(&line, "http")?,
            proc: Proc::new(child, "sidecar"),
            config,
            _dir: dir,
        })
    }

    /// The port of the ext_authz listener.
    pub fn ext_authz_port(&self) -> anyhow::Result<u16> {
        port_of(&self.ext_authz)
    }
}

fn port_of(addr: &str) -> anyhow::Result<u16> {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {addr}"))
}

/// The mock OpenAI-compatible upstream.
#[derive(Debug)]
pub struct MockLlm {
    pub proc: Proc,
    pub addr: String,
}

impl MockLlm {
    pub fn start() -> anyhow::Result<Self> {
        let bin = workspace_bin("tollgate-mock-llm", "TOLLGATE_MOCK_BIN")?;
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let line = ready_line(&mut child, "the mock upstream", Duration::from_secs(30))?;
        Ok(Self {
            addr: field(&line, "addr")?,
            proc: Proc::new(child, "mock upstream"),
        })
    }

    pub fn port(&self) -> anyhow::Result<u16> {
        port_of(&self.addr)
    }
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

/// Renders `envoy/<file>` for the given sidecar and upstream ports, with the release filter.
pub fn envoy_config(file: &str, sidecar_port: u16, upstream_port: u16) -> anyhow::Result<String> {
    let path = root().join("envoy").join(file);
    let template = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    render(
        &template,
        &[
            ("LISTEN_PORT", "0".into()),
            ("ADMIN_PORT", "0".into()),
            ("SIDECAR_PORT", sidecar_port.to_string()),
            ("UPSTREAM_PORT", upstream_port.to_string()),
            ("WASM", wasm_module()?.display().to_string()),
            ("JWT_ISSUER", JWT_ISSUER.to_string()),
            ("JWT_JWKS", jwks()),
            ("GATEWAY_TOKEN", GATEWAY_TOKEN.to_string()),
        ],
    )
}

/// What a [`fake_authz`] server answers to every ext_authz `Check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeAnswer {
    /// gRPC status OK with a body that is not a `CheckResponse`.
    Garbage,
    /// gRPC status 13 (INTERNAL), no body.
    Internal,
}

#[derive(Debug, Clone, Copy)]
struct Fake(FakeAnswer);

impl tonic::server::NamedService for Fake {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl tower::Service<axum::http::Request<tonic::body::Body>> for Fake {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: axum::http::Request<tonic::body::Body>) -> Self::Future {
        use axum::body::Bytes;
        use http_body::Frame;
        let mut trailers = axum::http::HeaderMap::new();
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = match self.0 {
            FakeAnswer::Garbage => {
                trailers.insert("grpc-status", axum::http::HeaderValue::from_static("0"));
                // A gRPC frame (uncompressed, 2 bytes) whose payload is no protobuf message.
                vec![
                    Ok(Frame::data(Bytes::from_static(&[
                        0, 0, 0, 0, 2, 0xff, 0xff,
                    ]))),
                    Ok(Frame::trailers(trailers)),
                ]
            }
            FakeAnswer::Internal => {
                trailers.insert("grpc-status", axum::http::HeaderValue::from_static("13"));
                trailers.insert(
                    "grpc-message",
                    axum::http::HeaderValue::from_static("fake failure"),
                );
                vec![Ok(Frame::trailers(trailers))]
            }
        };
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let response = axum::http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(axum::body::Body::new(body))
            .unwrap_or_default();
        std::future::ready(Ok(response))
    }
}

/// An ext_authz gRPC server on a free loopback port that answers every `Check` as `answer`
/// says: a sidecar gone wrong. Runs until the test's runtime ends; returns the port.
pub async fn fake_authz(answer: FakeAnswer) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the fake ext_authz server")?;
    let port = listener.local_addr()?.port();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Fake(answer))
            .serve_with_incoming(incoming),
    );
    Ok(port)
}
