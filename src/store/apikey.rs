//! The API key format: `tk_<30 base62 chars of randomness><6 base62 chars of checksum>`.
//!
//! The checksum (the first 32 bits of SHA-256 over the rest of the key) lets authentication
//! refuse mistyped or truncated keys without a database query. Only SHA-256 of the whole key is
//! stored (with a short display prefix); the plaintext exists only in the response that
//! issues it.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

// What a key may be used for. (No doc comment: it would become the OpenAPI description.)
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Teacher,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Teacher => "teacher",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "teacher" => Some(Scope::Teacher),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

const KEY_PREFIX: &str = "tk_";
const SECRET_LEN: usize = 30;
const CHECK_LEN: usize = 6;
/// `tk_` + secret + checksum.
pub const KEY_LEN: usize = KEY_PREFIX.len() + SECRET_LEN + CHECK_LEN;
/// Characters of the key kept as its display prefix (`tk_` + 8).
const DISPLAY_LEN: usize = KEY_PREFIX.len() + 8;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A well-formed API key. Its Debug shows only the display prefix; there is no Display, so a
/// key cannot end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}…)", self.prefix())
    }
}

impl ApiKey {
    /// A new random key (~178 bits from the OS-seeded CSPRNG).
    pub fn generate() -> ApiKey {
        let mut rng = rand::thread_rng();
        let mut key = String::with_capacity(KEY_LEN);
        key.push_str(KEY_PREFIX);
        for _ in 0..SECRET_LEN {
            key.push(BASE62[rng.gen_range(0..BASE62.len())] as char);
        }
        let check = checksum(&key);
        key.push_str(&check);
        ApiKey(key)
    }

    /// Checks the shape and the checksum; no database involved.
    pub fn parse(raw: &str) -> Option<ApiKey> {
        if raw.len() != KEY_LEN || !raw.starts_with(KEY_PREFIX) {
            return None;
        }
        let body = &raw.as_bytes()[KEY_PREFIX.len()..];
        if !body.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let (without_check, check) = raw.split_at(KEY_LEN - CHECK_LEN);
        let expected = checksum(without_check);
        if bool::from(expected.as_bytes().ct_eq(check.as_bytes())) {
            Some(ApiKey(raw.to_string()))
        } else {
            None
        }
    }

    /// What is stored and looked up: SHA-256 of the whole key.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// `tk_` and the first 8 characters: safe to show and store.
    pub fn prefix(&self) -> &str {
        &self.0[..DISPLAY_LEN]
    }

    /// The plaintext, for the single response that shows a new key.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

/// First 32 bits of SHA-256, as 6 base62 digits (62^6 > 2^32).
fn checksum(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ascii")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_parse_and_look_right() {
        for _ in 0..100 {
            let key = ApiKey::generate();
            let raw = key.expose_secret();
            assert_eq!(raw.len(), KEY_LEN);
            assert!(raw.starts_with("tk_"));
            assert_eq!(ApiKey::parse(raw).as_ref(), Some(&key));
            assert!(raw.starts_with(key.prefix()));
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = ApiKey::generate();
        let shown = format!("{key:?}");
        assert!(
            !shown.contains(&key.expose_secret()[DISPLAY_LEN..]),
            "{shown}"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let key = ApiKey::generate();
        let raw = key.expose_secret();
        assert!(ApiKey::parse("").is_none());
        assert!(ApiKey::parse(&raw[..KEY_LEN - 1]).is_none());
        assert!(ApiKey::parse(&format!("{raw}x")).is_none());
        assert!(ApiKey::parse(&raw.replacen("tk_", "sk_", 1)).is_none());
        let mut bad = raw.to_string();
        bad.replace_range(10..11, "!");
        assert!(ApiKey::parse(&bad).is_none());
    }

    proptest! {
        /// Any single mistyped character is caught by the checksum (or the alphabet check).
        #[test]
        fn one_typo_is_caught(pos in 3usize..KEY_LEN, c in proptest::char::range('0', 'z')) {
            let key = ApiKey::generate();
            let raw = key.expose_secret();
            prop_assume!(raw.as_bytes()[pos] as char != c);
            let mut typo = raw.to_string();
            typo.replace_range(pos..pos + 1, &c.to_string());
            // A 32-bit checksum lets ~1 in 4 billion through; proptest draws a few hundred.
            prop_assert!(ApiKey::parse(&typo).is_none());
        }
    }
}
