//! Username/password credentials (RFC 1929): parsing, loading and constant-time checking.

use std::path::Path;

use subtle::{Choice, ConstantTimeEq};
use thiserror::Error;

/// A problem with a credential given on the command line or in a users file.
#[derive(Debug, Error)]
pub enum CredentialError {
    /// A `NAME:PASS` value without a colon, or with an empty or over-long part.
    #[error("{0}")]
    Malformed(String),
    /// A users file line that is not `name:password`.
    #[error("{path}:{line}: {reason}")]
    BadLine {
        /// The users file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The users file could not be read.
    #[error("cannot read users file {path}")]
    Unreadable {
        /// The users file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The users allowed to authenticate.
#[derive(Clone, Default)]
pub struct UserDb {
    users: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for UserDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print passwords, not even in debug output.
        f.debug_struct("UserDb")
            .field("users", &self.users.len())
            .finish()
    }
}

impl UserDb {
    /// Adds (or replaces) a user.
    pub fn insert(&mut self, name: &str, password: &str) {
        self.users.retain(|(n, _)| n.as_slice() != name.as_bytes());
        self.users
            .push((name.as_bytes().to_vec(), password.as_bytes().to_vec()));
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a name and password. Every user is compared, and each comparison takes time
    /// independent of where the bytes differ, so timing reveals neither which user nor how much
    /// of a password matched (only, as for any slice comparison, whether the lengths are equal).
    pub fn verify(&self, name: &[u8], password: &[u8]) -> bool {
        let mut found = Choice::from(0);
        for (user, pass) in &self.users {
            found |= user.as_slice().ct_eq(name) & pass.as_slice().ct_eq(password);
        }
        bool::from(found)
    }

    /// Adds a `NAME:PASS` credential as given to `--user`.
    pub fn add_spec(&mut self, spec: &str) -> Result<(), CredentialError> {
        let (name, password) = split_credential(spec).map_err(CredentialError::Malformed)?;
        self.insert(name, password);
        Ok(())
    }

    /// Adds every `name:password` line of a users file; blank lines and `#` comments are skipped.
    pub fn load_file(&mut self, path: &Path) -> Result<(), CredentialError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Unreadable {
            path: shown.clone(),
            source,
        })?;
        for (index, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (name, password) =
                split_credential(line).map_err(|reason| CredentialError::BadLine {
                    path: shown.clone(),
                    line: index + 1,
                    reason,
                })?;
            self.insert(name, password);
        }
        Ok(())
    }
}

/// Splits `name:password` at the first colon; both parts must be 1..=255 bytes.
fn split_credential(spec: &str) -> Result<(&str, &str), String> {
    let Some((name, password)) = spec.split_once(':') else {
        return Err("expected name:password (no colon found)".into());
    };
    for (what, value) in [("name", name), ("password", password)] {
        if value.is_empty() {
            return Err(format!("empty {what} in name:password"));
        }
        if value.len() > 255 {
            return Err(format!("{what} longer than 255 bytes (RFC 1929 limit)"));
        }
    }
    Ok((name, password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_exact_credentials() {
        let mut db = UserDb::default();
        db.add_spec("alice:pa:ss").expect("valid");
        db.add_spec("bob:x").expect("valid");
        assert!(db.verify(b"alice", b"pa:ss"));
        assert!(db.verify(b"bob", b"x"));
        assert!(!db.verify(b"alice", b"x"));
        assert!(!db.verify(b"bob", b"pa:ss"));
        assert!(!db.verify(b"alic", b"pa:ss"));
        assert!(!db.verify(b"", b""));
    }

    #[test]
    fn bad_specs_are_explained() {
        let mut db = UserDb::default();
        for bad in ["nocolon", ":pass", "name:", ""] {
            assert!(db.add_spec(bad).is_err(), "{bad}");
        }
        let long = format!("{}:x", "n".repeat(256));
        assert!(db.add_spec(&long).is_err());
    }

    #[test]
    fn users_file_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("proxy-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("users");
        std::fs::write(&path, "# users\nalice:one\n\nbob\n").expect("write");
        let err = UserDb::default()
            .load_file(&path)
            .expect_err("line 4 is bad");
        assert!(err.to_string().contains(":4:"), "{err}");
        std::fs::write(&path, "alice:one\r\nbob:two\n").expect("write");
        let mut db = UserDb::default();
        db.load_file(&path).expect("valid file");
        assert!(db.verify(b"bob", b"two") && db.verify(b"alice", b"one"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
