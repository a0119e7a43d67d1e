//! Config pieces every test config repeats: the organization → team → user entity types, and
//! a credential's SHA-256 as the config writes it.

/// The entity types of an organization → team → user tree: a config's `entityTypes:` section.
pub const ORG_TEAM_USER: &str = "entityTypes:
  - name: organization
  - name: team
    parents: [organization]
  - name: user
    parents: [team]
";

/// The SHA-256 of `secret` in hex, as `server.credentials` takes a token or key.
pub fn sha256_hex(secret: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}
