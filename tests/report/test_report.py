"""The HTML report: escaping, self-containment, every section with and without optional fields, and a real
render in headless Chromium (screenshot + DOM dump)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from engine.errors import TributaryError
from engine.report import load_results, render_html_report, write_html_report
from tests.chromium import require_chromium, screenshot_and_dom

HOSTILE = "</td><script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror="alert(2)">'
HOSTILE_URL = "see https://evil.example/x.js and http://evil.example/"

VOID = {"meta", "col", "br", "img", "hr", "input", "link"}
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "main",
    "h1",
    "h2",
    "h3",
    "p",
    "nav",
    "a",
    "section",
    "div",
    "span",
    "b",
    "table",
    "colgroup",
    "col",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "details",
    "summary",
    "footer",
}


def full_record() -> dict:
    return {
        "query": 0,
        "id": "q0",
        "method": "if",
        "prompt": "Shall I compare thee to a summer's day?",
        "completion": " Thou art more lovely",
        "generated": True,
        "measurement": "logprob_sum",
        "completion_tokens": ["\u2581Thou", " art", " more", " lovely"],
        "token_scores": [0.5, -0.25, 0.0, 1.0],
        "top_k": [
            {
                "rank": 1,
                "index": 12,
                "id": "p12",
                "score": 3.2,
                "snippet": "Rough winds do shake the buds",
                "per_token": [0.1, 0.2, 0.3, 0.4],
                "per_module": {"h.0.attn.c_attn": 1.2, "h.1.mlp.c_fc": 2.0},
            },
            {"rank": 2, "index": 3, "id": "p3", "score": 1.5, "snippet": "And summer's lease hath all too short"},
        ],
        "bottom_k": [
            {"rank": 1, "index": 7, "id": "p7", "score": -2.5, "snippet": "Now is the winter of our discontent"}
        ],
    }


def minimal_record() -> dict:
    # "text" instead of prompt/completion; no tokens, no scores, no snippets, no bottom_k, no method.
    return {
        "query": 1,
        "id": "q1",
        "text": "to be or not to be",
        "top_k": [{"rank": 1, "index": 0, "id": "r0", "score": 0.4}],
    }


SETTINGS = {
    "model": {"path": "/models/tiny", "adapter": None},
    "method": "if",
    "damping": None,
    "projection": {"dim": 16},
    "curvature": "ekfac",
    "store": "runs/tiny/store.zarr",
    "train_rows": 1000,
    "measurement": "logprob_sum",
    "generation": {"max_new_tokens": 8, "do_sample": False},
}


class Collector(HTMLParser):
    """Tags with attributes, the text content, and a check that every non-void element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(document: str) -> Collector:
    parser = Collector()
    parser.feed(document)
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed elements: {parser.stack}"
    return parser


def assert_self_contained(document: str, parsed: Collector):
    lowered = document.lower()
    for forbidden in ("<script", "http://", "https://", "<link", "<img", "<iframe", "@import", "url("):
        assert forbidden not in lowered, forbidden
    assert {tag for tag, _ in parsed.tags} <= ALLOWED_TAGS
    for tag, attrs in parsed.tags:
        assert "src" not in attrs, (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs
    assert "default-src 'none'" in document  # the CSP meta tag: nothing may be fetched


def test_hostile_text_is_escaped_and_nothing_is_fetched():
    record = full_record()
    record["id"] = HOSTILE
    record["prompt"] = HOSTILE_IMG + " " + HOSTILE_URL
    record["completion_tokens"][1] = HOSTILE
    record["top_k"][0]["snippet"] = HOSTILE
    record["top_k"][0]["id"] = HOSTILE_IMG
    record["top_k"][0]["per_module"] = {HOSTILE: 1.0}
    record["top_k"][1]["snippet"] = HOSTILE_URL
    record["bottom_k"][0]["snippet"] = "<style>body{display:none}</style>&amp; <!-- x -->"
    settings = dict(SETTINGS, store=HOSTILE_URL, **{HOSTILE: HOSTILE_IMG})
    document = render_html_report([record], settings, title=HOSTILE)
    parsed = parse(document)
    assert_self_contained(document, parsed)
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert [tag for tag, _ in parsed.tags].count("style") == 1  # only the report's own stylesheet
    # The hostile strings come back verbatim as text once the entities are decoded.
    text = "".join(parsed.text)
    for value in (HOSTILE, HOSTILE_IMG, HOSTILE_URL, "<style>body{display:none}</style>&amp; <!-- x -->"):
        assert value in text, value


def test_all_sections_and_token_highlighting():
    records = [full_record(), minimal_record()]
    document = render_html_report(records, SETTINGS)
    parsed = parse(document)
    assert_self_contained(document, parsed)
    text = "".join(parsed.text)
    ids = {attrs.get("id") for _, attrs in parsed.tags}
    assert {"q-0", "q-1", "settings"} <= ids
    assert [attrs["href"] for tag, attrs in parsed.tags if tag == "a"] == ["#q-0", "#q-1"]
    assert text.count("Top supporting training examples") == 2
    assert text.count("Top opposing training examples") == 2
    for needle in (
        "Shall I compare thee to a summer's day?",
        "Rough winds do shake the buds",
        "p12",
        "p3",
        "p7",
        "Now is the winter of our discontent",
        "+3.2",
        "-2.5",
        "to be or not to be",
        "r0",
        "not computed for this run",
        "no snippet",
        "logprob_sum",
        "generated by the model",
        "h.1.mlp.c_fc",
    ):
        assert needle in text, needle
    # settings: nested keys flattened, None shown as "none"
    for key, value in (
        ("model.path", "/models/tiny"),
        ("model.adapter", "none"),
        ("projection.dim", "16"),
        ("generation.max_new_tokens", "8"),
        ("generation.do_sample", "false"),
        ("train_rows", "1000"),
        ("curvature", "ekfac"),
    ):
        assert re.search(
            rf'<td class="key">{re.escape(key)}</td><td class="value">{re.escape(value)}</td>', document
        ), key
    # one span per completion token, value in the tooltip, shading by sign and magnitude
    tokens = [attrs for tag, attrs in parsed.tags if tag == "span" and attrs.get("class") == "tok"]
    assert len(tokens) == 4
    assert [t["title"] for t in tokens] == [
        "token 0: ' Thou' score +0.5",
        "token 1: ' art' score -0.25",
        "token 2: ' more' score +0",
        "token 3: ' lovely' score +1",
    ]
    assert "var(--pos), 0.475" in tokens[0]["style"]
    assert "var(--neg), 0.287" in tokens[1]["style"]
    assert "style" not in tokens[2]  # a zero score is not shaded
    assert "var(--pos), 0.850" in tokens[3]["style"]  # the largest magnitude is the deepest shade
    assert "shading: token scores" in text


def test_shading_falls_back_to_the_top_supporters_per_token_scores():
    record = full_record()
    del record["token_scores"]
    parsed = parse(render_html_report([record], {}))
    tokens = [attrs for tag, attrs in parsed.tags if tag == "span" and attrs.get("class") == "tok"]
    assert [t["title"].rsplit(" ", 1)[1] for t in tokens] == ["+0.1", "+0.2", "+0.3", "+0.4"]
    assert "per-token score of the top supporter (p12)" in "".join(parsed.text)


@pytest.mark.parametrize(
    "strip",
    [
        "completion_tokens",
        "token_scores",
        "bottom_k",
        "top_k",
        "prompt",
        "snippets",
        "per_token",
        "everything",
        "short_scores",
        "nan_scores",
        "empty_lists",
    ],
)
def test_missing_optional_fields_render(strip):
    record = full_record()
    if strip == "snippets":
        for entry in record["top_k"] + record["bottom_k"]:
            del entry["snippet"]
    elif strip == "per_token":
        del record["token_scores"], record["top_k"][0]["per_token"]
    elif strip == "everything":
        record = {}
    elif strip == "short_scores":
        record["token_scores"] = [1.0]
    elif strip == "nan_scores":
        record["token_scores"] = [float("nan"), float("inf"), None, -1.0]
        record["top_k"][0]["score"] = float("nan")
    elif strip == "empty_lists":
        record.update(top_k=[], bottom_k=[], completion_tokens=[], token_scores=[])
    else:
        del record[strip]
    document = render_html_report([record], None)
    parsed = parse(document)
    assert_self_contained(document, parsed)
    text = "".join(parsed.text)
    assert "Top supporting training examples" in text and "Top opposing training examples" in text
    assert "Settings" in text and "no settings recorded" in text
    if strip in ("completion_tokens", "empty_lists"):
        assert " Thou art more lovely" in text  # the plain completion stands in for the missing tokens


def test_empty_results_and_bad_input():
    parsed = parse(render_html_report([], SETTINGS))
    assert "no queries in these results" in "".join(parsed.text)
    # Any: these are deliberately not records / settings, as a hand-edited results file could hold
    not_records: Any = [1, 2]
    not_settings: Any = ["not", "a", "dict"]
    with pytest.raises(TributaryError, match="list of result records"):
        render_html_report(not_records, SETTINGS)
    with pytest.raises(TributaryError, match="settings"):
        render_html_report([], not_settings)


def test_write_is_atomic_and_load_results_round_trips(tmp_path):
    records = [full_record(), minimal_record()]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    assert load_results(results) == records
    out = tmp_path / "sub" / "report.html"
    assert write_html_report(load_results(results), SETTINGS, out) == out
    first = out.read_text(encoding="utf-8")
    assert first == render_html_report(records, SETTINGS)
    assert not list(out.parent.glob("*.part"))
    # A failed render leaves the previous report untouched and no .part behind.
    not_records: Any = [None]
    with pytest.raises(TributaryError):
        write_html_report(not_records, SETTINGS, out)
    assert out.read_text(encoding="utf-8") == first and not list(out.parent.glob("*.part"))
    # A second write replaces the file.
    write_html_report(records[:1], SETTINGS, str(out))
    assert "q1" not in out.read_text(encoding="utf-8")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(TributaryError, match=r"bad\.jsonl:2: invalid JSON"):
        load_results(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(TributaryError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_results(bad)
    with pytest.raises(TributaryError, match="no such results file"):
        load_results(tmp_path / "missing.jsonl")


def test_report_renders_in_headless_chromium(tmp_path):
    require_chromium()
    first, second = full_record(), minimal_record()
    first.update(
        prompt="Whereof the periwinkle sings",
        completion=" beneath a copper moon",
        completion_tokens=[" beneath", " a", " copper", " moon"],
        token_scores=[0.3, -0.1, 0.9, 0.2],
    )
    first["top_k"][0].update(id="train-marigold-17", snippet="The marigold parliament adjourned at dusk")
    first["bottom_k"][0].update(id="train-basalt-4", snippet="Basalt remembers nothing of the tide")
    first["top_k"][1]["snippet"] = HOSTILE
    second.update(id="q-lantern", text="Lanterns drift over the quiet orchard")
    second["top_k"][0].update(id="train-orchard-9", snippet="Nine lanterns rested in the orchard grass")
    report = write_html_report([first, second], SETTINGS, tmp_path / "report.html")
    url = report.resolve().as_uri()

    shot, (width, height, distinct), dom = screenshot_and_dom(tmp_path, url, (1280, 2000))
    assert shot.is_file() and shot.stat().st_size > 20_000, "screenshot missing or too small"
    assert (width, height) == (1280, 2000)
    assert distinct > 50, "screenshot looks blank"

    for needle in (
        "Whereof the periwinkle sings",
        "copper",
        "train-marigold-17",
        "The marigold parliament adjourned at dusk",
        "train-basalt-4",
        "Basalt remembers nothing of the tide",
        "Lanterns drift over the quiet orchard",
        "train-orchard-9",
        "Nine lanterns rested in the orchard grass",
        "/models/tiny",
        "Top supporting training examples",
        "Top opposing training examples",
        "Settings",
    ):
        assert needle in dom, needle
    # The hostile snippet stayed text in the live DOM: no script element was created.
    assert "<script" not in dom.lower()
    assert "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in dom
