"""Differences the prepared pipeline makes on purpose, by (family, contract), with the reason.

A prepared pipeline that breaks a contract listed here is expected to (the test is an xfail,
strict: it fails when the prepared pipeline keeps the contract after all, so that a stale
entry is noticed). Every other contract the raw pipeline keeps, the prepared one must keep.
"""

from __future__ import annotations

from _families import FAMILIES

_LOOPED_CALLBACK = (
    "the loop runs one prompt per call, so callback_on_step_end fires at every step of every "
    "prompt and sees that prompt's rows, not the batch's (docs/explanation/batch-and-warmup.md,"
    " 'Callbacks and progress')"
)

ALLOWLIST: dict[tuple[str, str], str] = {
    (family.name, "callback_batch"): _LOOPED_CALLBACK for family in FAMILIES
}
