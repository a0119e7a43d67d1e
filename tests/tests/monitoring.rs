//! The monitoring in `k8s/monitoring/` against what the binaries export: every metric the
//! Grafana dashboard and the alert rules name, and every metric the docs list, is on the
//! sidecar's `/metrics` or Envoy's `/stats/prometheus` (the filter's) from the start, before
//! any traffic; every expression parses as PromQL; and every family the sidecar exports is
//! documented.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The metric names a Prometheus text page offers to queries: each sample's name, and for each
/// `# TYPE` the names its samples take (`_total` of a counter, `_bucket`/`_sum`/`_count` of a
/// histogram).
fn exported(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            match kind {
                "counter" if !name.ends_with("_total") => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {}
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// The families the sidecar declares (`# TYPE` names), as a query names them.
fn families(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next()?, parts.next()?);
            Some(match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_string(),
            })
        })
        .collect()
}

/// Every PromQL expression of the dashboard and the alert rules, with where it is.
fn expressions() -> Vec<(String, String)> {
    /// `at`: the title of the nearest panel around `v`.
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let at = m.get("title").and_then(Value::as_str).unwrap_or(at);
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push((format!("panel `{at}`"), e.clone()));
                }
                m.values().for_each(|x| walk(x, at, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, at, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let dashboard: Value = serde_json::from_str(&read("k8s/monitoring/grafana-dashboard.json"))
        .expect("the dashboard is JSON");
    walk(&dashboard, "", &mut out);
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("k8s/monitoring/prometheusrule.yaml")).unwrap();
    for group in rules["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            out.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The metric names `text` mentions; a pattern (`tollgate_filter_*_total`,
/// `tollgate_filter_<name>_total`) names none, nor does an Envoy stat name
/// (`wasmcustom.tollgate_filter`).
fn metric_names(text: &str) -> Vec<String> {
    let re = regex_lite::Regex::new(r"(?:^|[^.a-zA-Z0-9_])(tollgate_[a-z0-9_*<>]+)").unwrap();
    re.captures_iter(text)
        .filter_map(|c| c.get(1))
        .map(|m| m.as_str())
        .filter(|m| !m.contains(['*', '<', '>']))
        .map(|m| m.trim_end_matches('_').to_string())
        .collect()
}

/// The filter's stats as its README's table lists them, as Prometheus names them.
fn documented_filter_stats() -> Vec<String> {
    let text = read("filter/README.md");
    let table = text
        .split("**Stats.**")
        .nth(1)
        .expect("filter/README.md has its **Stats.** section");
    let mut out = Vec::new();
    for line in table
        .lines()
        .skip_while(|l| !l.starts_with("| `<name>`"))
        .skip(2)
    {
        if !line.starts_with('|') {
            break;
        }
        let first = line.split('|').nth(1).unwrap();
        for name in first.split('`').skip(1).step_by(2) {
            out.push(format!("tollgate_filter_{name}_total"));
        }
    }
    assert!(
        out.len() >= 20,
        "the table lists the filter's stats: {out:?}"
    );
    // And its histograms, named after the table ("one histogram: `<name>`").
    for part in table.split("histogram: `").skip(1) {
        if let Some(name) = part.split('`').next() {
            out.push(format!("tollgate_filter_{name}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_alerts_and_docs_name_only_metrics_the_binaries_export_from_the_start() {
    // Nothing has been asked yet: what a fresh pod exports is what an alert sees at first.
    let stack = support::Stack::start("wasm-filter.yaml");
    let sidecar_page = stack.sidecar_metrics().await.text().to_string();
    let envoy_page = stack.envoy.prometheus().unwrap();
    let mut offered = exported(&sidecar_page);
    let envoy = exported(&envoy_page);
    offered.extend(envoy.iter().filter(|n| n.starts_with("tollgate_")).cloned());

    // Every expression is PromQL, and every metric it names is exported.
    let mut missing = Vec::new();
    let exprs = expressions();
    assert!(exprs.len() > 30, "the dashboard and rules hold expressions");
    for (at, expr) in &exprs {
        let query = expr.replace("$__rate_interval", "5m");
        if let Err(e) = promql_parser::parser::parse(&query) {
            panic!("{at}: not PromQL: {e}\n{expr}");
        }
        for name in metric_names(expr) {
            if !offered.contains(&name) {
                missing.push(format!("{at}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but not exported:\n{}",
        missing.join("\n")
    );

    // Every metric the sidecar's docs and the filter's README list is there from the start.
    let docs = [
        "decision-server/README.md",
        "decision-server/docs/storage.md",
        "k8s/README.md",
    ]
    .map(read)
    .join("\n");
    let mut documented: BTreeSet<String> = metric_names(&docs).into_iter().collect();
    documented.extend(documented_filter_stats());
    let absent: Vec<&String> = documented
        .iter()
        .filter(|n| !offered.contains(*n))
        .collect();
    assert!(
        absent.is_empty(),
        "documented but not exported before the first event: {absent:?}"
    );
    // The filter's stats are Prometheus counters named `_total`, apart from the sidecar's.
    assert!(
        envoy_page.contains("# TYPE tollgate_filter_granted_total counter"),
        "{}",
        envoy_page
            .lines()
            .filter(|l| l.contains("tollgate"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And every family the sidecar exports, and every counter of the filter's, is documented.
    let undocumented: Vec<String> = families(&sidecar_page)
        .into_iter()
        .chain(
            families(&envoy_page)
                .into_iter()
                .filter(|f| f.starts_with("tollgate_")),
        )
        .filter(|f| !documented.contains(f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in the docs: {undocumented:?}"
    );
}
