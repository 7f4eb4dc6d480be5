"""Markdown table of training runs: `python report.py runs/*` prints one row per run folder.

Columns: run folder, method, data set, epochs done / planned, kNN top-1 (%) at the last monitor and the best one,
linear top-1 (%) from linear_eval.json when eval_linear.py has written it ("cached" when it trained on
pre-extracted features), the method's diagnostic, wall time, training images/s, commit, hardware. "–" = not found.

The diagnostic is the last value of one per-epoch key that each script writes to metrics.jsonl:
  median_triplet  rank_k_same_label      share of anchors whose rank-k negative has their label (Table 5)
  smog            group_label_entropy    mean label entropy of the groups used (Fig. 5; lower = purer groups)
  ressl           teacher_nn_same_label  % of teacher keys whose most similar queue entry has their label (Fig. 2)
  hnpm            hard_size              mean size of an anchor's hard-negative set B~_i (Eq. 5)
  reco            phi                    discriminative index of Table III on the test features (x100)

Where the numbers come from: config.json ("method", "dataset", "epochs", "provenance"); metrics.jsonl: per-step
lines (those with "images_per_s": the last one's value) and epoch-level lines ("knn_top1", the diagnostic, "epoch",
"wall_time_s", summed over the invocations of a resumed run); epochs done: the highest of the epoch-level lines' "epoch", the checkpoint's progress.json and,
when backbone.pt exists, the planned epochs. Every script writes "method" into config.json; a config.json without it
(written by hand) takes the method from the folder name (<method>-<dataset>-<time>). A folder without config.json is
skipped.
"""
import argparse
import json
import os
import re
import sys

DIAGNOSTIC = {"median_triplet": "rank_k_same_label", "smog": "group_label_entropy",
              "ressl": "teacher_nn_same_label", "hnpm": "hard_size", "reco": "phi"}
COLUMNS = ["run", "method", "dataset", "epochs", "kNN last", "kNN best", "linear", "diagnostic", "wall time",
           "img/s", "commit", "hardware"]
MISSING = "–"


def parse_json(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return parse_json(f.read())


def read_metrics(path):
    """metrics.jsonl -> list of dicts; a line that is not JSON (a run still writing it) is skipped."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [m for m in map(parse_json, f) if isinstance(m, dict)]


def fmt(value, spec=".2f"):
    return MISSING if value is None else format(value, spec)


def fmt_duration(seconds):
    if seconds is None:
        return MISSING
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def last(metrics, key):
    return next((m[key] for m in reversed(metrics) if isinstance(m.get(key), (int, float))), None)


def run_row(folder):
    """One table row (dict of column -> text) of a run folder, or None when it has no config.json."""
    cfg = read_json(os.path.join(folder, "config.json"))
    if not isinstance(cfg, dict):
        print(f"warning: skipping {folder}: no readable config.json in it", file=sys.stderr)
        return None
    name = os.path.basename(os.path.normpath(folder))
    finished = os.path.isfile(os.path.join(folder, "backbone.pt"))
    prefix = name.split("-")[0]
    method = cfg.get("method") or (prefix if prefix in DIAGNOSTIC else None)
    metrics = read_metrics(os.path.join(folder, "metrics.jsonl"))

    planned = cfg.get("epochs")
    epoch_lines = [m for m in metrics if "images_per_s" not in m]  # monitor and per-epoch lines, the final line
    done = [m["epoch"] for m in epoch_lines if isinstance(m.get("epoch"), int)]
    for d in os.listdir(folder):  # checkpoint-<n>/progress.json: {"epoch": complete epochs, ...}
        progress = read_json(os.path.join(folder, d, "progress.json")) if re.fullmatch(r"checkpoint-\d+", d) else None
        if isinstance(progress, dict) and isinstance(progress.get("epoch"), int):
            done.append(progress["epoch"])
    if finished and planned:
        done.append(planned)
    knn = [m["knn_top1"] for m in epoch_lines if isinstance(m.get("knn_top1"), (int, float))]
    linear = read_json(os.path.join(folder, "linear_eval.json"))
    linear = linear if isinstance(linear, dict) and isinstance(linear.get("top1"), (int, float)) else {}
    walls = [m["wall_time_s"] for m in epoch_lines if isinstance(m.get("wall_time_s"), (int, float))]
    key = DIAGNOSTIC.get(method)
    diag = last(epoch_lines, key) if key else None

    prov = cfg.get("provenance") or {}
    commit = prov.get("git_commit")
    commit = commit and commit[:8] + ("+dirty" if prov.get("git_dirty") else "")
    device = prov.get("device_name") or ("cpu" if prov else None)
    procs = prov.get("num_processes") or 1
    precision = prov.get("mixed_precision")
    hardware = device and f"{procs}× {device}" + (f" ({precision})" if precision not in (None, "no") else "")
    return {"run": name, "method": method or MISSING, "dataset": cfg.get("dataset") or MISSING,
            "epochs": f"{max(done) if done else 0}/{fmt(planned, 'd')}",
            "kNN last": fmt(knn[-1] if knn else None), "kNN best": fmt(max(knn) if knn else None),
            "linear": fmt(linear.get("top1")) + (" cached" if linear.get("cached") else ""),
            "diagnostic": MISSING if diag is None else f"{key} {diag:.4g}",
            "wall time": fmt_duration(sum(walls) if walls else None),
            "img/s": fmt(last(metrics, "images_per_s"), ".1f"),
            "commit": commit or MISSING, "hardware": hardware or MISSING}


def sort_key(column):
    """Text columns ascending; number columns best first, "–" last."""
    if column in ("kNN last", "kNN best", "linear"):
        return lambda row: (row[column] == MISSING, -float(row[column].split()[0]) if row[column] != MISSING else 0)
    return lambda row: row[column]


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (e.g. runs/*)")
    parser.add_argument("--sort", default="none", choices=["none", "run", "method", "dataset", "kNN last",
                                                           "kNN best", "linear"], help="order of the rows")
    args = parser.parse_args(argv)
    rows = [row for row in map(run_row, args.runs) if row]
    if args.sort != "none":
        rows.sort(key=sort_key(args.sort))
    print(table(rows))


if __name__ == "__main__":
    main()
