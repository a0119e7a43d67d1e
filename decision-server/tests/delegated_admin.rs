//! Delegated administration: customer keys with roles, the operator's ceilings and the guard
//! that holds a customer admin's limit changes under them, alert rules and webhooks a customer
//! manages itself (secrets shown once), and the audit log of every change. The guard and the
//! log run on every store; the HTTP rules through the router.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use serde_json::json;

use tollgate::auth::{Principal, Role};
use tollgate::catalog::{AdminError, AdminOp};
use tollgate::config::dto::LimitDto;
use tollgate::service::Service;
use tollgate::store::CounterStore;

use common::service::{
    ACME_ADMIN, ACME_KEY, ACME_VIEWER, Calls, GLOBEX_ADMIN, GLOBEX_KEY, OPERATOR, call, config_with,
};

/// acme bought 200,000 `ai-tokens` a day per limit; it has no ceiling for a per-minute rate.
const CEILINGS: &str =
    "    ceilings:\n      - { feature: ai-tokens, kind: quota, period: P1D, max: 200000 }\n";

/// The fixture with acme's ceilings, a per-minute user rate no ceiling covers, on `storage`.
fn config(storage: &str) -> String {
    let text = config_with(&format!("  logging: {{ level: warn }}\n  storage: {storage}"))
        // acme's limits end its entry: the rate joins them, the ceilings follow.
        .replacen(
            "  - id: globex\n",
            &format!("      - {{ id: user-minute, entityType: user, feature: ai-tokens, kind: rate, limit: 5000, window: PT1M }}\n{CEILINGS}  - id: globex\n"),
            1,
        );
    assert!(text.contains("ceilings:"), "the fixture changed");
    text
}

async fn service_on(store: Arc<dyn CounterStore>) -> Arc<Service> {
    let loaded = tollgate::config::load(&config("{ kind: memory }"), "fixture.yaml").unwrap();
    let engine = tollgate::Engine::new(loaded.model, store, Arc::new(tollgate::clock::SystemClock))
        .await
        .unwrap();
    let service = Arc::new(Service::new(engine, loaded.doc, &loaded.server));
    service.restore_admin_changes().await.unwrap();
    service
}

fn limit(service: &Service, id: &str) -> LimitDto {
    service.read_config(|d| {
        d.customers
            .iter()
            .find(|c| c.id == "acme")
            .unwrap()
            .limits
            .iter()
            .find(|l| l.id == id)
            .unwrap()
            .clone()
    })
}

fn with_value(mut l: LimitDto, value: u64) -> AdminOp {
    l.limit = Some(value);
    AdminOp::PutLimit {
        customer: "acme".into(),
        limit: l,
        create: false,
    }
}

fn refused(r: Result<(), AdminError>) -> String {
    match r {
        Err(AdminError::Refused(why)) => why,
        Err(AdminError::Invalid(e)) => e.to_string(),
        other => panic!("not refused: {other:?}"),
    }
}

fn ceilings_hold_customer_admins_and_every_change_is_logged(
    store: &dyn Fn() -> Arc<dyn CounterStore>,
) {
    // Made outside the test's runtime: the Redis stores connect on a shared one of their own.
    let store = store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let service = service_on(Arc::clone(&store)).await;
        let admin = Principal::Customer("acme".into(), Role::Admin);

        // Lowering a team's budget applies to the next decision.
        let team = limit(&service, "team-daily");
        service
            .admin_as(&admin, with_value(team.clone(), 300))
            .await
            .unwrap();
        let check = |usage: u64| {
            let service = Arc::clone(&service);
            async move {
                let dims = [("userId".to_string(), "alice".to_string())].into();
                let req = tollgate::CheckRequest {
                    deadline: None,
                    customer: "acme",
                    feature: "ai-tokens",
                    usage: tollgate::core::usage::Usage::units(usage),
                    dimensions: &dims,
                    dry_run: true,
                    commit: false,
                };
                service
                    .check(tollgate::metrics::Api::Http, &req)
                    .await
                    .unwrap()
            }
        };
        let d = check(400).await;
        assert!(d.denial.is_some(), "the lowered team cap refuses 400");
        assert_eq!(d.denial.unwrap().limit_id.as_str(), "team-daily");
        assert!(check(250).await.denial.is_none());

        // Raising within the ceiling is allowed; above it is refused with the reason.
        service
            .admin_as(&admin, with_value(team.clone(), 150_000))
            .await
            .unwrap();
        let why = refused(
            service
                .admin_as(&admin, with_value(team.clone(), 250_000))
                .await,
        );
        assert!(
            why.contains("above the customer's ceiling of 200000 for ai-tokens quota P1D"),
            "{why}"
        );
        // The same holds for the operator: the ceiling is what the customer bought.
        let why = refused(service.admin(with_value(team.clone(), 250_000)).await);
        assert!(why.contains("ceiling of 200000"), "{why}");

        // A limit no ceiling covers can be lowered, never raised.
        let minute = limit(&service, "user-minute");
        service
            .admin_as(&admin, with_value(minute.clone(), 4000))
            .await
            .unwrap();
        let why = refused(
            service
                .admin_as(&admin, with_value(minute.clone(), 4500))
                .await,
        );
        assert!(
            why.contains("no ceiling covers ai-tokens rate PT1M"),
            "{why}"
        );
        // Nor turned into a soft limit, which lets usage past it.
        let mut soft = limit(&service, "team-daily");
        soft.mode = tollgate::config::dto::ModeDto::Soft;
        let why = refused(
            service
                .admin_as(
                    &admin,
                    AdminOp::PutLimit {
                        customer: "acme".into(),
                        limit: soft,
                        create: false,
                    },
                )
                .await,
        );
        assert!(why.contains("enforced limits only"), "{why}");
        // New limits need a ceiling.
        let mut new = limit(&service, "team-daily");
        new.id = "ml-daily".into();
        new.entity = Some("ml".into());
        new.entity_type = None;
        new.limit = Some(100);
        service
            .admin_as(
                &admin,
                AdminOp::PutLimit {
                    customer: "acme".into(),
                    limit: new,
                    create: true,
                },
            )
            .await
            .unwrap();
        // The top entity's limit stands for what was bought: lowered, never deleted.
        let why = refused(
            service
                .admin_as(
                    &admin,
                    AdminOp::DeleteLimit {
                        customer: "acme".into(),
                        id: "org-daily".into(),
                    },
                )
                .await,
        );
        assert!(why.contains("top entity"), "{why}");
        service
            .admin_as(
                &admin,
                AdminOp::DeleteLimit {
                    customer: "acme".into(),
                    id: "ml-daily".into(),
                },
            )
            .await
            .unwrap();
        // Ceilings, entities and grants are the operator's; other customers are out of reach;
        // viewer and app keys change nothing.
        let customer = service.read_config(|d| d.customers[0].clone());
        let why = refused(
            service
                .admin_as(
                    &admin,
                    AdminOp::PutCustomer {
                        customer,
                        create: false,
                    },
                )
                .await,
        );
        assert!(why.contains("only the operator"), "{why}");
        let globex = Principal::Customer("globex".into(), Role::Admin);
        let why = refused(
            service
                .admin_as(&globex, with_value(team.clone(), 10))
                .await,
        );
        assert!(why.contains("changes only that customer"), "{why}");
        for role in [Role::Viewer, Role::App] {
            let p = Principal::Customer("acme".into(), role);
            refused(service.admin_as(&p, with_value(team.clone(), 10)).await);
        }
        assert_eq!(limit(&service, "team-daily").limit, Some(150_000));

        // The audit log: who, what, before and after, oldest first.
        let log = service.audit(Some("acme"));
        let summary: Vec<(String, String, &str)> = log
            .iter()
            .map(|l| (l.by.clone(), l.op.target().1.to_string(), l.op.action()))
            .collect();
        assert_eq!(
            summary,
            [
                ("acme:admin".to_string(), "team-daily".to_string(), "update"),
                ("acme:admin".to_string(), "team-daily".to_string(), "update"),
                (
                    "acme:admin".to_string(),
                    "user-minute".to_string(),
                    "update"
                ),
                ("acme:admin".to_string(), "ml-daily".to_string(), "create"),
                ("acme:admin".to_string(), "ml-daily".to_string(), "delete"),
            ]
        );
        assert_eq!(log[0].before.as_ref().unwrap()["limit"], 100_000);
        assert_eq!(log[0].after.as_ref().unwrap()["limit"], 300);
        assert!(log[0].at > 0);
        assert!(log[4].after.is_none());

        // Another replica (or a restart) on the same store has the same model and log, where
        // the store keeps admin changes (all but the plain in-memory one).
        let keeps = !store.admin_log().load().await.unwrap().entries.is_empty();
        let again = service_on(store).await;
        if keeps {
            assert_eq!(limit(&again, "team-daily").limit, Some(150_000));
            assert_eq!(again.audit(Some("acme")), log);
        } else {
            assert!(again.audit(Some("acme")).is_empty());
        }
    });
}

test_with_all_store_factories!(ceilings_hold_customer_admins_and_every_change_is_logged);

/// What the limit does after the change is what the ceiling holds: the org's limit (which holds
/// acme's 200,000-a-day ceiling) cannot be moved to another entity, spread over every user,
/// scoped to a model no request names, pooled or turned into a rate, though each such limit
/// would be under the ceiling on its own; and with the org's limit gone from the top, nothing
/// can be raised under the ceiling.
#[tokio::test]
async fn a_ceiling_stays_held_whatever_its_limit_is_changed_into() {
    let service = service_on(common::memory()).await;
    let admin = Principal::Customer("acme".into(), Role::Admin);
    let org = limit(&service, "org-daily");
    let put = |l: LimitDto| AdminOp::PutLimit {
        customer: "acme".into(),
        limit: l,
        create: false,
    };
    let mut moved = org.clone();
    moved.entity = Some("alice".into());
    let mut per_user = org.clone();
    per_user.entity = None;
    per_user.entity_type = Some("user".into());
    let mut scoped = org.clone();
    scoped.scope = [("model".to_string(), "no-such-model".to_string())].into();
    let mut pooled = org.clone();
    pooled.pool_by = Some("userId".into());
    let mut rate = org.clone();
    rate.kind = tollgate::config::dto::KindDto::Rate;
    rate.period = None;
    rate.anchor = None;
    rate.window = Some("PT1M".into());
    for (what, l) in [
        ("moved", moved),
        ("per user", per_user),
        ("scoped", scoped),
        ("pooled", pooled),
        ("a rate", rate),
    ] {
        let why = refused(service.admin_as(&admin, put(l)).await);
        assert!(
            why.contains("holds the customer's ceiling for ai-tokens quota P1D"),
            "{what}: {why}"
        );
    }
    assert_eq!(limit(&service, "org-daily"), org, "unchanged");
    // Raising it within the ceiling, in place, is still allowed.
    service
        .admin_as(&admin, with_value(org.clone(), 150_000))
        .await
        .unwrap();

    // Without a holder (the operator took the org's limit off), a customer admin raises
    // nothing under the ceiling: a team limit of 200,000 each would add up past it.
    service
        .admin(AdminOp::DeleteLimit {
            customer: "acme".into(),
            id: "org-daily".into(),
        })
        .await
        .unwrap();
    let team = limit(&service, "team-daily");
    let why = refused(
        service
            .admin_as(&admin, with_value(team.clone(), 150_000))
            .await,
    );
    assert!(
        why.contains("no enforced limit on `acme` holds the ceiling"),
        "{why}"
    );
    // Lowering is still fine.
    service
        .admin_as(&admin, with_value(team, 100))
        .await
        .unwrap();
}

/// The router over a service on the ceilings fixture, in memory.
async fn router() -> (Arc<Service>, axum::Router) {
    let loaded = tollgate::config::load(&config("{ kind: memory }"), "fixture.yaml").unwrap();
    let service = tollgate::server::build_service(loaded).await.unwrap();
    let router = tollgate::http::router(Arc::clone(&service), 65536);
    (service, router)
}

#[tokio::test]
async fn roles_decide_what_each_key_may_do_over_http() {
    let (_service, r) = router().await;
    let check =
        json!({"featureId": "ai-tokens", "requestedUsage": 1, "dimensions": {"userId": "alice"}});
    let team = json!({"id": "team-daily", "entityType": "team", "feature": "ai-tokens", "kind": "quota", "limit": 500, "period": "P1D"});
    // A viewer reads but neither decides nor changes.
    let (s, _) = r.get("/v1/customers/acme/limits", ACME_VIEWER).await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = r
        .post(
            "/v1/customers/acme/entitlements/check",
            ACME_VIEWER,
            check.clone(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("read-only"),
        "{b}"
    );
    for key in [ACME_VIEWER, ACME_KEY] {
        let (s, b) = r
            .put("/v1/customers/acme/limits/team-daily", key, team.clone())
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    }
    // The admin lowers a team limit; above the ceiling the answer says why.
    let (s, b) = r
        .put(
            "/v1/customers/acme/limits/team-daily",
            ACME_ADMIN,
            team.clone(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut over = team.clone();
    over["limit"] = json!(900_000);
    let (s, b) = r
        .put("/v1/customers/acme/limits/team-daily", ACME_ADMIN, over)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert_eq!(b["error"]["code"], "refused");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("above the customer's ceiling of 200000 for ai-tokens quota P1D"),
        "{b}"
    );
    // Another customer's admin gets 403 on acme, reads and writes alike.
    for (m, path) in [
        (Method::GET, "/v1/customers/acme/limits"),
        (Method::GET, "/v1/customers/acme/audit"),
        (Method::PUT, "/v1/customers/acme/limits/team-daily"),
        (Method::POST, "/v1/customers/acme/webhooks"),
    ] {
        let (s, _) = call(&r, m, path, GLOBEX_ADMIN, Some(team.clone())).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
    }
    let (s, _) = r
        .post("/v1/customers/acme/entitlements/check", GLOBEX_KEY, check)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The audit log shows the change, who made it, before and after.
    let (s, log) = r.get("/v1/customers/acme/audit", ACME_VIEWER).await;
    assert_eq!(s, StatusCode::OK);
    let e = &log["entries"][0];
    assert_eq!(
        e["by"], "acme:admin (key acme-admin)",
        "the key that made it"
    );
    assert_eq!(
        (e["kind"].as_str(), e["id"].as_str(), e["action"].as_str()),
        (Some("limit"), Some("team-daily"), Some("update"))
    );
    assert_eq!(e["before"]["limit"], 100_000);
    assert_eq!(e["after"]["limit"], 500);
    let (s, _) = r.get("/v1/audit", ACME_ADMIN).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "the whole log is the operator's");
    let (s, all) = r.get("/v1/audit", OPERATOR).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(all["entries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn webhook_secrets_are_shown_once_and_rotate_with_overlap() {
    let (_service, r) = router().await;
    let (s, made) = r
        .post(
            "/v1/customers/acme/webhooks",
            ACME_ADMIN,
            json!({"id": "ops", "url": "https://hooks.example.com/hook"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let first = made["secret"].as_str().unwrap().to_string();
    assert!(first.starts_with("whsec_"));
    // Never read back: not in the list, not in the customer, not in the audit log.
    let (_, list) = r.get("/v1/customers/acme/webhooks", ACME_ADMIN).await;
    assert_eq!(
        list,
        json!([{"id": "ops", "url": "https://hooks.example.com/hook", "secrets": 1}])
    );
    for path in ["/v1/customers/acme", "/v1/customers/acme/audit"] {
        let (_, body) = r.get(path, ACME_ADMIN).await;
        assert!(
            !body.to_string().contains(&first),
            "{path} shows the secret"
        );
    }
    // Rotation: a new secret, the previous one still signing until dropped.
    let (s, rotated) = call(
        &r,
        Method::POST,
        "/v1/customers/acme/webhooks/ops/secrets",
        ACME_ADMIN,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_ne!(rotated["secret"], first.as_str());
    let (_, list) = r.get("/v1/customers/acme/webhooks", ACME_ADMIN).await;
    assert_eq!(list[0]["secrets"], 2);
    let (s, _) = r
        .delete(
            "/v1/customers/acme/webhooks/ops/secrets/previous",
            ACME_ADMIN,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, list) = r.get("/v1/customers/acme/webhooks", ACME_ADMIN).await;
    assert_eq!(list[0]["secrets"], 1);
    // An alert rule on the webhook; a viewer cannot add one.
    let rule = json!({"id": "team-80", "entityType": "team", "feature": "ai-tokens", "percent": [80], "webhooks": ["ops"]});
    let (s, _) = r
        .post("/v1/customers/acme/alerts", ACME_VIEWER, rule.clone())
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = r.post("/v1/customers/acme/alerts", ACME_ADMIN, rule).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (_, rules) = r.get("/v1/customers/acme/alerts", ACME_VIEWER).await;
    assert_eq!(rules[0]["id"], "team-80");
    // A webhook the rule uses cannot go (the model would be invalid); after the rule, it can.
    let (s, _) = r
        .delete("/v1/customers/acme/webhooks/ops", ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = r
        .delete("/v1/customers/acme/alerts/team-80", ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = r
        .delete("/v1/customers/acme/webhooks/ops", ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn customer_admins_make_and_revoke_their_own_keys() {
    let (service, r) = router().await;
    // Only a manager makes keys, and only for its own customer.
    for key in [ACME_VIEWER, ACME_KEY, GLOBEX_ADMIN] {
        let (s, _) = r
            .post("/v1/customers/acme/keys", key, json!({"role": "viewer"}))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{key}");
    }
    let (s, made) = r
        .post(
            "/v1/customers/acme/keys",
            ACME_ADMIN,
            json!({"role": "viewer", "label": "finance dashboard"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let viewer = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert!(viewer.starts_with(&format!("{id}.")));
    // It works at once, with its role: reads, never decides.
    let (s, _) = r.get("/v1/customers/acme/limits", &viewer).await;
    assert_eq!(s, StatusCode::OK);
    let check =
        json!({"featureId": "ai-tokens", "requestedUsage": 1, "dimensions": {"userId": "alice"}});
    let (s, _) = r
        .post(
            "/v1/customers/acme/entitlements/check",
            &viewer,
            check.clone(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = r.get("/v1/customers/globex/limits", &viewer).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, app) = r
        .post(
            "/v1/customers/acme/keys",
            ACME_ADMIN,
            json!({"role": "app"}),
        )
        .await;
    let app = app["key"].as_str().unwrap().to_string();
    let (s, b) = r
        .post("/v1/customers/acme/entitlements/check", &app, check)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A guessed secret for a real id is not the key.
    let (s, _) = r
        .get("/v1/customers/acme/limits", &format!("{id}.guess"))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Listed without the key or its digest; in the audit log as made by acme's admin.
    let (_, list) = r.get("/v1/customers/acme/keys", ACME_VIEWER).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains(&viewer) && !list.to_string().contains("sha256"));
    let log = service.audit(Some("acme"));
    assert_eq!(log[0].by, "acme:admin (key acme-admin)");
    assert_eq!(log[0].op.target(), ("key", id.as_str()));
    // A portal session signed in with it ends when it is revoked.
    let (session, _) = service
        .sessions()
        .create(&service.token_check(), &viewer, service.now().millis())
        .unwrap();
    let (s, _) = r
        .delete(&format!("/v1/customers/acme/keys/{id}"), ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = r.get("/v1/customers/acme/limits", &viewer).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        service
            .sessions()
            .get(&service.token_check(), &session, service.now().millis())
            .is_err()
    );
}

/// Admin changes win over the config file until dropped: they are listed with the file's
/// version, a reload that edits what they hold says so, and dropping them brings the file's
/// version back. A customer's admin drops only its own customer's changes; this is also its
/// way back from lowering a limit no ceiling covers.
#[tokio::test]
async fn changes_over_the_file_are_listed_named_on_reload_and_dropped_to_restore_it() {
    let (service, r) = router().await;
    let minute = |limit: u64| json!({"id": "user-minute", "entityType": "user", "feature": "ai-tokens", "kind": "rate", "limit": limit, "window": "PT1M"});
    // No ceiling covers the per-minute rate: the admin may lower it, not raise it back.
    let (s, b) = r
        .put(
            "/v1/customers/acme/limits/user-minute",
            ACME_ADMIN,
            minute(100),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = r
        .put(
            "/v1/customers/acme/limits/user-minute",
            ACME_ADMIN,
            minute(5000),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");

    // Listed, with the file's version and the one in force; viewers read it too.
    let (s, o) = r.get("/v1/customers/acme/overrides", ACME_VIEWER).await;
    assert_eq!(s, StatusCode::OK, "{o}");
    let o = o.as_array().unwrap();
    assert_eq!(o.len(), 1, "{o:?}");
    assert_eq!(
        (o[0]["kind"].as_str(), o[0]["id"].as_str()),
        (Some("limit"), Some("user-minute"))
    );
    assert_eq!(o[0]["file"]["limit"], 5000);
    assert_eq!(o[0]["inForce"]["limit"], 100);
    assert_eq!(o[0]["changes"], 1);
    assert!(
        o[0]["lastChangedBy"]
            .as_str()
            .unwrap()
            .starts_with("acme:admin"),
        "{o:?}"
    );
    let (s, _) = r.get("/v1/customers/globex/overrides", ACME_ADMIN).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The operator edits the file: the admin change still wins, and the reload says so.
    let edited = config("{ kind: memory }").replace(
        "kind: rate, limit: 5000, window: PT1M",
        "kind: rate, limit: 6000, window: PT1M",
    );
    assert_ne!(edited, config("{ kind: memory }"));
    let reloaded = service
        .reload(tollgate::config::load(&edited, "fixture.yaml").unwrap())
        .await
        .unwrap();
    assert_eq!(reloaded.kept.len(), 1);
    let shadowed: Vec<String> = reloaded.shadowed.iter().map(ToString::to_string).collect();
    assert_eq!(shadowed.len(), 1, "{shadowed:?}");
    assert!(
        shadowed[0].starts_with("limit `user-minute` of `acme` changed by admin changes")
            && shadowed[0].contains("DELETE /v1/customers/acme/overrides/limit/user-minute"),
        "{shadowed:?}"
    );
    assert_eq!(limit(&service, "user-minute").limit, Some(100));

    // A viewer cannot drop it; the admin can, and the file's edited version applies.
    let (s, _) = r
        .delete(
            "/v1/customers/acme/overrides/limit/user-minute",
            ACME_VIEWER,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = r
        .delete("/v1/customers/acme/overrides/limit/user-minute", ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    assert_eq!(limit(&service, "user-minute").limit, Some(6000));
    let (_, o) = r.get("/v1/customers/acme/overrides", ACME_ADMIN).await;
    assert_eq!(o, json!([]));
    let (s, b) = r
        .delete("/v1/customers/acme/overrides/limit/user-minute", ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing left to drop: {b}");

    // The operator's change stands against the customer's admin; the operator drops it.
    let (s, b) = r
        .put(
            "/v1/customers/acme/limits/user-minute",
            OPERATOR,
            minute(10),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = r
        .delete("/v1/customers/acme/overrides/limit/user-minute", ACME_ADMIN)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("changed by operator"),
        "{b}"
    );
    let (s, _) = r
        .delete("/v1/customers/acme/overrides/limit/user-minute", OPERATOR)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(limit(&service, "user-minute").limit, Some(6000));
    // Keys are revoked, not restored.
    let (s, _) = r
        .delete("/v1/customers/acme/overrides/key/k1", OPERATOR)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
