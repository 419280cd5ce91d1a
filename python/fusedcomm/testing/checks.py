"""Collect every failing case of a loop, so one failure does not hide the rest.

Multi-rank tests often run many small cases inside one launch (spawning ranks is slow). Each
rank records its failed checks in a :class:`Failures` and returns ``failures.messages``; the
test then calls :func:`assert_no_failures` on the ranks' lists, which names every failure of
every rank. Recording instead of raising also keeps the ranks' collective calls in step.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Failures", "assert_no_failures"]


class Failures:
    """Failed checks of one process, in the order they happened."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        """Record ``message`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.messages.append(str(message))
        return bool(ok)

    def __len__(self) -> int:
        return len(self.messages)

    def __bool__(self) -> bool:
        return bool(self.messages)

    def assert_none(self) -> None:
        """Raise ``AssertionError`` naming every recorded failure (single-process loops)."""
        assert_no_failures([self.messages], by_rank=False)


def assert_no_failures(per_rank: Sequence[Sequence[str]], *, by_rank: bool = True) -> None:
    """Raise ``AssertionError`` listing every message; ``per_rank[r]`` holds rank ``r``'s."""
    lines = []
    for rank, messages in enumerate(per_rank):
        prefix = f"rank {rank}: " if by_rank else ""
        lines += [prefix + m for m in messages]
    if lines:
        raise AssertionError(f"{len(lines)} failed check(s):\n  " + "\n  ".join(lines))
