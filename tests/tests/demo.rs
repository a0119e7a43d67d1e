//! `make demo` as a newcomer runs it (its binary, not in a terminal): it tells the whole story
//! and ends cleanly, pointing at the next step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

#[test]
fn the_demo_runs_to_its_end_and_points_at_the_next_step() {
    let bin = tollgate_testkit::proc::workspace_bin("tollgate-demo", "TOLLGATE_DEMO_BIN").unwrap();
    let out = Command::new(bin).stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "DENIED",
        "limit.threshold_crossed 50% of research-daily-tokens",
        "limit.threshold_crossed 80% of research-daily-tokens",
        "(signature verified)",
        "counter now",
        "cut after",
        "quota limit `sales-daily-tokens`",
        "its usage record: cutBy sales-daily-tokens",
        "Where the tokens went",
        "teamId  research",
        "userId  alice",
        "/portal/",
        "fail-closed route /v1/...      -> 503",
        "fail-open route   /open/v1/... -> 200",
        "stopped Envoy, the sidecar and the mock upstream",
        "Your first governed call",
    ] {
        assert!(
            text.contains(step),
            "the demo did not show `{step}`:\n{text}"
        );
    }
}
