#!/usr/bin/env python3
"""Check what a teachd server signed, without teachd's code (standard library + `cryptography`).

  verify-receipt.py receipt --key KEY --receipt FILE --checkpoint FILE --proof FILE
      The receipt (the `x-teachd-receipt` header value) is signed by the log's key, and its row
      is leaf `leaf_index` of the tree the checkpoint signed (inclusion proof: the JSON of
      GET /v1/ledger/proof/inclusion?leaf_index=I&tree_size=N, N = the checkpoint's size).
      With --response FILE: the saved response body is the one the receipt names.
  verify-receipt.py consistency --key KEY --old FILE --new FILE --proof FILE
      Both checkpoints are signed by the key, and the newer tree extends the older one
      (the JSON of GET /v1/ledger/proof/consistency?first=M&second=N).

KEY is the verifier key string of GET /v1/ledger/key (`name+hexid+base64(0x01||key)`), or a file
holding it. Exit status 0: verified; 1: not verified (the reason is printed).
RFC 9162 (tree, proofs), C2SP signed-note and tlog-checkpoint (checkpoints).
"""

import argparse
import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

RECEIPT_DOMAIN = "teachd-receipt/v1"


class Failed(Exception):
    pass


def read(path):
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def verifier_key(arg):
    text = arg
    if "+" not in arg:
        text = read(arg)
    name, key_id, key = text.strip().split("+", 2)
    raw = base64.b64decode(key)
    if raw[0] != 1 or len(raw) != 33:
        raise Failed("the verifier key is not an Ed25519 key")
    want = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if want.hex() != key_id:
        raise Failed("the verifier key's id does not match its key")
    return name, bytes.fromhex(key_id), Ed25519PublicKey.from_public_bytes(raw[1:])


def open_checkpoint(key, text):
    """Verify a signed note from `key` and parse its checkpoint: (origin, size, root)."""
    name, key_id, public = key
    body, sep, sigs = text.partition("\n\n")
    if not sep:
        raise Failed("not a signed note")
    body += "\n"
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            continue
        sig_name, sig = line[2:].rsplit(" ", 1)
        raw = base64.b64decode(sig)
        if sig_name != name or raw[:4] != key_id:
            continue
        try:
            public.verify(raw[4:], body.encode())
        except InvalidSignature:
            raise Failed("the checkpoint's signature does not verify")
        lines = body.split("\n")
        return lines[0], int(lines[1]), base64.b64decode(lines[2])
    raise Failed("the checkpoint carries no signature by this key")


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def leaf(row_hash):
    return hashlib.sha256(b"\x00" + row_hash).digest()


def root_from_inclusion(index, size, leaf_hash, path):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        raise Failed("leaf index beyond the tree")
    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            raise Failed("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise Failed("inclusion proof too short")
    return r


def check_consistency(first, second, first_root, second_root, proof):
    """RFC 9162 section 2.1.4.2."""
    if first == second:
        if proof or first_root != second_root:
            raise Failed("equal trees must have equal roots and an empty proof")
        return
    if first == 0 or first > second:
        raise Failed("bad tree sizes")
    if first & (first - 1) == 0:  # a power of two: the first root is the first node
        proof = [first_root] + proof
    if not proof:
        raise Failed("empty consistency proof")
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise Failed("consistency proof too long")
        if fn & 1 or fn == sn:
            fr = node(c, fr)
            sr = node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != first_root or sr != second_root:
        raise Failed("the newer checkpoint does not extend the older one")


def check_receipt(args):
    key = verifier_key(args.key)
    origin, size, root = open_checkpoint(key, read(args.checkpoint))
    receipt = json.loads(base64.b64decode(read(args.receipt).strip()))
    b = lambda k: base64.b64decode(receipt[k])
    signed = "".join(
        f"{line}\n"
        for line in [
            RECEIPT_DOMAIN,
            origin,
            str(receipt["leaf_index"]),
            receipt["row_hash"],
            receipt["request_sha256"],
            receipt["response_sha256"],
            receipt["ts"],
        ]
    ).encode()
    try:
        key[2].verify(b("signature"), signed)
    except InvalidSignature:
        raise Failed("the receipt's signature does not verify")
    if args.response:
        with open(args.response, "rb") as f:
            if hashlib.sha256(f.read()).digest() != b("response_sha256"):
                raise Failed("the response is not the one the receipt names")
    proof = json.loads(read(args.proof))
    if proof["tree_size"] != size or proof["leaf_index"] != receipt["leaf_index"]:
        raise Failed("the proof is for another leaf or tree size")
    path = [base64.b64decode(h) for h in proof["audit_path"]]
    if root_from_inclusion(receipt["leaf_index"], size, leaf(b("row_hash")), path) != root:
        raise Failed("the receipt's row is not in the checkpoint's tree")
    print(f"ok: leaf {receipt['leaf_index']} is in {origin} at size {size}")


def check_consistency_cmd(args):
    key = verifier_key(args.key)
    o1, n1, r1 = open_checkpoint(key, read(args.old))
    o2, n2, r2 = open_checkpoint(key, read(args.new))
    if o1 != o2:
        raise Failed("the checkpoints are of different logs")
    proof = json.loads(read(args.proof))
    if (proof["first"], proof["second"]) != (n1, n2):
        raise Failed("the proof is for other tree sizes")
    check_consistency(n1, n2, r1, r2, [base64.b64decode(h) for h in proof["proof"]])
    print(f"ok: {o1} at size {n2} extends size {n1}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("receipt")
    r.add_argument("--key", required=True)
    r.add_argument("--receipt", required=True)
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--proof", required=True)
    r.add_argument("--response")
    c = sub.add_parser("consistency")
    c.add_argument("--key", required=True)
    c.add_argument("--old", required=True)
    c.add_argument("--new", required=True)
    c.add_argument("--proof", required=True)
    args = p.parse_args()
    try:
        (check_receipt if args.cmd == "receipt" else check_consistency_cmd)(args)
    except (Failed, ValueError, KeyError, IndexError, json.JSONDecodeError) as e:
        print(f"NOT VERIFIED: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
