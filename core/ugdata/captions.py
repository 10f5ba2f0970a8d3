"""Spatial context captions: the :class:`Captioner` protocol and the template captioner."""

from __future__ import annotations

from typing import Protocol

from core.ugdata.context import CONTEXT_RADIUS_M, PlaceFacts
from core.ugdata.geometry import KeyedRng, compass, format_distance

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


class Captioner(Protocol):
    """Writes a spatial context caption; plug in a local VLM by implementing this method."""

    def caption(self, facts: PlaceFacts, image_path: str | None = None) -> str:
        """The caption of the image at ``image_path`` taken at the place of ``facts``."""
        ...


_OPENINGS = (
    "This street-level image was taken in {b}, a neighbourhood in the {d} district.",
    "The photo shows a spot in {b} ({d}).",
    "Location: the {b} neighbourhood of {d}.",
    "We are in {b}, part of the {d} district.",
    "This view comes from {b}, in {d}.",
)
_OPENINGS_DISTRICT = (
    "This street-level image was taken in the {d} district.",
    "The photo shows a spot in {d}.",
)
_OPENINGS_NONE = ("This street-level image was taken outside the mapped neighbourhoods.",)
_ONE_LANDMARK = (
    "{n} is about {dist} to the {dir}.",
    "The nearest landmark, {n}, lies {dist} {dir} of here.",
    "About {dist} to the {dir} you would reach {n}.",
    "It is roughly {dist} from {n}, which lies to the {dir}.",
)
_TWO_LANDMARKS = (
    "{n} is about {dist} to the {dir}, and {n2} about {dist2} to the {dir2}.",
    "Nearby landmarks: {n} ({dist} {dir}) and {n2} ({dist2} {dir2}).",
    "The closest landmarks are {n}, {dist} to the {dir}, and {n2}, {dist2} to the {dir2}.",
)
_DEAD_END = (
    "The nearest street node is a dead end.",
    "It sits by a dead-end street.",
    "The closest street ends here in a dead end.",
)
_THROUGH = (
    "The nearest street node joins two street segments, without a crossing.",
    "The street runs through here without a junction.",
)
_JUNCTION = (
    "The nearest junction joins {k} streets.",
    "It is close to a {k}-way junction.",
    "{K} streets meet at the closest crossing.",
)
_AROUND = (
    "Within {r} m there is {items}.",
    "The surroundings ({r} m) have {items}.",
    "Around it: {items}.",
)
_POPULAR = (
    "It is a much-photographed spot: {n} Flickr photos were taken within {r} m.",
    "Many visitors take photos here ({n} Flickr photos within {r} m).",
)
_HEADING = ("The camera faces {dir}.", "The view looks {dir}.", "It is taken facing {dir}.")
_SOURCE = {
    "gsv": ("It is a street-view capture from {y}.", "A street-view car captured it in {y}."),
    "flickr": ("It is a Flickr photo from {y}.", "Someone posted this photo on Flickr in {y}."),
    "amsterdam_panorama": (
        "It is a view from the city's panorama survey of {y}.",
        "The City of Amsterdam's panorama car captured it in {y}.",
    ),
    "mapillary": (
        "It is a crowd-sourced Mapillary image from {y}.",
        "A Mapillary contributor captured it in {y}.",
    ),
    "other": ("It was captured in {y}.",),
}
_DENSITY = {
    "dense": ("a dense street network", "many closely spaced streets"),
    "moderate": ("a moderately dense street grid", "a regular street grid"),
    "open": ("an open, sparse street pattern", "few streets"),
}


def _amount(share: float, what: str, big: str, some: str) -> str:
    if share >= 0.25:
        return f"{big} ({share:.0%} {what})"
    if share >= 0.05:
        return f"{some} ({share:.0%} {what})"
    return f"no {what}" if what == "park" else "no open water"


class TemplateCaptioner:
    """The default captioner: varied sentences from templates, chosen by a seeded RNG.

    The choice depends only on ``seed`` and the facts' ``key``, so a caption does not change
    when other images are added or the sample order changes.
    """

    def __init__(self, seed: int = 0, radius: float = CONTEXT_RADIUS_M) -> None:
        self.seed, self.radius = seed, radius

    def caption(self, facts: PlaceFacts, image_path: str | None = None) -> str:
        """A caption of 4..7 sentences: place first, then the other facts in a seeded order."""
        rng = KeyedRng(f"{self.seed}|caption|{facts.key}")
        b, d = facts.buurt, facts.district
        if b and d:
            opening = rng.choice(_OPENINGS).format(b=b, d=d)
        elif d:
            opening = rng.choice(_OPENINGS_DISTRICT).format(d=d)
        else:
            opening = _OPENINGS_NONE[0]
        rest = [
            s
            for s in (
                self._landmarks(facts, rng),
                self._connectivity(facts, rng),
                self._around(facts, rng),
                self._popular(facts, rng),
                self._camera(facts, rng),
            )
            if s
        ]
        rng.shuffle(rest)
        return " ".join([opening, *rest])

    def _landmarks(self, facts: PlaceFacts, rng: KeyedRng) -> str:
        marks = facts.landmarks
        if not marks:
            return ""
        first = {
            "n": marks[0].label,
            "dist": format_distance(marks[0].distance_m),
            "dir": marks[0].direction,
        }
        if len(marks) == 1 or rng.random() < 0.4:
            return rng.choice(_ONE_LANDMARK).format(**first)
        second = {
            "n2": marks[1].label,
            "dist2": format_distance(marks[1].distance_m),
            "dir2": marks[1].direction,
        }
        return rng.choice(_TWO_LANDMARKS).format(**first, **second)

    @staticmethod
    def _connectivity(facts: PlaceFacts, rng: KeyedRng) -> str:
        k = facts.degree
        if k == 1:
            return rng.choice(_DEAD_END)
        if k == 2:
            return rng.choice(_THROUGH)
        if k >= 3:
            word = _NUMBERS[k] if k < len(_NUMBERS) else str(k)
            return rng.choice(_JUNCTION).format(k=word, K=word.capitalize())
        return ""

    def _around(self, facts: PlaceFacts, rng: KeyedRng) -> str:
        items = [rng.choice(_DENSITY[facts.density])]
        if facts.water_share is not None:
            items.append(_amount(facts.water_share, "water", "a lot of water", "some water"))
        if facts.park_share is not None:
            items.append(_amount(facts.park_share, "park", "a large park", "some park"))
        rng.shuffle(items)
        text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        return rng.choice(_AROUND).format(r=int(self.radius), items=text)

    def _popular(self, facts: PlaceFacts, rng: KeyedRng) -> str:
        if not facts.popular:
            return ""
        return rng.choice(_POPULAR).format(n=facts.photos, r=int(self.radius))

    @staticmethod
    def _camera(facts: PlaceFacts, rng: KeyedRng) -> str:
        parts = []
        if facts.heading is not None:
            parts.append(rng.choice(_HEADING).format(dir=compass(facts.heading)))
        if facts.year is not None:
            parts.append(
                rng.choice(_SOURCE.get(facts.source or "other", _SOURCE["other"])).format(
                    y=facts.year
                )
            )
        if facts.title:
            parts.append(f'Its title reads "{facts.title}".')
        return " ".join(parts)
