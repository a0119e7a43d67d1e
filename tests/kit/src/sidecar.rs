//! The sidecar binary (`tollgate serve`) as a child process on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::metrics::Metrics;
use crate::proc::{Proc, field, port_of, ready_line, workspace_bin};

/// The `server:` lines that put every listener on a free loopback port, logging warnings only.
pub const LOOPBACK_PORT_0: &str = "  listeners: { extAuthz: \"127.0.0.1:0\", grpc: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }\n  logging: { level: warn }";

/// The sidecar with a config file; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Sidecar {
    pub proc: Proc,
    pub ext_authz: String,
    pub grpc: String,
    pub http: String,
    /// The config file; a restart or a reload test rewrites it.
    pub config: PathBuf,
    /// The config's folder, when this handle made it.
    _dir: Option<tempfile::TempDir>,
}

impl Sidecar {
    /// Starts `tollgate serve` on `config_text`, whose `server.listeners` should use port 0.
    pub fn start(config_text: &str) -> anyhow::Result<Self> {
        Self::start_limited(config_text, None, &[])
    }

    /// Starts `tollgate serve` on `config_text` with at most `fds` file descriptors (soft and
    /// hard limit, set by util-linux's `prlimit`).
    pub fn start_with_fd_limit(config_text: &str, fds: u64) -> anyhow::Result<Self> {
        Self::start_limited(config_text, Some(fds), &[])
    }

    /// Starts `tollgate serve` on `config_text` with these extra environment variables.
    pub fn start_with_env(config_text: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_limited(config_text, None, env)
    }

    fn start_limited(
        config_text: &str,
        fds: Option<u64>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot make a temp dir")?;
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, config_text).context("cannot write the sidecar config")?;
        let mut s = Self::launch(config, fds, env)?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts `tollgate serve` on an existing config file (a restart uses the same file).
    pub fn start_at(config: &Path) -> anyhow::Result<Self> {
        Self::launch(config.to_path_buf(), None, &[])
    }

    fn launch(config: PathBuf, fds: Option<u64>, env: &[(&str, &str)]) -> anyhow::Result<Self> {
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
            .envs(env.iter().copied())
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
            _dir: None,
        })
    }

    /// Runs `tollgate serve` on `config`, expecting it to refuse to start: returns what it
    /// wrote to stderr once it exits with an error, having served nothing (no ready line). An
    /// error if it exits cleanly, printed its ready line, or is still running after 30 s (then
    /// it is killed).
    pub fn refused_start(config: &Path) -> anyhow::Result<String> {
        Self::refused_start_with_env(config, &[])
    }

    /// [`Sidecar::refused_start`] with these extra environment variables.
    pub fn refused_start_with_env(config: &Path, env: &[(&str, &str)]) -> anyhow::Result<String> {
        use std::io::Read as _;
        let bin = workspace_bin("tollgate", "TOLLGATE_BIN")?;
        let mut child = Command::new(&bin)
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "the sidecar was still running after 30 s; it was expected to refuse"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (mut stdout, mut stderr) = (String::new(), String::new());
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut stdout)?;
        }
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut stderr)?;
        }
        anyhow::ensure!(!status.success(), "the sidecar exited cleanly: {stderr}");
        anyhow::ensure!(
            stdout.is_empty(),
            "the sidecar printed {stdout:?} before it exited: it served"
        );
        Ok(stderr)
    }

    /// Sends `signal` (a name such as `KILL`, `TERM` or `HUP`).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        self.proc.signal(signal)
    }

    /// The port of the ext_authz listener.
    pub fn ext_authz_port(&self) -> anyhow::Result<u16> {
        port_of(&self.ext_authz)
    }

    /// The sidecar's `/metrics` page.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        Metrics::scrape(&self.http).await
    }
}
