//! What a batch writes: output and error lines in OpenAI's batch output format
//! (`{id, custom_id, response: {status_code, request_id, body}, error}`, `body` exactly what
//! the synchronous endpoint answers), and, for teacher forcing, the Parquet dataset made from
//! the output lines when the batch finalizes (streamed: one row group in memory at a time).

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    FixedSizeListBuilder, Float32Builder, ListBuilder, StringBuilder, UInt32Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::http::logprobs::LogprobsResponse;

#[derive(Debug, Serialize, Deserialize)]
pub struct OutputLine<B = Value> {
    pub id: String,
    pub custom_id: String,
    pub response: Option<LineResponse<B>>,
    pub error: Option<LineError>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LineResponse<B = Value> {
    pub status_code: u16,
    pub request_id: Option<String>,
    pub body: B,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LineError {
    pub code: String,
    pub message: String,
    /// 1-based line (JSONL) or row (Parquet) of the input.
    pub line: usize,
}

fn line_id() -> String {
    super::new_id("batch_req_")
}

/// A served line, newline-terminated.
pub fn ok_line<B: Serialize>(custom_id: &str, request_id: &str, body: &B) -> String {
    let line = OutputLine {
        id: line_id(),
        custom_id: custom_id.to_string(),
        response: Some(LineResponse {
            status_code: 200,
            request_id: Some(request_id.to_string()),
            body,
        }),
        error: None,
    };
    serde_json::to_string(&line).unwrap_or_default() + "\n"
}

/// A refused line: the response the synchronous endpoint would have given, and its code.
pub fn error_line(
    custom_id: &str,
    line: usize,
    request_id: Option<&str>,
    err: &ApiError,
) -> String {
    let envelope = err.envelope(request_id.map(str::to_string));
    let out = OutputLine {
        id: line_id(),
        custom_id: custom_id.to_string(),
        error: Some(LineError {
            code: envelope
                .error
                .code
                .clone()
                .unwrap_or_else(|| envelope.error.r#type.clone()),
            message: envelope.error.message.clone(),
            line,
        }),
        response: Some(LineResponse {
            status_code: err.status().as_u16(),
            request_id: request_id.map(str::to_string),
            body: serde_json::to_value(&envelope).unwrap_or_default(),
        }),
    };
    serde_json::to_string(&out).unwrap_or_default() + "\n"
}

/// A line that never ran: the batch expired or was cancelled first.
pub fn unrun_line(custom_id: &str, line: usize, code: &str, message: &str) -> String {
    let out: OutputLine = OutputLine {
        id: line_id(),
        custom_id: custom_id.to_string(),
        response: None,
        error: Some(LineError {
            code: code.into(),
            message: message.into(),
            line,
        }),
    };
    serde_json::to_string(&out).unwrap_or_default() + "\n"
}

/// Columns of one row group.
struct Columns {
    custom_id: StringBuilder,
    token_ids: ListBuilder<UInt32Builder>,
    score_from: UInt32Builder,
    token_logprobs: ListBuilder<Float32Builder>,
    token_ranks: ListBuilder<UInt32Builder>,
    top_ids: ListBuilder<FixedSizeListBuilder<UInt32Builder>>,
    top_logprobs: ListBuilder<FixedSizeListBuilder<Float32Builder>>,
    tail_logmass: ListBuilder<Float32Builder>,
    entropy: ListBuilder<Float32Builder>,
    k: usize,
    mantissa_bits: u32,
    rows: usize,
}

impl Columns {
    fn new(k: usize, mantissa_bits: u32) -> Self {
        let k32 = k as i32;
        Columns {
            custom_id: StringBuilder::new(),
            token_ids: ListBuilder::new(UInt32Builder::new()),
            score_from: UInt32Builder::new(),
            token_logprobs: ListBuilder::new(Float32Builder::new()),
            token_ranks: ListBuilder::new(UInt32Builder::new()),
            top_ids: ListBuilder::new(FixedSizeListBuilder::new(UInt32Builder::new(), k32)),
            top_logprobs: ListBuilder::new(FixedSizeListBuilder::new(Float32Builder::new(), k32)),
            tail_logmass: ListBuilder::new(Float32Builder::new()),
            entropy: ListBuilder::new(Float32Builder::new()),
            k,
            mantissa_bits,
            rows: 0,
        }
    }

    fn push(&mut self, custom_id: &str, r: &LogprobsResponse) -> Result<(), String> {
        if r.top_ids.iter().any(|t| t.len() != self.k)
            || r.top_logprobs.iter().any(|t| t.len() != self.k)
        {
            return Err(format!(
                "line `{custom_id}` has a top-k other than {}",
                self.k
            ));
        }
        self.custom_id.append_value(custom_id);
        self.token_ids.values().append_slice(&r.token_ids);
        self.token_ids.append(true);
        self.score_from.append_value(r.score_from as u32);
        self.token_logprobs.values().append_slice(&r.token_logprobs);
        self.token_logprobs.append(true);
        self.token_ranks.values().append_slice(&r.token_ranks);
        self.token_ranks.append(true);
        for (ids, lps) in r.top_ids.iter().zip(&r.top_logprobs) {
            self.top_ids.values().values().append_slice(ids);
            self.top_ids.values().append(true);
            let bits = self.mantissa_bits;
            self.top_logprobs
                .values()
                .values()
                .extend(lps.iter().map(|&x| Some(round_mantissa(x, bits))));
            self.top_logprobs.values().append(true);
        }
        self.top_ids.append(true);
        self.top_logprobs.append(true);
        for t in &r.tail_logmass {
            self.tail_logmass.values().append_option(*t);
        }
        self.tail_logmass.append(true);
        self.entropy.values().append_slice(&r.entropy);
        self.entropy.append(true);
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self) -> Vec<(&'static str, ArrayRef)> {
        self.rows = 0;
        vec![
            ("custom_id", Arc::new(self.custom_id.finish()) as ArrayRef),
            ("token_ids", Arc::new(self.token_ids.finish())),
            ("score_from", Arc::new(self.score_from.finish())),
            ("token_logprobs", Arc::new(self.token_logprobs.finish())),
            ("token_ranks", Arc::new(self.token_ranks.finish())),
            ("top_ids", Arc::new(self.top_ids.finish())),
            ("top_logprobs", Arc::new(self.top_logprobs.finish())),
            ("tail_logmass", Arc::new(self.tail_logmass.finish())),
            ("entropy", Arc::new(self.entropy.finish())),
        ]
    }
}

/// Largest row group kept in memory before it is written, whatever the row count.
const MAX_ROW_GROUP_BYTES: usize = 64 << 20;

/// How the Parquet dataset is laid out: rows per row group, and the size at which a shard is
/// closed and the next one begun (a shard always holds at least one row group).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub row_group_rows: usize,
    pub shard_bytes: u64,
    /// `top_logprobs` keep this many f32 mantissa bits (23: all of them).
    pub top_logprobs_mantissa_bits: u32,
}

/// `x` rounded to the nearest f32 with `bits` mantissa bits (ties away from zero), so that the
/// dropped low bits are zeros and compress away. Within `|x| * 2^-(bits+1)` of `x`; infinities
/// and NaN are kept as they are.
pub fn round_mantissa(x: f32, bits: u32) -> f32 {
    if bits >= 23 || !x.is_finite() {
        return x;
    }
    let drop = 23 - bits;
    let b = x.to_bits();
    let rounded = (b + (1 << (drop - 1))) & !((1u32 << drop) - 1);
    f32::from_bits(rounded)
}

/// Every f32 and u32 column (logprobs, ids, ranks) byte-stream split, without a dictionary:
/// their bytes are grouped by significance, so zstd finds the runs of equal exponents and
/// high bytes (measured on the default model's top-128: 518 bytes per token against 902 with
/// the default dictionary encoding, lossless).
fn numeric_encodings(
    schema: &Schema,
    mut props: parquet::file::properties::WriterPropertiesBuilder,
) -> Result<parquet::file::properties::WriterPropertiesBuilder, String> {
    use parquet::basic::{Encoding, Type};
    let descr = parquet::arrow::ArrowSchemaConverter::new()
        .convert(schema)
        .map_err(|e| e.to_string())?;
    for col in descr.columns() {
        if matches!(col.physical_type(), Type::FLOAT | Type::INT32) {
            props = props
                .set_column_dictionary_enabled(col.path().clone(), false)
                .set_column_encoding(col.path().clone(), Encoding::BYTE_STREAM_SPLIT);
        }
    }
    Ok(props)
}

/// One shard written: its path, its rows, and the batch row its first row is.
#[derive(Debug)]
pub struct Shard {
    pub path: std::path::PathBuf,
    pub rows: usize,
    pub first_row: usize,
}

/// The shard being written.
struct ShardWriter {
    writer: ArrowWriter<std::fs::File>,
    schema: Arc<Schema>,
    shard: Shard,
}

/// The shards of one output: the one being written (opened when rows come for it) and those
/// already closed.
struct Shards<'a> {
    fields: Vec<Field>,
    meta: HashMap<String, String>,
    layout: Layout,
    shard_path: &'a dyn Fn(usize) -> std::path::PathBuf,
    current: Option<ShardWriter>,
    closed: Vec<Shard>,
    /// Rows written so far, over all shards.
    rows: usize,
}

impl Shards<'_> {
    /// The next shard, its metadata saying where it stands in the output.
    fn open(&self) -> Result<ShardWriter, String> {
        let (index, first_row) = (self.closed.len(), self.rows);
        let mut meta = self.meta.clone();
        meta.insert("teachd.shard_index".into(), index.to_string());
        meta.insert("teachd.shard_first_row".into(), first_row.to_string());
        let schema = Arc::new(Schema::new(self.fields.clone()).with_metadata(meta.clone()));
        let kv = meta.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect();
        let props = numeric_encodings(
            &schema,
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(
                    ZstdLevel::try_new(3).map_err(|e| e.to_string())?,
                ))
                .set_max_row_group_size(self.layout.row_group_rows.max(1))
                .set_key_value_metadata(Some(kv)),
        )?
        .build();
        let path = (self.shard_path)(index);
        let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let writer =
            ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| e.to_string())?;
        Ok(ShardWriter {
            writer,
            schema,
            shard: Shard {
                path,
                rows: 0,
                first_row,
            },
        })
    }

    /// Writes the rows in `cols`; closes the shard once it reaches the shard size.
    fn write(&mut self, cols: &mut Columns) -> Result<(), String> {
        let mut w = match self.current.take() {
            Some(w) => w,
            None => self.open()?,
        };
        w.shard.rows += cols.rows;
        self.rows += cols.rows;
        let arrays = cols.finish().into_iter().map(|(_, a)| a).collect();
        let batch = RecordBatch::try_new(w.schema.clone(), arrays).map_err(|e| e.to_string())?;
        w.writer.write(&batch).map_err(|e| e.to_string())?;
        if w.writer.in_progress_size() > MAX_ROW_GROUP_BYTES {
            w.writer.flush().map_err(|e| e.to_string())?;
        }
        let size = w.writer.bytes_written() as u64 + w.writer.in_progress_size() as u64;
        if size >= self.layout.shard_bytes {
            w.writer.close().map_err(|e| e.to_string())?;
            self.closed.push(w.shard);
        } else {
            self.current = Some(w);
        }
        Ok(())
    }

    /// Closes the last shard; an output with no rows is one empty shard.
    fn finish(mut self) -> Result<Vec<Shard>, String> {
        if self.current.is_none() && self.closed.is_empty() {
            self.current = Some(self.open()?);
        }
        if let Some(w) = self.current.take() {
            w.writer.close().map_err(|e| e.to_string())?;
            self.closed.push(w.shard);
        }
        Ok(self.closed)
    }
}

/// Writes the Parquet dataset of the output lines in `jsonl` (successful lines only: refused
/// ones are in the error file) as shards at `shard_path(0)`, `shard_path(1)`, ..., with `meta`
/// (plus `teachd.shard_index` and `teachd.shard_first_row`) as each file's key-value metadata.
/// Streamed: one row group in memory at a time, whatever the number of lines.
pub fn write_parquet(
    jsonl: &Path,
    shard_path: &dyn Fn(usize) -> std::path::PathBuf,
    k: usize,
    meta: HashMap<String, String>,
    layout: Layout,
) -> Result<Vec<Shard>, String> {
    let mut cols = Columns::new(k, layout.top_logprobs_mantissa_bits);
    let fields = cols
        .finish()
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), false))
        .collect();
    let mut shards = Shards {
        fields,
        meta,
        layout,
        shard_path,
        current: None,
        closed: Vec::new(),
        rows: 0,
    };
    let chunk = layout.row_group_rows.clamp(1, 64);
    let reader = std::io::BufReader::new(std::fs::File::open(jsonl).map_err(|e| e.to_string())?);
    for text in reader.lines() {
        let text = text.map_err(|e| e.to_string())?;
        let line: OutputLine<LogprobsResponse> =
            serde_json::from_str(&text).map_err(|e| format!("output line: {e}"))?;
        let Some(response) = line.response else {
            continue;
        };
        cols.push(&line.custom_id, &response.body)?;
        if cols.rows >= chunk {
            shards.write(&mut cols)?;
        }
    }
    if cols.rows > 0 {
        shards.write(&mut cols)?;
    }
    shards.finish()
}

#[cfg(test)]
mod tests {
    use super::round_mantissa;

    #[test]
    fn rounded_mantissas_stay_within_their_bound_and_drop_their_low_bits() {
        let xs = [
            -0.0f32,
            -1e-7,
            -std::f32::consts::LN_2,
            -1.5,
            -std::f32::consts::LN_10,
            -9.999_9,
            -17.3,
            -31.9,
            -88.0,
        ];
        for bits in [1, 6, 8, 12, 22] {
            for &x in &xs {
                let r = round_mantissa(x, bits);
                let bound = x.abs() * 2f32.powi(-(bits as i32 + 1));
                assert!((r - x).abs() <= bound, "{x} at {bits} bits: {r}");
                assert_eq!(r.to_bits() & ((1 << (23 - bits)) - 1), 0, "{x} {bits}");
                assert!(r <= 0.0, "a logprob stays a logprob: {x} -> {r}");
            }
        }
        for &x in &xs {
            assert_eq!(round_mantissa(x, 23).to_bits(), x.to_bits());
        }
        assert_eq!(round_mantissa(f32::NEG_INFINITY, 8), f32::NEG_INFINITY);
        assert!(round_mantissa(f32::NAN, 8).is_nan());
        // The largest mantissa rounds up into the next power of two, not past it.
        assert_eq!(round_mantissa(-1.999_999_9, 8), -2.0);
    }
}
