#!/usr/bin/env python3
"""Issue 9: time /v1/logprobs at 512 tokens (top_k 20) through teachd binaries, side by side.
Each run: a fresh database, the real server binary, a real key with the ToS accepted, one warm-up,
five timed calls. Example (two builds of teachd copied aside):
  scripts/bench-profiles.py opt1=/tmp/teachd-opt1 opt3=$CARGO_TARGET_DIR/debug/teachd
usage: bench_profiles.py LABEL=BIN [LABEL=BIN ...]   (alternates binaries, 2 rounds each)"""
import json, os, subprocess, sys, time, urllib.request, statistics, uuid, random

MODEL = subprocess.check_output(["bash", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fetch-model.sh")]).decode().strip()
PORT = 18080
BASE = f"http://127.0.0.1:{PORT}"

def call(method, path, key=None, body=None):
    req = urllib.request.Request(BASE + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")

def run(binary):
    db = "teachd_bench_prof_" + uuid.uuid4().hex[:8]
    subprocess.check_call(["createdb", "-h", "127.0.0.1", "-U", "postgres", db])
    env = dict(os.environ, TEACHD__DATABASE__URL=f"postgres://postgres@127.0.0.1:5432/{db}",
               TEACHD__SERVER__BIND=f"127.0.0.1:{PORT}", TEACHD__MODELS__0__SOURCE__PATH=MODEL,
               TEACHD__TLOG__KEY_FILE="/tmp/bench-ledger.key", RUST_LOG="warn")
    srv = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(BASE + "/readyz", timeout=2); break
            except Exception:
                time.sleep(0.5)
        admin = subprocess.check_output([binary, "admin", "bootstrap"], env=env, stderr=subprocess.DEVNULL).decode().strip().splitlines()[-1]
        c = call("POST", "/admin/clients", admin, {"name": "bench", "limits": {"rpm": 100000, "tpm": 100000000, "max_concurrent": 8, "daily_tokens": 10**12}})
        key = call("POST", f"/admin/clients/{c['id']}/keys", admin, {"scopes": ["teacher"]})["key"]
        call("POST", "/admin/tos", admin, {"version": "v1", "text": "t"})
        call("POST", "/v1/tos/accept", key, {"version": "v1", "purpose": "bench", "student_model": "s", "commercial": False})
        rnd = random.Random(7)
        ids = [rnd.randrange(100, 40000) for _ in range(512)]
        body = {"model": "smollm2-135m-instruct", "token_ids": ids, "top_k": 20}
        call("POST", "/v1/logprobs", key, body)  # warm-up
        times = []
        for _ in range(5):
            t = time.perf_counter(); call("POST", "/v1/logprobs", key, body); times.append(time.perf_counter() - t)
        return times
    finally:
        srv.terminate(); srv.wait(timeout=60)
        subprocess.call(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", db])

res = {}
pairs = [a.split("=", 1) for a in sys.argv[1:]]
for rnd_ in range(2):
    for label, b in pairs:
        res.setdefault(label, []).extend(run(b))
print("| build | calls | median s | min s | scored tok/s (median) |")
print("|---|---:|---:|---:|---:|")
for label, t in res.items():
    m = statistics.median(t)
    print(f"| {label} | {len(t)} | {m:.3f} | {min(t):.3f} | {511/m:.0f} |")
