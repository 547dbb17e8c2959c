"""Is a caption true of its scene? Every claim is checked.

A small vocabulary-driven parser turns a caption (either phrasing family, or a captioner's output)
into claims: object mentions (count, size, colour, shape), relations between mentions and at most one
background. The caption is accurate when one assignment of scene objects to mentions makes every
claim true. Decisions, so results mean one thing:

- Text goes through ``pre_caption`` first and a leading prompt ("a picture of") is stripped.
- Any word outside the lexicon, a dangling modifier ("a red"), a relation without an object on both
  sides, two objects with no connector, or repeated attributes make the caption inaccurate (reason
  ``unparsable``): garbled captioner output is bad text, never a crash.
- A caption needs at least one object mention; boilerplate, vague text ("some shapes") and
  background-only text are inaccurate (reason ``no_object``, ``vague``).
- "a red circle" needs at least one; "one red circle" exactly one, "two red circles" exactly two;
  bare "red circles" two or more.
  Mentions without "the" take distinct objects; "the X" may re-mention an earlier object.
- A relation between groups must hold for every member pair. Captions may describe part of a scene
  (as human captions do); ``coverage`` says what fraction of the objects the caption mentions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from capfilt.data.text import pre_caption
from capfilt.data.world.lexicon import (
    BACKGROUND_NOUNS,
    COLOUR_OF,
    CONJUNCTIONS,
    DETERMINERS,
    FILLERS,
    GENERIC_NOUNS,
    NUMBER_WORDS,
    PATTERN_OF,
    PREFIX_TOKENS,
    RELATION_OF_PHRASE,
    SHAPE_OF,
    SHAPE_OF_PLURAL,
    SIZE_OF,
    TINT_OF,
    plural,
)
from capfilt.data.world.scene import Scene, holds

_MAX_RELATION_WORDS = max(len(phrase) for phrase in RELATION_OF_PHRASE)
_MAX_MENTIONS = 12


class CaptionParseError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Mention:
    shape: str
    colour: str | None = None
    size: str | None = None
    count: int = 1
    exact: bool = False  # numerals: exactly ``count``; otherwise at least ``count``
    definite: bool = False

    def describe(self) -> str:
        shape = plural(self.shape) if self.count > 1 else self.shape
        words = [str(self.count) if self.count > 1 or self.exact else "a", self.size, self.colour, shape]
        return " ".join(word for word in words if word)


@dataclass(frozen=True)
class Claims:
    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...]  # (subject mention, relation, object mention)
    pattern: str | None = None
    tint: str | None = None


@dataclass(frozen=True)
class CheckResult:
    accurate: bool
    reason: str  # "ok" or why not, e.g. "missing: a large red circle"
    coverage: float = 0.0
    claims: Claims | None = field(default=None, compare=False, repr=False)

    def __bool__(self) -> bool:
        return self.accurate


def tokenize(caption: str) -> list[str]:
    text = pre_caption(caption, max_words=10_000).replace(",", " , ")
    tokens = text.split()
    for prefix in PREFIX_TOKENS:
        if tuple(tokens[: len(prefix)]) == prefix:
            tokens = tokens[len(prefix) :]
            break
    # ", and" is one connector.
    return [token for i, token in enumerate(tokens) if not (token == "," and tokens[i + 1 : i + 2] == ["and"])]


def parse_caption(caption: str) -> Claims:
    """The claims a caption makes; raises :class:`CaptionParseError` when it is not well formed."""
    tokens = tokenize(caption)
    if not tokens:
        raise CaptionParseError("no_object", "empty caption")
    items: list[tuple] = []  # ("mention", Mention) | ("relation", str) | ("and",) | ("background", pattern, tint)
    pending: dict | None = None
    i = 0
    while i < len(tokens):
        relation, length = _relation_at(tokens, i)
        if relation:
            _expect_nothing_pending(pending, tokens[i])
            items.append(("relation", relation))
            i += length
            continue
        word = tokens[i]
        i += 1
        if word in CONJUNCTIONS:
            _expect_nothing_pending(pending, word)
            items.append(("and",))
        elif word in FILLERS:
            _expect_nothing_pending(pending, word)
        elif word in DETERMINERS:
            _expect_nothing_pending(pending, word)
            pending = {"determiner": word, "definite": DETERMINERS[word]}
            if word == "one":
                pending["exact"] = True
        elif word in NUMBER_WORDS:
            if pending is None:
                pending = {"definite": False}
            elif not (set(pending) == {"determiner", "definite"} and pending["definite"]):  # only "the two"
                raise CaptionParseError("unparsable", f"misplaced number {word!r}")
            pending.update(determiner=word, count=NUMBER_WORDS[word])
        elif word in SIZE_OF or word in COLOUR_OF:
            pending = pending or {}
            slot, value = ("size", SIZE_OF[word]) if word in SIZE_OF else ("colour", COLOUR_OF[word])
            if slot in pending or "background" in pending:
                raise CaptionParseError("unparsable", f"repeated or misplaced {slot} {word!r}")
            pending[slot] = value
        elif word in SHAPE_OF or word in SHAPE_OF_PLURAL:
            items.append(("mention", _close_mention(pending or {}, word)))
            pending = None
        elif word in PATTERN_OF or word in TINT_OF:
            pending = pending or {}
            slot, value = ("pattern", PATTERN_OF[word]) if word in PATTERN_OF else ("tint", TINT_OF[word])
            if "size" in pending or "colour" in pending or "count" in pending or slot in pending:
                raise CaptionParseError("unparsable", f"misplaced background word {word!r}")
            pending[slot] = value
            pending["background"] = True
        elif word in BACKGROUND_NOUNS:
            if not pending or "background" not in pending:
                raise CaptionParseError("unparsable", f"{word!r} without a pattern or tint")
            items.append(("background", pending.get("pattern"), pending.get("tint")))
            pending = None
        elif word in GENERIC_NOUNS:
            raise CaptionParseError("vague", f"{word!r} names no checkable object")
        else:
            raise CaptionParseError("unparsable", f"unknown word {word!r}")
    if pending is not None:
        raise CaptionParseError("unparsable", "caption ends mid-phrase")
    return _assemble(items)


def _relation_at(tokens: list[str], i: int) -> tuple[str | None, int]:
    for length in range(min(_MAX_RELATION_WORDS, len(tokens) - i), 0, -1):
        relation = RELATION_OF_PHRASE.get(tuple(tokens[i : i + length]))
        if relation:
            return relation, length
    return None, 0


def _expect_nothing_pending(pending: dict | None, word: str) -> None:
    if pending is not None:
        raise CaptionParseError("unparsable", f"phrase left unfinished before {word!r}")


def _close_mention(pending: dict, word: str) -> Mention:
    if "background" in pending:
        raise CaptionParseError("unparsable", f"background words before {word!r}")
    is_plural = word in SHAPE_OF_PLURAL
    shape = SHAPE_OF_PLURAL[word] if is_plural else SHAPE_OF[word]
    count = pending.get("count")
    if count is not None and not is_plural:
        raise CaptionParseError("unparsable", f"number {pending['determiner']!r} with singular {word!r}")
    if is_plural and count is None and pending.get("determiner") not in (None, "the"):
        raise CaptionParseError("unparsable", f"{pending['determiner']!r} with plural {word!r}")
    count, exact = (count or 2, count is not None) if is_plural else (1, pending.get("exact", False))
    return Mention(shape, pending.get("colour"), pending.get("size"), count, exact, pending.get("definite", False))


def _assemble(items: list[tuple]) -> Claims:
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    background: tuple | None = None
    for k, item in enumerate(items):
        previous = items[k - 1][0] if k > 0 else None
        following = items[k + 1][0] if k + 1 < len(items) else None
        kind = item[0]
        if kind == "mention":
            if previous == "mention":
                raise CaptionParseError("unparsable", "two objects with no connector between them")
            mentions.append(item[1])
        elif kind == "relation":
            if previous != "mention" or following != "mention":
                raise CaptionParseError("unparsable", f"relation {item[1]!r} without an object on each side")
            relations.append((len(mentions) - 1, item[1], len(mentions)))
        elif kind == "and":
            if previous in (None, "and", "relation") or following in (None, "and", "relation"):
                raise CaptionParseError("unparsable", "connector without a phrase on each side")
        elif kind == "background":
            if background is not None:
                raise CaptionParseError("unparsable", "two backgrounds")
            background = item[1:]
    if not mentions:
        raise CaptionParseError("no_object", "no object mentioned")
    if len(mentions) > _MAX_MENTIONS:
        raise CaptionParseError("unparsable", f"{len(mentions)} object mentions")
    pattern, tint = background or (None, None)
    return Claims(tuple(mentions), tuple(relations), pattern, tint)


def check_caption(caption: str, scene: Scene | str) -> CheckResult:
    """Whether every claim of ``caption`` is true of ``scene`` (a :class:`Scene` or its JSON)."""
    if isinstance(scene, str):
        scene = Scene.from_json(scene)
    if not isinstance(caption, str):
        return CheckResult(False, f"not_text: {type(caption).__name__}")
    try:
        claims = parse_caption(caption)
    except CaptionParseError as error:
        return CheckResult(False, str(error))
    return check_claims(claims, scene)


def check_claims(claims: Claims, scene: Scene) -> CheckResult:
    objects = scene.objects
    if claims.pattern is not None and claims.pattern != scene.background.pattern:
        return CheckResult(False, f"background: {claims.pattern} (scene: {scene.background.pattern})", claims=claims)
    if claims.tint is not None and claims.tint != scene.background.tint:
        return CheckResult(False, f"background: {claims.tint} (scene: {scene.background.tint})", claims=claims)

    candidates: list[list[frozenset[int]]] = []
    for mention in claims.mentions:
        matches = frozenset(
            i
            for i, obj in enumerate(objects)
            if obj.shape == mention.shape
            and mention.colour in (None, obj.colour)
            and mention.size in (None, obj.size)
        )
        if not matches:
            return CheckResult(False, f"missing: {mention.describe()}", claims=claims)
        if (len(matches) != mention.count) if mention.exact else (len(matches) < mention.count):
            return CheckResult(False, f"count: {mention.describe()} (scene has {len(matches)})", claims=claims)
        # One object per singular mention; a plural mention takes all of its matches together.
        candidates.append([frozenset([i]) for i in sorted(matches)] if mention.count == 1 else [matches])

    best = _best_assignment(claims, candidates, scene)
    if best is None:
        reason = "relation false" if claims.relations else "too few distinct objects"
        return CheckResult(False, reason, claims=claims)
    return CheckResult(True, "ok", best / len(objects), claims=claims)


def _best_assignment(claims: Claims, candidates: list[list[frozenset[int]]], scene: Scene) -> int | None:
    """Most objects covered by an assignment satisfying every claim; None when none does."""
    objects = scene.objects
    mentions = claims.mentions
    relations_closing_at: dict[int, list[tuple[int, str, int]]] = {}
    for subject, relation, obj in claims.relations:
        relations_closing_at.setdefault(max(subject, obj), []).append((subject, relation, obj))
    chosen: list[frozenset[int]] = []
    best: int | None = None

    def extend(k: int, indefinite_used: frozenset[int]) -> bool:
        nonlocal best
        if k == len(mentions):
            covered = len(frozenset().union(*chosen))
            best = covered if best is None else max(best, covered)
            return covered == len(objects)  # cannot do better: stop
        for referent in candidates[k]:
            if not mentions[k].definite and referent & indefinite_used:
                continue
            chosen.append(referent)
            ok = all(
                holds(relation, objects[a], objects[b])
                for subject, relation, obj in relations_closing_at.get(k, ())
                for a in chosen[subject]
                for b in chosen[obj]
            )
            used = indefinite_used if mentions[k].definite else indefinite_used | referent
            if ok and extend(k + 1, used):
                return True
            chosen.pop()
        return False

    extend(0, frozenset())
    return best
