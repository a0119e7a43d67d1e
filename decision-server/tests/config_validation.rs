//! Config validation: every class of error, with its exact message, file and YAML path; and the
//! `tollgate validate` command's output and exit code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::process::Command;

use tollgate::config::{self, ConfigError};

const BASE: &str = r#"entityTypes:
  - name: org
  - name: team
    parents: [org]
  - name: user
    parents: [team]
  - name: model
    dimensional: true
    dimension: model
attribution:
  - dimension: userId
    entityType: user
features:
  - id: tokens
    alsoDraws:
      - { feature: credits, per: price }
  - id: credits
prices:
  - version: v1
    effectiveFrom: 2026-01-01T00:00:00Z
    models:
      - { match: "gpt-4*", inputPerMillion: 10, outputPerMillion: 30 }
customers:
  - id: acme
    entities:
      - { id: acme, type: org }
      - { id: t1, type: team, parent: acme }
      - { id: u1, type: user, parent: t1 }
    limits:
      - { id: l-rate, entityType: user, feature: tokens, kind: rate, limit: 10, window: PT1M }
      - { id: l-quota, entity: t1, feature: tokens, kind: quota, limit: 10, period: P1D }
      - { id: l-credits, entity: acme, feature: credits, kind: credits }
    grants:
      - { id: g1, entity: acme, feature: credits, amount: 100, category: paid }
"#;

fn errors(yaml: &str) -> Vec<String> {
    match config::parse(yaml, "tollgate.yaml") {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ConfigError::to_string).collect(),
    }
}

/// `BASE` with `from` replaced by `to`; the replacement must apply.
fn with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE has no `{from}`");
    BASE.replacen(from, to, 1)
}

fn assert_errors(yaml: &str, expected: &[&str]) {
    assert_eq!(errors(yaml), expected, "for config:\n{yaml}");
}

#[test]
fn the_base_config_is_valid() {
    assert_errors(BASE, &[]);
}

#[test]
fn yaml_syntax_error() {
    assert_errors(
        &with("  - name: org\n", "  - name: \"org\n"),
        &[
            "tollgate.yaml: entityTypes[0]: did not find expected key at line 22 column 19, while parsing a block mapping at line 2 column 5",
        ],
    );
}

#[test]
fn unknown_field() {
    assert_errors(
        &with("kind: quota, limit: 10", "kind: quota, limt: 10"),
        &[
            "tollgate.yaml: customers[0].limits[1].limt: unknown field `limt`, expected one of `id`, `entity`, `entityType`, `feature`, `kind`, `limit`, `window`, `period`, `anchor`, `poolBy`, `scope`, `mode` at line 31 column 66",
        ],
    );
}

#[test]
fn wrong_type() {
    assert_errors(
        &with("amount: 100", "amount: lots"),
        &[
            "tollgate.yaml: customers[0].grants[0].amount: invalid type: string \"lots\", expected u64 at line 34 column 59",
        ],
    );
}

#[test]
fn unknown_enum_value() {
    assert_errors(
        &with("kind: quota", "kind: monthly"),
        &[
            "tollgate.yaml: customers[0].limits[1].kind: unknown variant `monthly`, expected one of `rate`, `quota`, `concurrency`, `credits` at line 31 column 59",
        ],
    );
}

#[test]
fn missing_field() {
    assert_errors(
        &with(
            "{ id: l-quota, entity: t1, feature: tokens,",
            "{ id: l-quota, entity: t1,",
        ),
        &["tollgate.yaml: customers[0].limits[1]: missing field `feature` at line 31 column 9"],
    );
}

#[test]
fn bad_timestamp() {
    assert_errors(
        &with(
            "effectiveFrom: 2026-01-01T00:00:00Z",
            "effectiveFrom: new-year",
        ),
        &[
            "tollgate.yaml: prices[0].effectiveFrom: input contains invalid characters at line 20 column 20",
        ],
    );
}

#[test]
fn duplicate_ids() {
    assert_errors(
        &with("id: l-quota", "id: l-rate"),
        &[
            "tollgate.yaml: customers[0].limits[1].id: duplicate limit `l-rate` (first defined at customers[0].limits[0].id)",
        ],
    );
    assert_errors(
        &with(
            "      - { id: u1, type: user, parent: t1 }\n",
            "      - { id: u1, type: user, parent: t1 }\n      - { id: t1, type: user, parent: t1 }\n",
        ),
        &[
            "tollgate.yaml: customers[0].entities[3].id: duplicate entity `t1` (first defined at customers[0].entities[1].id)",
        ],
    );
    let two_customers = format!("{BASE}  - id: acme\n");
    assert_errors(
        &two_customers,
        &[
            "tollgate.yaml: customers[1].id: duplicate customer `acme` (first defined at customers[0].id)",
        ],
    );
}

#[test]
fn unknown_references() {
    assert_errors(
        &with("entity: t1, feature: tokens", "entity: t9, feature: tokenz"),
        &[
            "tollgate.yaml: customers[0].limits[1].entity: unknown entity `t9`",
            "tollgate.yaml: customers[0].limits[1].feature: unknown feature `tokenz`",
        ],
    );
    assert_errors(
        &with(
            "{ id: u1, type: user, parent: t1 }",
            "{ id: u1, type: user, parent: t7 }",
        ),
        &["tollgate.yaml: customers[0].entities[2].parent: unknown entity `t7`"],
    );
    assert_errors(
        &with("entityType: user\n", "entityType: member\n"),
        &["tollgate.yaml: attribution[0].entityType: unknown entity type `member`"],
    );
    assert_errors(
        &with("parents: [org]", "parents: [orgs]"),
        &[
            "tollgate.yaml: entityTypes[1].parents[0]: unknown entity type `orgs`",
            "tollgate.yaml: customers[0].entities[1].parent: entity `t1` of type `team` cannot hang under `acme` of type `org`; allowed parent types: none (it is a root type)",
            "tollgate.yaml: customers[0].entities[1].parent: entity `t1` of type `team` cannot hang under `acme` of type `org`; allowed parent types: none (it is a root type)",
        ][..2],
    );
}

#[test]
fn tree_shape() {
    assert_errors(
        &with(
            "{ id: u1, type: user, parent: t1 }",
            "{ id: u1, type: user, parent: acme }",
        ),
        &[
            "tollgate.yaml: customers[0].entities[2].parent: entity `u1` of type `user` cannot hang under `acme` of type `org`; allowed parent types: `team`",
        ],
    );
    assert_errors(
        &with(
            "{ id: u1, type: user, parent: t1 }",
            "{ id: u1, type: user }",
        ),
        &[
            "tollgate.yaml: customers[0].entities[2].parent: entity `u1` of type `user` needs a parent of type `team`",
        ],
    );
    assert_errors(
        &with(
            "      - { id: acme, type: org }\n",
            "      - { id: acme, type: org }\n      - { id: other, type: org }\n",
        ),
        &[
            "tollgate.yaml: customers[0].entities: customer `acme` has 2 root entities (`acme`, `other`); a tree has exactly one",
        ],
    );
    assert_errors(
        &with("  - name: org\n", "  - name: org\n    parents: [user]\n"),
        &[
            "tollgate.yaml: entityTypes[0].parents: entity type `org` is its own ancestor",
            "tollgate.yaml: entityTypes[1].parents: entity type `team` is its own ancestor",
            "tollgate.yaml: entityTypes[2].parents: entity type `user` is its own ancestor",
            "tollgate.yaml: customers[0].entities[0].parent: entity `acme` of type `org` needs a parent of type `user`",
        ],
    );
    assert_errors(
        &with(
            "{ id: u1, type: user, parent: t1 }",
            "{ id: u1, type: model, parent: t1 }",
        ),
        &[
            "tollgate.yaml: customers[0].entities[2].type: `model` is a dimensional type; its values scope limits and are not tree entities",
        ],
    );
}

#[test]
fn periods_and_windows() {
    assert_errors(
        &with("period: P1D", "period: P1M2D"),
        &[
            "tollgate.yaml: customers[0].limits[1].period: `P1M2D` mixes units; a period takes one unit, for example P1M or P7D",
        ],
    );
    assert_errors(
        &with("period: P1D", "period: daily"),
        &[
            "tollgate.yaml: customers[0].limits[1].period: `daily` is not an ISO-8601 duration such as PT1M, P1D, P1W or P1M",
        ],
    );
    assert_errors(
        &with("period: P1D", "period: PT15M"),
        &[
            "tollgate.yaml: customers[0].limits[1].period: `PT15M` has a unit shorter than an hour; a calendar period is counted in hours, days, weeks, months or years",
        ],
    );
    assert_errors(
        &with("window: PT1M", "window: P1M"),
        &[
            "tollgate.yaml: customers[0].limits[0].window: `P1M` uses months or years, which have no fixed length; give a fixed one, such as PT1M, PT1H or P1D",
        ],
    );
    assert_errors(
        &with("entities:", "holdTtl: P0D\n    entities:")
            .replacen("holdTtl: P0D\n    ", "", 1)
            .replacen("entityTypes:", "holdTtl: P0D\nentityTypes:", 1),
        &["tollgate.yaml: holdTtl: `P0D` is zero; it must be positive"],
    );
}

#[test]
fn kind_specific_fields() {
    assert_errors(
        &with(
            "kind: quota, limit: 10, period: P1D",
            "kind: quota, limit: 10",
        ),
        &["tollgate.yaml: customers[0].limits[1].period: a quota limit needs `period`"],
    );
    assert_errors(
        &with(
            "kind: quota, limit: 10, period: P1D",
            "kind: quota, limit: 10, period: P1D, window: PT1M",
        ),
        &["tollgate.yaml: customers[0].limits[1].window: `window` does not apply to a quota limit"],
    );
    assert_errors(
        &with("kind: credits }", "kind: credits, limit: 5 }"),
        &["tollgate.yaml: customers[0].limits[2].limit: `limit` does not apply to a credits limit"],
    );
    assert_errors(
        &with("kind: rate, limit: 10,", "kind: rate, limit: 0,"),
        &["tollgate.yaml: customers[0].limits[0].limit: must be greater than zero"],
    );
    assert_errors(
        &with("kind: rate, limit: 10,", "kind: rate, limit: 5000000000,"),
        &[
            "tollgate.yaml: customers[0].limits[0].limit: a rate limit counts at most 4294967295 units per window",
        ],
    );
    assert_errors(
        &with(
            "{ id: l-quota, entity: t1,",
            "{ id: l-quota, entity: t1, entityType: team,",
        ),
        &["tollgate.yaml: customers[0].limits[1]: give either `entity` or `entityType`, not both"],
    );
}

#[test]
fn scopes_and_pools() {
    assert_errors(
        &with(
            "kind: quota, limit: 10, period: P1D }",
            "kind: quota, limit: 10, period: P1D, scope: { region: eu } }",
        ),
        &[
            "tollgate.yaml: customers[0].limits[1].scope.region: unknown dimension `region`; known dimensions: `model`, `userId`",
        ],
    );
    assert_errors(
        &with(
            "kind: quota, limit: 10, period: P1D }",
            "kind: quota, limit: 10, period: P1D, scope: { model: \"gpt-[4\" } }",
        ),
        &[
            "tollgate.yaml: customers[0].limits[1].scope.model: `gpt-[4` is not a valid pattern: Pattern syntax error near position 4: invalid range pattern",
        ],
    );
    assert_errors(
        &with("kind: credits }", "kind: credits, poolBy: apiKey }"),
        &["tollgate.yaml: customers[0].limits[2].poolBy: unknown dimension `apiKey`"],
    );
    assert_errors(
        &with("kind: credits }", "kind: credits, poolBy: model }"),
        &[
            "tollgate.yaml: customers[0].grants[0].pool: limit `l-credits` keeps isolated pools; name the pool this grant feeds",
        ],
    );
    assert_errors(
        &with("amount: 100,", "pool: p1, amount: 100,"),
        &[
            "tollgate.yaml: customers[0].grants[0].pool: limit `l-credits` keeps one balance, not isolated pools",
        ],
    );
    assert_errors(
        &with("{ id: g1, entity: acme,", "{ id: g1, entity: t1,"),
        &[
            "tollgate.yaml: customers[0].grants[0]: no credits limit for feature `credits` on entity `t1` or its type to hold this grant",
        ],
    );
}

#[test]
fn ids_are_checked() {
    assert_errors(
        &with("  - id: acme\n", "  - id: \"ac me\"\n"),
        &[
            "tollgate.yaml: customers[0].id: `ac me` contains ' '; ids are printable ASCII without spaces, `{` or `}`",
        ],
    );
    assert_errors(
        &with("  - id: acme\n", "  - id: \"{acme}\"\n"),
        &[
            "tollgate.yaml: customers[0].id: `{acme}` contains '{'; ids are printable ASCII without spaces, `{` or `}`",
        ],
    );
}

#[test]
fn features_cannot_draw_on_themselves_or_unknowns() {
    assert_errors(
        &with(
            "{ feature: credits, per: price }",
            "{ feature: tokens, per: price }",
        ),
        &[
            "tollgate.yaml: features[0].alsoDraws[0].feature: feature `tokens` cannot draw on itself",
        ],
    );
    assert_errors(
        &with(
            "{ feature: credits, per: price }",
            "{ feature: dollars, per: price }",
        ),
        &["tollgate.yaml: features[0].alsoDraws[0].feature: unknown feature `dollars`"],
    );
}

#[test]
fn several_problems_are_all_reported() {
    let yaml = with("entity: t1, feature: tokens", "entity: t9, feature: tokens").replacen(
        "period: P1D",
        "period: P1X",
        1,
    );
    assert_eq!(errors(&yaml).len(), 2, "{:?}", errors(&yaml));
}

#[test]
fn the_shipped_examples_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    for name in [
        "ai-tokens-org.yaml",
        "agents-workspace.yaml",
        "gateway-demo.yaml",
    ] {
        let path = std::path::Path::new(dir).join(name);
        if let Err(e) = config::load_file(&path) {
            panic!("{name}:\n{e}");
        }
    }
}

#[test]
fn validate_command_prints_errors_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("tollgate-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, with("period: P1D", "period: P1M2D")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!(
            "{0}: customers[0].limits[1].period: `P1M2D` mixes units; a period takes one unit, for example P1M or P7D\n{0}: 1 problem(s) found\n",
            bad.display()
        )
    );
    let good = dir.join("good.yaml");
    std::fs::write(&good, BASE).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "{}: ok (1 customers, 3 limits, 2 features)\n",
            good.display()
        )
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(dir.join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("missing.yaml: cannot read the file: No such file or directory")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The errors of `BASE` with `server` (a YAML block), loaded whole (model and server).
fn server_errors(server: &str) -> Vec<String> {
    let text = format!("{BASE}server:\n{server}");
    match config::load(&text, "tollgate.yaml") {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ConfigError::to_string).collect(),
    }
}

const SHA: &str = "61112491d046c3f6f8ab801f170d9b2d0c734a17ceff60dee92123fb507cfc3f";

#[test]
fn credentials_name_only_declared_customers() {
    assert_eq!(
        server_errors(&format!(
            "  credentials:\n    apiKeys:\n      - {{ id: k1, customer: acme, sha256: {SHA} }}\n      - {{ id: k2, customer: globex, sha256: {SHA} }}\n    gatewayTokens:\n      - {{ id: envoy, sha256: {SHA} }}\n      - {{ id: edge, sha256: {SHA}, customers: [acme, initech] }}\n      - {{ id: k1, sha256: {SHA} }}\n      - {{ id: \"bad id\", sha256: nothex, customers: [] }}\n"
        )),
        [
            "tollgate.yaml: server.credentials.apiKeys[1].customer: unknown customer `globex`; an API key must name a customer of this file",
            "tollgate.yaml: server.credentials.gatewayTokens[1].customers[1]: unknown customer `initech`",
            "tollgate.yaml: server.credentials.gatewayTokens[2].id: duplicate key id `k1` (API keys and gateway tokens share ids)",
            "tollgate.yaml: server.credentials.gatewayTokens[3].id: `bad id` is not a token id; use letters, digits, `-` and `_`",
            "tollgate.yaml: server.credentials.gatewayTokens[3].customers: an empty list reaches no customer; leave it out for every customer",
            "tollgate.yaml: server.credentials.gatewayTokens[3].sha256: not a hex SHA-256 digest (64 hex digits): Invalid string length",
        ]
    );
}

#[test]
fn mesh_peers_are_spiffe_ids_of_declared_customers() {
    assert_eq!(
        server_errors(
            "  credentials:\n    meshPeers:\n      - { spiffeId: \"spiffe://cluster.local/ns/istio-system/sa/gw\" }\n      - { spiffeId: \"spiffe://cluster.local/ns/eu/sa/edge\", customers: [acme, initech] }\n      - { spiffeId: \"spiffe://cluster.local/ns/istio-system/sa/gw\" }\n      - { spiffeId: \"spiffe://td/ns/a;URI=spiffe://td/x\", customers: [] }\n      - { spiffeId: istio-ingressgateway }\n"
        ),
        [
            "tollgate.yaml: server.credentials.meshPeers[1].customers[1]: unknown customer `initech`",
            "tollgate.yaml: server.credentials.meshPeers[2].spiffeId: duplicate mesh peer `spiffe://cluster.local/ns/istio-system/sa/gw`",
            "tollgate.yaml: server.credentials.meshPeers[3].spiffeId: `spiffe://td/ns/a;URI=spiffe://td/x` is not a SPIFFE id such as `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account`",
            "tollgate.yaml: server.credentials.meshPeers[3].customers: an empty list reaches no customer; leave it out for every customer",
            "tollgate.yaml: server.credentials.meshPeers[4].spiffeId: `istio-ingressgateway` is not a SPIFFE id such as `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account`",
        ]
    );
}

#[test]
fn a_bearer_jwt_needs_an_issuer_and_a_usable_key_set() {
    let errors = |b: &str| server_errors(&format!("  extAuthz:\n    bearerJwt: {b}\n"));
    assert_eq!(
        errors("{ issuer: \"\", jwks: { keys: [] } }"),
        ["tollgate.yaml: server.extAuthz.bearerJwt.issuer: is empty"]
    );
    assert_eq!(
        errors("{ issuer: i }"),
        ["tollgate.yaml: server.extAuthz.bearerJwt: give one of `jwks` and `jwksFile`"]
    );
    assert_eq!(
        errors("{ issuer: i, jwks: { keys: [] } }"),
        ["tollgate.yaml: server.extAuthz.bearerJwt.jwks: the key set has no keys"]
    );
    let missing = errors("{ issuer: i, jwksFile: no-such-jwks.json }");
    assert!(
        missing[0].starts_with(
            "tollgate.yaml: server.extAuthz.bearerJwt.jwksFile: cannot read `no-such-jwks.json`"
        ),
        "{missing:?}"
    );
    assert_eq!(
        errors("{ issuer: i, jwks: { keys: [ { kty: oct, k: AAAA } ] } }"),
        Vec::<String>::new()
    );
}

#[test]
fn headers_removed_before_the_upstream_are_names_envoy_may_remove() {
    let errors =
        |list: &str| server_errors(&format!("  extAuthz:\n    removeUpstreamHeaders: {list}\n"));
    assert_eq!(
        errors("[Authorization, x-api-key, authorization]"),
        Vec::<String>::new()
    );
    assert_eq!(
        errors("[host, \":authority\", \"bad name\"]"),
        [
            "tollgate.yaml: server.extAuthz.removeUpstreamHeaders[0]: `host`: Envoy does not remove `host` or pseudo-headers",
            "tollgate.yaml: server.extAuthz.removeUpstreamHeaders[1]: `:authority`: Envoy does not remove `host` or pseudo-headers",
            "tollgate.yaml: server.extAuthz.removeUpstreamHeaders[2]: `bad name` is not a header name",
        ]
    );
    let many: Vec<String> = (0..17).map(|i| format!("x-h{i}")).collect();
    assert_eq!(
        errors(&format!("[{}]", many.join(", "))),
        ["tollgate.yaml: server.extAuthz.removeUpstreamHeaders: 17 names, at most 16"]
    );
}

#[test]
fn ext_authz_sources_and_connection_bounds() {
    assert_eq!(
        server_errors(
            "  extAuthz:\n    customer: { header: x-c, jwtClaim: org }\n    feature: { jwtMetadata: p }\n    dimensions:\n      userId: { jwtClaim: \"\" }\n  connections: { maxHttp: 0, idleTimeout: P1M, authTimeout: PT0S }\n  limits: { maxDimensions: 0, maxDimensionBytes: 10, maxGrpcMessageBytes: 100 }\n"
        ),
        [
            "tollgate.yaml: server.extAuthz.customer: give one of `header`, `constant` and `jwtClaim`",
            "tollgate.yaml: server.extAuthz.feature: give a `header`, a `constant` or a `jwtClaim`",
            "tollgate.yaml: server.extAuthz.feature.jwtMetadata: only a `jwtClaim` source reads jwt_authn's metadata",
            "tollgate.yaml: server.extAuthz.dimensions.userId.jwtClaim: is empty",
            "tollgate.yaml: server.connections.idleTimeout: `P1M` uses months or years, which have no fixed length; give a fixed one, such as PT1M, PT1H or P1D",
            "tollgate.yaml: server.connections.authTimeout: `PT0S` is not an ISO-8601 duration such as PT1M, P1D, P1W or P1M",
            "tollgate.yaml: server.connections.maxHttp: must be at least 1",
            "tollgate.yaml: server.limits.maxDimensions: must be from 1 to 1024",
            "tollgate.yaml: server.limits.maxDimensionBytes: must be from 64 to 1048576",
            "tollgate.yaml: server.limits.maxGrpcMessageBytes: must be from 4096 to 67108864",
        ]
    );
}

#[test]
fn validate_warns_when_a_client_header_names_the_customer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trusting.yaml");
    std::fs::write(
        &file,
        format!("{BASE}server:\n  extAuthz:\n    customer: {{ header: X-Tollgate-Customer }}\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "a warning is not an error");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("warning: server.extAuthz.customer: the customer comes from the client's own `x-tollgate-customer` header, so any client can charge any customer"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: server.credentials.gatewayTokens: none configured"),
        "{stderr}"
    );
    // The shipped examples take the customer from verified claims: no such warning.
    for name in ["ai-tokens-org.yaml", "gateway-demo.yaml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("validate")
            .arg(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("examples")
                    .join(name),
            )
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stderr).unwrap(), "", "{name}");
    }
}

#[test]
fn validate_warns_where_leaving_a_dimension_out_skips_a_limit() {
    // `l-rate` is on users and `l-quota` on team t1; only `userId` names either level.
    let model = config::parse(BASE, "tollgate.yaml").unwrap();
    assert_eq!(
        model.skippable_limits(),
        [
            "attribution: a request that carries none of `userId` is charged to the levels above alone, skipping acme/l-rate, acme/l-quota; set `required: true` on one of them (and on the filter's rule for it) if every request must be charged there"
        ]
    );
    let required = with(
        "    entityType: user\nfeatures:",
        "    entityType: user\n    required: true\nfeatures:",
    );
    let model = config::parse(&required, "tollgate.yaml").unwrap();
    assert!(model.skippable_limits().is_empty());
}

#[test]
fn webhooks_never_point_inside_unless_the_operator_allows_a_range() {
    let hook = |url: &str| {
        format!(
            "{BASE}    webhooks:\n      - {{ id: ops, url: \"{url}\", secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw] }}\n"
        )
    };
    for url in [
        "http://127.0.0.1:9901/quitquitquit",
        "https://10.0.0.8/hook",
        "https://192.168.1.1/hook",
        "https://172.20.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[fd00::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://0.0.0.0/hook",
        "https://metadata.google.internal/hook",
        "https://localhost/hook",
    ] {
        let e = errors(&hook(url));
        assert_eq!(e.len(), 1, "{url}: {e:?}");
        assert!(e[0].contains("customers[0].webhooks[0].url"), "{e:?}");
    }
    // A public name is accepted (it is resolved, and checked again, on every delivery).
    assert_errors(&hook("https://hooks.example.com/t"), &[]);
    // The operator's range lets the tests' loopback receivers in, plain http included.
    let allowed = format!(
        "{}alerting: {{ allowTargets: [127.0.0.0/8] }}\n",
        hook("http://127.0.0.1:9/hook")
    );
    assert_errors(&allowed, &[]);
    let long = format!("https://hooks.example.com/{}", "a".repeat(3000));
    assert!(errors(&hook(&long))[0].contains("over 2048"));
    assert_errors(
        &format!("{BASE}alerting: {{ allowTargets: [somewhere] }}\n"),
        &[
            "tollgate.yaml: alerting.allowTargets[0]: `somewhere` is not an address range like 10.0.0.0/8: invalid IP address syntax",
        ],
    );
}

/// The errors of `BASE` with a `server.storage` section, loaded whole (model and server).
fn storage_errors(storage: &str) -> Vec<String> {
    let text = format!("{BASE}server:\n  storage: {storage}\n");
    match config::load(&text, "tollgate.yaml") {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ConfigError::to_string).collect(),
    }
}

#[test]
fn redis_storage_settings() {
    assert_eq!(
        storage_errors("{ kind: redis, url: \"redis://127.0.0.1:6379/\" }"),
        Vec::<String>::new()
    );
    assert_eq!(
        storage_errors(
            "{ kind: redis, cluster: [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"], prefix: tg, timeoutMs: 50, breakerFailures: 3, breakerOpenMs: 200 }"
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        storage_errors("{ kind: redis }"),
        [
            "tollgate.yaml: server.storage.url: `kind: redis` needs `url` (one node), `urlEnv` or `cluster` (node URLs)"
        ]
    );
    let one_of = "tollgate.yaml: server.storage.url: give one of `url` (one node), `urlEnv` (one node, URL from the environment) or `cluster` (node URLs)";
    assert_eq!(
        storage_errors("{ kind: redis, url: \"redis://a/\", cluster: [\"redis://b/\"] }"),
        [one_of]
    );
    assert_eq!(
        storage_errors("{ kind: redis, url: \"redis://a/\", urlEnv: REDIS_URL }"),
        [one_of]
    );
    // The URL itself is read when the store connects, so a config names the variable only.
    assert_eq!(
        storage_errors("{ kind: redis, urlEnv: TOLLGATE_REDIS_URL }"),
        Vec::<String>::new()
    );
    assert_eq!(
        storage_errors("{ kind: redis, urlEnv: \"redis://a/\" }"),
        [
            "tollgate.yaml: server.storage.urlEnv: `redis://a/` is not an environment variable name (letters, digits, `_`)"
        ]
    );
    assert_eq!(
        storage_errors(
            "{ kind: redis, url: \"http://127.0.0.1:6379\", prefix: \"a{b}\", timeoutMs: 0, breakerFailures: 0, breakerOpenMs: 0 }"
        ),
        [
            "tollgate.yaml: server.storage.url: `http://127.0.0.1:6379` is not a redis:// or rediss:// URL",
            "tollgate.yaml: server.storage.prefix: `a{b}` must be non-empty and have no `{` or `}` (they make hash tags)",
            "tollgate.yaml: server.storage.timeoutMs: 0 is not from 1 to 60000",
            "tollgate.yaml: server.storage.breakerFailures: must be at least 1",
            "tollgate.yaml: server.storage.breakerOpenMs: 0 is not from 1 to 600000",
        ]
    );
    assert_eq!(
        storage_errors("{ kind: redis, url: \"redis://x/\", hosts: 3 }").len(),
        1,
        "an unknown field is refused"
    );
}

#[test]
fn alert_rules_and_webhooks() {
    let ok = format!(
        "{BASE}    webhooks:\n      - {{ id: ops, url: \"https://hooks.example.com/t\", secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw] }}\n    alerts:\n      - {{ id: a1, entityType: team, limit: l-quota, percent: [50, 80], webhooks: [ops] }}\n      - {{ id: a2, entity: u1, feature: tokens, absolute: [5] }}\nalerting: {{ hysteresisPercent: 20 }}\n"
    );
    assert_errors(&ok, &[]);
    let bad = format!(
        "{BASE}    webhooks:\n      - {{ id: ops, url: \"http://hooks.example.com/t\", secrets: [MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw] }}\n      - {{ id: ops2, url: \"https://h.example\", secrets: [] }}\n    alerts:\n      - {{ id: a1, entityType: squad, limit: nope, percent: [0], webhooks: [pager] }}\n      - {{ id: a2, entity: u1, feature: tokens }}\n      - {{ id: a3, entity: u1, entityType: user, limit: l-rate, absolute: [0] }}\nalerting: {{ hysteresisPercent: 101 }}\n"
    );
    assert_errors(
        &bad,
        &[
            "tollgate.yaml: customers[0].webhooks[0].url: `http://hooks.example.com/t` must be https (plain http only to an address in `alerting.allowTargets`)",
            "tollgate.yaml: customers[0].webhooks[0].secrets[0]: a webhook secret must start with `whsec_` followed by base64",
            "tollgate.yaml: customers[0].webhooks[1].secrets: at least one `whsec_` secret is needed",
            "tollgate.yaml: customers[0].alerts[0].entityType: unknown entity type `squad`",
            "tollgate.yaml: customers[0].alerts[0].limit: customer `acme` has no limit `nope`",
            "tollgate.yaml: customers[0].alerts[0].percent: 0 is not from 1 to 1000",
            "tollgate.yaml: customers[0].alerts[0].webhooks[0]: customer `acme` has no webhook `pager`",
            "tollgate.yaml: customers[0].alerts[1]: no trigger: give `percent`, `absolute`, `softLimit: true`, `exhaustionWithin` or `denials`",
            "tollgate.yaml: customers[0].alerts[2]: give one of `entity` or `entityType`",
            "tollgate.yaml: customers[0].alerts[2].absolute: a threshold of 0 would fire on nothing spent",
            "tollgate.yaml: alerting.hysteresisPercent: 101 is over 100",
        ],
    );
}

#[test]
fn lease_settings() {
    let redis = "kind: redis, url: \"redis://127.0.0.1:6379/\"";
    // Off unless enabled; the document's holds (PT5M by default) must end inside a lease.
    assert_eq!(
        storage_errors(&format!("{{ {redis}, leases: {{ enabled: false }} }}")),
        Vec::<String>::new()
    );
    assert_eq!(
        storage_errors(&format!(
            "{{ {redis}, leases: {{ enabled: true, ttl: PT10M, skew: PT3S, maxShare: 0.25, minSlice: 10 }} }}"
        )),
        Vec::<String>::new()
    );
    // Enabled alone starts: the slice's life is derived from the holds it must outlive.
    assert_eq!(
        storage_errors(&format!("{{ {redis}, leases: {{ enabled: true }} }}")),
        Vec::<String>::new()
    );
    let loaded = config::load(
        &format!("{BASE}server:\n  storage: {{ {redis}, leases: {{ enabled: true }} }}\n"),
        "tollgate.yaml",
    )
    .unwrap();
    let terms = loaded.server.leases.unwrap();
    assert_eq!(terms.ttl_ms, 300_000 + 2_000 + 1_500 + 30_000);
    // A ttl given too short for the holds is refused, naming both.
    assert_eq!(
        storage_errors(&format!(
            "{{ {redis}, leases: {{ enabled: true, ttl: PT30S }} }}"
        )),
        [
            "tollgate.yaml: server.storage.leases.ttl: a lease usable for 26500 ms (ttl, less skew, less 1500 ms to give it back) cannot hold a decision whose hold lives 300000 ms (`holdTtl`): make the lease longer or the holds shorter"
        ]
    );
    assert_eq!(
        storage_errors(&format!(
            "{{ {redis}, leases: {{ enabled: true, ttl: PT1S, skew: PT2S, maxShare: 1.5 }} }}"
        )),
        [
            "tollgate.yaml: server.storage.leases.ttl: 1000 ms must be longer than the skew margin (2000 ms)",
            "tollgate.yaml: server.storage.leases.maxShare: 1.5 is not a fraction above 0 and at most 1",
        ]
    );
    assert_eq!(
        storage_errors(&format!(
            "{{ {redis}, leases: {{ enabled: true, size: 3 }} }}"
        ))
        .len(),
        1,
        "an unknown field is refused"
    );
}

#[test]
fn a_currency_needs_an_iso_code_and_a_positive_worth_of_at_most_six_decimals() {
    assert_errors(
        &format!("{BASE}currency: {{ code: EUR, perCredit: 0.000001 }}\n"),
        &[],
    );
    let loaded = tollgate::config::load(
        &format!("{BASE}currency: {{ code: USD, perCredit: 0.01 }}\n"),
        "t.yaml",
    )
    .unwrap();
    let c = loaded.model.currency.unwrap();
    assert_eq!((c.code.as_str(), c.micros_per_credit), ("USD", 10_000));
    assert_errors(
        &format!("{BASE}currency: {{ code: usd, perCredit: 0.0000001 }}\n"),
        &[
            "tollgate.yaml: currency.code: `usd` is not an ISO 4217 code (three capital letters)",
            "tollgate.yaml: currency.perCredit: 0.0000001 is not a positive amount of at most six decimals",
        ],
    );
    assert_errors(
        &format!("{BASE}currency: {{ code: USD, perCredit: -1 }}\n"),
        &["tollgate.yaml: currency.perCredit: -1 is not a positive amount of at most six decimals"],
    );
}
