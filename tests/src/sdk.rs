//! Runs the official `openai` and `anthropic` Python SDKs (`tests/sdk/client.py`) against
//! Envoy, as users call it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tollgate_testkit::root;

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
