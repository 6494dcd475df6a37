"""Figures of README.md, docs/RESULTS.md, docs/SYNTH.md (and docs/SETTINGS.md's tables), produced by a command:
``main.py results``.

A figure in those two files lives only inside a generated block::

    <!-- results:make_run_oof -->
    ...table rendered from docs/results/make_run/...
    <!-- /results:make_run_oof -->

Each block is rendered from files a command wrote: a snapshot of a finished run's outputs
(``main.py results --snapshot OUT`` copies ``serve.json``, ``timings.json``, the OOF summaries, the
blend summary and the subject post-processing replay of ``OUT`` into ``docs/results/<name>/``), the
ablation tables ``main.py ablate`` wrote (``docs/ablations/*.csv``), the realism table
(``docs/realism/*.json``), and the settings tables of docs/SETTINGS.md and the README (from the field
docs in config.py). ``main.py results`` re-renders every block in place;
``tests/test_results.py`` fails when a committed block no longer matches its source files.

Nothing here trains or serves; it only reads and writes Markdown.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from io_utils import read_json, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]  # the repository root (this file is in tools/)
RESULTS_DIR = ROOT / "docs" / "results"
DOCS = (ROOT / "README.md", ROOT / "docs" / "RESULTS.md", ROOT / "docs" / "SYNTH.md", ROOT / "docs" / "SETTINGS.md")
# What a snapshot keeps of a run's output folder (small JSON files; no model, no array).
SNAPSHOT_FILES = (
    "serve.json",
    "timings.json",
    "optional_steps.json",
    "ensemble/oof/blend_summary.json",
    "oof/subject_pp_replay.json",
    "make_run_wall.json",
)
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z0-9_.:/-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


class ResultsError(RuntimeError):
    """A block without a renderer, or a source file that is missing."""


def _f(x: Any, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


# --------------------------------------------------------------------------- snapshots


def snapshot(run_dir: str | Path, name: str = "make_run", dest: Path | None = None, conditions: str = "") -> Path:
    """Copy the figures' source files of a finished run into ``docs/results/<name>/`` (replacing it)."""
    run_dir = Path(run_dir)
    dest = (dest or RESULTS_DIR) / name
    if not (run_dir / "serve.json").is_file():
        raise ResultsError(f"{run_dir} has no serve.json: snapshot a finished `main.py run` folder")
    if dest.exists():
        shutil.rmtree(dest)
    for rel in SNAPSHOT_FILES:
        src = run_dir / rel
        if src.is_file():
            write_json(dest / rel, _strip(read_json(src)))
    for summary in sorted((run_dir / "oof").glob("*_summary.json")):
        write_json(dest / "oof" / summary.name, _strip(read_json(summary)))
    write_json(dest / "provenance.json", {**provenance(run_dir), **({"conditions": conditions} if conditions else {})})
    cfg = run_dir / "config.json"
    if cfg.is_file():
        c = read_json(cfg)
        write_json(dest / "config.json", {"run": {k: c["run"][k] for k in ("n_folds", "seed", "fold_seed", "debug")}})
    return dest


def provenance(run_dir: Path) -> dict[str, str]:
    """The commit of the checkout the run was made in (when it is a git clone) and the run's date."""
    import subprocess
    import time

    out = {"date": time.strftime("%Y-%m-%d", time.gmtime((run_dir / "serve.json").stat().st_mtime))}
    for where in (run_dir, run_dir.parent):
        try:
            commit = subprocess.run(
                ["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            break
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            break
    return out


def _strip(obj: Any) -> Any:
    """Drop machine paths (they differ per clone and are no figure)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("submission", "path", "bundle_dir", "data_dir")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- renderers


@dataclass(frozen=True)
class Source:
    root: Path

    def json(self, rel: str) -> Any:
        path = self.root / rel
        if not path.is_file():
            raise ResultsError(
                f"{path} is missing: run `main.py results --snapshot OUT` (or the command that writes it)"
            )
        return read_json(path)

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()


def render_oof(src: Source) -> str:
    """Per member and the served blend: OOF score per view (cross-fitted), from the snapshot's summaries."""
    rows = ["| member | full | IMU-only | test-like (mean) |", "|---|---|---|---|"]
    for path in sorted((src.root / "oof").glob("*_summary.json")):
        o = read_json(path)["overall"]
        rows.append(
            f"| {path.name[: -len('_summary.json')]} | {_f(o['full'])} | {_f(o['imu_only'])} | {_f(o['mean'])} |"
        )
    if src.has("ensemble/oof/blend_summary.json"):
        b = src.json("ensemble/oof/blend_summary.json")
        o = b["overall"]
        shipped = ", ".join(f"{v}: {m}" for v, m in sorted((b.get("shipped") or {}).items()))
        rows.append(
            f"| **served blend** (cross-fitted; shipped {shipped}) | **{_f(o['full'])}** | **{_f(o['imu_only'])}** "
            f"| **{_f(o['mean'])}** |"
        )
        decisions = b.get("decisions") or {}
        if decisions:
            per_view = [
                f"{v}: the blend in {d['folds_blend']} of {d['n_folds']} folds, the class bias in {d['folds_bias']}"
                for v, d in sorted(decisions.items())
            ]
            return (
                "\n".join(rows) + "\n\nPer-fold choices (each taken on the other folds): " + "; ".join(per_view) + ".\n"
            )
    return "\n".join(rows) + "\n"


def render_holdout(src: Source) -> str:
    s = src.json("serve.json")
    rows = ["| hold-out (test subjects, through the gateway) | score | binary F1 | macro F1 |", "|---|---|---|---|"]
    for key, label in (("holdout", "all"), ("holdout_full", "full sensors"), ("holdout_imu_only", "IMU-only")):
        if key in s:
            c = s[key]
            rows.append(f"| {label} | {_f(c['score'])} | {_f(c['binary_f1'])} | {_f(c['macro_f1'])} |")
    text = "\n".join(rows) + "\n"
    iv = s.get("holdout_interval")
    if iv:
        text += (
            f"\nHold-out score {_f(s['holdout']['score'])}, {iv['level']:.0%} interval [{_f(iv['low'])}, "
            f"{_f(iv['high'])}] ({iv['method']}, {iv['n_subjects']} subjects, {iv['n_resamples']} resamples)"
        )
        if src.has("ensemble/oof/blend_summary.json"):
            oof = src.json("ensemble/oof/blend_summary.json")["overall"]["mean"]
            inside = iv["low"] <= oof <= iv["high"]
            text += f"; the served blend's OOF test-like score {_f(oof)} lies " + (
                "inside it: hold-out and OOF agree within what the test subjects allow" if inside else "outside it"
            )
        text += ".\n"
    return text


def render_latency(src: Source) -> str:
    lat = src.json("serve.json").get("latency") or {}
    if not lat:
        return "No latency recorded (the run served through Kaggle's server).\n"
    return (
        f"`predict` over {lat['calls']} calls: p50 {_f(lat['p50_ms'], 1)} ms, p95 {_f(lat['p95_ms'], 1)} ms, "
        f"max {_f(lat['max_ms'], 1)} ms (start-up {_f(src.json('serve.json').get('startup_s'), 1)} s).\n"
    )


def render_timings(src: Source) -> str:
    t = src.json("timings.json")
    rows = ["| stage | seconds |", "|---|---|"]
    rows += [f"| {k} | {_f(v, 1)} |" for k, v in t.items()]
    return "\n".join(rows) + "\n"


def render_subject_pp(src: Source) -> str:
    if not src.has("oof/subject_pp_replay.json"):
        return "Subject post-processing was not fitted in this run.\n"
    r = src.json("oof/subject_pp_replay.json")
    sim = r.get("simulation") or {}
    rows = ["| view | no post-processing | with (mean of orders) | gain mean | gain min … max | orders |"]
    rows.append("|---|---|---|---|---|---|")
    for view, s in sorted(sim.items()):
        rows.append(
            f"| {view} | {_f(s['no_pp'])} | {_f(s['mean'])} | {s['gain_mean']:+.4f} | "
            f"{s['gain_min']:+.4f} … {s['gain_max']:+.4f} | {s['orders']} |"
        )
    return "\n".join(rows) + "\n"


def render_csv(path: Path) -> str:
    """A CSV a command wrote (e.g. ``ablate``), as a Markdown table; floats to 4 places."""
    if not path.is_file():
        raise ResultsError(f"{path} is missing")
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    if not table:
        return "(empty)\n"

    def cell(v: str) -> str:
        try:
            x = float(v)
        except ValueError:
            return v
        return v if x.is_integer() and "." not in v else f"{x:.4f}"

    rows = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in table[1:]]
    return "\n".join(rows) + "\n"


def render_realism(path: Path) -> str:
    from tools import realism

    d = read_json(path)
    return realism.format_markdown(realism.realism_rows(d.get("data") or {}, d.get("run")))


def render_wall(src: Source) -> str:
    t = src.json("timings.json")
    total = t.get("train + serve total")
    line = f"train + serve {_f(total / 60, 1)} min" if total is not None else "no train + serve total recorded"
    if src.has("make_run_wall.json"):
        w = src.json("make_run_wall.json")
        line = f"`make run` from a fresh clone: {_f(w['make_run_wall_s'] / 60, 1)} min wall, install included ({line})"
    if src.has("provenance.json"):
        p = src.json("provenance.json")
        line += f"; run of {p['date']}" + (f" at commit `{p['commit']}`" if p.get("commit") else "")
        if p.get("conditions"):
            line += f"; {p['conditions']}"
    return line + ".\n"


_RUN_RENDERERS: dict[str, Callable[[Source], str]] = {
    "wall": render_wall,
    "oof": render_oof,
    "holdout": render_holdout,
    "latency": render_latency,
    "timings": render_timings,
    "subject_pp": render_subject_pp,
}


def render(name: str, root: Path = ROOT) -> str:
    """The body of block ``name``: ``run:<snapshot>:<part>``, ``csv:<path>``, ``realism:<path>`` or
    ``settings:<part>`` (the settings tables, from config.py's field docs: ``config.settings_markdown``)."""
    kind, _, rest = name.partition(":")
    if kind == "run":
        snap, _, part = rest.partition(":")
        if part not in _RUN_RENDERERS:
            raise ResultsError(f"block {name!r}: no renderer {part!r} (known: {sorted(_RUN_RENDERERS)})")
        return _RUN_RENDERERS[part](Source(root / "docs" / "results" / snap))
    if kind == "csv":
        return render_csv(root / rest)
    if kind == "realism":
        return render_realism(root / rest)
    if kind == "settings":
        import config

        try:
            return config.settings_markdown(rest)
        except config.ConfigError as e:
            raise ResultsError(f"block {name!r}: {e}") from None
    raise ResultsError(f"block {name!r}: unknown kind {kind!r} (run:, csv:, realism:, settings:)")


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, body) of every generated block in ``text``."""
    return [(m.group("name"), m.group("body")) for m in BLOCK.finditer(text)]


def regenerate(path: Path, root: Path = ROOT) -> tuple[str, list[str]]:
    """``path``'s text with every block re-rendered, and the names of the blocks that changed."""
    text = path.read_text()
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        body = render(m.group("name"), root)
        if body != m.group("body"):
            changed.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(sub, text), changed


def run(
    snapshot_from: str | Path | None = None, name: str = "make_run", check: bool = False, conditions: str = ""
) -> dict[str, list[str]]:
    """Optionally snapshot a run, then re-render (or with ``check`` only compare) every block of the docs."""
    if snapshot_from is not None:
        snapshot(snapshot_from, name, conditions=conditions)
    report = {}
    for doc in DOCS:
        new, changed = regenerate(doc)
        report[str(doc.relative_to(ROOT))] = changed
        if changed and not check:
            write_text(doc, new)
    return report


_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+")


def figures_outside_blocks(text: str) -> list[str]:
    """Lines of ``text`` quoting a decimal figure outside a generated block and outside code fences.

    On pages whose figures must all come from their sources (docs/RESULTS.md, README's Results
    section) such a line is a hand-copied figure that nothing keeps current.
    """
    out, in_block, in_fence = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if BLOCK_OPEN.match(line):
            in_block = True
            continue
        if BLOCK_CLOSE.match(line):
            in_block = False
            continue
        if not (in_block or in_fence) and _NUMBER.search(re.sub(r"`[^`]*`", "", line)):
            out.append(line)
    return out


BLOCK_OPEN = re.compile(r"<!-- results:[^ ]+ -->$")
BLOCK_CLOSE = re.compile(r"<!-- /results:[^ ]+ -->$")


def section(text: str, heading: str) -> str:
    """The text of the ``## heading`` section (up to the next ``## ``)."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 3)
    return text[start : end if end >= 0 else len(text)]
