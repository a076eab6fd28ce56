"""The record shapes a site's files hold; shared by the lab's generator and the worker's audit."""

from __future__ import annotations

from typing import Literal, TypedDict

__all__ = ["CanaryRecord", "Group", "TextRecord"]

Group = Literal["1x", "10x", "control"]


class TextRecord(TypedDict):
    """One training or evaluation line: only the text, no metadata."""

    text: str


class CanaryRecord(TypedDict):
    """A canary or control with the secrets the audit looks for in a model's continuation."""

    id: str
    text: str
    secrets: dict[str, str]
    duplicates: int
    group: Group
