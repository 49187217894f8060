"""A self-contained HTML report of query results: one file, inline CSS, no scripts, no network assets.

Per query: the prompt (muted) and the completion with every completion token shaded by its score (green
for a positive score, red for a negative one, intensity relative to the query's largest magnitude; the
exact value in the token's tooltip), then the top supporting and the top opposing training examples with
their scores, drawn once more as a small bar chart. Optional record fields add context where a caller has
it: `instruction` (the heading), `baseline` ({label, text}: another model's answer to the same prompt),
`note` (a line under the heading), and per example `source` (where the example comes from). An optional
summary table ({caption, header, rows}) comes first. Settings of the run come last in a table. Every piece of text is HTML-escaped, and "://"
in text is written as "&#58;//", so the file contains no URL, no ``<script`` and nothing to fetch; a
Content-Security-Policy meta tag forbids any fetch as a second guard.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine import __version__
from engine.data.lines import numbered_lines
from engine.errors import TributaryError

__all__ = ["load_results", "render_html_report", "write_html_report"]

# SentencePiece / byte-level BPE markers that can appear in raw token pieces.
_PIECE_MARKERS = {"\u2581": " ", "\u0120": " ", "\u010a": "\n"}

_CSS = """
:root { --fg: #1f2328; --muted: #6e7781; --line: #d0d7de; --bg-soft: #f6f8fa;
        --pos: 22, 163, 74; --neg: 220, 38, 38; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px;
          margin-bottom: 20px; font-size: 14px; }
nav.toc a { color: #0969da; text-decoration: none; margin-right: 14px; white-space: nowrap; }
section.query { border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; margin: 0 0 22px; }
.meta { color: var(--muted); font-size: 13px; margin-bottom: 10px; }
.meta span { margin-right: 14px; }
.tag { display: inline-block; background: var(--bg-soft); border: 1px solid var(--line); border-radius: 10px;
       padding: 0 8px; font-size: 12px; color: var(--fg); }
.generation { font: 15px/1.9 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
              white-space: pre-wrap; word-break: break-word; background: #fcfcfd; border: 1px solid var(--line);
              border-radius: 6px; padding: 10px 12px; }
.prompt { color: var(--muted); }
.tok { border-radius: 3px; padding: 1px 0; box-shadow: inset 0 -1px 0 rgba(0,0,0,0.08); }
.legend { font-size: 12px; color: var(--muted); margin-top: 6px; }
.legend .sw { display: inline-block; width: 34px; height: 10px; border-radius: 2px; vertical-align: middle;
              margin: 0 4px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
table.examples { table-layout: fixed; }
table.examples td.id { overflow: hidden; text-overflow: ellipsis; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: nowrap; }
td.snippet { white-space: pre-wrap; word-break: break-word; }
.bar { display: block; height: 4px; border-radius: 2px; margin-top: 3px; }
.bar.pos { background: rgb(var(--pos)); }
.bar.neg { background: rgb(var(--neg)); }
.score-pos { color: rgb(15, 118, 54); }
.score-neg { color: rgb(185, 28, 28); }
.none { color: var(--muted); font-style: italic; }
details { margin-top: 4px; font-size: 12px; color: var(--muted); }
details table { font-size: 12px; width: auto; }
table.settings td.key { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; width: 32%; }
table.settings td.value { white-space: pre-wrap; word-break: break-word; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; }
.baseline { color: var(--muted); background: var(--bg-soft); font-size: 14px; }
.label { font-size: 12px; color: var(--muted); margin: 10px 0 3px; text-transform: uppercase; letter-spacing: .04em; }
.note { margin: 0 0 10px; }
.src { color: var(--muted); font-family: system-ui, sans-serif; font-size: 12px; white-space: normal; }
table.summary { margin: 6px 0 22px; }
table.summary td, table.summary th { text-align: center; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
table.summary tr:last-child td { font-weight: 600; }
.caption { color: var(--muted); font-size: 13px; margin: 0 0 6px; }
.chart { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 3fr); gap: 2px 10px; font-size: 12px;
         margin: 4px 0 6px; max-width: 860px; }
.chart .who { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; text-align: right; color: var(--fg); }
.chart .track { position: relative; height: 16px; border-left: 1px solid var(--line);
                border-right: 1px solid var(--line); background: linear-gradient(var(--line), var(--line))
                center / 1px 100% no-repeat; }
.chart .fill { position: absolute; top: 3px; height: 10px; border-radius: 2px; }
.chart .fill.pos { left: 50%; background: rgb(var(--pos)); }
.chart .fill.neg { right: 50%; background: rgb(var(--neg)); }
.chart .axis { grid-column: 2; display: flex; justify-content: space-between; color: var(--muted); font-size: 11px; }
@media (max-width: 760px) { main { padding: 14px; } .chart { grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); } }
"""


def _text(value: Any) -> str:
    """HTML-escape any value for element content or a quoted attribute; no URL survives as a literal."""
    escaped = html.escape("" if value is None else str(value), quote=True)
    return escaped.replace("://", "&#58;//")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _format_score(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    if not math.isfinite(number):
        return str(number)
    return f"{number:+.4g}"


def _display_piece(piece: Any) -> str:
    text = "" if piece is None else str(piece)
    for marker, replacement in _PIECE_MARKERS.items():
        text = text.replace(marker, replacement)
    return text


def _max_abs(values: Iterable[Any]) -> float:
    finite = [abs(v) for v in (_number(x) for x in values) if v is not None and math.isfinite(v)]
    return max(finite, default=0.0)


def _token_background(value: float | None, scale: float) -> str:
    if value is None or not math.isfinite(value) or scale <= 0 or value == 0:
        return ""
    alpha = 0.1 + 0.75 * min(1.0, abs(value) / scale)
    colour = "var(--pos)" if value > 0 else "var(--neg)"
    return f' style="background: rgba({colour}, {alpha:.3f})"'


def _highlight_source(record: dict) -> tuple[list | None, str]:
    scores = record.get("token_scores")
    if isinstance(scores, list) and scores:
        return scores, "token scores"
    top = record.get("top_k") or []
    if top and isinstance(top[0], dict) and isinstance(top[0].get("per_token"), list) and top[0]["per_token"]:
        return top[0][
            "per_token"
        ], f"per-token score of the top supporter ({top[0].get('id', top[0].get('index', ''))})"
    return None, ""


def _chart(top: Any, bottom: Any, scale: float) -> str:
    """The listed examples' scores as a diverging bar chart: supporters right (green), opposers left (red)."""
    entries = [e for e in (top if isinstance(top, list) else []) + (bottom if isinstance(bottom, list) else [])]
    bars = []
    for entry in entries:
        score = _number(entry.get("score")) if isinstance(entry, dict) else None
        if score is None or not math.isfinite(score) or scale <= 0:
            continue
        width = 50.0 * min(1.0, abs(score) / scale)
        label = entry.get("id", entry.get("index", ""))
        if entry.get("source"):
            label = f"{entry['source']} ({label})"
        bars.append(
            f'<div class="who" title="{_text(label)}">{_text(label)}</div>'
            f'<div class="track" title="{_text(_format_score(score))}"><span class="fill '
            f'{"pos" if score > 0 else "neg"}" style="width: {width:.1f}%"></span></div>'
        )
    if not bars:
        return ""
    limit = _text(_format_score(scale).lstrip("+"))
    return (
        f'<div class="chart">{"".join(bars)}<div class="axis"><span>−{limit}</span><span>0</span>'
        f"<span>+{limit}</span></div></div>"
    )


def _baseline(record: dict) -> str:
    baseline = record.get("baseline")
    if not isinstance(baseline, dict) or not baseline.get("text"):
        return ""
    return (
        f'<div class="label">{_text(baseline.get("label", "baseline"))}</div>'
        f'<div class="generation baseline">{_text(baseline["text"])}</div>'
        '<div class="label">this model</div>'
    )


def _generation(record: dict) -> str:
    """The prompt (muted) and the completion, its tokens shaded by score when tokens and scores exist."""
    has_pair = "prompt" in record or "completion" in record
    prompt = record.get("prompt") if has_pair else None
    completion = record.get("completion") if has_pair else record.get("text")
    tokens = record.get("completion_tokens")
    scores, source = _highlight_source(record)
    parts = ['<div class="generation">']
    if prompt:
        parts.append(f'<span class="prompt" title="prompt">{_text(prompt)}</span>')
    if isinstance(tokens, list) and tokens:
        scale = _max_abs(scores or [])
        sep = (
            ""
            if not prompt or str(prompt).endswith((" ", "\n")) or _display_piece(tokens[0]).startswith((" ", "\n"))
            else " "
        )
        parts.append(sep)
        for i, piece in enumerate(tokens):
            value = _number(scores[i]) if scores is not None and i < len(scores) else None
            title = f"token {i}: {_display_piece(piece)!r}"
            if value is not None:
                title += f" score {_format_score(value)}"
            parts.append(
                f'<span class="tok" title="{_text(title)}"{_token_background(value, scale)}>'
                f"{_text(_display_piece(piece))}</span>"
            )
    elif completion:
        if prompt and not str(prompt).endswith((" ", "\n")) and not str(completion).startswith((" ", "\n")):
            parts.append(" ")
        parts.append(f'<span class="completion">{_text(completion)}</span>')
    elif not prompt:
        parts.append('<span class="none">no text recorded</span>')
    parts.append("</div>")
    if scores is not None and isinstance(tokens, list) and tokens:
        scale = _max_abs(scores)
        parts.append(
            f'<div class="legend">shading: {_text(source)}; '
            f'<span class="sw" style="background: rgba(var(--neg), 0.85)"></span>opposing '
            f'<span class="sw" style="background: rgba(var(--pos), 0.85)"></span>supporting; '
            f"largest magnitude {_text(_format_score(scale).lstrip('+'))}; hover a token for its value</div>"
        )
    elif scores is not None:
        parts.append(
            '<div class="legend">token scores present but the completion tokens were not recorded; no shading</div>'
        )
    return "".join(parts)


def _per_module(entry: dict) -> str:
    modules = entry.get("per_module")
    if not isinstance(modules, dict) or not modules:
        return ""
    items = sorted(modules.items(), key=lambda kv: -abs(_number(kv[1]) or 0.0))
    rows = "".join(
        f'<tr><td class="id">{_text(name)}</td><td class="num">{_text(_format_score(v))}</td></tr>' for name, v in items
    )
    return f"<details><summary>per module ({len(items)})</summary><table>{rows}</table></details>"


def _examples_table(entries: Any, kind: str, scale: float) -> str:
    if not isinstance(entries, list):
        return f'<p class="none">{_text(kind)}: not computed for this run.</p>'
    if not entries:
        return f'<p class="none">{_text(kind)}: none.</p>'
    rows = []
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            entry = {"snippet": entry}
        score = _number(entry.get("score"))
        bar = ""
        css = ' class="num"'
        if score is not None and math.isfinite(score) and scale > 0 and score != 0:
            width = max(1.0, 100.0 * min(1.0, abs(score) / scale))
            sign = "pos" if score > 0 else "neg"
            css = f' class="num score-{sign}"'
            bar = f'<span class="bar {sign}" style="width: {width:.1f}%"></span>'
        snippet = entry.get("snippet")
        snippet_html = _text(snippet) if snippet not in (None, "") else '<span class="none">no snippet</span>'
        index = entry.get("index")
        source = f'<div class="src">{_text(entry["source"])}</div>' if entry.get("source") else ""
        rows.append(
            f'<tr><td class="num">{_text(entry.get("rank", position))}</td>'
            f'<td class="id" title="{_text(entry.get("id", ""))}">'
            f"{_text(entry.get('id', index if index is not None else ''))}{source}</td>"
            f'<td class="num">{_text("" if index is None else index)}</td>'
            f"<td{css}>{_text(_format_score(entry.get('score')))}{bar}</td>"
            f'<td class="snippet">{snippet_html}{_per_module(entry)}</td></tr>'
        )
    return (
        '<table class="examples"><colgroup><col style="width: 6%"><col style="width: 17%"><col style="width: 8%">'
        '<col style="width: 11%"><col></colgroup><thead><tr><th>rank</th><th>id</th><th>index</th><th>score</th>'
        f"<th>training example</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _query_section(position: int, record: dict) -> str:
    number = record.get("query", position)
    query_id = record.get("id", number)
    meta = [f"<span>query {_text(number)}</span>"]
    for key, label in (("method", "method"), ("measurement", "measurement")):
        if record.get(key) not in (None, ""):
            meta.append(f"<span>{label} <b>{_text(record[key])}</b></span>")
    if "generated" in record:
        meta.append(
            f'<span class="tag">{"generated by the model" if record["generated"] else "given completion"}</span>'
        )
    top = record.get("top_k")
    bottom = record.get("bottom_k")
    scale = _max_abs(e.get("score") for e in (top or []) + (bottom or []) if isinstance(e, dict))
    heading = f"Query {_text(query_id)}"
    if record.get("instruction"):
        heading = f'{_text(record["instruction"])} <span class="src">{_text(query_id)}</span>'
    note = f'<p class="note">{_text(record["note"])}</p>' if record.get("note") else ""
    chart = _chart(top, bottom, scale)
    return (
        f'<section class="query" id="q-{position}">'
        f"<h2>{heading}</h2>"
        f'<div class="meta">{"".join(meta)}</div>'
        f"{note}{_baseline(record)}{_generation(record)}"
        + (f"<h3>Scores of the listed examples</h3>{chart}" if chart else "")
        + "<h3>Top supporting training examples</h3>"
        f"{_examples_table(top, 'top supporting examples', scale)}"
        f"<h3>Top opposing training examples</h3>"
        f"{_examples_table(bottom, 'top opposing examples', scale)}"
        "</section>"
    )


def _flatten(settings: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def _setting_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _settings_table(settings: dict | None) -> str:
    items = _flatten(settings or {})
    if not items:
        return '<p class="none">no settings recorded.</p>'
    rows = "".join(
        f'<tr><td class="key">{_text(k)}</td><td class="value">{_text(_setting_value(v))}</td></tr>' for k, v in items
    )
    return (
        f'<table class="settings"><thead><tr><th>setting</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _summary(summary: dict | None) -> str:
    if not summary:
        return ""
    header = "".join(f"<th>{_text(cell)}</th>" for cell in summary.get("header", []))
    rows = "".join(
        "<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in summary.get("rows", [])
    )
    caption = f'<p class="caption">{_text(summary["caption"])}</p>' if summary.get("caption") else ""
    return f'{caption}<table class="summary"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'


def render_html_report(
    records: list[dict],
    settings: dict | None,
    title: str = "Tributary attribution report",
    summary: dict | None = None,
) -> str:
    """The report as one HTML string (see the module docstring); `summary`: {caption, header, rows}."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TributaryError(
            "the report needs a list of result records (dicts), one per query, as `tributary query --out` writes them"
        )
    if settings is not None and not isinstance(settings, dict):
        raise TributaryError("the report's settings must be a dict of setting name -> value")
    methods = sorted({str(r["method"]) for r in records if r.get("method") not in (None, "")})
    subtitle = f"{len(records)} {'query' if len(records) == 1 else 'queries'}"
    if methods:
        subtitle += f" · method {', '.join(methods)}"
    toc = "".join(f'<a href="#q-{i}">{_text(r.get("id", r.get("query", i)))}</a>' for i, r in enumerate(records))
    sections = "".join(_query_section(i, r) for i, r in enumerate(records))
    if not records:
        sections = '<p class="none">no queries in these results.</p>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main><h1>{_text(title)}</h1>"
        f'<p class="sub">{_text(subtitle)}. A positive score means the training example supports the '
        "completion (removing it would raise the completion's loss); a negative score means it opposes it.</p>"
        + (f'<nav class="toc">queries: {toc}</nav>' if records else "")
        + _summary(summary)
        + f"{sections}"
        f'<section class="settings" id="settings"><h2>Settings</h2>{_settings_table(settings)}</section>'
        f"<footer>Tributary {_text(__version__)} · self-contained report: no scripts, no network assets.</footer>"
        "</main></body></html>\n"
    )


def write_html_report(
    records: list[dict],
    settings: dict | None,
    path: str | Path,
    title: str = "Tributary attribution report",
    summary: dict | None = None,
) -> Path:
    """Write the report to PATH atomically (PATH.part, then rename); return PATH."""
    path = Path(path)
    document = render_html_report(records, settings, title=title, summary=summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        part.write_text(document, encoding="utf-8")
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return path


def load_results(path: str | Path) -> list[dict]:
    """Read a results JSONL (`tributary query --out`): one record per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise TributaryError(f"{path}: no such results file; write one with `tributary query ... --out {path}`")
    records = []
    for line_number, line in numbered_lines(path, "results file"):  # bytes not UTF-8: an error naming the line
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TributaryError(
                f"{path}:{line_number}: invalid JSON ({exc.msg}); expected one results record per line"
            ) from None
        except RecursionError:
            raise TributaryError(f"{path}:{line_number}: JSON nested too deeply to parse") from None
        if not isinstance(record, dict):
            raise TributaryError(
                f"{path}:{line_number}: expected a JSON object (one results record), got {type(record).__name__}"
            )
        records.append(record)
    return records
