//! Auth tokens: claims signed with blake3's keyed hash under a server secret.
//!
//! A token is `hex(postcard(claims)) + "." + hex(keyed_hash(secret, postcard(claims)))`,
//! lowercase hex only, so each claims value has exactly one token string. The token is
//! signed, not encrypted: anyone holding it can read the claims.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Longest token [`verify`] looks at, in bytes; anything longer is refused before any work.
pub const TOKEN_LEN_MAX: usize = 8 << 10;

/// Longest secret file read, in bytes: 64 hex digits plus generous whitespace.
const SECRET_FILE_LEN_MAX: u64 = 4 << 10;

/// Length of the signature part of a token: a 32-byte hash in hex.
const MAC_HEX_LEN: usize = 64;

/// What can go wrong issuing or verifying a token, or loading a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not `hex.hex`, or its claims do not decode.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match: the token was altered or signed with another secret.
    #[error("token signature does not match (altered, or signed with another secret)")]
    BadSignature,
    /// The token was valid until `expired_at_ms`.
    #[error("token expired at {expired_at_ms} ms (unix), now is {now_ms} ms")]
    Expired {
        /// The claims' `expires_at_ms`.
        expired_at_ms: u64,
        /// The time it was checked against.
        now_ms: u64,
    },
    /// The token is longer than [`TOKEN_LEN_MAX`] bytes.
    #[error("token longer than {TOKEN_LEN_MAX} bytes")]
    TooLong,
    /// The secret is missing or not 64 hex digits.
    #[error("bad secret: {0}")]
    BadSecret(String),
    /// Reading the secret file failed.
    #[error("reading the secret file: {0}")]
    Io(#[from] std::io::Error),
}

/// A 32-byte server secret that signs tokens. Its `Debug` output hides the bytes.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    /// A fresh random secret from the operating system-seeded CSPRNG.
    pub fn generate() -> Secret {
        Secret(rand::random())
    }

    /// Parses 64 hex digits (either case) into a secret.
    pub fn from_hex(hex: &str) -> Result<Secret, TokenError> {
        let mut bytes = [0u8; 32];
        // Errors name lengths and positions, never the secret's characters.
        if hex.len() != 2 * bytes.len() {
            return Err(TokenError::BadSecret(format!(
                "expected 64 hex digits, got {} bytes",
                hex.len()
            )));
        }
        decode_hex_into(&hex.to_ascii_lowercase(), &mut bytes)
            .map_err(|at| TokenError::BadSecret(format!("not a hex digit at byte {at}")))?;
        Ok(Secret(bytes))
    }

    /// The secret as 64 lowercase hex digits, the form [`Secret::from_hex`] reads.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// Loads the secret's hex from `file` if given, else from the environment variable
    /// `env_var`. Surrounding whitespace (a trailing newline) is ignored.
    pub fn from_env_or_file(env_var: &str, file: Option<&Path>) -> Result<Secret, TokenError> {
        let hex = match file {
            Some(path) => {
                let mut text = String::new();
                // Bounded read: a wrong path to a huge file must not eat memory.
                std::fs::File::open(path)?
                    .take(SECRET_FILE_LEN_MAX)
                    .read_to_string(&mut text)?;
                text
            }
            None => std::env::var(env_var).map_err(|e| {
                TokenError::BadSecret(match e {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {env_var} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {env_var} is not unicode")
                    }
                })
            })?,
        };
        Secret::from_hex(hex.trim())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What a token asserts about its holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user the token was issued to.
    pub user_id: String,
    /// Unix time in milliseconds from which the token is refused.
    pub expires_at_ms: u64,
    /// Further user fields, for permission rules (`%%user.<name>`).
    pub extra: BTreeMap<String, String>,
}

/// Signs `claims` into a token.
///
/// Fails with [`TokenError::TooLong`] if the token would exceed [`TOKEN_LEN_MAX`], since
/// [`verify`] would refuse it.
pub fn issue(secret: &Secret, claims: &Claims) -> Result<String, TokenError> {
    let body = postcard::to_allocvec(claims)
        .map_err(|e| TokenError::Malformed(format!("cannot encode claims: {e}")))?;
    if 2 * body.len() + 1 + MAC_HEX_LEN > TOKEN_LEN_MAX {
        return Err(TokenError::TooLong);
    }
    let mac = blake3::keyed_hash(&secret.0, &body);
    let mut token = encode_hex(&body);
    token.push('.');
    token.push_str(&mac.to_hex());
    Ok(token)
}

/// Checks `token`'s signature under `secret`, decodes its claims and refuses them if
/// `now_ms >= expires_at_ms`.
pub fn verify(secret: &Secret, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
    if token.len() > TOKEN_LEN_MAX {
        return Err(TokenError::TooLong);
    }
    let (body_hex, mac_hex) = token
        .split_once('.')
        .ok_or_else(|| TokenError::Malformed("no '.' between claims and signature".into()))?;
    if mac_hex.len() != MAC_HEX_LEN {
        return Err(TokenError::Malformed(format!(
            "signature is {} hex digits, expected {MAC_HEX_LEN}",
            mac_hex.len()
        )));
    }
    let mut mac = [0u8; 32];
    decode_hex_into(mac_hex, &mut mac).map_err(|at| {
        TokenError::Malformed(format!("signature: not a lowercase hex digit at byte {at}"))
    })?;
    if body_hex.len() % 2 != 0 {
        return Err(TokenError::Malformed(format!(
            "claims: odd number of hex digits ({})",
            body_hex.len()
        )));
    }
    let mut body = vec![0u8; body_hex.len() / 2];
    decode_hex_into(body_hex, &mut body).map_err(|at| {
        TokenError::Malformed(format!("claims: not a lowercase hex digit at byte {at}"))
    })?;
    // blake3::Hash's PartialEq is constant-time, so timing does not leak the MAC.
    if blake3::keyed_hash(&secret.0, &body) != blake3::Hash::from_bytes(mac) {
        return Err(TokenError::BadSignature);
    }
    let (claims, rest) = postcard::take_from_bytes::<Claims>(&body)
        .map_err(|e| TokenError::Malformed(format!("claims do not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(TokenError::Malformed(format!(
            "{} trailing bytes after the claims",
            rest.len()
        )));
    }
    if now_ms >= claims.expires_at_ms {
        return Err(TokenError::Expired {
            expired_at_ms: claims.expires_at_ms,
            now_ms,
        });
    }
    Ok(claims)
}

/// Lowercase hex of `bytes`.
fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Decodes exactly `2 * out.len()` lowercase hex digits into `out`; on failure returns the
/// byte offset of the first bad digit (or `hex.len()` if the length is wrong).
fn decode_hex_into(hex: &str, out: &mut [u8]) -> Result<(), usize> {
    let hex = hex.as_bytes();
    if hex.len() != 2 * out.len() {
        return Err(hex.len());
    }
    for (i, (pair, byte)) in hex.chunks_exact(2).zip(out.iter_mut()).enumerate() {
        let hi = nibble(pair[0]).ok_or(2 * i)?;
        let lo = nibble(pair[1]).ok_or(2 * i + 1)?;
        *byte = (hi << 4) | lo;
    }
    Ok(())
}

/// The value of one lowercase hex digit.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW_MS: u64 = 1_700_000_000_000;

    fn secret() -> Secret {
        Secret::from_hex(&"0123456789abcdef".repeat(4)).unwrap()
    }

    fn claims(user_id: &str) -> Claims {
        Claims {
            user_id: user_id.into(),
            expires_at_ms: NOW_MS + 60_000,
            extra: BTreeMap::from([
                ("role".to_string(), "admin".to_string()),
                ("team".to_string(), "north".to_string()),
            ]),
        }
    }

    #[test]
    fn round_trip() {
        let c = claims("user-1");
        let t = issue(&secret(), &c).unwrap();
        assert_eq!(verify(&secret(), &t, NOW_MS).unwrap(), c);
    }

    #[test]
    fn unicode_user_id_round_trips() {
        let c = claims("Zoë 🐕 名前");
        let t = issue(&secret(), &c).unwrap();
        assert!(t.is_ascii());
        assert_eq!(verify(&secret(), &t, NOW_MS).unwrap(), c);
    }

    #[test]
    fn every_tampered_claims_digit_is_bad_signature() {
        let t = issue(&secret(), &claims("user-1")).unwrap();
        let dot = t.find('.').unwrap();
        for i in 0..dot {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let bad = String::from_utf8(b).unwrap();
            assert!(
                matches!(
                    verify(&secret(), &bad, NOW_MS),
                    Err(TokenError::BadSignature)
                ),
                "digit {i}"
            );
        }
    }

    #[test]
    fn tampered_signature_is_bad_signature() {
        let t = issue(&secret(), &claims("u")).unwrap();
        let mut b = t.into_bytes();
        let last = b.len() - 1;
        b[last] = if b[last] == b'0' { b'1' } else { b'0' };
        let bad = String::from_utf8(b).unwrap();
        assert!(matches!(
            verify(&secret(), &bad, NOW_MS),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn wrong_secret_is_bad_signature() {
        let t = issue(&secret(), &claims("u")).unwrap();
        assert!(matches!(
            verify(&Secret::generate(), &t, NOW_MS),
            Err(TokenError::BadSignature)
        ));
    }

    #[test]
    fn expired_at_and_after_the_deadline() {
        let c = claims("u");
        let t = issue(&secret(), &c).unwrap();
        assert!(verify(&secret(), &t, c.expires_at_ms - 1).is_ok());
        for now in [c.expires_at_ms, c.expires_at_ms + 1, u64::MAX] {
            match verify(&secret(), &t, now) {
                Err(TokenError::Expired {
                    expired_at_ms,
                    now_ms,
                }) => assert_eq!((expired_at_ms, now_ms), (c.expires_at_ms, now)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_malformed_or_too_long() {
        let good = issue(&secret(), &claims("u")).unwrap();
        let mac = good.split_once('.').unwrap().1.to_string();
        let upper = good.to_ascii_uppercase();
        let cases = [
            String::new(),
            ".".into(),
            "no dot here".into(),
            "abcd".into(),
            format!("abc.{mac}"),                            // odd claims hex
            format!("zz.{mac}"),                             // non-hex claims
            format!("{}.", good.split_once('.').unwrap().0), // empty signature
            format!("00.{}", &mac[..63]),                    // short signature
            format!("00.{mac}0"),                            // long signature
            format!("00.{mac}.00"),                          // two dots
            upper,                                           // tokens are lowercase only
            format!("é.{mac}"),                              // non-ASCII
        ];
        for t in &cases {
            assert!(
                matches!(verify(&secret(), t, NOW_MS), Err(TokenError::Malformed(_))),
                "{t:?}: {:?}",
                verify(&secret(), t, NOW_MS)
            );
        }
        let huge = "a".repeat(TOKEN_LEN_MAX + 1);
        assert!(matches!(
            verify(&secret(), &huge, NOW_MS),
            Err(TokenError::TooLong)
        ));
    }

    #[test]
    fn signed_but_undecodable_claims_are_malformed() {
        for body in [&[][..], &[0xff, 0xff][..], &[0, 0, 0, 7][..]] {
            let mac = blake3::keyed_hash(&secret().0, body);
            let t = format!("{}.{}", encode_hex(body), mac.to_hex());
            assert!(
                matches!(verify(&secret(), &t, NOW_MS), Err(TokenError::Malformed(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn issue_refuses_claims_too_big_to_verify() {
        let mut c = claims("u");
        c.extra.insert("blob".into(), "x".repeat(TOKEN_LEN_MAX));
        assert!(matches!(issue(&secret(), &c), Err(TokenError::TooLong)));
    }

    #[test]
    fn secret_hex_round_trip_and_checks() {
        let s = Secret::generate();
        assert_eq!(Secret::from_hex(&s.to_hex()).unwrap().0, s.0);
        assert_ne!(Secret::generate().0, s.0);
        let upper = s.to_hex().to_ascii_uppercase();
        assert_eq!(Secret::from_hex(&upper).unwrap().0, s.0);
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
            assert!(
                matches!(Secret::from_hex(bad), Err(TokenError::BadSecret(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn secret_debug_hides_the_bytes() {
        let s = secret();
        let shown = format!("{s:?}");
        assert_eq!(shown, "Secret(..)");
        let err = Secret::from_hex(&format!("{}zz", &s.to_hex()[..62])).unwrap_err();
        assert!(!err.to_string().contains("0123"), "{err}");
    }

    #[test]
    fn secret_from_file_ignores_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("  {}\n", secret().to_hex())).unwrap();
        let env = "FIELDLOG_TEST_SECRET_SHOULD_NOT_BE_READ";
        let s = Secret::from_env_or_file(env, Some(&path)).unwrap();
        assert_eq!(s.0, secret().0);
    }

    #[test]
    fn secret_missing_file_is_io_and_missing_env_is_bad_secret() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            Secret::from_env_or_file("X", Some(&missing)),
            Err(TokenError::Io(_))
        ));
        // Only read, never set: setting the environment races with other test threads.
        let env = "FIELDLOG_TEST_SECRET_NEVER_SET_4F1C";
        match Secret::from_env_or_file(env, None) {
            Err(TokenError::BadSecret(why)) => assert!(why.contains(env), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn random_strings_never_panic(s in ".{0,200}") {
            let _ = verify(&secret(), &s, NOW_MS);
        }

        #[test]
        fn random_hex_with_dot_never_panics(a in "[0-9a-f]{0,80}", b in "[0-9a-f]{0,80}") {
            let _ = verify(&secret(), &format!("{a}.{b}"), NOW_MS);
        }

        #[test]
        fn any_claims_round_trip(
            user_id in ".{0,40}",
            expires_at_ms in (NOW_MS + 1)..u64::MAX,
            extra in proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
        ) {
            let c = Claims { user_id, expires_at_ms, extra };
            let t = issue(&secret(), &c).unwrap();
            prop_assert_eq!(verify(&secret(), &t, NOW_MS).unwrap(), c);
        }
    }
}
