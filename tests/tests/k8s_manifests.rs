//! The Kubernetes manifests in `k8s/`, proven offline: every kustomization builds with
//! `kubectl kustomize`; every Istio object validates against its CRD's strict schema
//! (`k8s/schemas/`) and every core object against the Kubernetes schemas (`kubernetes-validate
//! --strict`, for the version in [`KUBERNETES`]); the ConfigMap's `tollgate.yaml` passes the
//! sidecar's own validation, the filter configs in the WasmPlugin and the EnvoyFilter pass the
//! filter's, and the pods keep their hardening and shutdown timing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn k8s() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

/// The Kubernetes version the manifests are written for (and validated against).
const KUBERNETES: &str = "1.32.0";

/// Every folder under `k8s/` holding a `kustomization.yaml` that builds on its own (not a
/// `kind: Component`, which only builds inside an overlay).
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let k = dir.join("kustomization.yaml");
        if k.exists()
            && !std::fs::read_to_string(&k)
                .unwrap()
                .contains("kind: Component")
        {
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
    for overlay in [
        "embedded",
        "redis",
        "istio-wasm",
        "istio-wasm/workload",
        "istio-envoyfilter",
        "istio-ext-authz",
    ] {
        assert!(
            dirs.iter()
                .any(|d| d.ends_with(format!("overlays/{overlay}"))),
            "overlays/{overlay} is missing: {dirs:?}"
        );
    }
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
        // The ConfigMap's keys as the pod sees them: files side by side in one directory.
        let mounted = tempfile::tempdir().unwrap();
        for (name, value) in cm["data"].as_mapping().unwrap() {
            let name = name.as_str().unwrap();
            std::fs::write(mounted.path().join(name), value.as_str().unwrap()).unwrap();
        }
        let text = cm["data"]["tollgate.yaml"].as_str().unwrap();
        let file = mounted.path().join("tollgate.yaml");
        let loaded = tollgate::config::load(text, &file.display().to_string())
            .unwrap_or_else(|e| panic!("{}: the config does not validate:\n{e}", dir.display()));
        let grace_ms = loaded.server.shutdown_grace_millis;

        let pods: Vec<&Value> = of_kind(&objects, "Deployment")
            .into_iter()
            .chain(of_kind(&objects, "StatefulSet"))
            .map(|w| &w["spec"]["template"]["spec"])
            .collect();
        assert!(!pods.is_empty(), "{}: no workload", dir.display());
        for pod in pods {
            let c = pod["containers"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "tollgate")
                .unwrap_or_else(|| panic!("{}: no `tollgate` container", dir.display()));
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

/// Whether `o` is a custom resource whose CRD schema `k8s/schemas/` holds (Istio's kinds and the
/// Prometheus Operator's), rather than a core object the Kubernetes schemas cover.
fn has_crd_schema(o: &Value) -> bool {
    o["apiVersion"]
        .as_str()
        .is_some_and(|v| v.contains(".istio.io/") || v.starts_with("monitoring.coreos.com/"))
}

/// The strict schema `k8s/schemas/index.json` lists for an object's apiVersion and kind.
fn schema_for(o: &Value) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(k8s().join("schemas/index.json")).unwrap())
            .unwrap();
    let entry = index["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["apiVersion"] == o["apiVersion"].as_str().unwrap()
                && e["kind"] == o["kind"].as_str().unwrap()
        })
        .unwrap_or_else(|| {
            panic!(
                "k8s/schemas has no schema for {} {}: copy it from the Istio CRDs",
                o["apiVersion"].as_str().unwrap(),
                o["kind"].as_str().unwrap()
            )
        });
    let file = k8s().join("schemas").join(entry["file"].as_str().unwrap());
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// The schema errors of one Istio object (empty when it is valid).
fn schema_errors(o: &Value) -> Vec<String> {
    let schema = schema_for(o);
    let validator = jsonschema::validator_for(&schema).unwrap();
    let instance = serde_json::to_value(o).unwrap();
    validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn every_custom_resource_validates_against_its_crd_schema() {
    let mut seen = std::collections::BTreeSet::new();
    for dir in kustomizations() {
        for o in build(&dir).iter().filter(|o| has_crd_schema(o)) {
            seen.insert(o["kind"].as_str().unwrap().to_string());
            let errors = schema_errors(o);
            assert!(
                errors.is_empty(),
                "{}: {} {} does not validate:\n{}",
                dir.display(),
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
                errors.join("\n")
            );
        }
    }
    for kind in [
        "WasmPlugin",
        "EnvoyFilter",
        "ServiceEntry",
        "AuthorizationPolicy",
        "RequestAuthentication",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    ] {
        assert!(seen.contains(kind), "no {kind} was validated: {seen:?}");
    }
}

/// The ServiceMonitor scrapes the decision server's Service as built: its selector matches the
/// Service's labels and its port is one of the Service's, serving `/metrics`.
#[test]
fn the_service_monitor_selects_the_decision_servers_metrics_port() {
    let base = build(&k8s().join("base"));
    let service = of_kind(&base, "Service")[0];
    let monitoring = build(&k8s().join("monitoring"));
    let monitor = of_kind(&monitoring, "ServiceMonitor")[0];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k.as_str().unwrap()],
            v,
            "the Service carries {k:?}"
        );
    }
    assert_eq!(
        monitor["metadata"]["namespace"], service["metadata"]["namespace"],
        "a ServiceMonitor selects Services of its own namespace"
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    let port = endpoint["port"].as_str().unwrap();
    let http = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(port))
        .unwrap_or_else(|| panic!("the Service has no port `{port}`"));
    assert_eq!(
        http["port"], 9190,
        "the HTTP listener, which serves /metrics"
    );
    assert_eq!(endpoint["path"], "/metrics");
    let dashboard = of_kind(&monitoring, "ConfigMap")[0];
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["tollgate.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "tollgate-overview");
}

/// Finds the first object of `kind` in `overlay`'s build.
fn object(overlay: &str, kind: &str) -> Value {
    of_kind(&build(&k8s().join("overlays").join(overlay)), kind)
        .first()
        .map(|o| (*o).clone())
        .unwrap_or_else(|| panic!("overlays/{overlay} has no {kind}"))
}

#[test]
fn a_misspelled_field_fails_validation() {
    // An Istio object: a field the CRD does not have, at the top of the spec and deep inside.
    let mut wasm = object("istio-wasm", "WasmPlugin");
    assert!(schema_errors(&wasm).is_empty());
    let strategy = wasm["spec"]["failStrategy"].clone();
    wasm["spec"]
        .as_mapping_mut()
        .unwrap()
        .insert("failStrategyy".into(), strategy);
    assert!(
        schema_errors(&wasm)
            .iter()
            .any(|e| e.contains("failStrategyy")),
        "{:?}",
        schema_errors(&wasm)
    );
    let mut filter = object("istio-envoyfilter", "EnvoyFilter");
    filter["spec"]["configPatches"][0]["patch"]
        .as_mapping_mut()
        .unwrap()
        .insert("operaton".into(), "ADD".into());
    assert!(!schema_errors(&filter).is_empty());
    // A value outside an enum.
    let mut policy = object("istio-ext-authz", "AuthorizationPolicy");
    policy["spec"]["action"] = "CUSTOMISED".into();
    assert!(!schema_errors(&policy).is_empty());

    // A monitoring object: a misspelled field of a scrape endpoint.
    let mut monitor = object("../monitoring", "ServiceMonitor");
    assert!(schema_errors(&monitor).is_empty());
    monitor["spec"]["endpoints"][0]
        .as_mapping_mut()
        .unwrap()
        .insert("intervall".into(), "30s".into());
    assert!(
        schema_errors(&monitor)
            .iter()
            .any(|e| e.contains("intervall")),
        "{:?}",
        schema_errors(&monitor)
    );

    // A core object: kubernetes-validate in strict mode refuses an unknown field.
    let mut deployment = object("redis", "Deployment");
    deployment["spec"]
        .as_mapping_mut()
        .unwrap()
        .insert("replicass".into(), 3.into());
    let errors = kubernetes_validate(&[&deployment]).unwrap_err();
    assert!(errors.contains("replicass"), "{errors}");
}

/// `kubernetes-validate --strict` on these objects: Err with its report when any fails.
fn kubernetes_validate(objects: &[&Value]) -> Result<(), String> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} is missing: `make setup-python` installs it",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    let text: Vec<String> = objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect();
    std::fs::write(&file, text.join("---\n")).unwrap();
    let out = Command::new(&bin)
        .args(["--strict", "--quiet", "-k", KUBERNETES])
        .arg(&file)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !report.contains("ERROR") {
        Ok(())
    } else {
        Err(report)
    }
}

#[test]
fn every_core_object_validates_against_the_kubernetes_schemas() {
    for dir in kustomizations() {
        let objects = build(&dir);
        let core: Vec<&Value> = objects.iter().filter(|o| !has_crd_schema(o)).collect();
        assert!(!core.is_empty(), "{}", dir.display());
        if let Err(report) = kubernetes_validate(&core) {
            panic!(
                "{}: not valid for Kubernetes {KUBERNETES}:\n{report}",
                dir.display()
            );
        }
    }
}

/// The filter's own parser on a config from a manifest: no error and no warning.
fn assert_valid_filter_config(json: &[u8], what: &str) -> tollgate_filter::config::FilterConfig {
    let config = tollgate_filter::config::FilterConfig::parse(json, |_| Some("gw.token".into()))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(config.warnings(), Vec::<String>::new(), "{what}");
    config
}

#[test]
fn the_filter_configs_in_the_istio_manifests_pass_the_filters_own_validation() {
    for overlay in ["istio-wasm", "istio-wasm/workload"] {
        let plugin = object(overlay, "WasmPlugin");
        let json = serde_json::to_vec(&plugin["spec"]["pluginConfig"]).unwrap();
        assert_valid_filter_config(&json, &format!("overlays/{overlay}: pluginConfig"));
        // What a misspelled key does: the filter refuses it (Istio passes it through).
        let mut bad = plugin["spec"]["pluginConfig"].clone();
        bad.as_mapping_mut()
            .unwrap()
            .insert("failmode".into(), "open".into());
        assert!(
            tollgate_filter::config::FilterConfig::parse(
                &serde_json::to_vec(&bad).unwrap(),
                |_| Some("t".into())
            )
            .is_err()
        );
    }
    let filter = object("istio-envoyfilter", "EnvoyFilter");
    let patch = filter["spec"]["configPatches"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["applyTo"] == "HTTP_FILTER")
        .unwrap();
    let text = patch["patch"]["value"]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    assert_valid_filter_config(text.as_bytes(), "overlays/istio-envoyfilter: configuration");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn the_filter_image_holds_the_built_module_and_the_manifests_pin_it() {
    let wasm_path = tollgate_testkit::wasm_module().unwrap();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("image");
    let image = tollgate_xtask::write_wasm_image(&wasm, &layout, "0.1.0").unwrap();

    // Read back the way a registry client reads it.
    let reference = format!("oci:{}:0.1.0", layout.display());
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", &reference])
        .output()
        .unwrap_or_else(|e| panic!("skopeo is needed (`make setup-skopeo`): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256_hex(&out.stdout),
        image.manifest_sha256,
        "the image digest"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "Istio's oci variant has one layer");
    assert_eq!(layers[0]["mediaType"], tollgate_xtask::WASM_LAYER);
    assert_eq!(
        layers[0]["digest"],
        format!("sha256:{}", sha256_hex(&wasm)),
        "the layer is the built module"
    );
    // A copy verifies every blob against its digest; the copied layer is the module's bytes.
    let copy = dir.path().join("copy");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", &reference])
        .arg(format!("oci:{}:0.1.0", copy.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blob = std::fs::read(copy.join("blobs/sha256").join(sha256_hex(&wasm))).unwrap();
    assert!(
        blob == wasm,
        "the copied layer differs from {}",
        wasm_path.display()
    );

    // The pins: the WasmPlugins hold the image digest, the EnvoyFilter the module's.
    for (file, pin) in tollgate_xtask::PINS {
        let text = std::fs::read_to_string(k8s().join(file)).unwrap();
        let want = match pin {
            tollgate_xtask::Pin::Image => &image.manifest_sha256,
            tollgate_xtask::Pin::Module => &image.module_sha256,
        };
        assert_eq!(
            tollgate_xtask::pins_in(&text),
            vec![want.clone()],
            "k8s/{file} pins another build of the filter: run `make wasm-pin` (it rebuilds the \
             module, writes the image to target/wasm-image and rewrites the pins)"
        );
    }
}

/// No container engine runs here, so the decision server's image is not built in the tests;
/// what can be checked of its Dockerfile is: a build stage and a distroless final stage, the
/// user the pods run as, the binary the pods' `args` are for, and that the binary needs no
/// shared library beyond what distroless `cc` ships (glibc, libgcc).
#[test]
fn the_decision_server_dockerfile_matches_the_pods_and_the_binary() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../decision-server/Dockerfile"),
    )
    .unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    assert!(froms.last().unwrap().contains("distroless/cc"), "{froms:?}");
    assert!(text.contains("cargo build --release --locked -p tollgate"));
    // The portal's libraries come from the lock file, into the build stage.
    assert!(text.contains("npm ci") && text.contains("package-lock.json"));
    assert!(
        text.contains(
            "COPY --from=portal /portal/node_modules decision-server/portal/node_modules"
        )
    );
    assert!(text.contains("ENTRYPOINT [\"/tollgate\"]"));
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    let objects = build(&k8s().join("base"));
    let pod = &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"];
    let uid = pod["securityContext"]["runAsUser"].as_i64().unwrap();
    assert_eq!(user.trim(), format!("{uid}:{uid}"));
    assert_eq!(pod["containers"][0]["args"][0], "serve");

    let bin = tollgate_testkit::proc::workspace_bin("tollgate", "TOLLGATE_BIN").unwrap();
    let out = Command::new("ldd").arg(&bin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let lib = line.split_whitespace().next().unwrap_or("");
        assert!(
            [
                "linux-vdso",
                "libc.so",
                "libm.so",
                "libgcc_s.so",
                "libpthread.so",
                "libdl.so",
                "ld-linux",
                "/lib64/ld-linux"
            ]
            .iter()
            .any(|ok| lib.contains(ok)),
            "the binary needs {lib}, which distroless cc does not ship:\n{text}"
        );
    }
}
