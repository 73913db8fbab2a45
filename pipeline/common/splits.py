"""Patient splits shared by every task kind: seeded, order-independent assignment of patient keys to parts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from datasets.volume import FewscanError


# --- patient split ---------------------------------------------------------------------------------------------
def split_patients(groups: Sequence[str], validation: float, test: float, seed: int) -> dict[str, list[str]]:
    """Assign every group (pseudonymised patient key) to `train`, `validation` or `test`.

    Groups are ranked by a seeded hash of their key, so the assignment does not depend on item order and a
    patient keeps its part when others are added; the first `round(n * test)` are test, the next
    `round(n * validation)` validation, the rest train.
    """
    unique = sorted(set(groups))
    ranked = sorted(unique, key=lambda g: hashlib.sha256(f"{seed}\x00{g}".encode()).hexdigest())
    n_test, n_val = round(len(ranked) * test), round(len(ranked) * validation)
    if (test and not n_test) or (validation and not n_val) or n_test + n_val >= len(ranked):
        raise FewscanError(f"patient split validation={validation}, test={test} cannot be made from "
                           f"{len(ranked)} patients (each part needs at least one, and train some)")
    return {"train": sorted(ranked[n_test + n_val:]), "validation": sorted(ranked[n_test:n_test + n_val]),
            "test": sorted(ranked[:n_test])}


