//! Real Envoy loads what Istio would make of the manifests in `k8s/overlays`: a listener
//! shaped like an Istio gateway's (Istio's jwt_authn set-up from the RequestAuthentication,
//! the filter where the WasmPlugin's phase or the EnvoyFilter's patch puts it, the decision
//! server's cluster under the name Istio gives it), every value read from the manifests by
//! the test. Through it, a call is granted and its hold settled from the answer's usage, and
//! a call over the team's cap is denied. The only values replaced are addresses (loopback
//! ports instead of cluster DNS names), the module's location (the built file, where
//! istio-agent or Envoy's remote fetch would put it) and TLS to the artifact host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{Value, json};
use support::{SIDECAR, Stack, chat_body};
use tollgate_testkit::{jwks, signed_jwt, wasm_module};

/// Where Istio's jwt_authn keeps a verified payload (`payload_in_metadata`): Istio's
/// `EnvoyJwtFilterPayload`.
const ISTIO_JWT_PAYLOAD_KEY: &str = "payload";

fn overlay(name: &str) -> Vec<Value> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s/overlays")
        .join(name);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("`kubectl kustomize` is needed (install kubectl): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            let y = serde_yaml_ng::Value::deserialize(d).unwrap();
            serde_json::to_value(y).unwrap()
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The issuer the RequestAuthentication trusts.
fn issuer(objects: &[Value]) -> String {
    of_kind(objects, "RequestAuthentication")["spec"]["jwtRules"][0]["issuer"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An Istio gateway's listener: jwt_authn as Istio generates it for a RequestAuthentication
/// (here with a local JWKS instead of the `jwksUri`), Envoy's CORS and fault filters as Istio
/// places them, `filter` where `before_router` says, and the router to the model upstream.
fn istio_gateway(issuer: &str, filter: Value, clusters: Vec<Value>, upstream_port: u16) -> String {
    let jwt = json!({
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "origins-0": {
                    "issuer": issuer,
                    "local_jwks": { "inline_string": jwks() },
                    "payload_in_metadata": ISTIO_JWT_PAYLOAD_KEY,
                    "forward": true
                }
            },
            "rules": [{ "match": { "prefix": "/" }, "requires": { "requires_any": { "requirements": [
                { "provider_name": "origins-0" }, { "allow_missing": {} }
            ] } } }]
        }
    });
    let mut all_clusters = clusters;
    all_clusters.push(json!({
        "name": "outbound|80||llm.models.svc.cluster.local",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "outbound|80||llm.models.svc.cluster.local",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                "address": "127.0.0.1", "port_value": upstream_port } } } }] }]
        }
    }));
    json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_8080",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "route_config": {
                            "name": "http.8080",
                            "virtual_hosts": [{
                                "name": "*:8080",
                                "domains": ["*"],
                                "routes": [{ "match": { "prefix": "/" }, "route": {
                                    "cluster": "outbound|80||llm.models.svc.cluster.local", "timeout": "60s" } }]
                            }]
                        },
                        "http_filters": [
                            jwt,
                            { "name": "envoy.filters.http.cors", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors" } },
                            { "name": "envoy.filters.http.fault", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault" } },
                            filter,
                            { "name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }
                        ]
                    }
                }] }]
            }],
            "clusters": all_clusters
        }
    })
    .to_string()
}

/// Points a cluster's one endpoint at a loopback port.
fn to_loopback(mut cluster: Value, port: u16) -> Value {
    let address = &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    address["address"] = "127.0.0.1".into();
    address["port_value"] = port.into();
    cluster["type"] = "STATIC".into();
    cluster
}

/// The cluster Istio makes for a service in its registry: `outbound|<port>||<host>`, HTTP/2
/// for a gRPC port, one endpoint.
fn istio_service_cluster(host: &str, port: u64, sidecar_port: u16) -> (String, Value) {
    let name = format!("outbound|{port}||{host}");
    let cluster = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "load_assignment": { "cluster_name": name, "endpoints": [{ "lb_endpoints": [{ "endpoint": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": sidecar_port } } } }] }] }
    });
    (name, cluster)
}

/// The Wasm filter Istio makes of a WasmPlugin (what istio-agent serves once it has pulled the
/// image: the module as a local file).
fn wasm_plugin_filter(plugin: &Value) -> Value {
    let spec = &plugin["spec"];
    let host_env: Vec<&Value> = spec["vmConfig"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"] == "HOST")
        .map(|e| &e["name"])
        .collect();
    json!({
        "name": format!("{}.{}", plugin["metadata"]["namespace"].as_str().unwrap_or("default"),
            plugin["metadata"]["name"].as_str().unwrap()),
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": plugin["metadata"]["name"],
                "root_id": spec["pluginName"],
                "fail_open": spec["failStrategy"] == "FAIL_OPEN",
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": wasm_module().unwrap().display().to_string() } },
                    "environment_variables": { "host_env_keys": host_env }
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": spec["pluginConfig"].to_string()
                }
            }
        }
    })
}

/// The tests' sidecar config, with research's daily cap room for about one fixed WasmPlugin
/// hold (1024) or one body-sized hold (~1040), so the third call is denied either way.
fn sidecar() -> String {
    let text = SIDECAR.replace(
        "kind: quota, limit: 300, period: P1D",
        "kind: quota, limit: 1100, period: P1D",
    );
    assert_ne!(text, *SIDECAR);
    text
}

/// acme's research team: granted, settled at the answer's usage, then denied past its cap.
async fn grant_settle_deny(stack: &Stack, issuer: &str) {
    let jwt = signed_jwt(
        &json!({ "iss": issuer, "org": "acme", "sub": "alice" }),
        tollgate_testkit::JWT_KEY,
    );
    let auth = format!("Bearer {jwt}");
    let headers = [("authorization", auth.as_str()), ("x-team-id", "research")];
    let dims = json!({ "userId": "alice", "teamId": "research" });
    let granted = stack
        .chat("/v1/chat/completions", &headers, &chat_body(20, 1000))
        .await;
    assert_eq!(granted.status, 200, "{}", granted.text);
    let used = granted.total_tokens();
    // Settled: the counter holds what the answer says was used, not the hold.
    stack
        .usage_settles_at("acme", dims.clone(), "research-daily", used)
        .await;
    // More calls until the team's cap refuses one (bounded: the cap is a few calls' worth).
    let mut used = used;
    let mut denied = None;
    for _ in 0..20 {
        let r = stack
            .chat("/v1/chat/completions", &headers, &chat_body(20, 1000))
            .await;
        match r.status {
            200 => used += r.total_tokens(),
            429 => {
                denied = Some(r);
                break;
            }
            s => panic!("{s}: {}", r.text),
        }
    }
    assert!(denied.is_some(), "no call was denied within 20 calls");
    stack
        .usage_settles_at("acme", dims.clone(), "research-daily", used)
        .await;
    // A token from an issuer the RequestAuthentication does not trust charges nobody.
    let forged = signed_jwt(
        &json!({ "iss": "https://evil.example", "org": "acme", "sub": "alice" }),
        b"another key, not the identity provider's",
    );
    let forged = format!("Bearer {forged}");
    let refused = stack
        .chat(
            "/v1/chat/completions",
            &[("authorization", forged.as_str())],
            &chat_body(5, 10),
        )
        .await;
    assert!(
        refused.status == 400 || refused.status == 401,
        "{} {}",
        refused.status,
        refused.text
    );
    stack
        .usage_settles_at("acme", dims, "research-daily", used)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_plugin_on_the_gateway_reaches_the_decision_server_through_its_service() {
    let objects = overlay("istio-wasm");
    let plugin = of_kind(&objects, "WasmPlugin").clone();
    let service = of_kind(&objects, "Service");
    let host = format!(
        "{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc-ext-authz")
        .unwrap()["port"]
        .as_u64()
        .unwrap();
    wasm_plugin_governs_calls(&objects, &plugin, &host, port).await;
}

/// Runs `plugin` (from `objects`) in Envoy with the decision server behind the cluster Istio
/// makes for `host`:`port`, which the pluginConfig must name; then grants, settles and denies.
async fn wasm_plugin_governs_calls(objects: &[Value], plugin: &Value, host: &str, port: u64) {
    let issuer = issuer(objects);
    let stack = Stack::start_built(&sidecar(), |sidecar_port, upstream_port| {
        let (name, cluster) = istio_service_cluster(host, port, sidecar_port);
        assert_eq!(
            plugin["spec"]["pluginConfig"]["sidecar"]["cluster"], name,
            "the pluginConfig names the cluster Istio makes for the service"
        );
        istio_gateway(
            &issuer,
            wasm_plugin_filter(plugin),
            vec![cluster],
            upstream_port,
        )
    });
    grant_settle_deny(&stack, &issuer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_plugin_on_a_workload_reaches_its_own_pod_through_the_service_entry() {
    let objects = overlay("istio-wasm/workload");
    let plugin = of_kind(&objects, "WasmPlugin").clone();
    let entry = of_kind(&objects, "ServiceEntry");
    let host = entry["spec"]["hosts"][0].as_str().unwrap().to_string();
    let port = entry["spec"]["ports"][0]["number"].as_u64().unwrap();
    assert_eq!(entry["spec"]["endpoints"][0]["address"], "127.0.0.1");
    wasm_plugin_governs_calls(&objects, &plugin, &host, port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_filter_patches_load_in_envoy_and_govern_calls() {
    let objects = overlay("istio-envoyfilter");
    let filter = of_kind(&objects, "EnvoyFilter");
    let patches = filter["spec"]["configPatches"].as_array().unwrap();
    let http = patches
        .iter()
        .find(|p| p["applyTo"] == "HTTP_FILTER")
        .unwrap();
    assert_eq!(http["patch"]["operation"], "INSERT_BEFORE");
    assert_eq!(
        http["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
        "envoy.filters.http.router"
    );
    let mut wasm = http["patch"]["value"].clone();
    // The module: the built file, checked against the pin by `the_filter_image...` in
    // k8s_manifests; here Envoy's own remote fetch is replaced by the file it would fetch.
    let code = &mut wasm["typed_config"]["config"]["vm_config"]["code"];
    assert!(code["remote"]["sha256"].is_string());
    *code = json!({ "local": { "filename": wasm_module().unwrap().display().to_string() } });
    let decision_name = wasm["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .map(|t| serde_json::from_str::<Value>(t).unwrap()["sidecar"]["cluster"].clone())
        .unwrap();
    let added: Vec<Value> = patches
        .iter()
        .filter(|p| p["applyTo"] == "CLUSTER")
        .map(|p| p["patch"]["value"].clone())
        .collect();
    let issuer = issuer(&objects);
    let stack = Stack::start_built(&sidecar(), |sidecar_port, upstream_port| {
        let clusters = added
            .into_iter()
            .map(|c| {
                if c["name"] == decision_name {
                    to_loopback(c, sidecar_port)
                } else {
                    // The artifact host: unused once the module is local; no TLS peer here.
                    let mut c = to_loopback(c, upstream_port);
                    c.as_object_mut().unwrap().remove("transport_socket");
                    c
                }
            })
            .collect();
        istio_gateway(&issuer, wasm, clusters, upstream_port)
    });
    grant_settle_deny(&stack, &issuer).await;
}
