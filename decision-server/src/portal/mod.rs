//! The self-service portal at `/portal/`: server-rendered pages (minijinja templates, htmx
//! for partial updates, uPlot for charts, all embedded in the binary) over the same service
//! calls and permission checks as the HTTP API, whose endpoints its pages call with the
//! session cookie and the session's CSRF token.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use axum::extract::{Form, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::{Environment, Value, context};
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::auth::Principal;
use crate::session;
use crate::usage::{Budget, EntityPage};

/// Entities per page of the tree.
const PAGE: usize = 25;
/// Most entities one refresh of the bars asks about.
const MAX_REFRESH: usize = 200;

/// The templates, compiled into the binary.
const TEMPLATES: [(&str, &str); 12] = [
    (
        "base.html",
        include_str!("../../portal/templates/base.html"),
    ),
    (
        "login.html",
        include_str!("../../portal/templates/login.html"),
    ),
    (
        "error.html",
        include_str!("../../portal/templates/error.html"),
    ),
    (
        "customers.html",
        include_str!("../../portal/templates/customers.html"),
    ),
    (
        "overview.html",
        include_str!("../../portal/templates/overview.html"),
    ),
    (
        "tree.html",
        include_str!("../../portal/templates/tree.html"),
    ),
    (
        "usage.html",
        include_str!("../../portal/templates/usage.html"),
    ),
    (
        "alerts.html",
        include_str!("../../portal/templates/alerts.html"),
    ),
    (
        "limits.html",
        include_str!("../../portal/templates/limits.html"),
    ),
    (
        "live.html",
        include_str!("../../portal/templates/live.html"),
    ),
    (
        "audit.html",
        include_str!("../../portal/templates/audit.html"),
    ),
    (
        "keys.html",
        include_str!("../../portal/templates/keys.html"),
    ),
];

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, text) in TEMPLATES {
        // A template that does not compile is a build defect: every page is rendered by the
        // tests, and rendering a missing template answers 500 naming it.
        if let Err(e) = env.add_template(name, text) {
            tracing::error!(template = name, error = %e, "a portal template does not compile");
        }
    }
    env
});

/// The browser assets: the npm libraries (copied by build.rs) and the portal's own files.
const ASSETS: [(&str, &str, &[u8]); 5] = [
    (
        "htmx.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!(concat!(env!("OUT_DIR"), "/portal/htmx.min.js")),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!(concat!(env!("OUT_DIR"), "/portal/uPlot.iife.min.js")),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!(concat!(env!("OUT_DIR"), "/portal/uPlot.min.css")),
    ),
    (
        "portal.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../portal/static/portal.js"),
    ),
    (
        "portal.css",
        "text/css; charset=utf-8",
        include_bytes!("../../portal/static/portal.css"),
    ),
];

/// Headers every portal page carries: scripts and styles from the portal only (inline
/// styles for the bars' widths), no framing, no sniffing, no referrer off-site.
fn hardened(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn render(status: StatusCode, name: &str, ctx: Value) -> Response {
    let page = ENV
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| {
            let mut m = format!("the portal page `{name}` cannot be rendered: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                m.push_str(&format!(": {s}"));
                source = s.source();
            }
            m
        });
    match page {
        Ok(html) => hardened((status, axum::response::Html(html)).into_response()),
        Err(m) => {
            tracing::error!("{m}");
            hardened((StatusCode::INTERNAL_SERVER_ERROR, m).into_response())
        }
    }
}

/// The portal's routes.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/portal", get(landing))
        .route("/portal/", get(landing))
        .route("/portal/login", get(login_page).post(login))
        .route("/portal/logout", post(logout))
        .route("/portal/assets/{name}", get(asset))
        .route("/portal/customers", get(customers))
        .route("/portal/c/{customer}/", get(overview))
        .route("/portal/c/{customer}/tree", get(tree))
        .route("/portal/c/{customer}/budgets", get(budgets))
        .route("/portal/c/{customer}/usage", get(usage_page))
        .route("/portal/c/{customer}/usage.csv", get(usage_csv))
        .route("/portal/c/{customer}/alerts", get(alerts_page))
        .route("/portal/c/{customer}/limits", get(limits_page))
        .route("/portal/c/{customer}/keys", get(keys_page))
        .route("/portal/c/{customer}/live", get(live_page))
        .route("/portal/c/{customer}/audit", get(audit_page))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// The signed-in caller of a page, or the way to the sign-in page.
struct Page {
    principal: Principal,
    csrf: String,
}

/// A page's refusal (the way to sign-in, or an error page), boxed: responses are large.
type Refusal = Box<Response>;

fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Page, Refusal> {
    let to_login = || Box::new(Redirect::to("/portal/login").into_response());
    let id = session::cookie_in(headers).ok_or_else(to_login)?;
    let signed = state
        .sessions()
        .get(&state.token_check(), &id, state.now().millis())
        .map_err(|_| to_login())?;
    Ok(Page {
        principal: signed.principal,
        csrf: signed.csrf,
    })
}

fn error_page(page: &Page, status: StatusCode, message: String) -> Response {
    render(
        status,
        "error.html",
        context! {
            title => status.canonical_reason().unwrap_or("Error"),
            csrf => page.csrf,
            operator => page.principal.is_operator(),
            signed_in_as => page.principal.describe(),
            message,
        },
    )
}

/// A page of `customer` for the signed-in caller: 403 for a customer its credential does
/// not reach (the same rule as the API's), 404 for one that does not exist.
fn customer_page(state: &AppState, headers: &HeaderMap, customer: &str) -> Result<Page, Refusal> {
    let page = signed_in(state, headers)?;
    if !page.principal.may_access(customer) {
        let message = format!("these credentials do not reach customer `{customer}`");
        return Err(Box::new(error_page(&page, StatusCode::FORBIDDEN, message)));
    }
    if !state.knows_customer(customer) {
        let message = format!("customer `{customer}` not found");
        return Err(Box::new(error_page(&page, StatusCode::NOT_FOUND, message)));
    }
    Ok(page)
}

/// A page of the customer named by the path, for a signed-in caller it reaches (or the
/// refusal: the way to sign-in, 403 or 404).
struct CustomerPage {
    page: Page,
    customer: String,
}

/// A refusal as a response (boxed: responses are large).
struct Refused(Refusal);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl axum::extract::FromRequestParts<AppState> for CustomerPage {
    type Rejection = Refused;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Refused> {
        let Path(customer) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| Refused(Box::new(e.into_response())))?;
        let page = customer_page(state, &parts.headers, &customer).map_err(Refused)?;
        Ok(Self { page, customer })
    }
}

/// What every page of a customer shows: who is signed in and what they may do.
fn base(page: &Page, customer: &str, name: &str, title: &str) -> Value {
    context! {
        title,
        page => name,
        customer,
        csrf => page.csrf,
        operator => page.principal.is_operator(),
        signed_in_as => page.principal.describe(),
        can_manage => page.principal.may_manage(customer),
    }
}

async fn landing(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match signed_in(&state, &headers) {
        Err(to_login) => *to_login,
        Ok(page) => Redirect::to(&home(&page.principal)).into_response(),
    }
}

fn home(p: &Principal) -> String {
    match p {
        Principal::Customer(c, _) => format!("/portal/c/{c}/"),
        _ => "/portal/customers".to_string(),
    }
}

async fn login_page() -> Response {
    render(StatusCode::OK, "login.html", context! {})
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !session::same_origin(&headers) {
        return render(
            StatusCode::FORBIDDEN,
            "login.html",
            context! { error => "sign in from the portal's own page" },
        );
    }
    let now = state.now().millis();
    match state
        .sessions()
        .create(&state.token_check(), form.token.trim(), now)
    {
        Ok((id, principal)) => {
            let cookie = session::set_cookie(Some(&id), session::behind_tls(&headers));
            hardened(redirect_setting(&home(&principal), &cookie))
        }
        Err(e) => render(
            StatusCode::UNAUTHORIZED,
            "login.html",
            context! { error => e.to_string() },
        ),
    }
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if let Some(id) = session::cookie_in(&headers) {
        let signed = state
            .sessions()
            .get(&state.token_check(), &id, state.now().millis());
        match signed {
            Ok(s) if !session::csrf_ok(&s, Some(&form.csrf)) => {
                return (
                    StatusCode::FORBIDDEN,
                    "sign-out needs the page's CSRF token",
                )
                    .into_response();
            }
            _ => state.sessions().remove(&id),
        }
    }
    let cookie = session::set_cookie(None, session::behind_tls(&headers));
    redirect_setting("/portal/login", &cookie)
}

/// A redirect to `to` that sets `cookie`.
fn redirect_setting(to: &str, cookie: &str) -> Response {
    let mut r = Redirect::to(to).into_response();
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn customers(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let page = match signed_in(&state, &headers) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let list: Vec<String> = state.read_config(|d| {
        d.customers
            .iter()
            .filter(|c| page.principal.may_access(&c.id))
            .map(|c| c.id.clone())
            .collect()
    });
    render(
        StatusCode::OK,
        "customers.html",
        context! {
            title => "Customers",
            page => "customers",
            csrf => page.csrf,
            operator => page.principal.is_operator(),
            signed_in_as => page.principal.describe(),
            customers => list,
        },
    )
}

/// One limit's bar.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Bar {
    limit_id: String,
    used: u64,
    limit: Option<u64>,
    limit_text: String,
    remaining_text: String,
    /// Filled share, 0 to 100.
    pct: u64,
    /// `ok`, `near` (80 % or more) or `over`.
    state: &'static str,
    resets_at: Option<String>,
    exhaustion: Option<String>,
}

fn when(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
}

fn bars(b: &Budget) -> Vec<Bar> {
    b.limits
        .iter()
        .map(|l| {
            let (pct, state) = match l.limit {
                Some(cap) if cap > 0 => {
                    let pct = (u128::from(l.used) * 100 / u128::from(cap)).min(100);
                    let pct = u64::try_from(pct).unwrap_or(100);
                    let state = if l.used >= cap {
                        "over"
                    } else if pct >= 80 {
                        "near"
                    } else {
                        "ok"
                    };
                    (pct, state)
                }
                Some(_) => (100, "over"),
                None => (0, "ok"),
            };
            Bar {
                limit_id: l.limit_id.clone(),
                used: l.used,
                limit: l.limit,
                limit_text: l
                    .limit
                    .map_or_else(|| "credits".to_string(), |c| c.to_string()),
                remaining_text: l
                    .remaining
                    .map_or_else(|| "—".to_string(), |r| r.to_string()),
                pct,
                state,
                resets_at: l.resets_at.and_then(when),
                exhaustion: l.projected_exhaustion.and_then(when),
            }
        })
        .collect()
}

fn worst(bars: &[Bar]) -> &'static str {
    if bars.iter().any(|b| b.state == "over") {
        "over"
    } else if bars.iter().any(|b| b.state == "near") {
        "near"
    } else {
        "ok"
    }
}

#[derive(Deserialize, Default)]
struct TreeQuery {
    parent: Option<String>,
    q: Option<String>,
    #[serde(default)]
    page: usize,
}

/// The tree rows of one page, with their bars.
async fn tree_context(
    state: &AppState,
    customer: &str,
    query: &TreeQuery,
) -> Result<Value, crate::usage::UsageError> {
    let EntityPage { rows, total } = state
        .entity_page(
            customer,
            query.parent.as_deref(),
            query.q.as_deref(),
            query.page.saturating_mul(PAGE),
            PAGE,
        )
        .await?;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let budgets = state.budgets(customer, &ids).await?;
    let shown = (query.page + 1).saturating_mul(PAGE).min(total);
    let more = (shown < total).then(|| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(p) = &query.parent {
            q.append_pair("parent", p);
        }
        if let Some(s) = &query.q {
            q.append_pair("q", s);
        }
        q.append_pair("page", &(query.page + 1).to_string());
        q.finish()
    });
    let rows: Vec<Value> = rows
        .iter()
        .zip(&budgets)
        .map(|(r, b)| {
            let limits = bars(b);
            context! {
                id => r.id,
                entity_type => r.entity_type,
                children => r.children,
                state => worst(&limits),
                limits,
            }
        })
        .collect();
    Ok(context! { rows, total, shown, more, customer, q => query.q })
}

async fn overview(
    State(state): State<AppState>,
    cp: CustomerPage,
    Query(query): Query<TreeQuery>,
) -> Response {
    tree_page(&state, cp, &query, true).await
}

/// A page of the tree alone (htmx swaps it in).
async fn tree(
    State(state): State<AppState>,
    cp: CustomerPage,
    Query(query): Query<TreeQuery>,
) -> Response {
    tree_page(&state, cp, &query, false).await
}

/// The overview page (`whole`) or one page of its tree.
async fn tree_page(state: &AppState, cp: CustomerPage, query: &TreeQuery, whole: bool) -> Response {
    let CustomerPage { page, customer } = cp;
    let running_out = if whole {
        running_out(state, &customer).await
    } else {
        Vec::new()
    };
    match tree_context(state, &customer, query).await {
        Ok(tree) if whole => render(
            StatusCode::OK,
            "overview.html",
            context! { ..base(&page, &customer, "overview", "Overview"), ..tree, ..spend_context(state), ..context! { running_out } },
        ),
        Ok(tree) => render(StatusCode::OK, "tree.html", tree),
        Err(e) => {
            let e = crate::api::ApiError::from(e);
            error_page(&page, e.status, e.message)
        }
    }
}

#[derive(Deserialize)]
struct BudgetsQuery {
    #[serde(default)]
    ids: String,
}

/// Fresh bars for the entities on screen, as JSON (the overview polls it).
async fn budgets(
    State(state): State<AppState>,
    CustomerPage { customer, .. }: CustomerPage,
    Query(query): Query<BudgetsQuery>,
) -> Response {
    let ids: Vec<&str> = query
        .ids
        .split(',')
        .filter(|s| !s.is_empty())
        .take(MAX_REFRESH)
        .collect();
    match state.budgets(&customer, &ids).await {
        Ok(all) => {
            let out: BTreeMap<String, Vec<Bar>> =
                all.iter().map(|b| (b.entity.clone(), bars(b))).collect();
            axum::Json(out).into_response()
        }
        // As the API answers: 400 for a bad query, 404 for an unknown entity, 503 when the
        // store is unreachable (the overview's poll then keeps the bars it has).
        Err(e) => {
            // JSON, never text a browser could sniff into a page: the message may repeat
            // what the query asked for.
            let e = crate::api::ApiError::from(e);
            hardened(
                (
                    e.status,
                    axum::Json(serde_json::json!({"error": e.message})),
                )
                    .into_response(),
            )
        }
    }
}

async fn usage_page(
    State(state): State<AppState>,
    CustomerPage { page, customer }: CustomerPage,
) -> Response {
    // The same keys, with the same human names, as the overview's spend.
    let group_keys = spend_context(&state)
        .get_attr("spend_keys")
        .unwrap_or_default();
    render(
        StatusCode::OK,
        "usage.html",
        context! { ..base(&page, &customer, "usage", "Usage explorer"), ..context! { group_keys } },
    )
}

/// A CSV field of text a client chose (a dimension value, a group key): a value that a
/// spreadsheet would run as a formula (a leading `=`, `+`, `-`, `@`, tab or carriage return)
/// gets a leading `'`, as OWASP's CSV injection guidance says; quoted when it holds a comma,
/// quote or line break. The figures of a row are numbers the server writes, never passed here.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

/// What the chart shows, as CSV: the history API's answer for the same query, one row per
/// series and window.
async fn usage_csv(
    State(state): State<AppState>,
    CustomerPage { customer, .. }: CustomerPage,
    RawQuery(raw): RawQuery,
) -> Response {
    let h = match crate::api::usage_history(Arc::clone(&state), customer.clone(), raw).await {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let keys: Vec<String> = h
        .series
        .first()
        .map(|s| s.group_by.keys().cloned().collect())
        .unwrap_or_default();
    let mut out = String::from("windowStart,windowEnd");
    for k in &keys {
        out.push(',');
        out.push_str(&csv_field(k));
    }
    out.push_str(",units,requests,denied,credits\r\n");
    for s in &h.series {
        for p in &s.points {
            out.push_str(&format!(
                "{},{}",
                p.window_start.to_rfc3339(),
                p.window_end.to_rfc3339()
            ));
            for k in &keys {
                out.push(',');
                out.push_str(&csv_field(
                    s.group_by
                        .get(k)
                        .cloned()
                        .flatten()
                        .as_deref()
                        .unwrap_or(""),
                ));
            }
            out.push_str(&format!(
                ",{},{},{},{}\r\n",
                p.measures.units, p.measures.requests, p.measures.denied, p.measures.credits
            ));
        }
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{customer}-usage.csv\""),
            ),
        ],
        out,
    )
        .into_response()
}

async fn alerts_page(
    State(state): State<AppState>,
    CustomerPage { page, customer }: CustomerPage,
) -> Response {
    let (rules, webhooks, features, entity_types) = state.read_config(|d| {
        let c = d.customers.iter().find(|c| c.id == customer);
        (
            c.map(|c| c.alerts.clone()).unwrap_or_default(),
            c.map(|c| {
                c.webhooks
                    .iter()
                    .map(crate::api::dto::WebhookView::from)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
            d.features.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
            d.entity_types
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>(),
        )
    });
    render(
        StatusCode::OK,
        "alerts.html",
        context! { ..base(&page, &customer, "alerts", "Alerts"), ..context! { rules, webhooks, features, entity_types } },
    )
}

/// What the limits page was reloaded after: a save or a restore, said in its status line.
#[derive(Debug, Deserialize)]
struct LimitsQuery {
    saved: Option<String>,
    restored: Option<String>,
}

async fn limits_page(
    State(state): State<AppState>,
    CustomerPage { page, customer }: CustomerPage,
    Query(q): Query<LimitsQuery>,
) -> Response {
    let overrides = state.overrides(Some(&customer));
    let (limits, ceilings) = state.read_config(|d| {
        let c = d.customers.iter().find(|c| c.id == customer);
        let ceilings = c.map(|c| c.ceilings.as_slice()).unwrap_or_default();
        let limits: Vec<Value> = c
            .map(|c| c.limits.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|l| {
                let json = serde_json::to_string(l).unwrap_or_default();
                let mut v = serde_json::to_value(l).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("json".into(), json.into());
                    // A customer's admin raises only under a ceiling: lowering one no ceiling
                    // covers is a one-way step for it, which the page warns about first.
                    o.insert(
                        "covered".into(),
                        ceilings.iter().any(|x| x.covers(l)).into(),
                    );
                    if let Some(ov) = overrides.iter().find(|x| x.kind == "limit" && x.id == l.id) {
                        o.insert(
                            "fileLimit".into(),
                            ov.file
                                .as_ref()
                                .and_then(|f| f.get("limit").cloned())
                                .unwrap_or(serde_json::Value::Null),
                        );
                    }
                }
                Value::from_serialize(&v)
            })
            .collect();
        (limits, ceilings.to_vec())
    });
    let mine = format!("{customer}:");
    let overrides: Vec<Value> = overrides
        .iter()
        .map(|o| {
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .map(|v| v.get("limit").map_or_else(|| "present".to_string(), ToString::to_string))
            };
            context! {
                kind => o.kind,
                id => o.id,
                file => show(&o.file),
                in_force => show(&o.in_force),
                changes => o.changes,
                by => o.last_by,
                at => crate::api::dto::OverrideDto::from(o).last_changed_at.format("%Y-%m-%d %H:%M UTC").to_string(),
                // A customer's admin drops only changes its own customer's keys made.
                restorable => page.principal.is_operator() || o.last_by.starts_with(&mine),
            }
        })
        .collect();
    let customer_admin = !page.principal.is_operator();
    let status = match (&q.saved, &q.restored) {
        (Some(id), _) => limits
            .iter()
            .find(|l| {
                l.get_attr("id")
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .as_deref()
                    == Some(id.as_str())
            })
            .and_then(|l| l.get_attr("limit").ok())
            .map(|v| format!("Saved: {id} is now {v}; it applies to the next request.")),
        (_, Some(what)) => Some(format!(
            "Restored: {} is as the configuration file says.",
            what.replacen(':', " ", 1)
        )),
        _ => None,
    };
    render(
        StatusCode::OK,
        "limits.html",
        context! { ..base(&page, &customer, "limits", "Limits"), ..context! { limits, ceilings, overrides, customer_admin, status } },
    )
}

async fn keys_page(
    State(state): State<AppState>,
    CustomerPage { page, customer }: CustomerPage,
) -> Response {
    let keys: Vec<crate::api::dto::ApiKeyView> = state.read_config(|d| {
        d.customers
            .iter()
            .find(|c| c.id == customer)
            .map(|c| c.api_keys.iter().map(Into::into).collect())
            .unwrap_or_default()
    });
    render(
        StatusCode::OK,
        "keys.html",
        context! { ..base(&page, &customer, "keys", "API keys"), ..context! { keys } },
    )
}

async fn live_page(
    State(state): State<AppState>,
    CustomerPage { page, customer }: CustomerPage,
) -> Response {
    let model = state.model();
    // "Who" reads root first, in the order of the hierarchy, whatever order a record's
    // attributes come in.
    let chain: Vec<String> = model.chain_keys.iter().map(|k| k.to_string()).collect();
    let labels = key_labels(&model);
    render(
        StatusCode::OK,
        "live.html",
        context! { ..base(&page, &customer, "live", "Live"), ..context! {
            chain => chain.join(","),
            labels => serde_json::to_string(&labels).unwrap_or_default(),
            kept => LIVE_KEPT,
            per_page => LIVE_PAGE,
        } },
    )
}

/// Most entities the first screen looks at for budgets about to run out: the top of the tree
/// and the level under it (teams, workspaces), never every user.
const RUNNING_OUT_SCOPE: usize = 100;

/// The budgets of the top of the tree and the level under it that run out before they reset at
/// the last 15 minutes' pace (quotas and credit pools only: a rate or a concurrency slot
/// recovers on its own), the soonest first.
async fn running_out(state: &AppState, customer: &str) -> Vec<Value> {
    let mut ids: Vec<String> = Vec::new();
    if let Ok(top) = state.entity_page(customer, None, None, 0, 10).await {
        for root in top.rows {
            if let Ok(under) = state
                .entity_page(customer, Some(&root.id), None, 0, RUNNING_OUT_SCOPE)
                .await
            {
                ids.extend(under.rows.into_iter().map(|r| r.id));
            }
            ids.push(root.id);
        }
    }
    ids.truncate(RUNNING_OUT_SCOPE);
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let Ok(budgets) = state.budgets(customer, &refs).await else {
        return Vec::new();
    };
    let mut soon: Vec<(i64, Value)> = Vec::new();
    for b in &budgets {
        for l in &b.limits {
            let Some(at) = l.projected_exhaustion else {
                continue;
            };
            soon.push((
                at,
                context! {
                    entity => b.entity,
                    entity_type => b.entity_type,
                    limit_id => l.limit_id,
                    used => l.used,
                    limit => l.limit,
                    remaining => l.remaining,
                    runs_out => when(at),
                    resets => l.resets_at.and_then(when),
                },
            ));
        }
    }
    soon.sort_by_key(|(at, _)| *at);
    soon.into_iter().map(|(_, v)| v).collect()
}

/// The overview's spend section: the keys spend breaks down by, with human names, and the one
/// it opens on (the level under the root, "by team", when there is one).
fn spend_context(state: &AppState) -> Value {
    let model = state.model();
    let labels = key_labels(&model);
    let mut keys: Vec<String> = model.chain_keys.iter().map(|k| k.to_string()).collect();
    keys.extend(model.recorded_dimensions.iter().map(|k| k.to_string()));
    keys.push(crate::core::usage_query::FEATURE_KEY.to_string());
    keys.dedup();
    let default_by = keys.get(1).or(keys.first()).cloned().unwrap_or_default();
    let keys: Vec<(String, String)> = keys
        .into_iter()
        .map(|k| {
            let label = labels.get(&k).cloned().unwrap_or_else(|| k.clone());
            (k, label)
        })
        .collect();
    context! {
        spend_keys => keys,
        default_by,
        entity_keys => model.chain_keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(","),
    }
}

/// Live events a page keeps (older ones leave as new ones come) and shows per page.
const LIVE_KEPT: usize = 1_000;
const LIVE_PAGE: usize = 25;

/// A human name for each key usage is recorded by: an entity type's level by its type
/// ("organizationId" → "Organization"), a dimension by its name ("model" → "Model",
/// "projectId" → "Project"), and the feature and denying limit.
fn key_labels(model: &crate::core::model::Model) -> BTreeMap<String, String> {
    fn capital(s: &str) -> String {
        let mut c = s.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect())
            .unwrap_or_default()
    }
    fn words(key: &str) -> String {
        let key = key
            .strip_suffix("Id")
            .filter(|k| !k.is_empty())
            .unwrap_or(key);
        let mut out = String::new();
        for ch in key.chars() {
            if ch.is_uppercase() || ch == '_' || ch == '-' {
                out.push(' ');
            }
            if ch != '_' && ch != '-' {
                out.extend(ch.to_lowercase());
            }
        }
        capital(out.trim())
    }
    let mut labels = BTreeMap::new();
    for (key, t) in model.chain_keys.iter().zip(&model.entity_types) {
        labels.insert(key.to_string(), words(t.name.as_str()));
    }
    for d in &model.recorded_dimensions {
        labels
            .entry(d.to_string())
            .or_insert_with(|| words(d.as_str()));
    }
    labels.insert(
        crate::core::usage_query::FEATURE_KEY.to_string(),
        "Feature".into(),
    );
    labels.insert(
        crate::core::rollup::DENIED_BY.to_string(),
        "Denying limit".into(),
    );
    labels
}

async fn audit_page(
    State(state): State<AppState>,
    CustomerPage { page, customer }: CustomerPage,
) -> Response {
    let entries: Vec<Value> = state
        .audit(Some(&customer))
        .iter()
        .rev()
        .take(500)
        .map(|l| {
            let e = crate::api::dto::AuditEntryDto::from(l);
            let pretty = |v: &Option<serde_json::Value>| {
                v.as_ref()
                    .and_then(|v| serde_json::to_string_pretty(v).ok())
            };
            context! {
                at => e.at.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
                by => e.by,
                action => e.action,
                kind => e.kind,
                id => e.id,
                before => pretty(&e.before),
                after => pretty(&e.after),
            }
        })
        .collect();
    render(
        StatusCode::OK,
        "audit.html",
        context! { ..base(&page, &customer, "audit", "Audit log"), ..context! { entries } },
    )
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_fields_never_start_a_formula() {
        for (value, cell) in [
            ("=2+5", "'=2+5"),
            ("@SUM(1+1)", "'@SUM(1+1)"),
            ("+1+2", "'+1+2"),
            ("-1+2", "'-1+2"),
            (
                "=HYPERLINK(\"http://x\",\"y\")",
                "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"",
            ),
            ("\tcmd", "'\tcmd"),
            ("gpt-4o", "gpt-4o"),
            ("a,b", "\"a,b\""),
        ] {
            assert_eq!(csv_field(value), cell, "{value}");
        }
    }
}
