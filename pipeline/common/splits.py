"""Patient splits shared by every task kind: one seeded, order-independent ranking of patient keys, cut into parts.

Patients are ranked by a seeded hash of their key, so an assignment depends neither on the order of the items nor
on which other patients exist: a patient keeps its rank relative to the others when patients are added. Each
task kind cuts the ranking into its own parts (`assign_patients`): classification `test` / `validation` / `train`
(`split_patients`), segmentation held-out `test` scans, registration `adapt` / `eval` / `train`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from datasets.volume import FewscanError


def rank_patients(groups: Iterable[str], seed: int) -> list[str]:
    """The distinct patient keys in the seeded order every split takes them in."""
    return sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}\x00{g}".encode()).hexdigest())


def assign_patients(groups: Iterable[str], counts: dict[str, int], seed: int,
                    rest: str = "train") -> dict[str, list[str]]:
    """Deal the ranked patients out: the first `counts[part]` to each part in the order of `counts`, the rest to
    `rest`. Parts are disjoint; each list is sorted.

    Returns:
        `{rest: [...], **{part: [...] for part in counts}}`.
    """
    ranked = rank_patients(groups, seed)
    if sum(counts.values()) > len(ranked) or min(counts.values(), default=0) < 0:
        raise FewscanError(f"cannot deal {counts} out of {len(ranked)} patients")
    parts, start = {}, 0
    for part, n in counts.items():
        parts[part] = sorted(ranked[start:start + n])
        start += n
    return {rest: sorted(ranked[start:]), **parts}


def split_patients(groups: Sequence[str], validation: float, test: float, seed: int) -> dict[str, list[str]]:
    """Assign every group (pseudonymised patient key) to `train`, `validation` or `test`.

    The first `round(n * test)` ranked patients are test, the next `round(n * validation)` validation, the rest
    train (see `rank_patients`).
    """
    n = len(set(groups))
    n_test, n_val = round(n * test), round(n * validation)
    if (test and not n_test) or (validation and not n_val) or n_test + n_val >= n:
        raise FewscanError(f"patient split validation={validation}, test={test} cannot be made from "
                           f"{n} patients (each part needs at least one, and train some)")
    parts = assign_patients(groups, {"test": n_test, "validation": n_val}, seed)
    return {part: parts[part] for part in ("train", "validation", "test")}
