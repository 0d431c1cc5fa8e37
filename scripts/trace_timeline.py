"""Draws one request's trace, read from a ``--trace-file``, as a timeline picture.

    python scripts/serve.py --role all --trace-file /tmp/spans.jsonl ...   # then send a request
    python scripts/trace_timeline.py /tmp/spans.jsonl --out docs/trace.png [--request-id chatcmpl-...]

Each span is a bar on its process's row (router, encode, prefill, decode), from its start to its
end, labelled with its name and duration; span events (first token, ...) are ticks. Needs
matplotlib (``pip install -e ".[tools]"``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path


def load_trace(path: Path, request_id: str | None) -> list[dict]:
    spans = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    roots = [s for s in spans if s.get("kind") == "SpanKind.SERVER" and s["name"].startswith("router")]
    if request_id is not None:
        roots = [s for s in roots if s["attributes"].get("mmserve.request_id") == request_id]
    if not roots:
        raise SystemExit(f"no request span{f' for {request_id}' if request_id else ''} in {path}")
    trace_id = roots[-1]["context"]["trace_id"]
    return sorted((s for s in spans if s["context"]["trace_id"] == trace_id), key=lambda s: s["start_time"])


def seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def draw(spans: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(seconds(s["start_time"]) for s in spans)
    services = list(dict.fromkeys(s["resource"]["attributes"].get("service.name", "?") for s in spans))
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.9 * len(spans)))
    for row, span in enumerate(spans):
        start, end = seconds(span["start_time"]) - t0, seconds(span["end_time"]) - t0
        service = span["resource"]["attributes"].get("service.name", "?")
        ax.barh(row, max(end - start, 1e-4) * 1e3, left=start * 1e3, color=f"C{services.index(service)}")
        ax.text(end * 1e3, row, f"  {span['name']} ({(end - start) * 1e3:.1f} ms)", va="center", fontsize=8)
        for event in span.get("events", []):
            at = (seconds(event["timestamp"]) - t0) * 1e3
            ax.plot([at, at], [row - 0.4, row + 0.4], color="black")
            ax.text(at, row + 0.45, event["name"], fontsize=7, ha="center")
    ax.set_yticks(range(len(spans)), [s["resource"]["attributes"].get("service.name", "?") for s in spans])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the request reached the router")
    root = spans[0]["attributes"].get("mmserve.request_id", "")
    ax.set_title(f"one request's trace {root}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_file", type=Path)
    parser.add_argument("--out", type=Path, default=Path("trace.png"))
    parser.add_argument("--request-id", default=None, help="the request to draw (default: the last one)")
    args = parser.parse_args()
    spans = load_trace(args.trace_file, args.request_id)
    draw(spans, args.out)
    for span in spans:
        took = (seconds(span["end_time"]) - seconds(span["start_time"])) * 1e3
        print(f"{span['resource']['attributes'].get('service.name', '?'):16} {span['name']:28} {took:9.1f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
