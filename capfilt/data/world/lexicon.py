"""The world's words: one table read by the caption writers and by the checker.

Every synonym a caption may use is listed here against its canonical value, so the checker maps
"crimson" to red for exactly the words the human phrasing can produce (and a few more a captioner
might plausibly write).
"""

from __future__ import annotations

from capfilt.data.world.scene import COLOURS, PATTERNS, RELATIONS, SHAPES, SIZES, TINTS

# canonical -> words; the first word is the plain one the web phrasing uses.
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "amber"),
    "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross",),
}
PLURAL_IRREGULAR = {"cross": "crosses"}
PATTERN_WORDS = {
    "plain": ("plain", "solid", "uniform"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted"),
    "noisy": ("noisy", "speckled", "grainy"),
}
TINT_WORDS = {"white": ("white",), "grey": ("grey", "gray"), "black": ("black",)}
BACKGROUND_NOUNS = ("background", "backdrop")

WEB_RELATION_PHRASES = {"left": ("left of",), "right": ("right of",), "above": ("above",), "below": ("below", "under")}
HUMAN_RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath", "underneath"),
}
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}
SPELLED_NUMBERS = {2: "two", 3: "three", 4: "four"}
DETERMINERS = {"a": False, "an": False, "one": False, "the": True}  # word -> definite
CONJUNCTIONS = ("and", ",", "with")
# Words that carry no claim: verbs and prepositions around the phrases that do.
FILLERS = frozenset(
    "there is are sits sit sitting lies lie positioned located placed appears appear also on against "
    "shown drawn".split()
)
# Openings stripped before parsing: the captioner's prompt and the web's "photo of".
PREFIXES = (
    "a picture of",
    "a photo of",
    "a photograph of",
    "an image of",
    "picture of",
    "photo of",
    "image of",
    "the picture shows",
    "the image shows",
    "this picture shows",
)

# Words that name nothing checkable: a caption built on them is vague, not true.
GENERIC_NOUNS = frozenset("shape shapes object objects thing things figure figures pattern art".split())


def plural(shape_word: str) -> str:
    return PLURAL_IRREGULAR.get(shape_word, shape_word + "s")


def _invert(table: dict[str, tuple[str, ...]], canon: tuple[str, ...] | dict) -> dict[str, str]:
    words: dict[str, str] = {}
    for value, synonyms in table.items():
        assert value in canon, value
        for word in synonyms:
            assert word not in words, f"{word!r} means two things"
            words[word] = value
    return words


COLOUR_OF = _invert(COLOUR_WORDS, COLOURS)
SIZE_OF = _invert(SIZE_WORDS, SIZES)
SHAPE_OF = _invert(SHAPE_WORDS, SHAPES)
SHAPE_OF_PLURAL = {plural(word): shape for word, shape in SHAPE_OF.items()}
PATTERN_OF = _invert(PATTERN_WORDS, PATTERNS)
TINT_OF = _invert(TINT_WORDS, TINTS)
RELATION_OF_PHRASE: dict[tuple[str, ...], str] = {}
for _table in (WEB_RELATION_PHRASES, HUMAN_RELATION_PHRASES):
    for _relation, _phrases in _table.items():
        assert _relation in RELATIONS
        for _phrase in _phrases:
            RELATION_OF_PHRASE[tuple(_phrase.split())] = _relation
PREFIX_TOKENS = sorted((tuple(prefix.split()) for prefix in PREFIXES), key=len, reverse=True)

_all_words = [COLOUR_OF, SIZE_OF, SHAPE_OF, SHAPE_OF_PLURAL, PATTERN_OF, TINT_OF, NUMBER_WORDS, DETERMINERS]
for _i, _a in enumerate(_all_words):
    for _b in _all_words[_i + 1 :]:
        assert not set(_a) & set(_b), f"words in two categories: {set(_a) & set(_b)}"
