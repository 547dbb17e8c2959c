"""Captions of scenes: what to say (a description), how to say it (web or human phrasing) and web noise.

A description groups the scene's objects by what a caption names (colour and shape, plus size when
sizes are mentioned), so every mention names a whole group and counts come out right ("two green
triangles"). Consecutive groups are linked by a relation that holds for every member pair, or by
"and". The two phrasing families share the description, so they differ only in wording:

- web: terse alt-text, plain words, optional "photo of" opener, random casing, digits for counts;
- human: full sentences, synonyms ("crimson", "to the left of", "positioned", "backdrop"), inverted
  word order, definite re-mentions ("... and a star is below the blue square").

Web noise types change only the text. Each noisy caption is confirmed false for its scene with the
checker and redrawn otherwise, so a "hard" negative is never accidentally true. Mismatched captions
describe a fresh scene from the same distribution; hard_relation scenes have at least two objects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from capfilt.data.world.checker import check_caption
from capfilt.data.world.lexicon import (
    COLOUR_OF,
    COLOUR_WORDS,
    HUMAN_RELATION_PHRASES,
    PATTERN_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    SPELLED_NUMBERS,
    TINT_WORDS,
    WEB_RELATION_PHRASES,
    plural,
)
from capfilt.data.world.scene import COLOURS, OPPOSITE, RELATIONS, SHAPES, SIZES, Scene, holds, sample_scene

NOISE_TYPES = ("clean", "mismatched", "hard_attribute", "hard_relation", "boilerplate", "truncated", "vague")
_MAX_TRIES = 200


@dataclass(frozen=True)
class Group:
    shape: str
    colour: str
    size: str | None
    members: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class Description:
    groups: tuple[Group, ...]
    links: tuple[str | None, ...]  # links[k]: relation of groups[k] to groups[k + 1], or None ("and")
    pattern: str | None = None
    tint: str | None = None


def describe(
    scene: Scene,
    rng: random.Random,
    size_probability: float,
    relation_probability: float,
    background_probability: float,
    require_relation: bool = False,
) -> Description | None:
    """What a caption of ``scene`` will say; None when ``require_relation`` cannot be met."""
    with_size = rng.random() < size_probability
    members: dict[tuple, list[int]] = {}
    for i, obj in enumerate(scene.objects):
        members.setdefault((obj.shape, obj.colour, obj.size if with_size else None), []).append(i)
    groups = [Group(shape, colour, size, tuple(idx)) for (shape, colour, size), idx in members.items()]
    rng.shuffle(groups)

    holding = [
        [
            relation
            for relation in RELATIONS
            if all(holds(relation, scene.objects[a], scene.objects[b]) for a in left.members for b in right.members)
        ]
        for left, right in zip(groups, groups[1:])
    ]
    links = [rng.choice(rels) if rels and rng.random() < relation_probability else None for rels in holding]
    if require_relation and not any(links):
        linkable = [k for k, rels in enumerate(holding) if rels]
        if not linkable:
            return None
        k = rng.choice(linkable)
        links[k] = rng.choice(holding[k])

    pattern = tint = None
    if rng.random() < background_probability:
        which = rng.choice(("pattern", "tint", "both"))
        pattern = scene.background.pattern if which != "tint" else None
        tint = scene.background.tint if which != "pattern" else None
    return Description(tuple(groups), tuple(links), pattern, tint)


# ---------------------------------------------------------------------------------------------------
# Phrasing
# ---------------------------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _word(table: dict[str, tuple[str, ...]], value: str, rng: random.Random | None, synonym_probability: float) -> str:
    words = table[value]
    if rng is not None and len(words) > 1 and rng.random() < synonym_probability:
        return rng.choice(words[1:])
    return words[0]


def _noun_phrase(group: Group, rng: random.Random, human: bool, definite: bool = False, bare: bool = False) -> str:
    synonyms = 0.3 if human else 0.0
    words = [_word(SIZE_WORDS, group.size, rng, synonyms)] if group.size else []
    words.append(_word(COLOUR_WORDS, group.colour, rng, synonyms))
    shape = _word(SHAPE_WORDS, group.shape, rng, synonyms)
    words.append(plural(shape) if group.count > 1 else shape)
    if group.count > 1:
        number = SPELLED_NUMBERS[group.count] if human or rng.random() < 0.6 else str(group.count)
        words.insert(0, f"the {number}" if definite else number)
    elif definite:
        words.insert(0, "the")
    elif not bare:
        words.insert(0, _article(words[0]))
    return " ".join(words)


def _background_words(description: Description, rng: random.Random, human: bool) -> str:
    synonyms = 0.3 if human else 0.0
    words = []
    if description.pattern:
        words.append(_word(PATTERN_WORDS, description.pattern, rng, synonyms))
    if description.tint:
        words.append(_word(TINT_WORDS, description.tint, rng, synonyms))
    if len(words) == 2 and rng.random() < 0.5:
        words.reverse()
    noun = rng.choice(("background", "backdrop")) if human else "background"
    return " ".join(words + [noun])


def web_text(description: Description, rng: random.Random) -> str:
    """Terse alt-text: 'red circle left of 2 blue squares, striped background'."""
    bare = rng.random() < 0.5
    text = _noun_phrase(description.groups[0], rng, human=False, bare=bare)
    for link, group in zip(description.links, description.groups[1:]):
        if link:
            joint = " " + rng.choice(WEB_RELATION_PHRASES[link]) + " "
        else:
            joint = rng.choice((" and ", ", ", " with "))
        text += joint + _noun_phrase(group, rng, human=False, bare=bare)
    if description.pattern or description.tint:
        background = _background_words(description, rng, human=False)
        text += rng.choice((", ", " on ", " on a " if background[0] not in "aeiou" else " on an ")) + background
    text = rng.choice(("", "", "", "photo of ", "a photo of ", "image of ", "picture of ")) + text
    casing = rng.random()
    if casing < 0.25:
        return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))
    if casing < 0.5:
        return text[:1].upper() + text[1:]
    return text


def _be(group: Group) -> str:
    return "is" if group.count == 1 else "are"


def _human_clause(left: Group, link: str | None, right: Group, rng: random.Random, left_known: bool) -> str:
    """One clause about two consecutive groups; ``left_known``: ``left`` was mentioned already ("the")."""
    a = _noun_phrase(left, rng, human=True, definite=left_known)
    b = _noun_phrase(right, rng, human=True)
    if link is None:
        if left_known:
            return f"there {_be(right)} also {b}"
        return rng.choice(("{a} and {b}", "there {be} {a} and {b}", "{a} with {b}")).format(a=a, b=b, be=_be(left))
    subject, relation, obj, verb = (a, link, b, _be(left))
    if rng.random() < 0.5:  # the same fact in the other word order
        subject, relation, obj, verb = (b, OPPOSITE[link], a, _be(right))
    template = rng.choice(
        ("{s} {be} {r} {o}", "{s} {be} positioned {r} {o}", "{s} {be} located {r} {o}", "{s} {sits} {r} {o}",
         "there {be} {s} {r} {o}")
    )
    phrase = rng.choice(HUMAN_RELATION_PHRASES[relation])
    return template.format(s=subject, be=verb, r=phrase, o=obj, sits="sits" if verb == "is" else "sit")


def human_text(description: Description, rng: random.Random) -> str:
    """A full sentence: 'A large crimson circle is positioned to the left of a small blue square.'"""
    groups, links = description.groups, description.links
    if len(groups) == 1:
        template = rng.choice(("there {be} {a}", "{a}", "the picture shows {a}"))
        sentence = template.format(a=_noun_phrase(groups[0], rng, human=True), be=_be(groups[0]))
    else:
        sentence = _human_clause(groups[0], links[0], groups[1], rng, left_known=False)
    for k in range(2, len(groups)):
        sentence += ", and " + _human_clause(groups[k - 1], links[k - 1], groups[k], rng, left_known=True)
    if description.pattern or description.tint:
        background = _background_words(description, rng, human=True)
        background = f"{_article(background)} {background}"
        if rng.random() < 0.3 and not sentence.startswith("the picture"):
            sentence = f"on {background}, {sentence}"
        else:
            sentence += rng.choice((" on ", " against ")) + background
    return sentence[:1].upper() + sentence[1:] + "."


# ---------------------------------------------------------------------------------------------------
# Pairs: a scene and its caption(s)
# ---------------------------------------------------------------------------------------------------

WEB_STYLE = dict(size_probability=0.4, relation_probability=0.7, background_probability=0.3)
HUMAN_STYLE = dict(size_probability=0.75, relation_probability=0.9, background_probability=0.5)

_BOILERPLATE = (
    "IMG_{n4}.jpg", "DSC{n5}.JPG", "image{n3}.png", "click to enlarge", "stock photo", "image", "untitled",
    "photo", "thumbnail", "view larger image", "no description available", "product image {n1}", "placeholder",
    "banner", "screenshot 2019-{n2}-1{n1}", "download now", "free vector",
)
_VAGUE = (
    "some shapes", "abstract picture", "abstract art", "geometric shapes", "colorful shapes", "random objects",
    "shapes on a {background}", "a {pattern} pattern", "{colour} shapes", "a {colour} shape", "modern art",
    "simple geometric figures", "a few things",
)


def human_captions(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """``count`` human captions, distinct where the scene allows."""
    captions: list[str] = []
    for _ in range(count * 20):
        caption = human_text(describe(scene, rng, **HUMAN_STYLE), rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    distinct = len(captions)
    return [captions[i % distinct] for i in range(count)]


def web_pair(
    noise_type: str,
    rng: random.Random,
    min_objects: int = 1,
    max_objects: int = 3,
    duplicate_probability: float = 0.25,
) -> tuple[Scene, str]:
    """A scene and a web caption of ``noise_type``; noisy captions are checked false for the scene."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; expected one of {NOISE_TYPES}")
    if noise_type == "hard_relation":
        min_objects = max(min_objects, 2)
        max_objects = max(max_objects, 2)
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, min_objects, max_objects, duplicate_probability)
        caption = _web_caption(noise_type, scene, rng, min_objects, max_objects, duplicate_probability)
        if caption is None:
            continue
        if bool(check_caption(caption, scene)) == (noise_type == "clean"):
            return scene, caption
        if noise_type == "clean":
            raise RuntimeError(f"generator bug: clean caption {caption!r} judged false for {scene.to_json()}")
    raise RuntimeError(f"could not make a {noise_type} caption in {_MAX_TRIES} tries")


def _web_caption(noise_type: str, scene: Scene, rng: random.Random, *scene_args) -> str | None:
    if noise_type == "boilerplate":
        return rng.choice(_BOILERPLATE).format(
            n1=rng.randrange(1, 10), n2=rng.randrange(10, 13), n3=rng.randrange(1000), n4=f"{rng.randrange(10000):04d}",
            n5=f"{rng.randrange(100000):05d}",
        )
    if noise_type == "vague":
        return rng.choice(_VAGUE).format(
            background=f"{scene.background.pattern} background",
            pattern=scene.background.pattern,
            colour=rng.choice([obj.colour for obj in scene.objects]),
        )
    if noise_type == "mismatched":
        other = sample_scene(rng, *scene_args)
        return web_text(describe(other, rng, **WEB_STYLE), rng)
    description = describe(scene, rng, **WEB_STYLE, require_relation=noise_type == "hard_relation")
    if description is None:
        return None
    if noise_type == "clean":
        return web_text(description, rng)
    if noise_type == "truncated":
        words = web_text(description, rng).split(" ")
        # Cut after the first colour word at the earliest, so something of the scene is said.
        first = next(i for i, word in enumerate(words) if word.lower().rstrip(",") in COLOUR_OF)
        cuts = list(range(first + 1, len(words)))
        rng.shuffle(cuts)
        for cut in cuts:
            text = " ".join(words[:cut]).rstrip(",")
            if not check_caption(text, scene):
                return text + ("..." if rng.random() < 0.3 else "")
        return None
    if noise_type == "hard_attribute":
        wrong = list(_attribute_swaps(description))
    else:  # hard_relation
        wrong = [
            replace(description, links=description.links[:k] + (OPPOSITE[link],) + description.links[k + 1 :])
            for k, link in enumerate(description.links)
            if link
        ]
    rng.shuffle(wrong)
    for candidate in wrong:
        text = web_text(candidate, rng)
        if not check_caption(text, scene):
            return text
    return None


def _attribute_swaps(description: Description):
    for k, group in enumerate(description.groups):
        swaps = [replace(group, colour=c) for c in COLOURS if c != group.colour]
        swaps += [replace(group, shape=s) for s in SHAPES if s != group.shape]
        swaps += [replace(group, size=s) for s in SIZES if s != group.size]
        for swapped in swaps:
            yield replace(description, groups=description.groups[:k] + (swapped,) + description.groups[k + 1 :])
