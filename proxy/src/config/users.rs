//! Users for username/password authentication, from `--user NAME:PASS` and a users file.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;

use crate::socks5::auth::UserDb;

/// A problem with a credential given on the command line or in a users file.
#[derive(Debug, Error)]
pub enum CredentialError {
    /// A `NAME:PASS` value without a colon, or with an empty or over-long part.
    #[error("bad --user: {0}")]
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
    /// Authentication was asked for, but no user was given.
    #[error("the users file has no users")]
    NoUsers,
}

/// The users from `--user` specs and a users file; `None` when neither was given (no
/// authentication). Warns when the file is readable by every user of the machine.
pub fn load(specs: &[String], file: Option<&Path>) -> Result<Option<Arc<UserDb>>, CredentialError> {
    if specs.is_empty() && file.is_none() {
        return Ok(None);
    }
    let mut users = UserDb::default();
    for spec in specs {
        let (name, password) = split_credential(spec).map_err(CredentialError::Malformed)?;
        users.insert(name, password);
    }
    if let Some(path) = file {
        load_file(&mut users, path)?;
        warn_if_readable_by_others(path);
    }
    if users.is_empty() {
        return Err(CredentialError::NoUsers);
    }
    Ok(Some(Arc::new(users)))
}

/// Adds every `name:password` line of a users file; blank lines and `#` comments are skipped.
pub fn load_file(users: &mut UserDb, path: &Path) -> Result<(), CredentialError> {
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
        users.insert(name, password);
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "users file {} is readable by every user on this machine; chmod o-r it",
                path.display()
            );
        }
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
    fn specs_split_at_the_first_colon_and_bad_ones_are_explained() {
        let users = load(&["alice:pa:ss".into()], None)
            .expect("valid")
            .expect("users");
        assert!(users.verify(b"alice", b"pa:ss"));
        for bad in ["nocolon", ":pass", "name:", ""] {
            assert!(load(&[bad.into()], None).is_err(), "{bad}");
        }
        let long = format!("{}:x", "n".repeat(256));
        assert!(load(&[long], None).is_err());
        assert!(load(&[], None).expect("no auth").is_none());
    }

    #[test]
    fn users_file_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("proxy-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("users");
        std::fs::write(&path, "# users\nalice:one\n\nbob\n").expect("write");
        let err = load(&[], Some(&path)).expect_err("line 4 is bad");
        assert!(err.to_string().contains(":4:"), "{err}");
        std::fs::write(&path, "alice:one\r\nbob:two\n").expect("write");
        let users = load(&[], Some(&path)).expect("valid").expect("users");
        assert!(users.verify(b"bob", b"two") && users.verify(b"alice", b"one"));
        std::fs::write(&path, "# nobody\n").expect("write");
        assert!(matches!(
            load(&[], Some(&path)),
            Err(CredentialError::NoUsers)
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
