//! The Arrow IPC form of `/v1/logprobs`: the same columns as one record batch.
//! Per-request scalars (id, model, score_from, top_k, temperature, digests) travel as schema
//! metadata; `position` is the token index i each row scores.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{Float32Builder, ListBuilder, UInt32Builder};
use arrow_array::{ArrayRef, Float32Array, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema};

use super::LogprobsResponse;
use crate::error::ApiError;

pub fn schema(meta: HashMap<String, String>) -> Schema {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    Schema::new(vec![
        Field::new("position", DataType::UInt32, false),
        Field::new("token_id", DataType::UInt32, false),
        Field::new("token_logprobs", DataType::Float32, false),
        Field::new("token_ranks", DataType::UInt32, false),
        Field::new("top_ids", list(DataType::UInt32), false),
        Field::new("top_logprobs", list(DataType::Float32), false),
        Field::new("tail_logmass", DataType::Float32, true),
        Field::new("entropy", DataType::Float32, false),
    ])
    .with_metadata(meta)
}

pub fn encode(r: &LogprobsResponse) -> Result<Vec<u8>, ApiError> {
    let n = r.token_logprobs.len();
    let meta = HashMap::from([
        ("id".to_string(), r.id.clone()),
        ("object".to_string(), r.object.clone()),
        ("model".to_string(), r.model.clone()),
        ("score_from".to_string(), r.score_from.to_string()),
        ("top_k".to_string(), r.top_k.to_string()),
        ("temperature".to_string(), r.temperature.to_string()),
        (
            "prompt_tokens".to_string(),
            r.usage.prompt_tokens.to_string(),
        ),
        (
            "weights_sha256".to_string(),
            r.teacher.weights_sha256.clone(),
        ),
        (
            "tokenizer_sha256".to_string(),
            r.teacher.tokenizer_sha256.clone(),
        ),
        ("vocab_size".to_string(), r.teacher.vocab_size.to_string()),
        ("quantization".to_string(), r.teacher.quantization.clone()),
    ]);
    let schema = Arc::new(schema(meta));
    let mut top_ids = ListBuilder::new(UInt32Builder::new());
    let mut top_lps = ListBuilder::new(Float32Builder::new());
    for j in 0..n {
        top_ids.values().append_slice(&r.top_ids[j]);
        top_ids.append(true);
        top_lps.values().append_slice(&r.top_logprobs[j]);
        top_lps.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(
            (0..n).map(|j| (r.score_from + j) as u32),
        )),
        Arc::new(UInt32Array::from_iter_values(
            r.token_ids[r.score_from..].iter().copied(),
        )),
        Arc::new(Float32Array::from(r.token_logprobs.clone())),
        Arc::new(UInt32Array::from(r.token_ranks.clone())),
        Arc::new(top_ids.finish()),
        Arc::new(top_lps.finish()),
        Arc::new(Float32Array::from(r.tail_logmass.clone())),
        Arc::new(Float32Array::from(r.entropy.clone())),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("arrow batch: {e}")))?;
    let mut buf = Vec::new();
    {
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut buf, &schema)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("arrow writer: {e}")))?;
        w.write(&batch)
            .and_then(|_| w.finish())
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("arrow write: {e}")))?;
    }
    Ok(buf)
}
