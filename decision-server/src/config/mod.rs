//! The YAML config: parsing, validation with file-and-path errors, and conversion to the model.

pub mod dto;
pub mod server;
mod validate;

pub use validate::build_model;

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use crate::core::model::Model;
use dto::*;

/// Hold TTL when the config names none.
pub const DEFAULT_HOLD_TTL: &str = "PT5M";

/// With no `server.storage.leases.ttl`, a slice lives this long in the store past what the
/// document's `holdTtl`, the skew and the return margin need: the time in which it takes new
/// decisions before its successor is due.
pub const LEASE_WINDOW_MS: i64 = 30_000;
/// Entities a customer may have created on the fly when the config names no maximum.
pub const DEFAULT_MAX_AUTO_ENTITIES: u32 = 10_000;
pub use crate::core::model::MAX_ID_LEN;

/// One problem in a config file: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// The YAML path, such as `customers[2].limits[0].period`; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads and validates the config file at `path`, and returns its decision model.
pub fn load_file(path: &Path) -> Result<Model, ConfigErrors> {
    Ok(load_path(path)?.model)
}

/// Parses and validates config `text`; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Model, ConfigErrors> {
    Ok(load(text, file)?.model)
}

/// A whole config file, validated: the document (the base admin changes apply to), the
/// decision model built from it, and the server settings.
#[derive(Debug)]
pub struct Loaded {
    pub doc: ConfigDoc,
    pub model: Model,
    pub server: server::ServerSettings,
}

/// Reads and validates the whole config file at `path`, server section included.
pub fn load_path(path: &Path) -> Result<Loaded, ConfigErrors> {
    load(&read_path(path)?, &path.display().to_string())
}

/// Reads a config file's text, naming the file if it cannot.
pub fn read_path(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })
}

/// Parses and validates the whole config `text`, server section included, reporting every
/// problem of both parts at once.
pub fn load(text: &str, file: &str) -> Result<Loaded, ConfigErrors> {
    let mut doc = parse_doc(text, file)?;
    let server_dto = doc.server.take().unwrap_or_default();
    let model = build_model(&doc, file);
    let customers: HashSet<&str> = doc.customers.iter().map(|c| c.id.as_str()).collect();
    let server = server::ServerSettings::from_dto(&server_dto, file, &customers);
    let ttl_given = server_dto
        .storage
        .leases
        .as_ref()
        .is_some_and(|l| l.ttl.is_some());
    match (model, server) {
        (Ok(model), Ok(mut server)) => {
            let margin = crate::core::lease::RETURN_MARGIN_MS;
            if let Some(t) = server.leases.as_mut()
                && !ttl_given
            {
                // No `ttl` given: long enough for the document's holds, with a window of
                // `LEASE_WINDOW_MS` in which a slice takes new decisions.
                t.ttl_ms = model.hold_ttl_millis + t.skew_ms + margin + LEASE_WINDOW_MS;
            }
            if let Some(t) = server.leases
                && t.ttl_ms - t.skew_ms - margin <= model.hold_ttl_millis
            {
                return Err(ConfigErrors(vec![ConfigError {
                    file: file.to_string(),
                    path: "server.storage.leases.ttl".into(),
                    message: format!(
                        "a lease usable for {} ms (ttl, less skew, less {margin} ms to give it back) cannot hold a decision whose hold lives {} ms (`holdTtl`): make the lease longer or the holds shorter",
                        t.ttl_ms - t.skew_ms - margin,
                        model.hold_ttl_millis
                    ),
                }]));
            }
            Ok(Loaded { doc, model, server })
        }
        (model, server) => {
            let mut errors = model.err().map(|e| e.0).unwrap_or_default();
            errors.extend(server.err().map(|e| e.0).unwrap_or_default());
            Err(ConfigErrors(errors))
        }
    }
}

/// Parses config `text` into its document, without validating what it means.
pub fn parse_doc(text: &str, file: &str) -> Result<ConfigDoc, ConfigErrors> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let doc: ConfigDoc = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // serde_path_to_error writes `?` for a segment it could not name (a syntax error).
        let path = path.trim_end_matches(".?").trim_end_matches('?');
        let path = if path == "." {
            String::new()
        } else {
            path.to_string()
        };
        let message = e.into_inner().to_string();
        // The YAML error may start with its own (shorter) path; ours is the precise one.
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => {
                rest.to_string()
            }
            _ => message,
        };
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            path,
            message,
        }])
    })?;
    Ok(doc)
}
