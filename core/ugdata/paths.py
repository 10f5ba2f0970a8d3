"""Spatial reasoning paths: walks on the street graph asked as questions, with answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.ugdata.context import CityContext
from core.ugdata.geometry import KeyedRng, bearing_deg, compass, format_distance
from core.ugdata.graph import SpatialGraph


@dataclass(frozen=True)
class ReasoningPath:
    """A walk on the street graph as a question and its answer.

    Attributes:
        nodes: node indices from start to end (no node repeats).
        steps: per step ``length_m``, ``bearing_deg``, ``dx_m``, ``dy_m``, ``direction``.
        kind: ``buurt``, ``landmark`` or ``displacement``: what the question asks.
        question, answer: the texts.
        facts: the answer's facts (end node id, buurt, district and the asked value).
    """

    nodes: tuple[int, ...]
    steps: tuple[dict[str, Any], ...]
    kind: str
    question: str
    answer: str
    facts: dict[str, Any]


_STARTS = (
    "Starting at the street corner nearest to this photo,",
    "From the point of the street network closest to where this picture was taken,",
    "Begin at the street node nearest to this image and",
)
_QUESTIONS = {
    "buurt": ("Which neighbourhood (buurt) are you in?", "In which buurt do you end up?"),
    "landmark": (
        "Which landmark is nearest to where you end up, and where is it?",
        "What is the closest landmark to your end point?",
    ),
    "displacement": (
        "How far and in which direction are you from the start, as the crow flies?",
        "Where are you relative to the starting point?",
    ),
}
QUESTION_KINDS = tuple(_QUESTIONS)


def random_walk(graph: SpatialGraph, start: int, hops: int, rng: KeyedRng) -> list[int]:
    """A walk of up to ``hops`` edges from ``start`` that never revisits a node (shorter when
    it reaches a dead end)."""
    path = [start]
    for _ in range(hops):
        options = [n for n in graph.neighbours(path[-1]).tolist() if n not in path]
        if not options:
            break
        path.append(rng.choice(options))
    return path


def reasoning_path(
    context: CityContext, start: int, rng: KeyedRng, max_hops: int = 3
) -> ReasoningPath | None:
    """A 1..``max_hops`` hop question/answer walk from node ``start``; ``None`` if isolated."""
    graph = context.graph
    nodes = random_walk(graph, start, rng.randint(1, max_hops), rng)
    if len(nodes) < 2:
        return None
    steps = []
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        s = graph.step(a, b)
        steps.append(
            {
                "length_m": round(s["length"], 1),
                "bearing_deg": round(s["bearing"], 1),
                "dx_m": round(s["dx"], 2),
                "dy_m": round(s["dy"], 2),
                "direction": compass(s["bearing"]),
            }
        )
    verb = rng.choice(("walk", "go", "head"))
    moves = [f"{format_distance(s['length_m'])} {s['direction']}" for s in steps]
    route = f"{verb} {moves[0]}" + "".join(f", then {m}" for m in moves[1:])
    kind = rng.choice(QUESTION_KINDS)
    end = nodes[-1]
    buurt, district = str(context.node_buurt[end]), str(context.node_district[end])
    facts: dict[str, Any] = {
        "node_id": str(graph.node_ids[end]),
        "buurt": buurt,
        "district": district,
    }
    if kind == "buurt":
        if buurt:
            answer = f"You end up in {buurt}, in the {district} district."
        else:
            answer = "You end up outside the mapped neighbourhoods" + (
                f", in the {district} district." if district else "."
            )
    elif kind == "landmark":
        marks = context.node_landmark[end]
        if not marks:
            kind = "displacement"  # nothing within reach to ask about
        else:
            m = marks[0]
            facts.update(landmark=m.name, distance_m=m.distance_m, direction=m.direction)
            answer = (
                f"{m.label} is the nearest landmark, about {format_distance(m.distance_m)} "
                f"to the {m.direction}."
            )
    if kind == "displacement":
        d = graph.xy[end] - graph.xy[start]
        dist, direction = float(np.hypot(*d)), compass(float(bearing_deg(d[0], d[1])))
        facts.update(distance_m=round(dist, 1), direction=direction)
        answer = f"You are about {format_distance(dist)} {direction} of the start."
    start_text = rng.choice(_STARTS)
    question = f"{start_text} {route}. {rng.choice(_QUESTIONS[kind])}"
    return ReasoningPath(
        nodes=tuple(nodes),
        steps=tuple(steps),
        kind=kind,
        question=question,
        answer=answer,
        facts=facts,
    )
