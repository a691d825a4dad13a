"""Graph helpers over step ids, for validation (which must cope with cycles and dangling references) and the plan.

``upstream`` maps a step to the steps it reads. Every result is ordered by the steps' order in the workflow where the
graph leaves a choice, so the same workflow always gives the same order, levels and problems.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence


def topological_order(steps: Sequence[str], upstream: Mapping[str, Sequence[str]]) -> tuple[list[str], list[str]]:
    """``(ordered, left)``: the steps in dependency order (earliest in the workflow first among those free to go),
    and those that never become free, because they are on a cycle or read from one, in workflow order.
    References to steps not in ``steps`` are ignored."""
    index = {step: i for i, step in enumerate(steps)}
    waiting = {step: {u for u in upstream.get(step, ()) if u in index} for step in steps}
    downstream: dict[str, list[str]] = {step: [] for step in steps}
    for step, ups in waiting.items():
        for u in ups:
            downstream[u].append(step)
    free = [(index[step], step) for step in steps if not waiting[step]]
    heapq.heapify(free)
    ordered: list[str] = []
    while free:
        _, step = heapq.heappop(free)
        ordered.append(step)
        for d in downstream[step]:
            waiting[d].discard(step)
            if not waiting[d]:
                heapq.heappush(free, (index[d], d))
    placed = set(ordered)
    return ordered, [step for step in steps if step not in placed]


def cycles(steps: Sequence[str], upstream: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of steps that has one (a self-reference included), as the steps met
    following "reads from" from the group's first step in workflow order, the shortest such cycle; the groups are
    ordered by that first step."""
    index = {step: i for i, step in enumerate(steps)}
    edges = {step: [u for u in dict.fromkeys(upstream.get(step, ())) if u in index] for step in steps}
    found: list[list[str]] = []
    for group in _strongly_connected(steps, edges):
        members = set(group)
        start = min(group, key=index.__getitem__)
        if len(group) == 1 and start not in edges[start]:
            continue
        found.append(_shortest_cycle(start, edges, members))
    found.sort(key=lambda cycle: index[cycle[0]])
    return found


def _strongly_connected(steps: Sequence[str], edges: Mapping[str, list[str]]) -> list[list[str]]:
    # Tarjan's algorithm; a workflow has at most a few dozen steps, so recursion depth is not a concern.
    counter = 0
    number: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(step: str) -> None:
        nonlocal counter
        number[step] = low[step] = counter
        counter += 1
        stack.append(step)
        on_stack.add(step)
        for nxt in edges[step]:
            if nxt not in number:
                visit(nxt)
                low[step] = min(low[step], low[nxt])
            elif nxt in on_stack:
                low[step] = min(low[step], number[nxt])
        if low[step] == number[step]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == step:
                    break
            groups.append(group)

    for step in steps:
        if step not in number:
            visit(step)
    return groups


def _shortest_cycle(start: str, edges: Mapping[str, list[str]], members: set[str]) -> list[str]:
    if start in edges[start]:
        return [start]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        step = queue.popleft()
        for nxt in edges[step]:
            if nxt == start:
                path = [step]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if nxt in members and nxt not in came_from:
                came_from[nxt] = step
                queue.append(nxt)
    raise AssertionError(f"{start!r} is in a strongly connected group but on no cycle")


def transitive_downstream(step: str, downstream: Mapping[str, Sequence[str]]) -> set[str]:
    """Every step that reads ``step``'s result, directly or through others."""
    seen: set[str] = set()
    queue = deque(downstream.get(step, ()))
    while queue:
        d = queue.popleft()
        if d not in seen:
            seen.add(d)
            queue.extend(downstream.get(d, ()))
    return seen
