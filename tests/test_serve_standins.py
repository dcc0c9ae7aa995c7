"""Helpers of the serve tests (no tests here): a tiny checkpoint, a slowed-down model, a live uvicorn server."""

from __future__ import annotations










