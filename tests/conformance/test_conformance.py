"""The conformance suite: each family's contracts, on a raw and on a prepared pipeline.

``prepare_pipeline(pipe, device="cpu", batch_to_loop=True, warmup=True, dtype=torch.float32)``
forces the loop and the warmup, which the CPU plan would not choose, so that every call goes
through them. A prepared pipeline must keep every contract the raw one keeps, but for the
differences in ``_allowlist.ALLOWLIST`` (expected failures, each with its reason). Run
``python tests/conformance/report.py`` for the per-family table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from _allowlist import ALLOWLIST
from _contracts import CONTRACTS, VARIANTS
from _families import FAMILIES

if TYPE_CHECKING:
    from _contracts import Contract
    from _families import Family

pytestmark = [
    # third-party notices some families' calls print through the warnings machinery
    pytest.mark.filterwarnings("ignore:`callback_steps` is deprecated:FutureWarning"),
]


def _cases() -> list[pytest.param]:
    cases = []
    for family in FAMILIES:
        cls = family.cls()
        for contract in CONTRACTS:
            if not contract.applies(family, cls) or contract.name in family.exempt:
                continue
            for variant in VARIANTS:
                marks = []
                reason = ALLOWLIST.get((family.name, contract.name))
                if reason is not None and variant == "prepared":
                    marks.append(pytest.mark.xfail(reason=reason, strict=True))
                cases.append(
                    pytest.param(
                        family,
                        contract,
                        variant,
                        marks=marks,
                        id=f"{family.name}-{contract.name}-{variant}",
                    )
                )
    return cases


@pytest.mark.parametrize(("family", "contract", "variant"), _cases())
def test_contract(family: Family, contract: Contract, variant: str) -> None:
    contract.check(VARIANTS[variant], family)


def test_every_allowlist_entry_names_a_case_and_says_why() -> None:
    names = {(family.name, contract.name) for family in FAMILIES for contract in CONTRACTS}
    for key, reason in ALLOWLIST.items():
        assert key in names, key
        assert len(reason) > 20, key
