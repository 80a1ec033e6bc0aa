#!/usr/bin/env python3
"""Memory soak of the live view: `ersm run --loop --output http://…` for a
given time while MJPEG viewers attach and detach again and again, /metrics
and /status are scraped, and the resident memory is sampled. Ends with
Ctrl-C and checks the summary is printed.

    targets/soak-live.py [--seconds 600] [--model models/mobilenet_v2_ersm] \
        [--out targets/results/x86-2core/soak-live.json]

Pass: resident memory after the first minute grows by less than --max-growth
MiB (default 16) to the end, and the run prints its summary on Ctrl-C.
Standard library only; needs the release binary (cargo build --release).
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fetch(addr, path, timeout=10):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
        return r.read()


def viewer(addr, frames):
    """Attaches to the MJPEG stream, reads `frames` parts, detaches."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(f"GET /stream.mjpg HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    seen = 0
    buf = b""
    while seen < frames:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        seen += buf.count(b"Content-Type: image/jpeg")
        buf = buf[-64:]
    s.close()
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--model", default=os.path.join(ROOT, "models/mobilenet_v2_ersm"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/ersm"))
    ap.add_argument("--threads", default="1")
    ap.add_argument("--max-growth", type=float, default=16.0)
    ap.add_argument("--out")
    a = ap.parse_args()

    proc = subprocess.Popen(
        [a.binary, "run", "--loop", "--model", a.model, "--threads", a.threads,
         "--output", "http://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    addr = None
    log = []
    for line in proc.stderr:
        log.append(line)
        m = re.search(r"live view on http://([\d.:]+)/", line)
        if m:
            addr = m.group(1)
            break
    if not addr:
        sys.exit("no live view line:\n" + "".join(log))
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()

    start = time.time()
    samples = []
    attaches = 0
    viewed = 0
    while time.time() - start < a.seconds:
        # A viewer attaches for a few frames and leaves; a second one stays a
        # little longer every other round.
        viewed += viewer(addr, 5)
        attaches += 1
        if attaches % 2 == 0:
            viewed += viewer(addr, 20)
            attaches += 1
        status = json.loads(fetch(addr, "/status"))
        metrics = fetch(addr, "/metrics").decode()
        rss = float(re.search(r"^ersm_resident_memory_bytes (\S+)$", metrics, re.M).group(1))
        samples.append({"t": round(time.time() - start, 1), "rss_mib": round(rss / 2**20, 2),
                        "frames": status["frames"], "live_dropped": status["live_dropped"],
                        "viewers": status["viewers"]})
        time.sleep(5)

    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    after_minute = [s for s in samples if s["t"] >= 60] or samples
    base = after_minute[0]["rss_mib"]
    peak = max(s["rss_mib"] for s in after_minute)
    end = samples[-1]["rss_mib"]
    result = {
        "seconds": round(time.time() - start, 1),
        "model": os.path.basename(a.model),
        "threads": a.threads,
        "frames": samples[-1]["frames"],
        "viewer_attaches": attaches,
        "frames_viewed": viewed,
        "rss_mib_at_1_min": base,
        "rss_mib_peak_after_1_min": peak,
        "rss_mib_end": end,
        "growth_mib": round(end - base, 2),
        "summary_on_ctrl_c": "interrupted (Ctrl-C)" in out,
        "exit_code": proc.returncode,
        "samples": samples,
    }
    result["pass"] = (result["growth_mib"] < a.max_growth and result["summary_on_ctrl_c"]
                      and proc.returncode == 0)
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
