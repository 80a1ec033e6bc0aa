#!/usr/bin/env python3
"""Compares two `ersm bench --dump` files (e.g. an aarch64 run under qemu
against the x86_64 run): same images, identical kept token sets, ERSM and
dense logits within a tolerance. Exits 1 on any difference. Standard library only."""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: compare-dumps.py A.jsonl B.jsonl [tolerance=1e-4]")
    a, b = load(sys.argv[1]), load(sys.argv[2])
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
    ok = len(a) == len(b) and len(a) > 0
    if not ok:
        print(f"record counts differ or empty: {len(a)} vs {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x["image"] != y["image"]:
            print(f"frame {i}: images differ: {x['image']} vs {y['image']}")
            ok = False
            continue
        same_kept = x["kept"] == y["kept"]
        diffs = {
            key: max(abs(p - q) for p, q in zip(x[key], y[key]))
            for key in ("logits", "dense_logits")
        }
        print(
            f"frame {i} {x['image']}: kept {len(x['kept'])} tokens "
            f"({'identical' if same_kept else 'DIFFERENT'}), "
            f"max |Δ logit| ersm {diffs['logits']:.2e}, dense {diffs['dense_logits']:.2e}"
        )
        if not same_kept:
            only_a = sorted(set(x["kept"]) - set(y["kept"]))
            only_b = sorted(set(y["kept"]) - set(x["kept"]))
            print(f"  only in A: {only_a[:20]}  only in B: {only_b[:20]}")
        ok &= same_kept and all(d <= tol for d in diffs.values())
    print("MATCH" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
