//! Real Envoy loads what Istio would make of the manifests in `k8s/overlays`: a listener
//! shaped like an Istio gateway's (Istio's jwt_authn set-up from the RequestAuthentication,
//! the filter where the WasmPlugin's phase or the EnvoyFilter's patch puts it, the decision
//! server's cluster under the name Istio gives it), every value read from the manifests by
//! the test. Through it, a call is granted and its hold settled from the answer's usage, and
//! a call over the team's cap is denied. For the CUSTOM ext_authz overlay, Envoy's ext_authz
//! filter is built from the mesh config's provider settings and reaches the decision server
//! across an mTLS hop through a second Envoy shaped like the decision server pod's Istio proxy,
//! whose `x-forwarded-client-cert` is the gateway's credential. The only values replaced are addresses (loopback
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
/// places them, `filters` (in order) before the router, and the router to the model upstream.
fn istio_gateway(
    issuer: &str,
    filters: Vec<Value>,
    clusters: Vec<Value>,
    upstream_port: u16,
) -> String {
    istio_gateway_logging(issuer, filters, clusters, upstream_port, Vec::new())
}

/// [`istio_gateway`] with the HTTP connection manager's `access_log` entries a Telemetry
/// resource gives it.
fn istio_gateway_logging(
    issuer: &str,
    filters: Vec<Value>,
    clusters: Vec<Value>,
    upstream_port: u16,
    access_log: Vec<Value>,
) -> String {
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
    let mut http_filters = vec![
        jwt,
        json!({ "name": "envoy.filters.http.cors", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors" } }),
        json!({ "name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault" } }),
    ];
    http_filters.extend(filters);
    http_filters.push(
        json!({ "name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }),
    );
    loopback_envoy(
        "0.0.0.0_8080",
        json!({ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "access_log": access_log,
                        "route_config": {
                            "name": "http.8080",
                            "virtual_hosts": [{
                                "name": "*:8080",
                                "domains": ["*"],
                                "routes": [{ "match": { "prefix": "/" }, "route": {
                                    "cluster": "outbound|80||llm.models.svc.cluster.local", "timeout": "60s" } }]
                            }]
                        },
                        "http_filters": http_filters
                    }
                }] }),
        all_clusters,
    )
}

/// An Envoy with one listener on a free loopback port (`filter_chain` its one chain), the
/// admin interface likewise, and `clusters`.
fn loopback_envoy(listener: &str, filter_chain: Value, clusters: Vec<Value>) -> String {
    json!({
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": {
            "listeners": [{
                "name": listener,
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                "filter_chains": [filter_chain]
            }],
            "clusters": clusters
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
            vec![wasm_plugin_filter(plugin)],
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
        istio_gateway(&issuer, vec![wasm], clusters, upstream_port)
    });
    grant_settle_deny(&stack, &issuer).await;
}

/// A mesh's certificates as istiod issues them: one root, and per workload a leaf whose only
/// name is its SPIFFE id (a URI SAN), good for both ends of mTLS.
struct MeshCa {
    dir: tempfile::TempDir,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A workload's certificate and key files.
struct Leaf {
    cert: String,
    key: String,
}

impl MeshCa {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::OrganizationName, "cluster.local");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root.pem"), issuer.pem()).unwrap();
        Self { dir, issuer }
    }

    fn root(&self) -> String {
        self.dir.path().join("root.pem").display().to_string()
    }

    fn leaf(&self, name: &str, spiffe_id: &str) -> Leaf {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        Leaf {
            cert: c.display().to_string(),
            key: k.display().to_string(),
        }
    }
}

/// The decision server pod's Istio proxy, inbound: mTLS required (PeerAuthentication STRICT),
/// and the verified caller's identity appended to `x-forwarded-client-cert` as Istio's
/// sidecar inbound listener does (`APPEND_FORWARD`, subject, URI and DNS), then to the
/// decision server on loopback.
fn inbound_proxy(mesh: &MeshCa, own: &Leaf, sidecar_port: u16) -> String {
    // The inbound cluster has the shape of a service cluster: HTTP/2, one loopback endpoint.
    let (_, mut cluster) = istio_service_cluster("", 0, sidecar_port);
    cluster["name"] = "inbound|9191||".into();
    cluster["load_assignment"]["cluster_name"] = "inbound|9191||".into();
    loopback_envoy(
        "virtualInbound",
        json!({
            "transport_socket": { "name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{ "certificate_chain": { "filename": own.cert },
                        "private_key": { "filename": own.key } }],
                    "validation_context": { "trusted_ca": { "filename": mesh.root() } }
                }
            } },
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "inbound_0.0.0.0_9191",
                    "forward_client_cert_details": "APPEND_FORWARD",
                    "set_current_client_cert_details": { "subject": true, "uri": true, "dns": true },
                    "route_config": { "name": "inbound|9191||", "virtual_hosts": [{
                        "name": "inbound|http|9191", "domains": ["*"],
                        "routes": [{ "match": { "prefix": "/" },
                            "route": { "cluster": "inbound|9191||", "timeout": "0s" } }]
                    }] },
                    "http_filters": [{ "name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }]
                }
            }]
        }),
        vec![cluster],
    )
}

/// The gateway's cluster for the provider's service, as Istio makes it with auto mTLS: the
/// gateway's own certificate, the SNI Istio sets, the server's SPIFFE id checked.
fn mtls_service_cluster(
    name: &str,
    host: &str,
    port: u64,
    proxy_port: u16,
    mesh: &MeshCa,
    own: &Leaf,
    server_id: &str,
) -> Value {
    let (_, mut cluster) = istio_service_cluster(host, port, proxy_port);
    assert_eq!(cluster["name"], name);
    cluster["transport_socket"] = json!({ "name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": format!("outbound_.{port}_._.{host}"),
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{ "certificate_chain": { "filename": own.cert },
                "private_key": { "filename": own.key } }],
            "validation_context": {
                "trusted_ca": { "filename": mesh.root() },
                "match_typed_subject_alt_names": [{ "san_type": "URI",
                    "matcher": { "exact": server_id } }]
            }
        }
    } });
    cluster
}

/// The filters Istio puts on a gateway for a CUSTOM policy: an RBAC filter whose shadow rules
/// (from the policy's `to` operations) mark matching requests, and the ext_authz filter built
/// from the provider's `envoyExtAuthzGrpc` settings, enabled only on marked requests.
fn custom_policy_filters(
    policy: &Value,
    provider: &Value,
    cluster: &str,
    host: &str,
) -> Vec<Value> {
    let rules = policy["spec"]["rules"].as_array().unwrap();
    let policies: serde_json::Map<String, Value> =
        rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let op = &rule["to"][0]["operation"];
                let methods: Vec<Value> = op["methods"].as_array().unwrap().iter()
                .map(|m| json!({ "header": { "name": ":method", "string_match": { "exact": m } } }))
                .collect();
                let paths: Vec<Value> = op["paths"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| json!({ "url_path": { "path": { "exact": p } } }))
                    .collect();
                (
                    format!(
                        "istio-ext-authz-ns[{}]-policy[{}]-rule[{i}]",
                        policy["metadata"]["namespace"].as_str().unwrap(),
                        policy["metadata"]["name"].as_str().unwrap()
                    ),
                    json!({
                        "permissions": [{ "and_rules": { "rules": [
                            { "or_rules": { "rules": methods } },
                            { "or_rules": { "rules": paths } }
                        ] } }],
                        "principals": [{ "any": true }]
                    }),
                )
            })
            .collect();
    let status: u64 = provider["statusOnError"].as_str().unwrap().parse().unwrap();
    vec![
        json!({ "name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": { "action": "DENY", "policies": policies },
            "shadow_rules_stat_prefix": "istio_ext_authz_"
        } }),
        json!({ "name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": provider["failOpen"].as_bool().unwrap(),
            "status_on_error": { "code": status },
            "grpc_service": {
                "envoy_grpc": { "cluster_name": cluster, "authority": host },
                "timeout": provider["timeout"]
            },
            "filter_enabled_metadata": {
                "filter": "envoy.filters.http.rbac",
                "path": [{ "key": "istio_ext_authz_shadow_effective_policy_id" }],
                "value": { "string_match": { "prefix": "istio-ext-authz" } }
            }
        } }),
    ]
}

/// The access log Istio puts on the gateway for a Telemetry resource naming an `envoyHttpAls`
/// provider: Envoy's gRPC access logger to the provider's service cluster, the provider's log
/// name and extra response headers, Envoy's default buffering (no flush interval is set).
fn http_als(provider: &Value, cluster: &str, host: &str) -> Value {
    json!({ "name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {
            "log_name": provider["logName"],
            "transport_api_version": "V3",
            "grpc_service": { "envoy_grpc": { "cluster_name": cluster, "authority": host } }
        },
        "additional_response_headers_to_log": provider["additionalResponseHeadersToLog"]
    } })
}

/// The overlay's `tollgate.yaml` (from its ConfigMap) as JSON.
fn config_map_config(objects: &[Value]) -> Value {
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    serde_yaml_ng::from_str(cm["data"]["tollgate.yaml"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ext_authz_provider_checks_calls_across_the_mesh_hop_and_refuses_what_it_cannot_verify()
{
    let objects = overlay("istio-ext-authz");
    let mesh_config: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../k8s/overlays/istio-ext-authz/mesh-config.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "AuthorizationPolicy" && o["spec"]["action"] == "CUSTOM")
        .unwrap()
        .clone();
    let providers = mesh_config["meshConfig"]["extensionProviders"]
        .as_array()
        .unwrap();
    let provider = providers
        .iter()
        .find(|p| p["name"] == policy["spec"]["provider"]["name"])
        .expect("the policy's provider is registered")["envoyExtAuthzGrpc"]
        .clone();
    // The Telemetry resource turns on the settlement provider's access log for the gateway.
    let telemetry = of_kind(&objects, "Telemetry");
    assert_eq!(
        telemetry["spec"]["selector"], policy["spec"]["selector"],
        "the access log is on the gateway the policy checks"
    );
    let als = providers
        .iter()
        .find(|p| p["name"] == telemetry["spec"]["accessLogging"][0]["providers"][0]["name"])
        .expect("the Telemetry's provider is registered")["envoyHttpAls"]
        .clone();
    assert_eq!(als["service"], provider["service"]);
    assert_eq!(als["port"], provider["port"]);
    // The provider names the decision server's Service and its ext_authz port.
    let service = of_kind(&objects, "Service");
    let host = format!(
        "{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    assert_eq!(provider["service"], host.as_str());
    let port = provider["port"].as_u64().unwrap();
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == port && p["name"] == "grpc-ext-authz")
    );
    let cluster_name = format!("outbound|{port}||{host}");

    // Identities: the gateway's (the config's mesh peer, which the ALLOW policy on the decision
    // server admits) and the decision server's (its ServiceAccount).
    let config = config_map_config(&objects);
    let gateway_id = config["server"]["credentials"]["meshPeers"][0]["spiffeId"]
        .as_str()
        .unwrap()
        .to_string();
    let allow = objects
        .iter()
        .find(|o| o["kind"] == "AuthorizationPolicy" && o["spec"]["action"] == "ALLOW")
        .unwrap();
    assert_eq!(
        allow["spec"]["rules"][0]["from"][0]["source"]["principals"][0],
        gateway_id.trim_start_matches("spiffe://")
    );
    let sa = of_kind(&objects, "ServiceAccount");
    let tollgate_id = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        sa["metadata"]["namespace"].as_str().unwrap(),
        sa["metadata"]["name"].as_str().unwrap()
    );
    let peer = objects
        .iter()
        .find(|o| o["kind"] == "PeerAuthentication")
        .unwrap();
    assert_eq!(peer["spec"]["mtls"]["mode"], "STRICT");
    let issuer = issuer(&objects);
    assert_eq!(
        config["server"]["extAuthz"]["bearerJwt"]["issuer"],
        issuer.as_str()
    );

    // The tests' model and caps, with the overlay's ext_authz settings and mesh peers; the
    // overlay's key set replaced by the test identity provider's.
    let mut sidecar: Value = serde_yaml_ng::from_str(&SIDECAR.replace(
        "kind: quota, limit: 300, period: P1D",
        "kind: quota, limit: 1100, period: P1D",
    ))
    .unwrap();
    let mut ext = config["server"]["extAuthz"].clone();
    let bearer = ext["bearerJwt"].as_object_mut().unwrap();
    assert!(bearer.remove("jwksFile").is_some());
    bearer.insert("jwks".into(), serde_json::from_str(&jwks()).unwrap());
    let held = ext["usage"]["constant"]
        .as_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_eq!(held, 1024);
    sidecar["server"]["extAuthz"] = ext;
    sidecar["server"]["credentials"]["meshPeers"] =
        config["server"]["credentials"]["meshPeers"].clone();
    let sidecar = sidecar.to_string();

    let mesh = MeshCa::new();
    let gateway_leaf = mesh.leaf("gateway", &gateway_id);
    let tollgate_leaf = mesh.leaf("tollgate", &tollgate_id);
    let mut inbound = None;
    let stack = Stack::start_built(&sidecar, |sidecar_port, upstream_port| {
        let proxy =
            tollgate_testkit::Envoy::start(&inbound_proxy(&mesh, &tollgate_leaf, sidecar_port))
                .unwrap();
        let proxy_port: u16 = proxy.url.rsplit(':').next().unwrap().parse().unwrap();
        let cluster = mtls_service_cluster(
            &cluster_name,
            &host,
            port,
            proxy_port,
            &mesh,
            &gateway_leaf,
            &tollgate_id,
        );
        let filters = custom_policy_filters(&policy, &provider, &cluster_name, &host);
        let config = istio_gateway_logging(
            &issuer,
            filters.clone(),
            vec![cluster],
            upstream_port,
            vec![http_als(&als, &cluster_name, &host)],
        );
        inbound = Some((proxy, proxy_port, filters));
        config
    });
    let (proxy, proxy_port, filters) = inbound.unwrap();

    // A verified caller: checked across the mTLS hop. Each grant holds the fixed amount
    // (ext_authz sees no body); the gateway's access log brings each finished call back across
    // the same hop, and its hold settles at the usage the model service reported (20 prompt
    // and 24 output tokens), or at what it held when it reported none; then the team's cap
    // (1,100 here) refuses a third.
    let alice = format!(
        "Bearer {}",
        signed_jwt(
            &json!({ "iss": issuer, "org": "acme", "sub": "alice" }),
            tollgate_testkit::JWT_KEY
        )
    );
    let dims = json!({ "userId": "alice", "teamId": "research" });
    let headers = [("authorization", alice.as_str())];
    let reporting = [
        ("authorization", alice.as_str()),
        ("x-mock-report-usage", "x-tollgate-actual-usage"),
    ];
    let r = stack
        .chat("/v1/chat/completions", &reporting, &chat_body(20, 1000))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The gateway forwards the caller's token for the check to verify (`forwardOriginalToken`,
    // the jwt_authn `forward: true` above); the grant has Envoy remove it before the model
    // service (the overlay's `removeUpstreamHeaders`).
    assert_eq!(
        of_kind(&objects, "RequestAuthentication")["spec"]["jwtRules"][0]["forwardOriginalToken"],
        true
    );
    assert!(
        r.headers.get("x-echo-authorization").is_none(),
        "the caller's token reached the model service"
    );
    stack
        .usage_settles_at("acme", dims.clone(), "research-daily", 44)
        .await;
    let r = stack
        .chat("/v1/chat/completions", &headers, &chat_body(20, 1000))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    stack
        .usage_settles_at("acme", dims.clone(), "research-daily", 44 + held)
        .await;
    stack.holds_closed().await;
    let m = stack.sidecar_metrics().await;
    for result in ["settled", "held"] {
        assert_eq!(
            m.get("tollgate_access_log_reports_total", &[("result", result)]),
            Some(1.0),
            "{result}"
        );
    }
    let denied = stack
        .chat("/v1/chat/completions", &headers, &chat_body(20, 1000))
        .await;
    assert_eq!(denied.status, 429, "{}", denied.text);
    assert_eq!(denied.json()["limitId"], "research-daily");

    // No token: the CUSTOM check runs before Istio's DENY policy, so the decision server
    // itself refuses it (401), charging nobody, whatever headers the caller adds.
    let bare = stack
        .chat(
            "/v1/chat/completions",
            &[("x-tollgate-customer", "globex"), ("x-team-id", "labs")],
            &chat_body(5, 10),
        )
        .await;
    assert_eq!(bare.status, 401, "{}", bare.text);
    assert!(bare.text.contains("bearer token"), "{}", bare.text);
    // What the ext_authz service answered (the HTTP API's dry runs above count apart).
    let checked = || async {
        stack
            .sidecar_metrics()
            .await
            .sum("tollgate_decisions_total", &[("api", "ext_authz")])
    };
    let decisions = checked().await;
    // A path the policy does not name is not checked at all.
    let other = stack
        .chat("/v1/embeddings", &headers, &chat_body(5, 10))
        .await;
    assert_ne!(other.status, 401, "{}", other.text);
    assert_eq!(checked().await, decisions);
    assert_eq!(stack.usage("acme", dims, "research-daily").await, 44 + held);

    // Another workload of the mesh, with a valid certificate of the same root but not the
    // gateway's identity, gets the provider's error status: its calls are never checked.
    let intruder = mesh.leaf("intruder", "spiffe://cluster.local/ns/ai-apps/sa/default");
    let cluster = mtls_service_cluster(
        &cluster_name,
        &host,
        port,
        proxy_port,
        &mesh,
        &intruder,
        &tollgate_id,
    );
    let elsewhere = tollgate_testkit::Envoy::start(&istio_gateway(
        &issuer,
        filters,
        vec![cluster],
        stack.mock.port().unwrap(),
    ))
    .unwrap();
    let r = stack
        .http
        .post(format!("{}/v1/chat/completions", elsewhere.url))
        .header("authorization", &alice)
        .header("content-type", "application/json")
        .body(chat_body(5, 10).to_string())
        .send()
        .await
        .unwrap();
    let expected: u16 = provider["statusOnError"].as_str().unwrap().parse().unwrap();
    assert_eq!(r.status().as_u16(), expected);
    assert_eq!(checked().await, decisions);
    drop(proxy);
}
