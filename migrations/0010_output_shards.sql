-- Sharded Parquet outputs (issue 14): a large teacher-forcing dataset is written as several
-- Parquet files of about `batch.parquet_shard_bytes` each. `output_file_id` stays the first
-- shard (what OpenAI's clients read); `output_file_ids` lists every shard in row order (one
-- entry for an unsharded output; empty while there is no output).
ALTER TABLE batches ADD COLUMN output_file_ids text[] NOT NULL DEFAULT '{}';
UPDATE batches SET output_file_ids = ARRAY[output_file_id] WHERE output_file_id IS NOT NULL;
