//! The real-provider recipe (`envoy/openai-provider.yaml`, `envoy/anthropic-provider.yaml`) in
//! real Envoy against a loopback TLS stand-in for the provider: the provider is reached by its
//! own name (SNI, `Host`, a certificate checked against a CA), gets its own key from Envoy's
//! environment, and never the caller's JWT or a Tollgate credential; usage settles exactly,
//! driven also by the official SDKs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{INITECH, SIDECAR, Stack, caller, chat_body, initech_ops, run_sdk, true_usage};
use tollgate_testkit::{Envoy, GATEWAY_TOKEN, MockLlm, ProviderTarget, Sidecar, provider_config};

const OPENAI_KEY: &str = "sk-provider-openai-0123456789";
const ANTHROPIC_KEY: &str = "sk-ant-provider-0123456789";

/// A CA and a server certificate for the providers' names, in files.
struct ProviderTls {
    dir: tempfile::TempDir,
}

impl ProviderTls {
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::OrganizationName, "provider test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["api.openai.com".into(), "api.anthropic.com".into()])
                .unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Self { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// The sidecar, the TLS provider stand-in requiring `key`, and Envoy on `file` naming the
/// provider `host` and holding `env`.
fn start(tls: &ProviderTls, file: &str, host: &str, key: &str, env: (&str, &str)) -> Stack {
    let sidecar = Sidecar::start(&SIDECAR).unwrap();
    let (cert, private) = (tls.file("cert.pem"), tls.file("key.pem"));
    let mock = MockLlm::start_with(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &private,
        "--require-key",
        key,
    ])
    .unwrap();
    let target = ProviderTarget {
        host: host.into(),
        address: "127.0.0.1".into(),
        port: mock.port().unwrap(),
        ca: tls.file("ca.pem"),
    };
    let config = provider_config(file, sidecar.ext_authz_port().unwrap(), &target).unwrap();
    let envoy = Envoy::start_env(&config, &[env]).unwrap();
    Stack::from_parts(sidecar, mock, envoy)
}

/// What reached the provider: its request headers and the SNI, from the stand-in's echo.
fn seen(r: &support::Reply) -> Value {
    let text = r
        .header("x-echo-request")
        .unwrap_or_else(|| panic!("the provider was not reached: {} {}", r.status, r.text));
    serde_json::from_str(text).unwrap()
}

/// No header that reached the provider holds `secret`, or is Tollgate's or Envoy's own.
fn assert_clean(seen: &Value, secrets: &[&str]) {
    for (name, value) in seen["headers"].as_object().unwrap() {
        let value = value.as_str().unwrap();
        for s in secrets {
            assert!(
                !value.contains(s),
                "the provider saw a caller's credential in `{name}`: {seen}"
            );
        }
        assert!(
            !name.starts_with("x-tollgate") && !name.starts_with("x-envoy"),
            "the provider saw `{name}`: {seen}"
        );
    }
}

/// Runs each SDK scenario as initech's `ops` team: the counter ends at the sum of the usage
/// each call reported (OpenAI's `total_tokens`, or Anthropic's input and output).
async fn sdk_calls_settle_exactly(s: &Stack, scenarios: &[(&'static str, &[&str])]) {
    let before = initech_ops(s).await;
    let mut reported = 0;
    for (scenario, extra) in scenarios {
        let out = run_sdk(s, &INITECH, scenario, extra, Duration::from_secs(60)).await;
        let u = &out["usage"];
        reported += u["total_tokens"].as_u64().unwrap_or_else(|| {
            u["input_tokens"]
                .as_u64()
                .unwrap_or_else(|| panic!("{scenario}: {out}"))
                + u["output_tokens"].as_u64().unwrap()
        });
    }
    s.usage_settles_at(
        "initech",
        json!({"teamId": "ops"}),
        "initech-daily",
        before + reported,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_provider_gets_its_own_key_over_tls_and_never_the_callers_credentials() {
    let tls = ProviderTls::new();
    let s = start(
        &tls,
        "openai-provider.yaml",
        "api.openai.com",
        OPENAI_KEY,
        ("OPENAI_API_KEY", OPENAI_KEY),
    );
    let carol = caller("acme", Some("carol"));
    let jwt = carol.trim_start_matches("Bearer ");
    // The caller also sends a second key header and Tollgate-looking headers: none goes on.
    let h = [
        ("authorization", carol.as_str()),
        ("x-api-key", GATEWAY_TOKEN),
        ("x-tollgate-hold-id", "forged"),
    ];
    let r = s.chat("/v1/chat/completions", &h, &chat_body(3, 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let seen = seen(&r);
    assert_eq!(
        seen["headers"]["authorization"],
        format!("Bearer {OPENAI_KEY}")
    );
    assert_eq!(seen["headers"]["host"], "api.openai.com");
    assert_eq!(seen["sni"], "api.openai.com");
    assert_clean(&seen, &[jwt, GATEWAY_TOKEN]);
    s.usage_settles_at(
        "acme",
        json!({"userId": "carol"}),
        "user-daily",
        true_usage(3, 5),
    )
    .await;
    // Without a valid JWT nothing reaches the provider, and nothing is counted.
    let r = s
        .chat(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {OPENAI_KEY}"))],
            &chat_body(3, 5),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert!(r.header("x-echo-request").is_none(), "{:?}", r.headers);
    // The official SDK, streamed and not: the counter ends at what the provider reported.
    sdk_calls_settle_exactly(
        &s,
        &[
            ("chat-json", &[]),
            ("chat-stream", &[]),
            ("responses-stream", &[]),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_provider_gets_its_own_key_from_either_sdk_credential() {
    let tls = ProviderTls::new();
    let s = start(
        &tls,
        "anthropic-provider.yaml",
        "api.anthropic.com",
        ANTHROPIC_KEY,
        ("ANTHROPIC_API_KEY", ANTHROPIC_KEY),
    );
    let carol = caller("acme", Some("carol"));
    let jwt = carol.trim_start_matches("Bearer ");
    let body = json!({"model": "claude-sonnet-4", "max_tokens": 5,
        "messages": [{"role": "user", "content": "one two three"}]});
    // The JWT as the SDK's `api_key` (x-api-key), and as its `auth_token` (authorization).
    for h in [
        [
            ("x-api-key", jwt),
            ("authorization", "Basic c29tZW9uZTplbHNl"),
        ],
        [
            ("authorization", carol.as_str()),
            ("anthropic-version", "2023-06-01"),
        ],
    ] {
        let r = s.chat("/v1/messages", &h, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let seen = seen(&r);
        assert_eq!(seen["headers"]["x-api-key"], ANTHROPIC_KEY);
        assert!(seen["headers"].get("authorization").is_none(), "{seen}");
        assert_eq!(seen["headers"]["host"], "api.anthropic.com");
        assert_eq!(seen["sni"], "api.anthropic.com");
        assert_clean(&seen, &[jwt, GATEWAY_TOKEN, "c29tZW9uZTplbHNl"]);
    }
    // Two calls of 3 prompt and 5 output tokens.
    s.usage_settles_at("acme", json!({"userId": "carol"}), "user-daily", 16)
        .await;
    sdk_calls_settle_exactly(
        &s,
        &[
            ("messages-json", &["--anthropic-api-key"]),
            ("messages-stream", &[]),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_whose_certificate_does_not_name_it_gets_nothing() {
    let tls = ProviderTls::new();
    // The certificate names api.openai.com, the config expects another name: Envoy refuses
    // the handshake, the key is never sent, and the caller gets a 503.
    let s = start(
        &tls,
        "openai-provider.yaml",
        "api.example.com",
        OPENAI_KEY,
        ("OPENAI_API_KEY", OPENAI_KEY),
    );
    let r = s
        .chat(
            "/v1/chat/completions",
            &[("authorization", &caller("acme", Some("carol")))],
            &chat_body(3, 5),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.header("x-echo-request").is_none(), "{:?}", r.headers);
    let handshakes = s
        .envoy
        .stat("cluster.provider.ssl.fail_verify_san")
        .unwrap();
    assert!(handshakes >= 1, "no refused handshake counted");
}
