"""Are two checkouts' outputs bit-identical on the tiny model? A check for refactors that must not change
behaviour (issue 27): each checkout indexes the same configs and queries them through its own `tributary`,
and every stored array file, the results JSONL, the scores .npy and the CLI's stdout are compared byte for byte.
The manifests are compared without what differs by run (times, host, pid, store id, code version, folder).

    python benchmarks/same_outputs.py --before /path/to/main --after .

Takes about a minute on two cores; prints one line per compared output and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SENTENCES = [
    "the fox eats berries in the forest",
    "the owl eats mice at night",
    "a bear eats honey in the valley",
    "the otter eats clams in the harbor",
    "a crow eats seeds in the meadow",
    "the wolf eats deer in the snow",
    "a seal eats fish in the cold sea",
    "the hare eats clover in the field",
]
QUERIES = [
    {"id": "q-owl", "text": "the owl eats fish in the cold sea"},
    {"id": "q-prompt", "prompt": "the fox eats", "completion": " honey in the valley"},
]
CONFIGS = {  # name -> sections over the base config
    "if_ekfac_dim0": {},
    "grad_dot_dim4": {"projection": {"dim": 4}, "curvature": {"strategy": "identity"}, "method": {"name": "grad_dot"}},
    "source_kfac_dim4": {
        "projection": {"dim": 4, "kind": "gaussian"},
        "curvature": {"strategy": "kfac"},
        "method": {"name": "source", "eta": 0.1, "steps": 5},
    },
}
VOLATILE = {"runs", "store_id", "code_version", "timings", "created", "host", "pid", "seconds", "started"}


def _run(checkout: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(checkout), RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    code = "import sys; from engine.cli import app; sys.argv = ['tributary', *sys.argv[1:]]; app()"
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: tributary {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _store_files(store: Path, root: Path) -> dict[str, bytes]:
    """Relative path -> bytes; JSON files with their volatile keys removed and the run's folder named ROOT."""
    files = {}
    for path in sorted(p for p in store.rglob("*") if p.is_file() and "lock" not in p.name):
        data = path.read_bytes()
        if path.suffix == ".json":
            text = data.decode().replace(str(root), "ROOT")
            data = json.dumps(_stable(json.loads(text)), sort_keys=True).encode()
        files[str(path.relative_to(store))] = data
    return files


def outputs(checkout: Path, model: Path, root: Path) -> dict[str, bytes]:
    import yaml

    root.mkdir(parents=True)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "text": s}) + "\n" for i, s in enumerate(SENTENCES)))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    found = {}
    for name, sections in CONFIGS.items():
        raw = {
            "model": {"path": str(model), "dtype": "float64"},
            "data": {"train": str(train), "max_length": 32, "batch_size": 3},
            "projection": {"dim": 0},
            "curvature": {"strategy": "ekfac"},
            "method": {"name": "if"},
            "store": {"path": str(root / f"{name}.zarr"), "dtype": "float64", "rows_per_chunk": 3},
        }
        for section, values in sections.items():
            raw[section] = dict(raw[section], **values)
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        _run(checkout, "index", str(config), "--no-progress")
        out, scores = root / f"{name}.results.jsonl", root / f"{name}.scores.npy"
        stdout = _run(
            checkout,
            "query",
            str(config),
            "--queries",
            str(queries),
            "--top-k",
            "3",
            "--out",
            str(out),
            "--scores-out",
            str(scores),
            "--per-module",
        )
        found[f"{name}: query stdout"] = stdout.replace(str(root), "ROOT").encode()
        found[f"{name}: results"] = out.read_bytes().replace(str(root).encode(), b"ROOT")
        found[f"{name}: scores"] = scores.read_bytes()
        for relative, data in _store_files(root / f"{name}.zarr", root).items():
            found[f"{name}: store {relative}"] = data
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description="are two checkouts' outputs bit-identical on the tiny model?")
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.after.resolve()))
    from engine.testing.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        texts = SENTENCES + [q.get("text") or q["prompt"] + q["completion"] for q in QUERIES]
        model = save_tiny(Path(tmp) / "model", "gpt2", texts, hidden=8, layers=2, heads=2, seed=1)
        before = outputs(args.before.resolve(), model, Path(tmp) / "before")
        after = outputs(args.after.resolve(), model, Path(tmp) / "after")
    different = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for key in sorted(before.keys() | after.keys()):
        print(f"{'DIFFERENT' if key in different else 'same     '} {key}")
    print(f"{len(before.keys() | after.keys()) - len(different)} outputs identical, {len(different)} different")
    return 1 if different else 0


if __name__ == "__main__":
    raise SystemExit(main())
