-- Sharded Parquet outputs (issue 14): a large teacher-forcing dataset is written as several
-- Parquet files of about `batch.parquet_shard_bytes` each. `output_file_id` stays the first
-- shard (what OpenAI's clients read); `output_file_ids` lists every shard in row order (one
-- entry for an unsharded output; empty while there is no output).
ALTER TABLE batches ADD COLUMN output_file_ids text[] NOT NULL DEFAULT '{}';
UPDATE batches SET output_file_ids = ARRAY[output_file_id] WHERE output_file_id IS NOT NULL;

-- Parquet outputs may round `top_logprobs` to fewer mantissa bits (issue 14: bytes per token);
-- 23 keeps every f32 bit. `token_logprobs` is never rounded.
ALTER TABLE batches ADD COLUMN top_logprobs_mantissa_bits smallint NOT NULL DEFAULT 23
    CHECK (top_logprobs_mantissa_bits BETWEEN 1 AND 23);
