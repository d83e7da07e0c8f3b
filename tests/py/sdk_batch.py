#!/usr/bin/env python3
"""Batch jobs through the unmodified `openai` SDK, read back with pyarrow (issue 14).

Run by the API test `sdk::the_openai_sdk_runs_a_batch_and_pyarrow_reads_its_parquet` against a
live teachd (real model, real Postgres) with a key whose client has accepted the ToS:

    python sdk_batch.py --server http://127.0.0.1:PORT --key KEY --model MODEL

What it checks, with the SDK's own calls: `files.create` / `retrieve` / `list` / `content` /
`delete`, `batches.create` (with teachd's `output_format` as an extra body field) /
`retrieve` / `list` / `cancel`; the Parquet output read with pyarrow equals, value for value,
what `POST /v1/logprobs` answers for the same sequence; a chat batch's JSONL bodies parse as the
SDK's `ChatCompletion` and equal the synchronous call's answer. Exits non-zero (an
AssertionError with the difference) on any mismatch.
"""

import argparse
import io
import json
import struct
import sys
import time
import urllib.request

import openai
import pyarrow.parquet as pq
from openai.types.chat import ChatCompletion

FINAL = {"completed", "failed", "expired", "cancelled"}


def f32(x):
    """The float32 a JSON number stands for (teachd writes f32 values in shortest form)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def wait(client, batch_id, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in FINAL:
            return b
        assert time.monotonic() < deadline, f"batch {batch_id} never finished: {b}"
        time.sleep(0.2)


def post(server, key, path, body):
    req = urllib.request.Request(
        server + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def logprobs_batch(client, server, key, model):
    seqs = [
        [(1 + (i * 131 + j * 17) % 4000) for j in range(n)]
        for i, n in [(1, 24), (2, 9), (3, 40)]
    ]
    bodies = [{"model": model, "token_ids": s, "top_k": 5} for s in seqs]
    bodies[1]["score_from"] = 4
    lines = [
        {"custom_id": f"seq-{i}", "method": "POST", "url": "/v1/logprobs", "body": b}
        for i, b in enumerate(bodies)
    ]
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    f = client.files.create(file=("dataset.jsonl", data), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data), f
    assert client.files.retrieve(f.id).filename == "dataset.jsonl"
    assert f.id in [x.id for x in client.files.list()], "uploaded file not listed"
    assert client.files.content(f.id).read() == data, "input content differs"

    b = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/logprobs",
        completion_window="24h",
        metadata={"run": "sdk-e2e"},
        extra_body={"output_format": "parquet"},
    )
    assert b.status in ("validating", "in_progress"), b
    b = wait(client, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
        3,
        3,
        0,
    ), b.request_counts
    assert b.metadata == {"run": "sdk-e2e"}, b.metadata
    progress = (b.model_extra or {}).get("progress") or {}
    assert progress.get("scored_tokens") == progress.get("total_tokens") > 0, progress
    assert b.id in [x.id for x in client.batches.list(limit=100)], "batch not listed"

    assert b.output_file_ids == [b.output_file_id], b  # one shard at this size
    table = pq.read_table(io.BytesIO(client.files.content(b.output_file_id).read()))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    assert meta["teachd.batch_id"] == b.id and meta["model"] == model, meta
    assert meta["top_k"] == "5", meta
    assert table.schema.field("top_ids").type.value_type.list_size == 5, table.schema
    rows = table.to_pylist()
    assert [r["custom_id"] for r in rows] == ["seq-0", "seq-1", "seq-2"], rows
    for row, body in zip(rows, bodies):
        want = post(server, key, "/v1/logprobs", body)
        assert meta["weights_sha256"] == want["teacher"]["weights_sha256"], meta
        assert row["token_ids"] == want["token_ids"]
        assert row["score_from"] == want["score_from"]
        assert row["token_ranks"] == want["token_ranks"]
        assert row["top_ids"] == want["top_ids"], row["custom_id"]
        for col in ("token_logprobs", "entropy"):
            assert row[col] == [f32(x) for x in want[col]], (row["custom_id"], col)
        assert row["tail_logmass"] == [None if x is None else f32(x) for x in want["tail_logmass"]]
        assert row["top_logprobs"] == [[f32(x) for x in t] for t in want["top_logprobs"]]
    client.files.delete(f.id)
    try:
        client.files.retrieve(f.id)
        raise AssertionError("a deleted file is still there")
    except openai.NotFoundError:
        pass
    return len(rows)


def chat_batch(client, model):
    msgs = [
        [{"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Count to three."}],
    ]
    lines = [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": m,
                "max_tokens": 6,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 2,
            },
        }
        for i, m in enumerate(msgs)
    ]
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    f = client.files.create(file=("chat.jsonl", data), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait(client, b.id)
    assert b.status == "completed" and b.request_counts.completed == 2, b
    out = sorted(jsonl(client.files.content(b.output_file_id).text), key=lambda o: o["custom_id"])
    for o, line in zip(out, lines):
        assert o["custom_id"] == line["custom_id"] and o["error"] is None, o
        assert o["response"]["status_code"] == 200, o
        got = ChatCompletion.model_validate(o["response"]["body"])
        want = client.chat.completions.create(**line["body"])
        assert got.choices[0].message.content == want.choices[0].message.content, (got, want)
        got_lp = [t.logprob for t in got.choices[0].logprobs.content]
        want_lp = [t.logprob for t in want.choices[0].logprobs.content]
        assert got_lp == want_lp, (got_lp, want_lp)
    return len(out)


def cancelled_batch(client, model):
    lines = [
        {
            "custom_id": f"long-{i}",
            "method": "POST",
            "url": "/v1/logprobs",
            "body": {"model": model, "token_ids": [(1 + (i * 7 + j) % 3000) for j in range(256)]},
        }
        for i in range(40)
    ]
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    f = client.files.create(file=("long.jsonl", data), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/logprobs", completion_window="24h")
    b = client.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled"), b
    b = wait(client, b.id)
    assert b.status == "cancelled", b
    assert b.request_counts.completed < 40, b.request_counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.server + "/v1", api_key=args.key, max_retries=0)
    rows = logprobs_batch(client, args.server, args.key, args.model)
    chats = chat_batch(client, args.model)
    cancelled_batch(client, args.model)
    print(f"sdk_batch: ok ({rows} Parquet rows equal /v1/logprobs, {chats} chat lines, cancel)")


if __name__ == "__main__":
    sys.exit(main())
