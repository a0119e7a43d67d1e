//! The decision model as a document: the config file's model sections plus the admin changes
//! made through the API, rebuilt and validated into the engine's model on every change.
//!
//! Admin changes are kept as an ordered list of operations over the file's document, so a
//! reload of the file replays them on the new base instead of losing them.

use parking_lot::Mutex;

use crate::config::dto::{ConfigDoc, CustomerDto, EntityDto, GrantDto, LimitDto, PriceTableDto};
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
            AdminOp::PutCustomer { customer, create } => put(
                &mut doc.customers,
                customer.clone(),
                |c| &c.id,
                *create,
                format!("customer `{}`", customer.id),
            ),
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
        }
    }
}

#[derive(Debug)]
struct State {
    /// The model sections of the config file.
    base: ConfigDoc,
    /// Admin changes in force, in order.
    ops: Vec<AdminOp>,
    /// `base` with `ops` applied: what the engine's model was built from.
    current: ConfigDoc,
    /// The store's revision of `ops` (see `AdminLog::save`).
    revision: u64,
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
async fn save(engine: &Engine, ops: &[AdminOp], base: u64) -> Result<u64, AdminError> {
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
    pub ops: Vec<AdminOp>,
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
        match serde_json::from_slice(bytes) {
            Ok(op) => out.ops.push(op),
            Err(e) => out
                .skipped
                .push(format!("stored admin change {i} skipped: {e}")),
        }
    }
    Ok(out)
}

/// Names admin changes in validation errors, where a file name would be.
const ADMIN_SOURCE: &str = "admin change";

/// Attempts at an admin change while other replicas keep saving theirs first.
const SAVE_ATTEMPTS: usize = 5;

impl Catalog {
    pub fn new(base: ConfigDoc) -> Self {
        Self {
            state: Mutex::new(State {
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
        let _changing = self.changing.lock().await;
        for _ in 0..SAVE_ATTEMPTS {
            let (mut next, mut ops, revision) = {
                let state = self.state.lock();
                (state.current.clone(), state.ops.clone(), state.revision)
            };
            op.apply(&mut next)?;
            let model = build_model(&next, ADMIN_SOURCE).map_err(AdminError::Invalid)?;
            ops.push(op.clone());
            // Stored before it takes effect: a change the store could not keep is refused.
            match save(engine, &ops, revision).await {
                Ok(revision) => {
                    engine.replace_model(model).await?;
                    let mut state = self.state.lock();
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
        ops: Vec<AdminOp>,
        mut revision: u64,
        save_dropped: bool,
    ) -> Result<Vec<String>, AdminError> {
        let base = base.unwrap_or_else(|| self.state.lock().base.clone());
        let mut next = base.clone();
        let mut kept = Vec::with_capacity(ops.len());
        let mut dropped = Vec::new();
        for op in ops {
            match op.apply(&mut next) {
                Ok(()) => kept.push(op),
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
            current: next,
            revision,
        };
        Ok(dropped)
    }

    /// How many admin changes are in force on top of the file.
    pub fn admin_changes(&self) -> usize {
        self.state.lock().ops.len()
    }

    /// The file's own document, without admin changes.
    pub fn base(&self) -> ConfigDoc {
        self.state.lock().base.clone()
    }
}
