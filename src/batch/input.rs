//! The lines of an input file, read in order and in constant memory: JSONL in OpenAI's batch
//! line format (`{"custom_id", "method", "url", "body"}`), or Parquet with an `input_ids` list
//! column and an optional `custom_id` column (each row becomes a `/v1/logprobs` body whose
//! other fields come from the batch's `metadata`: `model`, `top_k`, `score_from`,
//! `temperature`).

use std::io::BufRead;
use std::path::PathBuf;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Parquet,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }

    pub fn parse(s: &str) -> Format {
        if s == "parquet" {
            Format::Parquet
        } else {
            Format::Jsonl
        }
    }
}

/// One request of the input. `index` is 0-based among the requests, `line` the 1-based line
/// number (JSONL) or row number (Parquet) that errors name.
#[derive(Debug, Clone)]
pub struct InputLine {
    pub index: usize,
    pub line: usize,
    pub custom_id: String,
    pub url: String,
    pub body: Value,
}

/// Why the file as a whole cannot run (the batch then fails with `errors.data`).
#[derive(Debug, Clone)]
pub struct FileError {
    pub code: &'static str,
    pub message: String,
    pub line: Option<usize>,
}

pub enum Item {
    Line(InputLine),
    Malformed(FileError),
}

/// What an upload is, checked before it is stored: Parquet (by its magic) with an `input_ids`
/// column, or UTF-8 text; and how many requests it holds (at most `max_lines`).
pub fn inspect(bytes: &[u8], max_lines: usize) -> Result<(Format, usize), ApiError> {
    let over = |n: usize| {
        ApiError::bad_param(
            "file",
            format!("the file has {n} lines; at most {max_lines} are allowed (batch.max_lines)"),
        )
    };
    if bytes.len() >= 8 && bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1") {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
            .map_err(|e| ApiError::bad_param("file", format!("unreadable Parquet: {e}")))?;
        if reader.schema().field_with_name("input_ids").is_err() {
            return Err(ApiError::bad_param(
                "file",
                "a Parquet input needs an `input_ids` list column",
            ));
        }
        let rows = reader.metadata().file_metadata().num_rows().max(0) as usize;
        if rows > max_lines {
            return Err(over(rows));
        }
        return Ok((Format::Parquet, rows));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::bad_param("file", "a JSONL input must be UTF-8 text"))?;
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    if lines > max_lines {
        return Err(over(lines));
    }
    if lines == 0 {
        return Err(ApiError::bad_param("file", "the file has no lines"));
    }
    Ok((Format::Jsonl, lines))
}

/// Reads the file at `path` on a blocking thread; its items arrive in order on the receiver
/// (bounded: the reader waits for the consumer). `endpoint` and `metadata` make Parquet rows
/// into request bodies.
pub fn read(
    path: PathBuf,
    format: Format,
    endpoint: String,
    metadata: Option<Value>,
) -> tokio::sync::mpsc::Receiver<Item> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        let result = match format {
            Format::Jsonl => read_jsonl(&path, &tx),
            Format::Parquet => read_parquet(&path, &endpoint, metadata.as_ref(), &tx),
        };
        if let Err(message) = result {
            let _ = tx.blocking_send(Item::Malformed(FileError {
                code: "invalid_file",
                message,
                line: None,
            }));
        }
    });
    rx
}

#[derive(Deserialize)]
struct JsonlLine {
    custom_id: Option<String>,
    method: Option<String>,
    url: Option<String>,
    body: Option<Value>,
}

type Tx = tokio::sync::mpsc::Sender<Item>;

fn read_jsonl(path: &std::path::Path, tx: &Tx) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let mut index = 0;
    for (n, text) in std::io::BufReader::new(file).lines().enumerate() {
        let text = text.map_err(|e| format!("cannot read line {}: {e}", n + 1))?;
        if text.trim().is_empty() {
            continue;
        }
        let line = n + 1;
        let bad = |code, message: String| {
            Item::Malformed(FileError {
                code,
                message,
                line: Some(line),
            })
        };
        let item = match serde_json::from_str::<JsonlLine>(&text) {
            Err(e) => bad(
                "invalid_json_line",
                format!("line {line} is not a batch line: {e}"),
            ),
            Ok(JsonlLine {
                custom_id: None, ..
            }) => bad(
                "missing_custom_id",
                format!("line {line} has no `custom_id`"),
            ),
            Ok(l) if l.method.as_deref() != Some("POST") => bad(
                "invalid_method",
                format!("line {line}: `method` must be `POST`"),
            ),
            Ok(JsonlLine { body: None, .. }) => {
                bad("missing_body", format!("line {line} has no `body`"))
            }
            Ok(l) => Item::Line(InputLine {
                index,
                line,
                custom_id: l.custom_id.unwrap_or_default(),
                url: l.url.unwrap_or_default(),
                body: l.body.unwrap_or_default(),
            }),
        };
        index += 1;
        if tx.blocking_send(item).is_err() {
            return Ok(()); // the consumer stopped
        }
    }
    Ok(())
}

fn read_parquet(
    path: &std::path::Path,
    endpoint: &str,
    metadata: Option<&Value>,
    tx: &Tx,
) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(256).build())
        .map_err(|e| format!("unreadable Parquet: {e}"))?;
    // The batch's metadata gives every row's other fields (numbers as strings, like OpenAI's).
    let mut defaults = Map::new();
    if let Some(Value::Object(meta)) = metadata {
        for key in ["model", "top_k", "score_from", "temperature"] {
            if let Some(Value::String(v)) = meta.get(key) {
                let value = match key {
                    "model" => json!(v),
                    _ => serde_json::from_str(v).unwrap_or(json!(v)),
                };
                defaults.insert(key.into(), value);
            }
        }
    }
    let mut index = 0;
    for batch in reader {
        let batch = batch.map_err(|e| format!("unreadable Parquet: {e}"))?;
        let ids = batch
            .column_by_name("input_ids")
            .ok_or("a Parquet input needs an `input_ids` list column")?;
        let custom = batch.column_by_name("custom_id");
        for row in 0..batch.num_rows() {
            let line = index + 1;
            let token_ids =
                list_row(ids, row).ok_or("`input_ids` must be a list of integers without nulls")?;
            let custom_id = custom
                .and_then(|c| string_row(c, row))
                .unwrap_or_else(|| format!("row-{line}"));
            let mut body = defaults.clone();
            body.insert("token_ids".into(), json!(token_ids));
            let item = Item::Line(InputLine {
                index,
                line,
                custom_id,
                url: endpoint.to_string(),
                body: Value::Object(body),
            });
            index += 1;
            if tx.blocking_send(item).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Row `row` of a list-of-integers column, as token ids (negative ids become out-of-range
/// ones, which validation refuses).
fn list_row(col: &ArrayRef, row: usize) -> Option<Vec<u64>> {
    let values = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(row),
        DataType::LargeList(_) => col.as_list::<i64>().value(row),
        _ => return None,
    };
    if values.null_count() > 0 || col.is_null(row) {
        return None;
    }
    let out = match values.data_type() {
        DataType::Int32 => values
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&v| v as i64 as u64)
            .collect(),
        DataType::Int64 => values
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .map(|&v| v as u64)
            .collect(),
        DataType::UInt32 => values
            .as_primitive::<UInt32Type>()
            .values()
            .iter()
            .map(|&v| v as u64)
            .collect(),
        DataType::UInt64 => values.as_primitive::<UInt64Type>().values().to_vec(),
        _ => return None,
    };
    Some(out)
}

fn string_row(col: &ArrayRef, row: usize) -> Option<String> {
    if col.is_null(row) {
        return None;
    }
    match col.data_type() {
        DataType::Utf8 => Some(col.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Some(col.as_string::<i64>().value(row).to_string()),
        _ => None,
    }
}
