//! The decision model as a document: the config file's model sections plus the admin changes
//! made through the API, rebuilt and validated into the engine's model on every change.
//!
//! Admin changes are kept as an ordered list of operations over the file's document, so a
//! reload of the file replays them on the new base instead of losing them.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::auth::{Principal, Role};
use crate::config::dto::{
    AlertRuleDto, ConfigDoc, CustomerDto, CustomerKeyDto, EntityDto, GrantDto, KindDto, LimitDto,
    PriceTableDto, WebhookDto,
};
use crate::config::{ConfigErrors, build_model};
use crate::engine::Engine;
use crate::store::StoreError;

/// One admin change. Serialisable: a durable store keeps the list across restarts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum AdminOp {
    /// Create (`create`) or create-or-replace a customer, whole.
    PutCustomer {
        customer: CustomerDto,
        create: bool,
    },
    DeleteCustomer {
        id: String,
    },
    PutEntity {
        customer: String,
        entity: EntityDto,
        create: bool,
    },
    DeleteEntity {
        customer: String,
        id: String,
    },
    PutLimit {
        customer: String,
        limit: LimitDto,
        create: bool,
    },
    DeleteLimit {
        customer: String,
        id: String,
    },
    /// Grants are added, never replaced: the credits they carried may be spent.
    AddGrant {
        customer: String,
        grant: GrantDto,
    },
    PutPrices {
        table: PriceTableDto,
        create: bool,
    },
    DeletePrices {
        version: String,
    },
    PutAlertRule {
        customer: String,
        rule: AlertRuleDto,
        create: bool,
    },
    DeleteAlertRule {
        customer: String,
        id: String,
    },
    /// A webhook with its secrets (made by the server, shown to the caller once).
    PutWebhook {
        customer: String,
        webhook: WebhookDto,
        create: bool,
    },
    DeleteWebhook {
        customer: String,
        id: String,
    },
    /// A key a customer's admin made (its digest; the key itself was shown once).
    AddApiKey {
        customer: String,
        key: CustomerKeyDto,
    },
    DeleteApiKey {
        customer: String,
        id: String,
    },
}

/// Why an admin change was refused. A refused change changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("the change would make the model invalid:\n{0}")]
    Invalid(ConfigErrors),
    /// Not allowed for this caller; the text says why (the portal shows it as it is).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Replaces the item whose id is `id`, or appends it; `create` refuses an existing one.
fn put<T>(
    list: &mut Vec<T>,
    item: T,
    id_of: impl Fn(&T) -> &str,
    create: bool,
    what: String,
) -> Result<(), AdminError> {
    let id = id_of(&item).to_string();
    match list.iter_mut().find(|x| id_of(x) == id) {
        Some(_) if create => Err(AdminError::Conflict(what)),
        Some(slot) => {
            *slot = item;
            Ok(())
        }
        None => {
            list.push(item);
            Ok(())
        }
    }
}

fn delete<T>(
    list: &mut Vec<T>,
    id: &str,
    id_of: impl Fn(&T) -> &str,
    what: String,
) -> Result<(), AdminError> {
    let before = list.len();
    list.retain(|x| id_of(x) != id);
    if list.len() == before {
        Err(AdminError::NotFound(what))
    } else {
        Ok(())
    }
}

fn customer_mut<'d>(doc: &'d mut ConfigDoc, id: &str) -> Result<&'d mut CustomerDto, AdminError> {
    doc.customers
        .iter_mut()
        .find(|c| c.id == id)
        .ok_or_else(|| AdminError::NotFound(format!("customer `{id}`")))
}

impl AdminOp {
    /// Applies the change to `doc`'s structure; validation of the result is the caller's.
    pub fn apply(&self, doc: &mut ConfigDoc) -> Result<(), AdminError> {
        match self {
            AdminOp::PutCustomer { customer, create } => {
                // A customer read back has its webhook secrets redacted: a redacted secret
                // written back keeps the one it stands for (same webhook, same place).
                let mut customer = customer.clone();
                if let Some(before) = doc.customers.iter().find(|c| c.id == customer.id) {
                    for w in &mut customer.webhooks {
                        let old = before.webhooks.iter().find(|o| o.id == w.id);
                        for (i, secret) in w.secrets.iter_mut().enumerate() {
                            if secret == REDACTED
                                && let Some(kept) = old.and_then(|o| o.secrets.get(i))
                            {
                                secret.clone_from(kept);
                            }
                        }
                    }
                }
                let id = customer.id.clone();
                put(
                    &mut doc.customers,
                    customer,
                    |c| &c.id,
                    *create,
                    format!("customer `{id}`"),
                )
            }
            AdminOp::DeleteCustomer { id } => delete(
                &mut doc.customers,
                id,
                |c| &c.id,
                format!("customer `{id}`"),
            ),
            AdminOp::PutEntity {
                customer,
                entity,
                create,
            } => put(
                &mut customer_mut(doc, customer)?.entities,
                entity.clone(),
                |e| &e.id,
                *create,
                format!("entity `{}` of customer `{customer}`", entity.id),
            ),
            AdminOp::DeleteEntity { customer, id } => delete(
                &mut customer_mut(doc, customer)?.entities,
                id,
                |e| &e.id,
                format!("entity `{id}` of customer `{customer}`"),
            ),
            AdminOp::PutLimit {
                customer,
                limit,
                create,
            } => put(
                &mut customer_mut(doc, customer)?.limits,
                limit.clone(),
                |l| &l.id,
                *create,
                format!("limit `{}` of customer `{customer}`", limit.id),
            ),
            AdminOp::DeleteLimit { customer, id } => delete(
                &mut customer_mut(doc, customer)?.limits,
                id,
                |l| &l.id,
                format!("limit `{id}` of customer `{customer}`"),
            ),
            AdminOp::AddGrant { customer, grant } => put(
                &mut customer_mut(doc, customer)?.grants,
                grant.clone(),
                |g| &g.id,
                true,
                format!("grant `{}` of customer `{customer}`", grant.id),
            ),
            AdminOp::PutPrices { table, create } => put(
                &mut doc.prices,
                table.clone(),
                |t| &t.version,
                *create,
                format!("price table `{}`", table.version),
            ),
            AdminOp::DeletePrices { version } => delete(
                &mut doc.prices,
                version,
                |t| &t.version,
                format!("price table `{version}`"),
            ),
            AdminOp::PutAlertRule {
                customer,
                rule,
                create,
            } => put(
                &mut customer_mut(doc, customer)?.alerts,
                rule.clone(),
                |r| &r.id,
                *create,
                format!("alert rule `{}` of customer `{customer}`", rule.id),
            ),
            AdminOp::DeleteAlertRule { customer, id } => delete(
                &mut customer_mut(doc, customer)?.alerts,
                id,
                |r| &r.id,
                format!("alert rule `{id}` of customer `{customer}`"),
            ),
            AdminOp::PutWebhook {
                customer,
                webhook,
                create,
            } => put(
                &mut customer_mut(doc, customer)?.webhooks,
                webhook.clone(),
                |w| &w.id,
                *create,
                format!("webhook `{}` of customer `{customer}`", webhook.id),
            ),
            AdminOp::DeleteWebhook { customer, id } => delete(
                &mut customer_mut(doc, customer)?.webhooks,
                id,
                |w| &w.id,
                format!("webhook `{id}` of customer `{customer}`"),
            ),
            AdminOp::AddApiKey { customer, key } => put(
                &mut customer_mut(doc, customer)?.api_keys,
                key.clone(),
                |k| &k.id,
                true,
                format!("API key `{}` of customer `{customer}`", key.id),
            ),
            AdminOp::DeleteApiKey { customer, id } => delete(
                &mut customer_mut(doc, customer)?.api_keys,
                id,
                |k| &k.id,
                format!("API key `{id}` of customer `{customer}`"),
            ),
        }
    }

    /// The customer this change is about, if it is about one.
    pub fn customer(&self) -> Option<&str> {
        match self {
            AdminOp::PutCustomer { customer, .. } => Some(&customer.id),
            AdminOp::DeleteCustomer { id } => Some(id),
            AdminOp::PutEntity { customer, .. }
            | AdminOp::DeleteEntity { customer, .. }
            | AdminOp::PutLimit { customer, .. }
            | AdminOp::DeleteLimit { customer, .. }
            | AdminOp::AddGrant { customer, .. }
            | AdminOp::PutAlertRule { customer, .. }
            | AdminOp::DeleteAlertRule { customer, .. }
            | AdminOp::PutWebhook { customer, .. }
            | AdminOp::DeleteWebhook { customer, .. }
            | AdminOp::AddApiKey { customer, .. }
            | AdminOp::DeleteApiKey { customer, .. } => Some(customer),
            AdminOp::PutPrices { .. } | AdminOp::DeletePrices { .. } => None,
        }
    }

    /// What kind of thing it changes and which one: `limit team-daily`.
    pub fn target(&self) -> (&'static str, &str) {
        match self {
            AdminOp::PutCustomer { customer, .. } => ("customer", &customer.id),
            AdminOp::DeleteCustomer { id } => ("customer", id),
            AdminOp::PutEntity { entity, .. } => ("entity", &entity.id),
            AdminOp::DeleteEntity { id, .. } => ("entity", id),
            AdminOp::PutLimit { limit, .. } => ("limit", &limit.id),
            AdminOp::DeleteLimit { id, .. } => ("limit", id),
            AdminOp::AddGrant { grant, .. } => ("grant", &grant.id),
            AdminOp::PutPrices { table, .. } => ("prices", &table.version),
            AdminOp::DeletePrices { version } => ("prices", version),
            AdminOp::PutAlertRule { rule, .. } => ("alert", &rule.id),
            AdminOp::DeleteAlertRule { id, .. } => ("alert", id),
            AdminOp::PutWebhook { webhook, .. } => ("webhook", &webhook.id),
            AdminOp::DeleteWebhook { id, .. } => ("webhook", id),
            AdminOp::AddApiKey { key, .. } => ("key", &key.id),
            AdminOp::DeleteApiKey { id, .. } => ("key", id),
        }
    }

    /// `create`, `update` or `delete`.
    pub fn action(&self) -> &'static str {
        match self {
            AdminOp::PutCustomer { create: true, .. }
            | AdminOp::PutEntity { create: true, .. }
            | AdminOp::PutLimit { create: true, .. }
            | AdminOp::PutPrices { create: true, .. }
            | AdminOp::PutAlertRule { create: true, .. }
            | AdminOp::PutWebhook { create: true, .. }
            | AdminOp::AddGrant { .. }
            | AdminOp::AddApiKey { .. } => "create",
            AdminOp::PutCustomer { .. }
            | AdminOp::PutEntity { .. }
            | AdminOp::PutLimit { .. }
            | AdminOp::PutPrices { .. }
            | AdminOp::PutAlertRule { .. }
            | AdminOp::PutWebhook { .. } => "update",
            _ => "delete",
        }
    }
}

/// A webhook with its secrets hidden: they are shown once, when made.
pub fn redacted_webhook(w: &WebhookDto) -> WebhookDto {
    WebhookDto {
        secrets: w.secrets.iter().map(|_| REDACTED.to_string()).collect(),
        ..w.clone()
    }
}

/// What stands in for a secret in anything read back.
pub const REDACTED: &str = "(redacted)";

/// The object `op` changes, as it stands in `doc` (secrets hidden), for the audit log.
fn subject(doc: &ConfigDoc, op: &AdminOp) -> Option<serde_json::Value> {
    fn json<T: serde::Serialize>(t: Option<&T>) -> Option<serde_json::Value> {
        t.and_then(|t| serde_json::to_value(t).ok())
    }
    let (kind, id) = op.target();
    let customer = op
        .customer()
        .and_then(|c| doc.customers.iter().find(|x| x.id == c));
    match kind {
        "customer" => customer
            .map(|c| {
                let mut c = c.clone();
                c.webhooks = c.webhooks.iter().map(redacted_webhook).collect();
                c
            })
            .and_then(|c| json(Some(&c))),
        "entity" => json(customer.and_then(|c| c.entities.iter().find(|e| e.id == id))),
        "limit" => json(customer.and_then(|c| c.limits.iter().find(|l| l.id == id))),
        "grant" => json(customer.and_then(|c| c.grants.iter().find(|g| g.id == id))),
        "alert" => json(customer.and_then(|c| c.alerts.iter().find(|r| r.id == id))),
        "webhook" => json(
            customer
                .and_then(|c| c.webhooks.iter().find(|w| w.id == id))
                .map(redacted_webhook)
                .as_ref(),
        ),
        "key" => json(customer.and_then(|c| c.api_keys.iter().find(|k| k.id == id))),
        _ => json(doc.prices.iter().find(|t| t.version == id)),
    }
}

/// Whether `l` holds `ceiling` for the whole customer: an enforced limit of the ceiling's shape
/// on the top entity (`top`), one counter for everything (no scope, type or pooling), at most
/// the ceiling.
fn holds_ceiling(
    l: &LimitDto,
    ceiling: &crate::config::dto::CeilingDto,
    top: Option<&str>,
) -> bool {
    top.is_some()
        && l.entity.as_deref() == top
        && l.entity_type.is_none()
        && l.scope.is_empty()
        && l.pool_by.is_none()
        && l.mode == crate::config::dto::ModeDto::Enforce
        && ceiling.covers(l)
        && l.limit.is_some_and(|v| v <= ceiling.max)
}

/// Whether a limit change by a customer's admin keeps within what the operator allows, given
/// the document before it. Pure: the catalog runs it under its change lock.
///
/// The rules: a customer admin changes limits, alert rules, webhooks and API keys of its own
/// customer only. A limit may be lowered freely (same shape, lower value); any other new or changed
/// limit must be covered by one of the operator's ceilings (which validation then holds it
/// under), enforced (`mode: enforce`) and not `credits` (credits come from grants). A limit
/// may be deleted only where a ceiling covers it and it is not on the customer's top entity:
/// that one stands for what was bought. Invariant: a ceiling held by a limit on the top entity
/// stays held after any change a customer admin makes, and a limit is raised or added under a
/// ceiling only while one is.
pub fn customer_admin_guard(
    doc: &ConfigDoc,
    customer: &str,
    op: &AdminOp,
) -> Result<(), AdminError> {
    if op.customer() != Some(customer) {
        return Err(AdminError::Refused(format!(
            "an admin key of `{customer}` changes only that customer"
        )));
    }
    let refuse = |why: String| Err(AdminError::Refused(why));
    let Some(c) = doc.customers.iter().find(|c| c.id == customer) else {
        return Err(AdminError::NotFound(format!("customer `{customer}`")));
    };
    let covering = |l: &LimitDto| c.ceilings.iter().find(|x| x.covers(l));
    let top = c
        .entities
        .iter()
        .find(|e| e.parent.is_none())
        .map(|e| e.id.as_str());
    match op {
        AdminOp::PutLimit { limit, .. } => {
            // What the limits do after the change, not what they are called: every ceiling
            // must stay held by an enforced limit on the top entity, unscoped and unpooled, so
            // no move, scope, type or kind change spreads what was bought over many counters
            // (a limit per user) or lets usage around it (a scope no request matches).
            let after: Vec<&LimitDto> = c
                .limits
                .iter()
                .filter(|l| l.id != limit.id)
                .chain(std::iter::once(limit))
                .collect();
            for ceiling in &c.ceilings {
                let had = c.limits.iter().any(|l| holds_ceiling(l, ceiling, top));
                if had && !after.iter().any(|l| holds_ceiling(l, ceiling, top)) {
                    return refuse(format!(
                        "limit `{}` holds the customer's ceiling for {} (what `{customer}` bought): it must stay an enforced limit on `{}`, with no scope, `entityType` or `poolBy`, at most {}",
                        limit.id,
                        ceiling.describe(),
                        top.unwrap_or_default(),
                        ceiling.max
                    ));
                }
            }
            let before = c.limits.iter().find(|l| l.id == limit.id);
            let same_shape = before.is_some_and(|b| {
                let mut b = b.clone();
                b.limit = limit.limit;
                b == *limit
            });
            let lowered = before.is_some_and(|b| match (b.limit, limit.limit) {
                (Some(old), Some(new)) => new <= old,
                _ => false,
            });
            if same_shape && lowered {
                return Ok(());
            }
            if limit.kind == KindDto::Credits {
                return refuse("credits come from grants, which only the operator adds".into());
            }
            if limit.mode != crate::config::dto::ModeDto::Enforce {
                return refuse(format!(
                    "limit `{}`: an admin key sets enforced limits only; `soft` and `shadow` let usage past the limit",
                    limit.id
                ));
            }
            match covering(limit) {
                // Said here in the customer's words (validation would say it too, for anyone).
                Some(ceiling) if limit.limit.is_some_and(|v| v > ceiling.max) => refuse(format!(
                    "limit `{}`: {} is above the customer's ceiling of {} for {} (what `{customer}` bought); only the operator raises a ceiling",
                    limit.id,
                    limit.limit.unwrap_or_default(),
                    ceiling.max,
                    ceiling.describe()
                )),
                Some(ceiling) if !after.iter().any(|l| holds_ceiling(l, ceiling, top)) => {
                    refuse(format!(
                        "limit `{}`: no enforced limit on `{}` holds the ceiling for {}, so this one could let usage past what `{customer}` bought (one counter per user or per scope, each up to the ceiling); ask the operator for a limit on `{}`",
                        limit.id,
                        top.unwrap_or_default(),
                        ceiling.describe(),
                        top.unwrap_or_default()
                    ))
                }
                Some(_) => Ok(()),
                None => refuse(format!(
                    "limit `{}`: no ceiling covers {} {}{}, so it can only be lowered; ask the operator for a ceiling",
                    limit.id,
                    limit.feature,
                    limit.kind.as_str(),
                    [&limit.period, &limit.window]
                        .into_iter()
                        .flatten()
                        .map(|p| format!(" {p}"))
                        .collect::<String>()
                )),
            }
        }
        AdminOp::DeleteLimit { id, .. } => {
            let Some(limit) = c.limits.iter().find(|l| &l.id == id) else {
                return Err(AdminError::NotFound(format!(
                    "limit `{id}` of customer `{customer}`"
                )));
            };
            let top = limit
                .entity
                .as_deref()
                .is_some_and(|e| c.entities.iter().any(|x| x.id == e && x.parent.is_none()));
            if top {
                return refuse(format!(
                    "limit `{id}` is on `{}`, the customer's top entity: it stands for what was bought; lower it instead",
                    limit.entity.as_deref().unwrap_or_default()
                ));
            }
            if covering(limit).is_none() {
                return refuse(format!(
                    "limit `{id}`: no ceiling covers it, so removing it could let usage past what was bought; lower it instead"
                ));
            }
            Ok(())
        }
        AdminOp::PutAlertRule { .. }
        | AdminOp::DeleteAlertRule { .. }
        | AdminOp::PutWebhook { .. }
        | AdminOp::DeleteWebhook { .. }
        | AdminOp::AddApiKey { .. }
        | AdminOp::DeleteApiKey { .. } => Ok(()),
        _ => refuse(format!(
            "only the operator changes a customer's {}s",
            op.target().0
        )),
    }
}

/// One admin change as the store keeps it: the change, who made it and when, and the object
/// it changed before and after (secrets hidden). The list of these is the audit log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Logged {
    pub op: AdminOp,
    pub by: String,
    /// Milliseconds since the epoch.
    pub at: i64,
    #[serde(default)]
    pub before: Option<serde_json::Value>,
    #[serde(default)]
    pub after: Option<serde_json::Value>,
}

/// A stored entry: logged, or a bare change kept before changes were logged.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Stored {
    Logged(Logged),
    Bare(AdminOp),
}

#[derive(Debug)]
struct State {
    /// The model sections of the config file.
    base: ConfigDoc,
    /// Admin changes in force, in order, with who made them.
    ops: Vec<Logged>,
    /// `base` with `ops` applied: what the engine's model was built from.
    current: ConfigDoc,
    /// The store's revision of `ops` (see `AdminLog::save`).
    revision: u64,
    /// The API keys customers' admins made in `current`, by key id: the customer, the role and
    /// the digest. Kept with `current` so authenticating a key is a lookup, not a scan of every
    /// customer.
    keys: HashMap<String, (String, Role, String)>,
}

/// The index of customer-made API keys of `doc` (see `State::keys`).
fn key_index(doc: &ConfigDoc) -> HashMap<String, (String, Role, String)> {
    doc.customers
        .iter()
        .flat_map(|c| {
            c.api_keys
                .iter()
                .map(|k| (k.id.clone(), (c.id.clone(), k.role, k.sha256.clone())))
        })
        .collect()
}

/// The model document and its admin changes. Changes are serialised by one async lock held
/// across their store calls; the state lock is only held to read or swap the documents, and
/// decisions take neither (they read the engine's model).
#[derive(Debug)]
pub struct Catalog {
    state: Mutex<State>,
    changing: tokio::sync::Mutex<()>,
}

/// Stores the whole list of admin changes if the kept list is still at revision `base` (they
/// are few; rewriting keeps the stored list exactly the list in force). The new revision.
async fn save(engine: &Engine, ops: &[Logged], base: u64) -> Result<u64, AdminError> {
    let encoded = ops
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Unavailable(format!("cannot encode an admin change: {e}")))?;
    Ok(engine.store().admin_log().save(&encoded, base).await?)
}

/// Admin changes as a store keeps them, decoded.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    pub ops: Vec<Logged>,
    pub revision: u64,
    /// Entries that no longer parse, named; they are skipped.
    pub skipped: Vec<String>,
}

/// Reads the admin changes a store kept. An entry that no longer parses is skipped and named.
pub async fn load(engine: &Engine) -> Result<Kept, StoreError> {
    let kept = engine.store().admin_log().load().await?;
    let mut out = Kept {
        revision: kept.revision,
        ..Kept::default()
    };
    for (i, bytes) in kept.entries.iter().enumerate() {
        match serde_json::from_slice::<Stored>(bytes) {
            Ok(Stored::Logged(l)) => out.ops.push(l),
            Ok(Stored::Bare(op)) => out.ops.push(Logged {
                op,
                by: "unknown".into(),
                at: 0,
                before: None,
                after: None,
            }),
            Err(e) => out
                .skipped
                .push(format!("stored admin change {i} skipped: {e}")),
        }
    }
    Ok(out)
}

/// Names admin changes in validation errors, where a file name would be.
const ADMIN_SOURCE: &str = "admin change";

/// The kinds of object whose admin changes can be dropped to bring back the file's version.
/// API keys are revoked, not restored; grants are credit history and stay.
pub const RESTORABLE: [&str; 4] = ["limit", "entity", "alert", "webhook"];

/// An object admin changes changed on top of the file (see [`Catalog::overrides`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub customer: String,
    pub kind: &'static str,
    pub id: String,
    /// The file's version (`None`: the file does not have it; a change made it).
    pub file: Option<serde_json::Value>,
    /// The version in force (`None`: a change deleted it).
    pub in_force: Option<serde_json::Value>,
    pub changes: usize,
    pub last_by: String,
    /// Milliseconds since the epoch.
    pub last_at: i64,
}

impl std::fmt::Display for Override {
    /// One line for the reload log: what stays over the file and how to drop it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match (&self.file, &self.in_force) {
            (Some(_), Some(_)) => "changed",
            (None, _) => "added",
            (Some(_), None) => "deleted",
        };
        write!(
            f,
            "{} `{}` of `{}` {state} by admin changes ({}, last by {}): they win over the file's version until dropped (DELETE /v1/customers/{}/overrides/{}/{})",
            self.kind,
            self.id,
            self.customer,
            self.changes,
            self.last_by,
            self.customer,
            self.kind,
            self.id
        )
    }
}

/// Attempts at an admin change while other replicas keep saving theirs first.
const SAVE_ATTEMPTS: usize = 5;

impl Catalog {
    pub fn new(base: ConfigDoc) -> Self {
        Self {
            state: Mutex::new(State {
                keys: key_index(&base),
                current: base.clone(),
                base,
                ops: Vec::new(),
                revision: 0,
            }),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the current document.
    pub fn read<R>(&self, f: impl FnOnce(&ConfigDoc) -> R) -> R {
        f(&self.state.lock().current)
    }

    /// Applies `op`, validates the whole result and puts the new model in force for the next
    /// decision; or changes nothing and says why. If another replica saved admin changes
    /// meanwhile, theirs are taken in first and `op` is applied on top of them.
    pub async fn apply(&self, engine: &Engine, op: AdminOp) -> Result<(), AdminError> {
        self.apply_as(engine, op, &Principal::Operator, "operator", 0)
            .await
    }

    /// [`Catalog::apply`] for `by` at `now` (ms): a customer admin's change must also pass
    /// [`customer_admin_guard`] against the document it lands on; the change is logged with
    /// who made it (`who`: the principal, and the key it presented), when, and its object
    /// before and after.
    pub async fn apply_as(
        &self,
        engine: &Engine,
        op: AdminOp,
        by: &Principal,
        who: &str,
        now: i64,
    ) -> Result<(), AdminError> {
        let _changing = self.changing.lock().await;
        self.save_in_force(engine, |_base, current, mut ops| {
            let mut next = current.clone();
            match by {
                Principal::Operator => {}
                Principal::Customer(c, Role::Admin) => customer_admin_guard(&next, c, &op)?,
                _ => {
                    return Err(AdminError::Refused(
                        "this key cannot change the model".into(),
                    ));
                }
            }
            let before = subject(&next, &op);
            op.apply(&mut next)?;
            ops.push(Logged {
                after: subject(&next, &op),
                before,
                op: op.clone(),
                by: who.to_string(),
                at: now,
            });
            Ok((next, ops))
        })
        .await
    }

    /// Drops every admin change in force to `kind` `id` of `customer`, so the file's version of
    /// it applies again (an object the changes made goes; one they deleted comes back). A
    /// customer's admin may drop only changes its own customer's keys made: one the operator
    /// made stands until the operator drops it. Returns how many changes were dropped.
    pub async fn restore(
        &self,
        engine: &Engine,
        customer: &str,
        kind: &str,
        id: &str,
        by: &Principal,
    ) -> Result<usize, AdminError> {
        if !RESTORABLE.contains(&kind) {
            return Err(AdminError::NotFound(format!(
                "kind `{kind}` (restorable: {})",
                RESTORABLE.join(", ")
            )));
        }
        let _changing = self.changing.lock().await;
        let mut dropped = 0;
        self.save_in_force(engine, |base, _current, ops| {
            let touches =
                |l: &Logged| l.op.customer() == Some(customer) && l.op.target() == (kind, id);
            let mine = format!("{customer}:");
            match by {
                Principal::Operator => {}
                Principal::Customer(c, Role::Admin) if c == customer => {
                    if let Some(l) = ops.iter().find(|l| touches(l) && !l.by.starts_with(&mine)) {
                        return Err(AdminError::Refused(format!(
                            "{kind} `{id}` was changed by {}; only the operator can restore the file's version",
                            l.by
                        )));
                    }
                }
                _ => {
                    return Err(AdminError::Refused(format!(
                        "this key cannot restore `{customer}`'s configuration"
                    )));
                }
            }
            let (gone, kept): (Vec<Logged>, Vec<Logged>) = ops.into_iter().partition(touches);
            if gone.is_empty() {
                return Err(AdminError::NotFound(format!(
                    "an admin change to {kind} `{id}` of `{customer}`"
                )));
            }
            dropped = gone.len();
            let mut next = base.clone();
            for l in &kept {
                // A later change that needs the dropped one (a limit on an entity it made)
                // cannot stand without it: nothing is dropped, and the reason is given.
                l.op.apply(&mut next).map_err(|e| {
                    AdminError::Refused(format!(
                        "cannot restore {kind} `{id}`: the admin change to {} `{}` depends on it ({e})",
                        l.op.target().0,
                        l.op.target().1
                    ))
                })?;
            }
            Ok((next, kept))
        })
        .await?;
        Ok(dropped)
    }

    /// Every object admin changes changed on top of the file, of one customer or all: what
    /// the file says, what is in force, and who changed it last.
    pub fn overrides(&self, customer: Option<&str>) -> Vec<Override> {
        let state = self.state.lock();
        let mut out: Vec<Override> = Vec::new();
        for l in &state.ops {
            let (kind, id) = l.op.target();
            let Some(c) = l.op.customer() else { continue };
            if !RESTORABLE.contains(&kind) || customer.is_some_and(|x| x != c) {
                continue;
            }
            match out
                .iter_mut()
                .find(|o| o.customer == c && o.kind == kind && o.id == id)
            {
                Some(o) => {
                    o.changes += 1;
                    o.last_by.clone_from(&l.by);
                    o.last_at = l.at;
                }
                None => out.push(Override {
                    customer: c.to_string(),
                    kind,
                    id: id.to_string(),
                    file: subject(&state.base, &l.op),
                    in_force: subject(&state.current, &l.op),
                    changes: 1,
                    last_by: l.by.clone(),
                    last_at: l.at,
                }),
            }
        }
        out
    }

    /// Saves the admin changes that `change` makes of those in force and puts them in force
    /// for the next decision. `change` gets the file's document, the document in force and the
    /// changes in force, and returns the next document and changes; if another replica saved
    /// admin changes meanwhile, theirs are taken in and `change` runs again on them. Called
    /// with `changing` held.
    async fn save_in_force(
        &self,
        engine: &Engine,
        mut change: impl FnMut(
            &ConfigDoc,
            &ConfigDoc,
            Vec<Logged>,
        ) -> Result<(ConfigDoc, Vec<Logged>), AdminError>,
    ) -> Result<(), AdminError> {
        for _ in 0..SAVE_ATTEMPTS {
            let (base, current, ops, revision) = {
                let state = self.state.lock();
                (
                    state.base.clone(),
                    state.current.clone(),
                    state.ops.clone(),
                    state.revision,
                )
            };
            let (next, ops) = change(&base, &current, ops)?;
            let model = build_model(&next, ADMIN_SOURCE).map_err(AdminError::Invalid)?;
            // Stored before it takes effect: a change the store could not keep is refused.
            match save(engine, &ops, revision).await {
                Ok(revision) => {
                    engine.replace_model(model).await?;
                    let mut state = self.state.lock();
                    state.keys = key_index(&next);
                    state.current = next;
                    state.ops = ops;
                    state.revision = revision;
                    return Ok(());
                }
                Err(AdminError::Store(StoreError::AdminMoved(_))) => {
                    let kept = load(engine).await?;
                    self.put_in_force(engine, None, kept.ops, kept.revision, false)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!(
            "other replicas saved admin changes first {SAVE_ATTEMPTS} times in a row; try again"
        ))
        .into())
    }

    /// Puts admin changes kept by the store (from before a restart, or saved by another
    /// replica) back on the base document. Changes that no longer apply are dropped and
    /// returned as messages.
    pub async fn replay(&self, engine: &Engine, kept: Kept) -> Result<Vec<String>, AdminError> {
        let _changing = self.changing.lock().await;
        self.put_in_force(engine, None, kept.ops, kept.revision, false)
            .await
    }

    /// Takes in the admin changes another replica saved, if the store's revision moved past
    /// this catalog's. Returns whether it did. For stores that only this process changes, a
    /// no-op.
    pub async fn follow(&self, engine: &Engine) -> Result<bool, AdminError> {
        let Some(revision) = engine.store().admin_log().revision().await? else {
            return Ok(false);
        };
        if revision == self.state.lock().revision {
            return Ok(false);
        }
        let _changing = self.changing.lock().await;
        let kept = load(engine).await?;
        if kept.revision == self.state.lock().revision {
            return Ok(false);
        }
        for s in &kept.skipped {
            tracing::warn!("{s}");
        }
        let dropped = self
            .put_in_force(engine, None, kept.ops, kept.revision, false)
            .await?;
        for d in dropped {
            tracing::warn!("{d}");
        }
        Ok(true)
    }

    /// Puts a new base document (a reloaded file) in force with the admin changes replayed on
    /// it. A change that no longer applies (its customer is gone) is dropped and returned as
    /// a message. If the result is invalid, nothing changes.
    pub async fn rebase(
        &self,
        engine: &Engine,
        base: ConfigDoc,
    ) -> Result<Vec<String>, AdminError> {
        let _changing = self.changing.lock().await;
        let (ops, revision) = {
            let state = self.state.lock();
            (state.ops.clone(), state.revision)
        };
        self.put_in_force(engine, Some(base), ops, revision, true)
            .await
    }

    /// Builds the model from `base` (or the current base) with `ops` replayed, and puts it in
    /// force. Ops that no longer apply are dropped (and, with `save_dropped`, the shorter list
    /// is stored). Called with `changing` held.
    async fn put_in_force(
        &self,
        engine: &Engine,
        base: Option<ConfigDoc>,
        ops: Vec<Logged>,
        mut revision: u64,
        save_dropped: bool,
    ) -> Result<Vec<String>, AdminError> {
        let base = base.unwrap_or_else(|| self.state.lock().base.clone());
        let mut next = base.clone();
        let mut kept = Vec::with_capacity(ops.len());
        let mut dropped = Vec::new();
        for logged in ops {
            match logged.op.apply(&mut next) {
                Ok(()) => kept.push(logged),
                Err(e) => dropped.push(format!("admin change dropped on reload: {e}")),
            }
        }
        let model = build_model(&next, ADMIN_SOURCE).map_err(AdminError::Invalid)?;
        if save_dropped && !dropped.is_empty() {
            revision = save(engine, &kept, revision).await?;
        }
        engine.replace_model(model).await?;
        *self.state.lock() = State {
            base,
            ops: kept,
            keys: key_index(&next),
            current: next,
            revision,
        };
        Ok(dropped)
    }

    /// How many admin changes are in force on top of the file.
    pub fn admin_changes(&self) -> usize {
        self.state.lock().ops.len()
    }

    /// The principal of a key a customer's admin made, if `token` is one (compared over its
    /// digest in constant time).
    pub fn customer_key(&self, token: &str) -> Option<Principal> {
        let (id, _) = token.split_once('.')?;
        let state = self.state.lock();
        let (customer, role, digest) = state.keys.get(id)?;
        crate::auth::key_matches(token, digest)
            .then(|| Principal::Customer(customer.clone(), *role))
    }

    /// The audit log: the admin changes in force, oldest first, for one customer or all.
    pub fn audit(&self, customer: Option<&str>) -> Vec<Logged> {
        self.state
            .lock()
            .ops
            .iter()
            .filter(|l| customer.is_none() || l.op.customer() == customer)
            .cloned()
            .collect()
    }

    /// The file's own document, without admin changes.
    pub fn base(&self) -> ConfigDoc {
        self.state.lock().base.clone()
    }
}
