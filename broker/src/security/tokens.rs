//! Bearer tokens and their roles, read from `--token-file`.
//!
//! # The token file
//!
//! ```text
//! # From a # to the end of the line is a comment; blank lines are ignored.
//! # Each other line: a token and a role, separated by spaces or tabs,
//! # in either order (exactly one of the two is a role name).
//! 6f1c0d7e2a9b4c58a1d3e5f7b9c2d4e6   producer
//! worker   0b8e2f4a6c8d0e2f4a6b8c0d2e4f6a8b    # the example worker
//! 9a7c5e3f1b2d4c6e8a0b2d4f6a8c0e2f   admin
//! ```
//!
//! - Roles: `producer` (service `gantry.v1.Jobs`), `worker` (`gantry.v1.Worker`),
//!   `admin` (every service, `gantry.v1.Admin` included).
//! - A token is 16 to 512 visible ASCII characters without spaces (it
//!   travels in an HTTP header), not starting with `#`. One that is listed
//!   on several lines has all their roles (e.g. a worker that also enqueues
//!   follow-up jobs).
//! - Clients send `authorization: Bearer <token>`.
//!
//! The file is read at startup; an error names the line and stops the
//! broker. While it runs, the broker re-reads the file every
//! `--token-reload-interval` (default 5 s): a changed file takes effect for
//! new calls (streams already open stay open), so tokens rotate without a
//! restart — including when a Kubernetes Secret mounted as the file is
//! updated. A changed file that does not parse (or vanished) is logged and
//! ignored: the tokens loaded last stay in force.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

/// Shortest accepted token: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;
const MAX_TOKEN_LEN: usize = 512;

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Producer,
    Worker,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Producer, Role::Worker, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == text)
    }
}

/// Roles as a small bit set.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    fn bit(role: Role) -> u8 {
        1 << role as u8
    }

    pub fn with(self, role: Role) -> Roles {
        Roles(self.0 | Roles::bit(role))
    }

    /// Admin may do everything.
    pub fn allows(self, needed: Role) -> bool {
        self.0 & (Roles::bit(needed) | Roles::bit(Role::Admin)) != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Role::ALL.into_iter().filter(|r| self.0 & Roles::bit(*r) != 0).map(Role::name).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Known(Roles),
    Unknown,
}

/// The tokens of a token file.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, Roles)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Tokens").field("count", &self.entries.len()).finish()
    }
}

impl Tokens {
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries: Vec<(Vec<u8>, Roles)> = Vec::new();
        for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().take_while(|f| !f.starts_with('#')).collect();
            let [a, b] = fields[..] else {
                return Err(format!(
                    "line {number}: expected `<token> <role>`, found {} fields (a token cannot contain spaces)",
                    fields.len()
                ));
            };
            let (token, role) = match (Role::parse(a), Role::parse(b)) {
                (None, Some(role)) => (a, role),
                (Some(role), None) => (b, role),
                (Some(_), Some(_)) => {
                    return Err(format!("line {number}: both fields are role names; one must be the token"));
                }
                (None, None) => {
                    return Err(format!(
                        "line {number}: no role; one field must be producer, worker or admin (the other the token)"
                    ));
                }
            };
            if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len()) {
                return Err(format!(
                    "line {number}: the token has {} characters; tokens have {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN}",
                    token.len()
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("line {number}: the token must be visible ASCII characters only"));
            }
            match entries.iter_mut().find(|(t, _)| t == token.as_bytes()) {
                Some((_, roles)) => *roles = roles.with(role),
                None => entries.push((token.as_bytes().to_vec(), Roles::default().with(role))),
            }
        }
        if entries.is_empty() {
            return Err("lists no tokens; without --token-file the broker runs without authentication".into());
        }
        Ok(Tokens { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The roles of `token`. Compares against every entry in constant time
    /// per byte, so response times do not reveal how much of a guess matched.
    pub fn lookup(&self, token: &[u8]) -> Lookup {
        let mut found = Roles::default();
        for (known, roles) in &self.entries {
            if constant_time_eq(known, token) {
                found = *roles;
            }
        }
        if found == Roles::default() { Lookup::Unknown } else { Lookup::Known(found) }
    }

    /// A token with the admin role, if the file has one (a joining node
    /// uses it to call AddNode).
    pub fn admin_token(&self) -> Option<&[u8]> {
        self.entries.iter().find(|(_, roles)| roles.0 & Roles::bit(Role::Admin) != 0).map(|(t, _)| t.as_slice())
    }
}

/// The token file as the broker runs with it: the tokens loaded last, and
/// the bytes they came from (to notice a change).
pub struct TokenFile {
    path: PathBuf,
    loaded: RwLock<(Arc<Tokens>, Vec<u8>)>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile").field("path", &self.path).field("tokens", &self.tokens()).finish()
    }
}

/// What a reload found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// Now in force, with this many tokens.
    Changed(usize),
    /// The file changed but cannot be used; the previous tokens stay.
    Refused(String),
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        let bytes = read_token_file(path)?;
        let tokens = parse_token_bytes(path, &bytes)?;
        Ok(TokenFile { path: path.to_owned(), loaded: RwLock::new((Arc::new(tokens), bytes)) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tokens in force now.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// Re-reads the file and puts its tokens in force if it changed and
    /// parses; a broken file never locks every client out.
    pub fn reload(&self) -> Reload {
        let bytes = match read_token_file(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => return Reload::Refused(e),
        };
        if self.loaded.read().unwrap_or_else(|p| p.into_inner()).1 == bytes {
            return Reload::Unchanged;
        }
        match parse_token_bytes(&self.path, &bytes) {
            Ok(tokens) => {
                let count = tokens.len();
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(tokens), bytes);
                Reload::Changed(count)
            }
            Err(e) => Reload::Refused(e),
        }
    }
}

fn read_token_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn parse_token_bytes(path: &Path, bytes: &[u8]) -> Result<Tokens, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    Tokens::parse(text).map_err(|e| format!("{}: {e}", path.display()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "producer-token-0001";
    const W: &str = "worker-token-000002";
    const A: &str = "admin-token-0000003";

    #[test]
    fn a_changed_file_takes_effect_and_a_broken_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{P} producer\n")).unwrap();
        let file = TokenFile::load(&path).unwrap();
        assert_eq!(file.reload(), Reload::Unchanged);
        std::fs::write(&path, format!("{W} producer\n{A} admin\n")).unwrap();
        assert_eq!(file.reload(), Reload::Changed(2));
        assert_eq!(file.tokens().lookup(P.as_bytes()), Lookup::Unknown, "the rotated-out token still works");
        assert!(matches!(file.tokens().lookup(W.as_bytes()), Lookup::Known(_)));
        std::fs::write(&path, "half-written garbage\n").unwrap();
        let Reload::Refused(reason) = file.reload() else { panic!("a broken file was taken") };
        assert!(reason.contains("line 1"), "{reason}");
        assert!(matches!(file.tokens().lookup(W.as_bytes()), Lookup::Known(_)), "a broken file locked clients out");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(file.reload(), Reload::Refused(reason) if reason.contains("cannot read")));
        assert!(matches!(file.tokens().lookup(A.as_bytes()), Lookup::Known(_)));
    }

    #[test]
    fn either_order_comments_and_role_union() {
        let text = format!("# tokens\n\n{P} producer\n  worker\t{W}  \n{A} admin # ops\n{W} producer\n");
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(tokens.len(), 3);
        let Lookup::Known(roles) = tokens.lookup(P.as_bytes()) else { panic!("producer token unknown") };
        assert_eq!(roles.names(), ["producer"]);
        assert!(roles.allows(Role::Producer) && !roles.allows(Role::Worker) && !roles.allows(Role::Admin));
        let Lookup::Known(roles) = tokens.lookup(W.as_bytes()) else { panic!("worker token unknown") };
        assert_eq!(roles.names(), ["producer", "worker"]);
        let Lookup::Known(roles) = tokens.lookup(A.as_bytes()) else { panic!("admin token unknown") };
        assert!(Role::ALL.into_iter().all(|r| roles.allows(r)), "admin may do everything");
        assert_eq!(tokens.lookup(b"producer-token-0002"), Lookup::Unknown);
        assert_eq!(tokens.lookup(b""), Lookup::Unknown);
        assert_eq!(tokens.admin_token(), Some(A.as_bytes()));
        assert!(!format!("{tokens:?}").contains(P), "Debug never prints a token");
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, message) in [
            ("short producer", "line 1: the token has 5 characters"),
            ("producer-token-0001 operator", "line 1: no role"),
            ("admin worker", "line 1: both fields are role names"),
            ("# only a comment\n", "lists no tokens"),
            ("\n\nproducer-token-0001", "line 3: expected `<token> <role>`, found 1 fields"),
            ("producer-token-000é producer", "visible ASCII"),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(message), "{text:?}: {err}");
        }
    }
}
