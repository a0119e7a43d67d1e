//! The Kubernetes manifests in `k8s/`, proven offline: every kustomization builds with
//! `kubectl kustomize`, the ConfigMap's `tollgate.yaml` passes the sidecar's own validation,
//! and the Deployment keeps the pod's hardening and shutdown timing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn k8s() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

/// Every folder under `k8s/` holding a `kustomization.yaml`.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.join("kustomization.yaml").exists() {
            out.push(dir.to_path_buf());
        }
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&k8s(), &mut out);
    out.sort();
    out
}

/// The objects `kubectl kustomize dir` prints.
fn build(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("`kubectl kustomize` is needed to build k8s/ (install kubectl): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

#[test]
fn every_kustomization_builds() {
    let dirs = kustomizations();
    assert!(dirs.iter().any(|d| d.ends_with("base")), "{dirs:?}");
    for dir in dirs {
        let objects = build(&dir);
        assert!(!objects.is_empty(), "{} built nothing", dir.display());
        for o in &objects {
            assert!(
                o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty()),
                "{}: an object without a name: {o:?}",
                dir.display()
            );
        }
    }
}

#[test]
fn the_config_map_holds_a_valid_config_and_the_pod_matches_it() {
    for dir in kustomizations() {
        let objects = build(&dir);
        let Some(cm) = of_kind(&objects, "ConfigMap").into_iter().find(|c| {
            c["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("tollgate-config"))
        }) else {
            continue;
        };
        let text = cm["data"]["tollgate.yaml"].as_str().unwrap();
        let loaded = tollgate::config::load(text, &format!("{}: tollgate.yaml", dir.display()))
            .unwrap_or_else(|e| panic!("{}: the config does not validate:\n{e}", dir.display()));
        let grace_ms = loaded.server.shutdown_grace_millis;

        let pods: Vec<&Value> = of_kind(&objects, "Deployment")
            .into_iter()
            .chain(of_kind(&objects, "StatefulSet"))
            .map(|w| &w["spec"]["template"]["spec"])
            .collect();
        assert!(!pods.is_empty(), "{}: no workload", dir.display());
        for pod in pods {
            let c = &pod["containers"][0];
            let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
                .as_i64()
                .unwrap();
            let period = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
            assert!(
                period * 1000 >= grace_ms + pre_stop * 1000,
                "{}: terminationGracePeriodSeconds {period} is shorter than shutdownGrace ({grace_ms} ms) plus the preStop pause ({pre_stop} s)",
                dir.display()
            );
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", dir.display());
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["capabilities"]["drop"][0], "ALL");
            assert!(c["resources"]["limits"]["cpu"].as_str().is_some());
            // Workers follow the CPU limit.
            let workers = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "TOLLGATE_WORKERS")
                .expect("TOLLGATE_WORKERS is set");
            assert_eq!(
                workers["valueFrom"]["resourceFieldRef"]["resource"],
                "limits.cpu"
            );
            for probe in ["readinessProbe", "livenessProbe"] {
                assert!(c[probe]["grpc"]["port"].as_i64().is_some(), "{probe}");
            }
        }
    }
}
