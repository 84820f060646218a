//! Username/password verification (RFC 1929), in constant time. Reading users from flags
//! and files is configuration: see `config::users`.

use subtle::{Choice, ConstantTimeEq};

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_exact_credentials() {
        let mut db = UserDb::default();
        db.insert("alice", "pa:ss");
        db.insert("bob", "x");
        assert!(db.verify(b"alice", b"pa:ss"));
        assert!(db.verify(b"bob", b"x"));
        assert!(!db.verify(b"alice", b"x"));
        assert!(!db.verify(b"bob", b"pa:ss"));
        assert!(!db.verify(b"alic", b"pa:ss"));
        assert!(!db.verify(b"", b""));
        db.insert("bob", "y");
        assert_eq!(db.len(), 2);
        assert!(!db.verify(b"bob", b"x") && db.verify(b"bob", b"y"));
    }
}
