//! `teachd batch ...`: the client side of batch jobs, for people. `submit` uploads a file,
//! creates the batch, follows its progress (a bar with tokens/s and ETA, fed by
//! `/v1/batches/{id}/events`) and downloads the outputs; `status`, `cancel` and `download` act
//! on a batch by id. Talks to a server over HTTP with a teacher key, like any client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(clap::Subcommand)]
pub enum BatchCommand {
    /// Upload FILE (JSONL batch lines, or Parquet with `input_ids`), run it as a batch, follow
    /// it with a progress bar and download the output (and error) file into --out.
    Submit {
        file: PathBuf,
        #[arg(long, default_value = "/v1/logprobs")]
        endpoint: String,
        /// Sets `top_k` of every line (Parquet: of every row).
        #[arg(long)]
        top_k: Option<usize>,
        /// The model of every Parquet row (JSONL lines name their own).
        #[arg(long)]
        model: Option<String>,
        /// `jsonl` or `parquet`.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Parquet: round `top_logprobs` to this many mantissa bits (1-23; 8 is about bf16's
        /// precision, a smaller file); `token_logprobs` stay exact.
        #[arg(long)]
        top_logprobs_mantissa_bits: Option<u8>,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a batch (JSON).
    Status {
        batch_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a batch; prints it.
    Cancel {
        batch_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Download a finished batch's output and error files into --out.
    Download {
        batch_id: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(clap::Args)]
pub struct Conn {
    /// Server base URL.
    #[arg(long, env = "TEACHD_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A teacher key.
    #[arg(long, env = "TEACHD_KEY", hide_env_values = true)]
    key: String,
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    fn new(conn: &Conn) -> anyhow::Result<Self> {
        Ok(Client {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
            base: conn.server.trim_end_matches('/').to_string(),
            key: conn.key.clone(),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    async fn json(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = rb.send().await.context("cannot reach the server")?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .context("the server's answer is not JSON")?;
        if !status.is_success() {
            bail!(
                "{status}: {}",
                body["error"]["message"].as_str().unwrap_or("error")
            );
        }
        Ok(body)
    }

    async fn batch(&self, id: &str) -> anyhow::Result<Value> {
        self.json(self.req(reqwest::Method::GET, &format!("/v1/batches/{id}")))
            .await
    }
}

/// Runs a `teachd batch` command; returns the process exit code (0: the batch completed).
pub async fn run(cmd: BatchCommand) -> anyhow::Result<i32> {
    match cmd {
        BatchCommand::Submit {
            file,
            endpoint,
            top_k,
            model,
            format,
            top_logprobs_mantissa_bits,
            out,
            conn,
        } => {
            let client = Client::new(&conn)?;
            let opts = Submit {
                endpoint,
                top_k,
                model,
                format,
                top_logprobs_mantissa_bits,
            };
            let batch = submit(&client, &file, &opts).await?;
            let id = batch["id"].as_str().unwrap_or_default().to_string();
            eprintln!("batch {id}: {}", batch["status"].as_str().unwrap_or(""));
            let batch = follow(&client, &id, batch).await?;
            download(&client, &batch, &out).await?;
            Ok(exit_code(&batch))
        }
        BatchCommand::Status { batch_id, conn } => {
            let batch = Client::new(&conn)?.batch(&batch_id).await?;
            println!("{}", serde_json::to_string_pretty(&batch)?);
            Ok(0)
        }
        BatchCommand::Cancel { batch_id, conn } => {
            let client = Client::new(&conn)?;
            let path = format!("/v1/batches/{batch_id}/cancel");
            let batch = client
                .json(client.req(reqwest::Method::POST, &path))
                .await?;
            println!("{}", serde_json::to_string_pretty(&batch)?);
            Ok(0)
        }
        BatchCommand::Download {
            batch_id,
            out,
            conn,
        } => {
            let client = Client::new(&conn)?;
            let batch = client.batch(&batch_id).await?;
            download(&client, &batch, &out).await?;
            Ok(exit_code(&batch))
        }
    }
}

fn exit_code(batch: &Value) -> i32 {
    if batch["status"] == "completed" {
        0
    } else {
        1
    }
}

/// What `teachd batch submit` asks for.
struct Submit {
    endpoint: String,
    top_k: Option<usize>,
    model: Option<String>,
    format: String,
    top_logprobs_mantissa_bits: Option<u8>,
}

/// Uploads the file (JSONL lines get `top_k` set when given) and creates the batch.
async fn submit(client: &Client, file: &Path, opts: &Submit) -> anyhow::Result<Value> {
    let Submit {
        endpoint,
        top_k,
        model,
        format,
        top_logprobs_mantissa_bits,
    } = opts;
    let top_k = *top_k;
    let mut bytes = tokio::fs::read(file)
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    let parquet = bytes.starts_with(b"PAR1");
    if let (Some(k), false) = (top_k, parquet) {
        let text = String::from_utf8(bytes).context("a JSONL file must be UTF-8")?;
        let mut lines = String::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut v: Value =
                serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
            v["body"]["top_k"] = json!(k);
            lines += &(v.to_string() + "\n");
        }
        bytes = lines.into_bytes();
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name),
        );
    let uploaded = client
        .json(
            client
                .req(reqwest::Method::POST, "/v1/files")
                .multipart(form),
        )
        .await?;
    let mut metadata = serde_json::Map::new();
    if parquet {
        if let Some(k) = top_k {
            metadata.insert("top_k".into(), json!(k.to_string()));
        }
        if let Some(m) = model {
            metadata.insert("model".into(), json!(m));
        }
    }
    let mut body = json!({"input_file_id": uploaded["id"], "endpoint": endpoint,
        "completion_window": "24h", "output_format": format, "metadata": metadata});
    if let Some(bits) = top_logprobs_mantissa_bits {
        body["top_logprobs_mantissa_bits"] = json!(bits);
    }
    let batch = client
        .json(client.req(reqwest::Method::POST, "/v1/batches").json(&body))
        .await?;
    if batch["status"] == "failed" {
        bail!("the batch failed validation: {}", batch["errors"]);
    }
    Ok(batch)
}

fn terminal(batch: &Value) -> bool {
    matches!(
        batch["status"].as_str(),
        Some("completed" | "failed" | "expired" | "cancelled")
    )
}

/// Follows the batch's events with a progress bar until it ends; returns the final batch.
async fn follow(client: &Client, id: &str, mut batch: Value) -> anyhow::Result<Value> {
    let bar = indicatif::ProgressBar::new(batch["progress"]["total_tokens"].as_u64().unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while !terminal(&batch) {
        let resp = client
            .req(reqwest::Method::GET, &format!("/v1/batches/{id}/events"))
            .send()
            .await;
        if let Ok(resp) = resp.and_then(|r| r.error_for_status()) {
            let mut events = resp.bytes_stream().eventsource();
            while let Some(Ok(event)) = events.next().await {
                let Ok(b) = serde_json::from_str::<Value>(&event.data) else {
                    continue;
                };
                if b.get("error").is_some() {
                    break;
                }
                let p = &b["progress"];
                bar.set_length(p["total_tokens"].as_u64().unwrap_or(0));
                bar.set_position(p["scored_tokens"].as_u64().unwrap_or(0));
                let eta = p["eta_s"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.0}s"));
                bar.set_message(format!(
                    "{:.0} tokens/s, ETA {eta}, {} done, {} failed",
                    p["tokens_per_s"].as_f64().unwrap_or(0.0),
                    b["request_counts"]["completed"],
                    b["request_counts"]["failed"]
                ));
                batch = b;
            }
        }
        if !terminal(&batch) {
            // The stream broke off: look again, then follow anew.
            tokio::time::sleep(Duration::from_millis(500)).await;
            batch = client.batch(id).await?;
        }
    }
    bar.finish();
    eprintln!(
        "batch {id}: {} ({} completed, {} failed)",
        batch["status"].as_str().unwrap_or(""),
        batch["request_counts"]["completed"],
        batch["request_counts"]["failed"]
    );
    Ok(batch)
}

/// Saves the batch's output files (every shard of a sharded Parquet output) and its error file
/// into `out`; prints their paths.
async fn download(client: &Client, batch: &Value, out: &Path) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(out).await?;
    let id = batch["id"].as_str().unwrap_or("batch");
    let mut files: Vec<(String, String)> = Vec::new();
    let shards: Vec<&str> = batch["output_file_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match (shards.len(), batch["output_file_id"].as_str()) {
        (0 | 1, Some(file_id)) => files.push((file_id.into(), format!("{id}_output"))),
        (0 | 1, None) => {}
        (n, _) => files.extend(
            shards
                .iter()
                .enumerate()
                .map(|(i, f)| (f.to_string(), format!("{id}_output-{i:05}-of-{n:05}"))),
        ),
    }
    if let Some(file_id) = batch["error_file_id"].as_str() {
        files.push((file_id.into(), format!("{id}_errors")));
    }
    for (file_id, stem) in files {
        let meta = client
            .json(client.req(reqwest::Method::GET, &format!("/v1/files/{file_id}")))
            .await?;
        let ext = meta["format"].as_str().unwrap_or("jsonl");
        let resp = client
            .req(
                reqwest::Method::GET,
                &format!("/v1/files/{file_id}/content"),
            )
            .send()
            .await?
            .error_for_status()?;
        let path = out.join(format!("{stem}.{ext}"));
        let mut file = tokio::fs::File::create(&path).await?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk?).await?;
        }
        // A tokio file finishes its last write in the background: wait for it before exiting.
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        println!("{}", path.display());
    }
    Ok(())
}
