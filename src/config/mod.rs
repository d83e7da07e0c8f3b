//! Typed configuration, in three layers: the embedded default (`default.toml` next to this file,
//! the one place every default lives), a TOML file merged over it, then environment overrides
//! `TEACHD__SECTION__KEY=value` (array elements by index: `TEACHD__MODELS__0__MAX_TOP_K=64`).
//! Secrets are redacted in Debug.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub limits: DefaultLimits,
    pub ledger: LedgerConfig,
    pub engine: EngineConfig,
    pub tlog: TlogConfig,
    pub console: ConsoleConfig,
    pub batch: BatchConfig,
    /// The teacher models served. Several may be served at once.
    pub models: Vec<ModelConfig>,
}

/// The embedded default: the base layer of every configuration.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. `0.0.0.0:8080` in containers.
    pub bind: String,
    /// Largest accepted request body. Larger bodies get 413 before any parsing. Token-id bodies
    /// of a full 8k context are ~60 KiB, so the default leaves room for batched judgments.
    pub body_limit_bytes: usize,
    /// Wall-clock limit for one request (generation included). Long limits let slow CPU teachers
    /// finish; short ones free capacity from stuck clients sooner.
    pub request_timeout_secs: u64,
    /// Requests in flight across all clients before new ones get 503 `overloaded` instead of
    /// queueing without bound.
    pub max_in_flight: usize,
    /// Grace period on SIGTERM for in-flight requests (streams included) to finish. Connections
    /// still open after it are cut; their rows are still written (see `ledger_drain_secs`).
    pub shutdown_grace_secs: u64,
    /// After the grace period, how long shutdown waits for the rows of cut and finished
    /// requests to commit. A container's stop grace period must exceed
    /// `shutdown_grace_secs + ledger_drain_secs` (docker-compose.yml uses 50 s), or rows queued
    /// at the end are lost to SIGKILL.
    pub ledger_drain_secs: u64,
    /// Longest a client may take to send a request's headers. A slow-header client then loses
    /// its connection instead of holding it.
    pub header_read_timeout_secs: u64,
    /// Longest a client may take to send a request body, once admitted (408 after). A slow
    /// upload cannot hold its client's concurrency slot for long.
    pub body_read_timeout_secs: u64,
    /// Who may read `/metrics`: `open` (no key; route templates as labels, unmatched paths
    /// collapsed into one label), `admin` (an admin key), or `off`.
    pub metrics: MetricsAccess,
    /// For benchmarks and development only: teacher requests need no key and all run as one
    /// fixed `anonymous` client with the default limits (admin routes still need an admin
    /// key). Logs a loud warning at start. Never set this where clients can reach the server.
    pub disable_auth: bool,
}

/// The admin console at `/console` (src/console/).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve `/console`. Off removes the routes entirely (404), e.g. where admins must use the
    /// API only.
    pub enabled: bool,
    /// How long a sign-in lasts. Longer is convenient; shorter limits what a stolen cookie or
    /// an unattended browser can do. Sign-out ends a session at once.
    pub session_ttl_secs: u64,
    /// The cookie's `Secure` flag: `auto` sets it when the request came over TLS through a
    /// proxy (`X-Forwarded-Proto: https`), `always` always (use when every access is HTTPS),
    /// `never` never (plain-HTTP setups only).
    pub secure_cookie: SecureCookie,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecureCookie {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    #[default]
    Open,
    Admin,
    Off,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Postgres URL. May hold a password: it is redacted from Debug output and logs.
    pub url: String,
    /// Pool size. The ledger writer holds one connection; the rest serve auth and admin queries.
    pub max_connections: u32,
    /// Run migrations when `serve` starts (also available as `teachd migrate`).
    pub migrate_on_start: bool,
    /// Longest a query waits for a pooled connection. When the database is down, the first
    /// requests wait this long before they answer 503; later ones fail fast (see
    /// `outage_backoff_ms`). Short values fail fast; long ones ride out connection spikes.
    pub acquire_timeout_ms: u64,
    /// After a query failed because the database is down, requests that need it answer 503
    /// `service_unavailable` at once for this long, then one request probes it again.
    pub outage_backoff_ms: u64,
    /// URL of the role that owns the schema, used only to run migrations (`migrate_on_start`,
    /// `teachd migrate`, `admin bootstrap`). Empty: `url` runs them. Least privilege: `url`
    /// logs in as the runtime role `teachd_app`, which may append to the ledger but not
    /// change, delete or truncate it, nor disable its triggers; only this role owns the tables.
    pub migrate_url: String,
    /// What `serve` does when `url` logs in as a superuser or as the ledger's owner (either
    /// could rewrite the ledger): `warn` (log loudly) or `refuse` (do not start).
    pub privilege_check: PrivilegeCheck,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrivilegeCheck {
    Warn,
    Refuse,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("acquire_timeout_ms", &self.acquire_timeout_ms)
            .field("outage_backoff_ms", &self.outage_backoff_ms)
            .field("migrate_url", &redact_url(&self.migrate_url))
            .field("privilege_check", &self.privilege_check)
            .finish()
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Limits applied to clients that have no override of their own.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultLimits {
    /// Requests per minute.
    pub rpm: u32,
    /// Tokens per minute (prompt + scored/generated).
    pub tpm: u32,
    /// Requests in flight at once per client.
    pub max_concurrent: u32,
    /// Tokens per UTC day, persisted: survives restarts.
    pub daily_tokens: i64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Most rows in one group commit. Bigger batches mean fewer fsyncs under load.
    pub max_batch: usize,
    /// Longest a row waits for companions before its batch is committed. Adds at most this
    /// much latency to a lone request; 0 commits every row as soon as the writer is free.
    /// 0 is the default because group commit happens anyway: rows that arrive while one batch
    /// is being committed form the next batch, so batches grow with load without any waiting
    /// (BENCH_LEDGER.md: 0 ms gave 3-4x the throughput of 2 ms at 16-64 concurrent callers).
    /// A wait only pays when commits are far cheaper than the arrival gap.
    pub max_wait_ms: u64,
    /// Store full request/response bodies (evidence table) in addition to their SHA-256.
    /// Off by default: bodies can be large and may be sensitive.
    pub store_bodies: bool,
    /// Longest one group commit may take before its rows are refused (503 `ledger_unavailable`)
    /// and the connection is replaced. Short values fail fast when Postgres hangs; long ones ride
    /// out slow disks.
    pub commit_timeout_ms: u64,
    /// Refusals (429, 503 `overloaded`, 413, ...) of one client written as individual rows per
    /// UTC minute. Later ones of that minute are counted into one aggregated row per status and
    /// code, so a client hammering past its limits cannot grow the ledger by a row per request.
    /// Higher keeps more detail about abusive traffic; lower bounds storage tighter.
    pub max_refusal_rows_per_minute: u32,
}

/// The transparency log over the ledger: its signing key and signed checkpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlogConfig {
    /// The checkpoints' origin line: a name unique to this log (C2SP tlog-checkpoint), such as
    /// `teacher.example.com/ledger`. Verifiers pin it; changing it starts a different log.
    pub origin: String,
    /// Environment variable that may hold the signing key (a C2SP signed-note private key,
    /// `PRIVATE+KEY+<name>+<id>+<key>`); used before `key_file` when set.
    pub key_env: String,
    /// File holding the signing key (`teachd keys init` writes one, mode 0600). `~` is the
    /// home directory.
    pub key_file: PathBuf,
    /// Create `key_file` on first start when it is missing (the embedded default, so that the
    /// README's first command works). Off in production: a missing key should stop the server
    /// instead of silently starting a new log under a new key.
    pub generate_key: bool,
    /// Longest time between two signed checkpoints while the tree grows. A checkpoint is also
    /// made on demand by `GET /v1/ledger/checkpoint` when the latest is older than this.
    pub checkpoint_interval_secs: u64,
    /// Directory each new checkpoint is also written to, one file per tree size, never
    /// overwritten (for shipping to WORM storage or a witness). Empty: none.
    pub checkpoint_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Pause after the engine dropped a raw request's sequence before the next is admitted
    /// (it passes while the caller scores the logits). mistralrs 0.8.1 may run one leftover
    /// decode step after a request finishes; batching that step with the next request panics
    /// its engine thread. ~2 decode steps of the CPU default model.
    pub settle_ms: u64,
    /// Requests waiting for one model's engine before new ones get 503 `overloaded`.
    pub max_queue: usize,
    /// Generations one model's mistralrs generation engine runs at once (mistralrs batches
    /// their decode steps); more wait their turn. Must be 1 for a CPU model on mistralrs:
    /// mistralrs 0.8.1's CPU decode attention (`flash_attn_cpu_single_q`) shares its scratch
    /// buffers across the batch, so every sequence of a batched step but the last gets another
    /// sequence's attention (measured: logprobs off by 5-14 nats from token 2 on). teachd
    /// refuses a larger value there. CPU models on the native engine use `native_max_batch`.
    pub max_batch: usize,
    /// Generations the native CPU engine (`generation_engine = "native"`) batches into one
    /// decode step; more wait their turn. Each holds a key/value cache of up to its context
    /// (46 KiB per token for the default model: 30 layers x 2 x 192 floats).
    pub native_max_batch: usize,
    /// Key/value cache the native engine's generations may hold together (MiB). A generation
    /// reserves its whole cache when it starts (prompt + `max_tokens`, at most the context;
    /// 46 KiB per token for the default model), and waits while the reservation does not fit
    /// beside the running ones, so the cache never grows past this. Must hold at least one
    /// sequence of the model's full context (the engine refuses to load otherwise).
    pub native_kv_cache_mib: usize,
    /// Longest generation allowed (`max_tokens` cap).
    pub max_new_tokens: usize,
    /// With a scoring lane of its own (`scoring_engine` native or separate): batch lines of
    /// teacher forcing of at most this many tokens may also run on a spare turn of the idle
    /// generation engine (no generation running or waiting; with native scoring, a second
    /// native pass), so a batch runs two lines at once. A generation arriving meanwhile waits for
    /// that one pass (not measured; a 32-token call waited ~4.4 s p50 behind paired 512-token lines on the 2-core CI machine). 0 turns it off; it is off
    /// anyway when the two engines' weights differ (`generation_dequantize_on_cpu = false`).
    pub spare_max_tokens: usize,
    /// No batch line takes the idle generation engine within this long of the model's last
    /// interactive request (a generation or a `/v1/logprobs`-style call): two passes share the
    /// CPU, so a pair would make an interactive caller wait about twice as long for the line
    /// in progress (measured: a 32-token call's p50 4.4 s during a paired 512-token batch).
    pub spare_quiet_ms: u64,
}

/// Batch jobs (`/v1/files`, `/v1/batches`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Where uploaded files, work files and outputs live (`~` is the home directory). The
    /// container mounts a volume here. Outputs can be far larger than inputs (top-k logprobs
    /// per token), so give it room.
    pub data_dir: PathBuf,
    /// Largest upload to `POST /v1/files`. The upload is read into memory once (like every
    /// body, bounded), so this bounds memory per upload too. OpenAI allows 200 MB.
    pub max_file_bytes: usize,
    /// Most lines (JSONL) or rows (Parquet) in one input file. OpenAI allows 50,000.
    pub max_lines: usize,
    /// Batches of one client that may be active (validated, not finished) at once; more get
    /// 429. Batches take turns (at most two lines at once in all), so this bounds queued work,
    /// not speed.
    pub max_active_per_client: u32,
    /// Longest `completion_window` accepted (seconds). OpenAI's only window is 24h.
    pub max_completion_window_secs: u64,
    /// Rows per Parquet row group: bigger groups compress better, smaller ones bound the
    /// memory of the writer and of readers.
    pub parquet_row_group_rows: usize,
    /// A Parquet output is closed and the next shard begun once it reaches this size (each
    /// shard holds at least one row group).
    pub parquet_shard_bytes: u64,
    /// How often the runner looks for work it was not told about (e.g. after a restart).
    pub poll_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The id clients put in `model`.
    pub id: String,
    pub source: ModelSource,
    /// Activation dtype. `auto`: F32 on CPU (exact and fastest there with dequantized weights),
    /// BF16 on CUDA.
    #[serde(default)]
    pub dtype: DTypeSetting,
    /// `cpu`, or `cuda` / `cuda:N` (needs the `cuda` cargo feature).
    #[serde(default = "default_device")]
    pub device: String,
    /// On CPU, dequantize GGUF weights to F32 at load: ~12x faster teacher forcing with 2 threads
    /// and exact logits, for ~4x the memory of the quantized file. Ignored on CUDA.
    #[serde(default = "default_true")]
    pub dequantize_on_cpu: bool,
    /// Where teacher forcing runs. `native`: on the native generation engine's model (see
    /// `generation_engine`), one pass at a time beside the generations, with no second copy of
    /// the weights; needs that engine and `dequantize_on_cpu`. `separate`: a second mistralrs
    /// instance of this model that serves only teacher forcing, so `/v1/logprobs` never waits
    /// behind generations (costs a second copy of the weights in memory). `shared`: the
    /// mistralrs generation engine, taken alone between generations. `auto`: native where it
    /// applies, else separate on CPU, shared on CUDA.
    #[serde(default)]
    pub scoring_engine: ScoringEngine,
    /// On CPU with a separate scoring engine, whether the generation engine dequantizes too
    /// (`false` also rules out the native engine, which runs dequantized weights).
    /// `false` keeps the quantized weights for generation: faster decode and less memory,
    /// with generation logprobs from quantized matmuls (not bit-equal to teacher forcing; see
    /// the README's performance section). Defaults to `dequantize_on_cpu`.
    #[serde(default)]
    pub generation_dequantize_on_cpu: Option<bool>,
    /// What runs generations. `native`: teachd's own CPU decoder on candle (llama-architecture
    /// GGUF files, dequantized F32 weights), which batches up to `engine.native_max_batch`
    /// generations per decode step. `mistralrs`: the mistralrs engine (one generation at a
    /// time on CPU). `auto`: native where it applies (CPU, a local llama GGUF file, F32,
    /// dequantized generation weights), mistralrs otherwise. Teacher forcing runs on it too
    /// unless `scoring_engine` says otherwise.
    #[serde(default)]
    pub generation_engine: GenerationEngine,
    pub licence: LicenceConfig,
    /// Cap on `top_k` / `top_logprobs` / `prompt_logprobs`.
    #[serde(default = "default_max_top_k")]
    pub max_top_k: usize,
    /// Quantization label reported to clients (e.g. `Q4_1`); derived from the file when absent.
    #[serde(default)]
    pub quantization: Option<String>,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_true() -> bool {
    true
}
fn default_max_top_k() -> usize {
    256
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DTypeSetting {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GenerationEngine {
    #[default]
    Auto,
    Native,
    Mistralrs,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScoringEngine {
    #[default]
    Auto,
    Native,
    Separate,
    Shared,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSource {
    /// A local GGUF file; tokenizer and chat template come from the file.
    Gguf { path: PathBuf },
    /// A local directory with `config.json`, `tokenizer.json` and safetensors weights,
    /// optionally quantized in situ (`isq = "Q4K"`, `"Q8_0"`, ...).
    Safetensors {
        path: PathBuf,
        #[serde(default)]
        isq: Option<String>,
    },
    /// A Hugging Face hub repository (needs network); `file` selects a GGUF file in it,
    /// otherwise safetensors are loaded (with optional `isq`).
    Hub {
        repo: String,
        #[serde(default)]
        file: Option<String>,
        #[serde(default)]
        isq: Option<String>,
    },
}

#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LicenceConfig {
    /// SPDX-like id, e.g. `apache-2.0`, `llama3.1`.
    pub id: String,
    pub distillation: DistillationPolicy,
    /// Required attribution text, sent as `x-teacher-attribution` (e.g. "Built with Llama").
    #[serde(default)]
    pub attribution: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DistillationPolicy {
    Allowed,
    AttributionRequired,
    NonCommercial,
    Prohibited,
}

impl Config {
    /// Load the file (if given), then apply `TEACHD__…` environment overrides.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(path: Option<&Path>, env: &[(String, String)]) -> anyhow::Result<Config> {
        let mut value: toml::Table = DEFAULT_TOML
            .parse()
            .context("parsing the embedded default configuration")?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            let file = text
                .parse::<toml::Table>()
                .with_context(|| format!("parsing config {}", path.display()))?;
            merge(&mut value, file);
        }
        let mut overrides: BTreeMap<&str, &str> = BTreeMap::new();
        for (key, val) in env {
            if let Some(rest) = key.strip_prefix("TEACHD__") {
                overrides.insert(rest, val);
            }
        }
        for (key, val) in overrides {
            let path: Vec<String> = key.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut value, &path, parse_scalar(val))
                .with_context(|| format!("applying TEACHD__{key}"))?;
        }
        let mut config: Config = toml::Value::Table(value)
            .try_into()
            .context("invalid configuration")?;
        for model in &mut config.models {
            model.source = match std::mem::replace(
                &mut model.source,
                ModelSource::Gguf {
                    path: PathBuf::new(),
                },
            ) {
                ModelSource::Gguf { path } => ModelSource::Gguf {
                    path: expand_home(&path),
                },
                ModelSource::Safetensors { path, isq } => ModelSource::Safetensors {
                    path: expand_home(&path),
                    isq,
                },
                other => other,
            };
        }
        config.tlog.key_file = expand_home(&config.tlog.key_file);
        config.tlog.checkpoint_dir = expand_home(&config.tlog.checkpoint_dir);
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.server.disable_auth && !bind_is_loopback(&self.server.bind) {
            bail!(
                "server.disable_auth is set but server.bind = {} is not a loopback address: \
                 refusing to serve every client without a key on a reachable interface",
                self.server.bind
            );
        }
        if self.tlog.origin.trim().is_empty() || self.tlog.origin.contains('\n') {
            bail!("tlog.origin must be one non-empty line");
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(&m.id) {
                bail!("model id `{}` is configured twice", m.id);
            }
            if m.max_top_k == 0 {
                bail!("model `{}`: max_top_k must be at least 1", m.id);
            }
        }
        Ok(())
    }
}

/// Whether a bind address (`host:port`) only accepts connections from this machine.
pub fn bind_is_loopback(bind: &str) -> bool {
    let host = match bind.rsplit_once(':') {
        Some((host, _)) => host,
        None => bind,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn expand_home(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(rest),
            None => path.to_path_buf(),
        },
        Err(_) => path.to_path_buf(),
    }
}

/// `over` merged into `base`: tables key by key, anything else (arrays included) replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn parse_scalar(raw: &str) -> toml::Value {
    if let Ok(v) = raw.parse::<i64>() {
        return toml::Value::Integer(v);
    }
    if let Ok(v) = raw.parse::<f64>() {
        return toml::Value::Float(v);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> anyhow::Result<()> {
    let (head, rest) = path.split_first().context("empty key")?;
    if rest.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(head.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    set_value_path(entry, rest, value)
}

fn set_value_path(
    node: &mut toml::Value,
    path: &[String],
    value: toml::Value,
) -> anyhow::Result<()> {
    match node {
        toml::Value::Table(t) => set_path(t, path, value),
        toml::Value::Array(items) => {
            let (head, rest) = path.split_first().context("empty key")?;
            let idx: usize = head.parse().context("array index expected")?;
            while items.len() <= idx {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if rest.is_empty() {
                items[idx] = value;
                Ok(())
            } else {
                set_value_path(&mut items[idx], rest, value)
            }
        }
        _ => bail!("cannot set a key below a scalar"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_nested_keys_and_array_items() {
        let dir = std::env::temp_dir().join(format!("teachd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            r#"
[[models]]
id = "m"
source = { kind = "gguf", path = "/x.gguf" }
licence = { id = "apache-2.0", distillation = "allowed" }
"#,
        )
        .unwrap();
        let env = vec![
            ("TEACHD__SERVER__BIND".to_string(), "0.0.0.0:9".to_string()),
            ("TEACHD__MODELS__0__MAX_TOP_K".to_string(), "7".to_string()),
            ("TEACHD__LIMITS__RPM".to_string(), "5".to_string()),
        ];
        let cfg = Config::load_with_env(Some(&file), &env).unwrap();
        assert_eq!(cfg.server.bind, "0.0.0.0:9");
        assert_eq!(cfg.models[0].max_top_k, 7);
        assert_eq!(cfg.limits.rpm, 5);
    }

    #[test]
    fn disable_auth_refuses_a_reachable_bind() {
        let env = |bind: &str| {
            vec![
                (
                    "TEACHD__SERVER__DISABLE_AUTH".to_string(),
                    "true".to_string(),
                ),
                ("TEACHD__SERVER__BIND".to_string(), bind.to_string()),
            ]
        };
        for bind in ["0.0.0.0:8080", "[::]:8080", "10.0.0.5:80"] {
            let err = Config::load_with_env(None, &env(bind)).unwrap_err();
            assert!(format!("{err:#}").contains("loopback"), "{bind}: {err:#}");
        }
        for bind in ["127.0.0.1:8080", "[::1]:9", "localhost:1"] {
            assert!(Config::load_with_env(None, &env(bind)).is_ok(), "{bind}");
        }
    }

    #[test]
    fn the_embedded_default_is_the_base_layer() {
        let cfg = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(cfg.server.bind, "127.0.0.1:8080");
        assert_eq!(cfg.limits.rpm, 600);
        assert_eq!(cfg.models.len(), 1);
        assert_eq!(cfg.models[0].id, "smollm2-135m-instruct");
        // A file overrides keys it names and keeps the rest; its [[models]] replace the list.
        let dir = std::env::temp_dir().join(format!("teachd-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "models = []\n[server]\nbind = \"127.0.0.1:9\"\n").unwrap();
        let cfg = Config::load_with_env(Some(&file), &[]).unwrap();
        assert_eq!(cfg.server.bind, "127.0.0.1:9");
        assert_eq!(cfg.server.max_in_flight, 256);
        assert!(cfg.models.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let env = vec![("TEACHD__SERVER__NOPE".to_string(), "1".to_string())];
        assert!(Config::load_with_env(None, &env).is_err());
    }

    #[test]
    fn database_password_is_redacted() {
        let mut db = Config::load_with_env(None, &[]).unwrap().database;
        db.url = "postgres://u:hunter2@h:5432/d".into();
        let shown = format!("{db:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("u:***@h"), "{shown}");
    }
}
