//! The administering desk: admin changes (each checked against the ceilings a customer admin
//! is held to, and logged with who made it), reloads, and the admin log other replicas share.

use super::*;

/// What a reload did with the admin changes in force.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// Changes that no longer apply to the new file, dropped (as messages).
    pub dropped: Vec<String>,
    /// Objects admin changes still hold over the file.
    pub kept: Vec<crate::catalog::Override>,
    /// Of those, the ones whose version in the file this reload changed: the edit does not
    /// apply while the admin changes stand.
    pub shadowed: Vec<crate::catalog::Override>,
}

impl Service {
    /// Reads the config in force (file plus admin changes).
    pub fn read_config<R>(&self, f: impl FnOnce(&ConfigDoc) -> R) -> R {
        self.catalog.read(f)
    }

    /// The audit log of admin changes, for one customer or all.
    pub fn audit(&self, customer: Option<&str>) -> Vec<crate::catalog::Logged> {
        self.catalog.audit(customer)
    }

    /// How many admin changes are in force on top of the file.
    pub fn admin_changes(&self) -> usize {
        self.catalog.admin_changes()
    }

    /// Puts back the admin changes the store kept (from before a restart, or saved by another
    /// replica). Returns how many were restored; logs those that no longer apply.
    pub async fn restore_admin_changes(&self) -> Result<usize, AdminError> {
        let kept = crate::catalog::load(&self.engine).await?;
        for s in &kept.skipped {
            tracing::warn!("{s}");
        }
        if kept.ops.is_empty() && kept.revision == 0 {
            return Ok(0);
        }
        let n = kept.ops.len();
        let dropped = self.catalog.replay(&self.engine, kept).await?;
        for d in &dropped {
            tracing::warn!("{d}");
        }
        Ok(n - dropped.len())
    }

    /// Takes in admin changes another replica saved to a shared store; `true` if any were.
    pub async fn follow_admin_changes(&self) -> Result<bool, AdminError> {
        self.catalog.follow(&self.engine).await
    }

    /// Puts a reloaded config in force: the model (admin changes replayed on it), the
    /// credentials and the ext_authz mapping. On error nothing changes.
    pub async fn reload(&self, loaded: Loaded) -> Result<Reloaded, AdminError> {
        let before = self.catalog.overrides(None);
        let dropped = self.catalog.rebase(&self.engine, loaded.doc).await?;
        self.settings
            .store(Arc::new(Reloadable::from(&loaded.server)));
        let kept = self.catalog.overrides(None);
        // An object the file changed in this reload while admin changes hold it: the edit
        // does not apply, which the reload must say rather than pass over.
        let shadowed = kept
            .iter()
            .filter(|o| {
                before.iter().any(|b| {
                    (&b.customer, b.kind, &b.id) == (&o.customer, o.kind, &o.id) && b.file != o.file
                })
            })
            .cloned()
            .collect();
        Ok(Reloaded {
            dropped,
            kept,
            shadowed,
        })
    }

    /// The objects admin changes hold over the file (see [`crate::catalog::Override`]).
    pub fn overrides(&self, customer: Option<&str>) -> Vec<crate::catalog::Override> {
        self.catalog.overrides(customer)
    }

    /// Drops the admin changes to `kind` `id` of `customer`, so the file's version applies
    /// again; `by` (with API key `key`) is logged.
    pub async fn restore(
        &self,
        by: &Principal,
        key: Option<&str>,
        customer: &str,
        kind: &str,
        id: &str,
    ) -> Result<usize, AdminError> {
        let result = self
            .catalog
            .restore(&self.engine, customer, kind, id, by)
            .await;
        let who = match key {
            Some(k) => format!("{} (key {k})", by.describe()),
            None => by.describe(),
        };
        match &result {
            Ok(n) => tracing::info!(
                customer, kind, id, by = %who, changes_dropped = n,
                "admin changes dropped: the file's version applies again"
            ),
            Err(e) => tracing::info!(error = %e, "restoring the file's version refused"),
        }
        result
    }

    /// Applies an admin change; it is in force for the next decision.
    pub async fn admin(&self, op: AdminOp) -> Result<(), AdminError> {
        self.admin_as(&Principal::Operator, op).await
    }

    /// An admin change made by `by`: a customer admin's is held to the ceiling guard; every
    /// change is logged with who made it (the audit log).
    /// A change by `by`.
    pub async fn admin_as(&self, by: &Principal, op: AdminOp) -> Result<(), AdminError> {
        self.admin_by_key(by, None, op).await
    }

    /// A change by `by`, who presented API key `key` (if a customer's key): the audit log
    /// names both.
    pub async fn admin_by_key(
        &self,
        by: &Principal,
        key: Option<&str>,
        op: AdminOp,
    ) -> Result<(), AdminError> {
        let (kind, id) = op.target();
        let who = match key {
            Some(k) => format!("{} (key {k})", by.describe()),
            None => by.describe(),
        };
        let what = format!(
            "{} {kind} `{id}` of `{}` by {who}",
            op.action(),
            op.customer().unwrap_or("-"),
        );
        let result = self
            .catalog
            .apply_as(&self.engine, op, by, &who, self.now().millis())
            .await;
        match &result {
            Ok(()) => {
                tracing::info!(change = %what.chars().take(200).collect::<String>(), "admin change applied")
            }
            Err(e) => tracing::info!(error = %e, "admin change refused"),
        }
        result
    }
}
