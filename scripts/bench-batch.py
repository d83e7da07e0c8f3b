#!/usr/bin/env python3
"""Issue 14's benchmark: N sequences x LEN tokens at top-20 as Parquet batches, against the same
sequences through /v1/logprobs one at a time from one client, through the real server binary on a
fresh database. The N sequences are cut into --rounds chunks; each chunk runs once as a batch and
once as the loop, alternating which goes first (ABBA), so that a drift of this shared machine's
speed over the run weighs on both sides alike (a single batch between two halves of the loop
measured a loop 264 tok/s before and 224 after). A batch is timed as its create call (which
validates every line) plus its row's creation to completion, to the microsecond (from Postgres),
and followed as `teachd batch submit` follows it, on its /events stream, not by polling. Then one
more batch per entry of --outputs (top-k, optionally `:BITS` for `top_logprobs_mantissa_bits`)
over the first --bytes-n sequences, for bytes per scored token on disk; the short interactive
/v1/logprobs calls (32 tokens) run during the last of those, and idle.
Prints a markdown table: scored tokens/s both ways, bytes per token, the server's peak RSS during
each batch, and the short calls' latency. Run it with nothing else busy.
  scripts/bench-batch.py [BIN] [--n 200] [--len 512] [--rounds 10] [--outputs 20,128,128:8] [--bytes-n 40]
BIN defaults to $CARGO_TARGET_DIR/debug/teachd (build it first: cargo build --bin teachd)."""
import argparse, json, os, random, statistics, subprocess, sys, tempfile, threading, time, urllib.request, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("bin", nargs="?", default=os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/teachd/target")), "debug", "teachd"))
ap.add_argument("--n", type=int, default=200)
ap.add_argument("--len", type=int, default=512)
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--outputs", default="20,128,128:8")
ap.add_argument("--bytes-n", type=int, default=40)
args = ap.parse_args()
MODEL_PATH = subprocess.check_output(["bash", os.path.join(HERE, "fetch-model.sh")]).decode().strip()
MODEL = "smollm2-135m-instruct"
PORT = 18081
BASE = f"http://127.0.0.1:{PORT}"


def call(method, path, key=None, body=None, raw=None, ctype="application/json"):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"content-type": ctype}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(BASE + path, method=method, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=3600) as r:
        out = r.read()
    return out if ctype is None else json.loads(out or b"null")


def upload(key, text):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + text.encode() + f"\r\n--{boundary}--\r\n".encode()
    return call("POST", "/v1/files", key, raw=body, ctype=f"multipart/form-data; boundary={boundary}")


def follow(key, batch_id):
    """Reads the batch's event stream to its end; returns the final batch object."""
    req = urllib.request.Request(f"{BASE}/v1/batches/{batch_id}/events",
                                 headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            if line.strip() == b"data: [DONE]":
                break
    return call("GET", f"/v1/batches/{batch_id}", key)


def one_at_a_time(key, seqs):
    """Scored tokens and seconds of `seqs` through /v1/logprobs, one call after the other."""
    t = time.perf_counter()
    scored = 0
    for s in seqs:
        r = call("POST", "/v1/logprobs", key, {"model": MODEL, "token_ids": s, "top_k": 20})
        scored += len(r["token_logprobs"])
    return scored, time.perf_counter() - t


def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, min(len(xs), -(-len(xs) * p // 100)) - 1)]


def short_calls(key, stop, out):
    rnd = random.Random(3)
    while not stop.is_set():
        ids = [rnd.randrange(100, 40000) for _ in range(32)]
        t = time.perf_counter()
        call("POST", "/v1/logprobs", key, {"model": MODEL, "token_ids": ids, "top_k": 20})
        out.append((time.perf_counter() - t) * 1000)


def main():
    db = "teachd_bench_batch_" + uuid.uuid4().hex[:8]
    data_dir = tempfile.mkdtemp(prefix="teachd-bench-batch-")
    subprocess.check_call(["createdb", "-h", "127.0.0.1", "-U", "postgres", db])
    env = dict(os.environ, TEACHD__DATABASE__URL=f"postgres://postgres@127.0.0.1:5432/{db}",
               TEACHD__SERVER__BIND=f"127.0.0.1:{PORT}", TEACHD__MODELS__0__SOURCE__PATH=MODEL_PATH,
               TEACHD__TLOG__KEY_FILE=os.path.join(data_dir, "ledger.key"),
               TEACHD__BATCH__DATA_DIR=os.path.join(data_dir, "batch"), RUST_LOG="warn")
    srv = subprocess.Popen([args.bin, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(BASE + "/readyz", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        admin = subprocess.check_output([args.bin, "admin", "bootstrap"], env=env,
                                        stderr=subprocess.DEVNULL).decode().strip().splitlines()[-1]
        c = call("POST", "/admin/clients", admin, {"name": "bench", "limits": {
            "rpm": 100000, "tpm": 10**9, "max_concurrent": 8, "daily_tokens": 10**12}})
        key = call("POST", f"/admin/clients/{c['id']}/keys", admin, {"scopes": ["teacher"]})["key"]
        call("POST", "/admin/tos", admin, {"version": "v1", "text": "t"})
        call("POST", "/v1/tos/accept", key, {"version": "v1", "purpose": "bench", "student_model": "s", "commercial": False})
        rnd = random.Random(7)
        seqs = [[rnd.randrange(100, 40000) for _ in range(args.len)] for _ in range(args.n)]
        call("POST", "/v1/logprobs", key, {"model": MODEL, "token_ids": seqs[0], "top_k": 20})  # warm-up
        rows = []
        idle = []
        # Idle short-call latency: 12 calls.
        rnd_s = random.Random(3)
        for _ in range(12):
            ids = [rnd_s.randrange(100, 40000) for _ in range(32)]
            t = time.perf_counter()
            call("POST", "/v1/logprobs", key, {"model": MODEL, "token_ids": ids, "top_k": 20})
            idle.append((time.perf_counter() - t) * 1000)
        during = None

        def run_batch(seqs, k, bits, with_calls):
            text = "".join(json.dumps({"custom_id": f"s{j}", "method": "POST", "url": "/v1/logprobs",
                                       "body": {"model": MODEL, "token_ids": s, "top_k": k}}) + "\n"
                           for j, s in enumerate(seqs))
            f = upload(key, text)
            open(f"/proc/{srv.pid}/clear_refs", "w").write("5")
            body = {"input_file_id": f["id"], "endpoint": "/v1/logprobs",
                    "completion_window": "24h", "output_format": "parquet"}
            if bits is not None:
                body["top_logprobs_mantissa_bits"] = bits
            t = time.perf_counter()
            b = call("POST", "/v1/batches", key, body)
            create_secs = time.perf_counter() - t
            lat, stop = [], threading.Event()
            th = threading.Thread(target=short_calls, args=(key, stop, lat)) if with_calls else None
            if th:
                th.start()
            b = follow(key, b["id"])
            stop.set()
            if th:
                th.join()
            assert b["status"] == "completed", b
            secs = create_secs + float(subprocess.check_output(
                ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-qtA", "-c",
                 f"SELECT extract(epoch FROM completed_at - created_at) FROM batches WHERE id = '{b['id']}'"]))
            scored = b["progress"]["scored_tokens"]
            size = sum(call("GET", f"/v1/files/{fid}", key)["bytes"] for fid in b["output_file_ids"])
            rss = status_kib(srv.pid, "VmHWM:") / 1024
            return (len(seqs), k, bits, scored, secs, size, rss), lat

        # The throughput run: top-20 over all N sequences in chunks, each chunk as a batch and as
        # the loop, alternating which goes first; nothing else running.
        per = -(-args.n // args.rounds)
        batch_tok = loop_tok = 0
        batch_secs = loop_secs = 0.0
        ratios, peak = [], 0.0
        for r in range(args.rounds):
            chunk = seqs[r * per:(r + 1) * per]
            if not chunk:
                break
            if r % 2:
                tok, secs = one_at_a_time(key, chunk)
            row, _ = run_batch(chunk, 20, None, False)
            if not r % 2:
                tok, secs = one_at_a_time(key, chunk)
            loop_tok, loop_secs = loop_tok + tok, loop_secs + secs
            batch_tok, batch_secs = batch_tok + row[3], batch_secs + row[4]
            peak = max(peak, row[6])
            ratios.append((row[3] / row[4]) / (tok / secs))
        one_by_one = loop_tok / loop_secs
        batch_rate = batch_tok / batch_secs
        outputs = [o.split(":") for o in args.outputs.split(",")]
        for i, o in enumerate(outputs):
            last = i == len(outputs) - 1
            row, lat = run_batch(seqs[:args.bytes_n], int(o[0]), int(o[1]) if len(o) > 1 else None, last)
            rows.append(row)
            if last:
                during = (row, lat)
        print(f"{args.n} sequences x {args.len} tokens (random ids), default model, {args.bin}\n")
        print("| measurement | value |")
        print("|---|---|")
        print(f"| /v1/logprobs one at a time, top-20, {args.n} sequences | {one_by_one:.0f} scored tok/s |")
        print(f"| Parquet batches, top-20, the same {args.n} sequences in {len(ratios)} batches of {per} | "
              f"{batch_rate:.0f} scored tok/s ({batch_tok} tokens in {batch_secs:.1f} s); "
              f"server peak RSS {peak:.0f} MiB |")
        print(f"| batch / one at a time, top-20, {args.n} sequences | {batch_rate / one_by_one:.3f}x "
              f"(per round: median {statistics.median(ratios):.3f}, {min(ratios):.3f} to {max(ratios):.3f}) |")
        for n, k, bits, scored, secs, size, rss in rows:
            rounding = "" if bits is None else f", top_logprobs rounded to {bits} mantissa bits"
            print(f"| Parquet batch, {n} sequences, top-{k}{rounding} | {scored / secs:.0f} scored tok/s "
                  f"({scored} tokens in {secs:.1f} s); {size / scored:.1f} bytes per scored token "
                  f"on disk; server peak RSS {rss:.0f} MiB |")
        print(f"| 32-token /v1/logprobs idle | p50 {statistics.median(idle):.0f} ms, p99 {pct(idle, 99):.0f} ms ({len(idle)} calls) |")
        if during and during[1]:
            (n, k, bits, *_), lat = during
            print(f"| 32-token /v1/logprobs during the last batch (top-{k}) | p50 {statistics.median(lat):.0f} ms, "
                  f"p99 {pct(lat, 99):.0f} ms ({len(lat)} calls) |")
    finally:
        srv.terminate()
        srv.wait(timeout=60)
        subprocess.call(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", db])


main()
