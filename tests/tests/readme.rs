//! The README's "Your first governed call", run as written: its shell blocks, in order, as one
//! bash script in a copy of the repository's files it names (`envoy/`,
//! `decision-server/examples/`), with the build outputs of this checkout (`target/`, `.tools/`)
//! linked in. Two departures, both about the build: the block that runs `make` is skipped (the
//! test suite has built everything its own way), and `target/release/` reads as the directory
//! of the binaries this test run built. The ports are the README's own (8000, 8080, 9190–9192,
//! 9901, all loopback, below the range the OS hands out for port 0, so the other tests never
//! take them). Beside it, the other READMEs' commands that can run here, and a check of every
//! relative link in the Markdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tollgate_testkit::root;

/// The ```sh blocks of the README section titled `title`, in order.
fn shell_blocks(readme: &str, title: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n## {title}\n"))
        .unwrap_or_else(|| panic!("the README has no section `{title}`"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    let section = &rest[..end];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(block.join("\n"));
        }
    }
    blocks
}

/// Copies `rel` (a directory of the repository) into `to`.
fn copy_dir(rel: &str, to: &Path) {
    let from = root().join(rel);
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(rel).join(entry.file_name());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A directory holding a copy of the files the READMEs' commands name (`envoy/`,
/// `decision-server/examples/`) and this checkout's build outputs (`target/`, `.tools/`)
/// linked in; and the `tollgate` binary this test run built (the tests' profile), which the
/// READMEs' `target/release/` stands for.
fn workdir() -> (tempfile::TempDir, std::path::PathBuf) {
    let bin = tollgate_testkit::proc::workspace_bin("tollgate", "TOLLGATE_BIN").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for rel in ["envoy", "decision-server/examples"] {
        copy_dir(rel, dir.path());
    }
    for rel in ["target", ".tools"] {
        std::os::unix::fs::symlink(root().join(rel), dir.path().join(rel)).unwrap();
    }
    (dir, bin)
}

/// Runs `script` with bash in `dir` (its own process group, stopped whole when it ends or
/// after `limit`), with `envs` added: its exit status (`None` past the limit), stdout and
/// stderr.
fn run_bash(
    dir: &Path,
    script: &str,
    envs: &[(&str, &str)],
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let log = dir.join("out.txt");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(log.with_extension("err")).unwrap(),
        ))
        // Its own group: whatever it leaves running is stopped with it.
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let mut out = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
    (status, out, err)
}

#[test]
fn the_readmes_first_governed_call_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks = shell_blocks(&readme, "Your first governed call");
    assert!(blocks.len() >= 8, "only {} blocks", blocks.len());
    let (built, blocks): (Vec<String>, Vec<String>) = blocks
        .into_iter()
        .partition(|b| b.trim_start().starts_with("make "));
    assert_eq!(built.len(), 1, "one build step: {built:?}");

    let (dir, bin) = workdir();
    let bin_dir = bin.parent().unwrap().display().to_string();
    let script = format!(
        "set -euo pipefail\n{}\n",
        blocks
            .join("\n")
            .replace("target/release/", &format!("{bin_dir}/"))
    );
    let (status, out, err) = run_bash(dir.path(), &script, &[], Duration::from_secs(120));
    let status =
        status.unwrap_or_else(|| panic!("the README's commands ran past 120 s\n{out}\n{err}"));
    assert!(
        status.success(),
        "the README's commands failed ({status})\n{out}\n{err}"
    );

    // The governed call: granted, with the budget left; then the oversized one refused by
    // research's daily limit; the usage by user shows alice; the portal answers.
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("http/1.1 200"), "{out}");
    assert!(lower.contains("ratelimit-remaining:"), "{out}");
    assert!(out.contains("\"usage\""), "{out}");
    assert!(out.contains("research-daily-tokens"), "{out}");
    assert!(out.contains("\"value\":\"alice\""), "{out}");
    assert!(out.contains("portal: 200"), "{out}");
    // The trial files are where the README says, the key readable by its owner only.
    let key = dir.path().join("trial/signing-key.pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the signing key is readable by others");
}

/// envoy/README's "A real provider" commands, as written but for the last step: the `sed`
/// that renders the OpenAI config from a trial key set, then Envoy started with that file in
/// `--mode validate` (it loads every listener, cluster, secret and the WASM filter without
/// serving, since the real provider and its key are not here). And decision-server/README's
/// `validate` of its example config.
#[test]
fn the_other_readmes_runnable_commands_run_as_written() {
    let (dir, bin) = workdir();
    let bin_dir = bin.parent().unwrap().display().to_string();
    let trial = Command::new(&bin)
        .args(["trial-key", "--dir", "trial"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(trial.status.success(), "{trial:?}");

    let envoy_readme = std::fs::read_to_string(root().join("envoy/README.md")).unwrap();
    let blocks = shell_blocks(&envoy_readme, "A real provider");
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let block = blocks[0].trim_end();
    const RUN: &str = "envoy -c trial/envoy-openai.yaml --concurrency 2";
    assert!(
        block.ends_with(RUN),
        "the recipe no longer ends by starting Envoy: {block}"
    );
    let script = format!("set -euo pipefail\n{block} --mode validate\n");
    let (status, out, err) = run_bash(
        dir.path(),
        &script,
        &[("TOLLGATE_GATEWAY_TOKEN", "envoy.trial-gateway-token")],
        Duration::from_secs(60),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the provider recipe failed ({status:?})\n{out}\n{err}"
    );
    assert!(
        format!("{out}{err}").contains("configuration 'trial/envoy-openai.yaml' OK"),
        "{out}\n{err}"
    );
    let rendered = std::fs::read_to_string(dir.path().join("trial/envoy-openai.yaml")).unwrap();
    assert!(
        !rendered.contains("{{"),
        "a placeholder was left: {rendered}"
    );
    let jwks = std::fs::read_to_string(dir.path().join("trial/jwks.json")).unwrap();
    assert!(
        rendered.contains(jwks.trim()),
        "the trial key set is not inline"
    );

    let server_readme = std::fs::read_to_string(root().join("decision-server/README.md")).unwrap();
    let validate = server_readme
        .lines()
        .find(|l| l.starts_with("target/release/tollgate validate "))
        .expect("decision-server/README shows `tollgate validate`");
    let (status, out, err) = run_bash(
        dir.path(),
        &validate.replace("target/release/", &format!("{bin_dir}/")),
        &[],
        Duration::from_secs(30),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "`{validate}` failed\n{out}\n{err}"
    );
}

/// GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The repository's own Markdown files (not dependencies, not build outputs).
fn markdown_files() -> Vec<std::path::PathBuf> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.md",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| root().join(l))
        .filter(|p| p.is_file())
        .collect()
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_leads_somewhere() {
    let mut broken = Vec::new();
    let files = markdown_files();
    assert!(files.len() > 5, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let dir = file.parent().unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (path, frag) = target.split_once('#').unwrap_or((target, ""));
            let linked = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            if !linked.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            if !frag.is_empty() && linked.extension().is_some_and(|e| e == "md") {
                let doc = std::fs::read_to_string(&linked).unwrap();
                let found = doc
                    .lines()
                    .filter_map(|l| l.trim_start().strip_prefix('#'))
                    .map(|h| anchor(h.trim_start_matches('#')))
                    .any(|a| a == frag);
                if !found {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
