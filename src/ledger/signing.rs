//! The ledger's Ed25519 key: signed checkpoints (C2SP tlog-checkpoint in a C2SP signed note)
//! and response receipts.
//!
//! The key is a C2SP signed-note private key string, `PRIVATE+KEY+<name>+<hex id>+<base64(0x01
//! || seed)>`, from the environment variable `tlog.key_env` or the file `tlog.key_file`
//! (created with mode 0600 by `teachd keys init`, or on first start when `tlog.generate_key`).
//! Its public half is published as the verifier key `<name>+<hex id>+<base64(0x01 || public
//! key)>`, where the id is the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key).

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use base64::prelude::{Engine as _, BASE64_STANDARD};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use signed_note::{Note, Signer as _, StandardSigner, StandardVerifier, VerifierList};
use tlog_tiles::{Checkpoint, Hash};

use crate::config::TlogConfig;

/// Domain line of the bytes a receipt signs.
pub const RECEIPT_DOMAIN: &str = "teachd-receipt/v1";

/// The log's identity and key.
pub struct LogKey {
    origin: String,
    signer: StandardSigner,
    key: SigningKey,
    verifier_key: String,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKey")
            .field("origin", &self.origin)
            .field("verifier_key", &self.verifier_key)
            .finish_non_exhaustive()
    }
}

impl LogKey {
    /// From a private key string.
    pub fn from_private(origin: &str, skey: &str) -> anyhow::Result<LogKey> {
        let skey = skey.trim();
        let signer = StandardSigner::new(skey)
            .map_err(|e| anyhow::anyhow!("invalid ledger signing key: {e}"))?;
        let name = signer.name().to_string();
        // Base64 may itself hold `+`: the key is everything after the fourth separator.
        let b64 = skey.splitn(5, '+').nth(4).unwrap_or_default();
        let raw = BASE64_STANDARD.decode(b64).context("ledger signing key")?;
        let seed: [u8; 32] = raw
            .get(1..)
            .and_then(|s| s.try_into().ok())
            .context("ledger signing key: not an Ed25519 seed")?;
        let key = SigningKey::from_bytes(&seed);
        let verifier_key = signed_note::new_ed25519_verifier_key(&name, &key.verifying_key());
        Ok(LogKey {
            origin: origin.to_string(),
            signer,
            key,
            verifier_key,
        })
    }

    /// Loads the key as configured (environment, then file), creating the file when allowed.
    pub fn load(cfg: &TlogConfig) -> anyhow::Result<LogKey> {
        if let Ok(skey) = std::env::var(&cfg.key_env) {
            if !skey.trim().is_empty() {
                return LogKey::from_private(&cfg.origin, &skey)
                    .with_context(|| format!("the key in ${}", cfg.key_env));
            }
        }
        let path = &cfg.key_file;
        match std::fs::read_to_string(path) {
            Ok(skey) => {
                warn_if_readable_by_others(path);
                LogKey::from_private(&cfg.origin, &skey)
                    .with_context(|| format!("the key in {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && cfg.generate_key => {
                match init_key_file(path, &cfg.origin) {
                    Ok(vkey) => tracing::warn!(path = %path.display(), verifier_key = %vkey,
                        "generated a new ledger signing key (tlog.generate_key): keep it safe, \
                         it signs every checkpoint and receipt of this log"),
                    // Another process won the race to create it: use that one.
                    Err(e) if e.is::<KeyExists>() => {}
                    Err(e) => return Err(e),
                }
                let skey = std::fs::read_to_string(path)?;
                LogKey::from_private(&cfg.origin, &skey)
            }
            Err(e) => Err(e).with_context(|| {
                format!(
                    "reading the ledger signing key {} (create one with `teachd keys init`, or \
                     set ${})",
                    path.display(),
                    cfg.key_env
                )
            }),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The published verifier key string.
    pub fn verifier_key(&self) -> &str {
        &self.verifier_key
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// A signed checkpoint of the tree of `size` leaves with root `root`.
    pub fn sign_checkpoint(&self, size: u64, root: [u8; 32]) -> anyhow::Result<String> {
        let cp = Checkpoint::new(&self.origin, size, Hash(root), "")
            .map_err(|e| anyhow::anyhow!("checkpoint: {e}"))?;
        let mut note = Note::new(&cp.to_bytes(), &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| anyhow::anyhow!("signing the checkpoint: {e}"))?;
        String::from_utf8(note.to_bytes()).context("checkpoint text")
    }

    /// Ed25519 signature (64 bytes) over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }
}

/// A checkpoint whose signature verified under `verifier_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedCheckpoint {
    pub origin: String,
    pub size: u64,
    pub root: [u8; 32],
}

/// Why a checkpoint was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("not a signed note or not a checkpoint: {0}")]
    Malformed(String),
    #[error("no valid signature by the ledger's key: {0}")]
    BadSignature(String),
}

/// Verifies a checkpoint's signature by the key `verifier_key` and parses it.
pub fn open_checkpoint(
    verifier_key: &str,
    text: &str,
) -> Result<OpenedCheckpoint, CheckpointError> {
    let verifier = StandardVerifier::new(verifier_key)
        .map_err(|e| CheckpointError::Malformed(format!("verifier key: {e}")))?;
    let note =
        Note::from_bytes(text.as_bytes()).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    note.verify(&VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| CheckpointError::BadSignature(e.to_string()))?;
    let cp = Checkpoint::from_bytes(note.text())
        .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    Ok(OpenedCheckpoint {
        origin: cp.origin().to_string(),
        size: cp.size(),
        root: cp.hash().0,
    })
}

/// What a receipt states: the row of a response and the hashes of the exact bytes exchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptFields {
    pub leaf_index: u64,
    pub row_hash: [u8; 32],
    pub request_sha256: [u8; 32],
    pub response_sha256: [u8; 32],
    /// The row's timestamp, RFC 3339 in UTC with microseconds.
    pub ts: String,
}

impl ReceiptFields {
    /// The bytes the signature covers: seven lines, each ending in `\n`: the domain
    /// `teachd-receipt/v1`, the log's origin, the leaf index in decimal, then `row_hash`,
    /// `request_sha256` and `response_sha256` in standard base64, then `ts`.
    pub fn signed_bytes(&self, origin: &str) -> Vec<u8> {
        format!(
            "{RECEIPT_DOMAIN}\n{origin}\n{}\n{}\n{}\n{}\n{}\n",
            self.leaf_index,
            BASE64_STANDARD.encode(self.row_hash),
            BASE64_STANDARD.encode(self.request_sha256),
            BASE64_STANDARD.encode(self.response_sha256),
            self.ts
        )
        .into_bytes()
    }

    /// The `x-teachd-receipt` value: base64 of the JSON receipt.
    pub fn seal(&self, key: &LogKey) -> String {
        let sig = key.sign(&self.signed_bytes(key.origin()));
        let json = serde_json::json!({
            "leaf_index": self.leaf_index,
            "row_hash": BASE64_STANDARD.encode(self.row_hash),
            "request_sha256": BASE64_STANDARD.encode(self.request_sha256),
            "response_sha256": BASE64_STANDARD.encode(self.response_sha256),
            "ts": self.ts,
            "signature": BASE64_STANDARD.encode(sig),
        });
        BASE64_STANDARD.encode(json.to_string())
    }
}

/// Opens an `x-teachd-receipt` value and checks its signature (what a client does).
pub fn open_receipt(
    public_key: &VerifyingKey,
    origin: &str,
    header: &str,
) -> Result<ReceiptFields, String> {
    let json = BASE64_STANDARD
        .decode(header.trim())
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
    let b32 = |k: &str| -> Result<[u8; 32], String> {
        let s = v[k].as_str().ok_or(format!("{k} missing"))?;
        BASE64_STANDARD
            .decode(s)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|_| format!("{k} is not 32 bytes"))
    };
    let fields = ReceiptFields {
        leaf_index: v["leaf_index"].as_u64().ok_or("leaf_index missing")?,
        row_hash: b32("row_hash")?,
        request_sha256: b32("request_sha256")?,
        response_sha256: b32("response_sha256")?,
        ts: v["ts"].as_str().ok_or("ts missing")?.to_string(),
    };
    let sig = BASE64_STANDARD
        .decode(v["signature"].as_str().ok_or("signature missing")?)
        .map_err(|e| e.to_string())?;
    let sig = ed25519_dalek::Signature::from_slice(&sig).map_err(|e| e.to_string())?;
    public_key
        .verify(&fields.signed_bytes(origin), &sig)
        .map_err(|_| "the receipt's signature does not verify".to_string())?;
    Ok(fields)
}

/// Writes a new private key to `path` (mode 0600, never over an existing file); returns the
/// verifier key.
pub fn init_key_file(path: &Path, name: &str) -> anyhow::Result<String> {
    if !signed_note::is_key_name_valid(name) {
        bail!("`{name}` is not a valid key name (no spaces or `+`)");
    }
    let (skey, vkey) = signed_note::generate_key(&mut rand::rngs::OsRng, name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written to a private temporary file, then linked into place: the link fails if the key
    // exists (never replaced), and a reader never sees a half-written key.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".teachd-key-")
        .permissions(private())
        .tempfile_in(dir)
        .with_context(|| format!("creating a key file in {}", dir.display()))?;
    tmp.write_all(format!("{skey}\n").as_bytes())?;
    tmp.as_file().sync_all()?;
    match std::fs::hard_link(tmp.path(), path) {
        Ok(()) => Ok(vkey),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(KeyExists(path.into()).into())
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// `init_key_file` found a key already there.
#[derive(Debug, thiserror::Error)]
#[error("{} already exists: refusing to replace a log's key", .0.display())]
pub struct KeyExists(pub std::path::PathBuf);

fn private() -> std::fs::Permissions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o600)
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(".").expect("cwd").permissions()
    }
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(),
                    "the ledger signing key is readable by other users: chmod 600 it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LogKey {
        let (skey, _) = signed_note::generate_key(&mut rand::rngs::OsRng, "example.com/log");
        LogKey::from_private("example.com/log", &skey).unwrap()
    }

    #[test]
    fn checkpoints_are_c2sp_signed_notes() {
        let k = key();
        let text = k.sign_checkpoint(7, [9; 32]).unwrap();
        let mut lines = text.split('\n');
        assert_eq!(lines.next(), Some("example.com/log"));
        assert_eq!(lines.next(), Some("7"));
        assert_eq!(
            lines.next(),
            Some(BASE64_STANDARD.encode([9u8; 32]).as_str())
        );
        assert_eq!(lines.next(), Some(""));
        let sig = lines.next().unwrap();
        assert!(sig.starts_with("\u{2014} example.com/log "), "{sig}");
        let raw = BASE64_STANDARD
            .decode(sig.rsplit(' ').next().unwrap())
            .unwrap();
        assert_eq!(raw.len(), 4 + 64);
        let id = u32::from_str_radix(k.verifier_key().split('+').nth(1).unwrap(), 16).unwrap();
        assert_eq!(raw[..4], id.to_be_bytes());
        let opened = open_checkpoint(k.verifier_key(), &text).unwrap();
        assert_eq!((opened.size, opened.root), (7, [9; 32]));
        // Another key, or one changed byte, does not verify.
        assert!(matches!(
            open_checkpoint(key().verifier_key(), &text),
            Err(CheckpointError::BadSignature(_))
        ));
        let forged = text.replacen("\n7\n", "\n8\n", 1);
        assert!(open_checkpoint(k.verifier_key(), &forged).is_err());
    }

    #[test]
    fn receipts_verify_and_a_changed_bit_does_not() {
        let k = key();
        let r = ReceiptFields {
            leaf_index: 41,
            row_hash: [1; 32],
            request_sha256: [2; 32],
            response_sha256: [3; 32],
            ts: "2026-12-01T10:00:00.000001Z".into(),
        };
        let sealed = r.seal(&k);
        assert_eq!(
            open_receipt(&k.public_key(), k.origin(), &sealed).unwrap(),
            r
        );
        let mut json = BASE64_STANDARD.decode(&sealed).unwrap();
        let at = json.iter().position(|&b| b == b'4').unwrap(); // the leaf index 41
        json[at] ^= 1;
        assert!(open_receipt(&k.public_key(), k.origin(), &BASE64_STANDARD.encode(json)).is_err());
    }

    #[test]
    fn key_files_are_private_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/ledger.key");
        let vkey = init_key_file(&path, "teachd.test").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(init_key_file(&path, "teachd.test").is_err());
        let k = LogKey::from_private("o", &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(k.verifier_key(), vkey);
    }
}
