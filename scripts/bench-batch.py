#!/usr/bin/env python3
"""Issue 14's benchmark: a Parquet batch of N sequences x LEN tokens against the same sequences
through /v1/logprobs one at a time from one client, through the real server binary on a fresh
database. Prints a markdown table: scored tokens/s both ways, bytes per scored token on disk at
each top-k, the server's peak RSS during each batch, and the latency of short interactive
/v1/logprobs calls (32 tokens) idle and while a batch runs. Run it with nothing else busy.
  scripts/bench-batch.py [BIN] [--n 40] [--len 512] [--k 20,128]
BIN defaults to $CARGO_TARGET_DIR/debug/teachd (build it first: cargo build --bin teachd)."""
import argparse, json, os, random, statistics, subprocess, sys, tempfile, threading, time, urllib.request, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ap = argparse.ArgumentParser()
ap.add_argument("bin", nargs="?", default=os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/teachd/target")), "debug", "teachd"))
ap.add_argument("--n", type=int, default=40)
ap.add_argument("--len", type=int, default=512)
ap.add_argument("--k", default="20,128")
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
        batch_rate = None
        for i, k in enumerate(int(x) for x in args.k.split(",")):
            text = "".join(json.dumps({"custom_id": f"s{j}", "method": "POST", "url": "/v1/logprobs",
                                       "body": {"model": MODEL, "token_ids": s, "top_k": k}}) + "\n"
                           for j, s in enumerate(seqs))
            f = upload(key, text)
            open(f"/proc/{srv.pid}/clear_refs", "w").write("5")
            b = call("POST", "/v1/batches", key, {"input_file_id": f["id"], "endpoint": "/v1/logprobs",
                                                  "completion_window": "24h", "output_format": "parquet"})
            lat, stop = [], threading.Event()
            th = None
            if i == 0:
                th = threading.Thread(target=short_calls, args=(key, stop, lat))
                th.start()
            while b["status"] not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.5)
                b = call("GET", f"/v1/batches/{b['id']}", key)
            stop.set()
            if th:
                th.join()
                during = lat
            assert b["status"] == "completed", b
            secs = b["completed_at"] - b["in_progress_at"]
            scored = b["progress"]["scored_tokens"]
            size = call("GET", f"/v1/files/{b['output_file_id']}", key)["bytes"]
            rows.append((k, scored, secs, size, status_kib(srv.pid, "VmHWM:") / 1024))
            if i == 0:
                batch_rate = scored / secs
        t = time.perf_counter()
        scored = 0
        for s in seqs:
            r = call("POST", "/v1/logprobs", key, {"model": MODEL, "token_ids": s, "top_k": 20})
            scored += len(r["token_logprobs"])
        one_by_one = scored / (time.perf_counter() - t)
        print(f"{args.n} sequences x {args.len} tokens, default model, {args.bin}\n")
        print("| measurement | value |")
        print("|---|---|")
        print(f"| /v1/logprobs one at a time, top-20 | {one_by_one:.0f} scored tok/s |")
        for k, scored, secs, size, rss in rows:
            print(f"| Parquet batch, top-{k} | {scored / secs:.0f} scored tok/s ({scored} tokens in {secs} s, "
                  f"whole seconds); {size / scored:.1f} bytes per scored token on disk; server peak RSS {rss:.0f} MiB |")
        print(f"| batch / one at a time (top-20) | {batch_rate / one_by_one:.2f}x |")
        print(f"| 32-token /v1/logprobs idle | p50 {statistics.median(idle):.0f} ms, p99 {pct(idle, 99):.0f} ms ({len(idle)} calls) |")
        if during:
            print(f"| 32-token /v1/logprobs during the top-20 batch | p50 {statistics.median(during):.0f} ms, "
                  f"p99 {pct(during, 99):.0f} ms ({len(during)} calls) |")
    finally:
        srv.terminate()
        srv.wait(timeout=60)
        subprocess.call(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", db])


main()
