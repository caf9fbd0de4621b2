"""Built-in reward functions (`--reward lmforge.finetune.rewards:NAME`), TRL's signature
`f(prompts, completions, **columns) -> list[float | None]`."""

from __future__ import annotations

from typing import Any, Sequence


def task_verifier(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None,
                  **columns: Any) -> list[float | None]:
    """1.0 when the reply is the expected `answer` column under the verifiable tasks' checker
    (lmforge.data.tasks.check), else 0.0; None for rows without an answer."""
    from lmforge.data.tasks import check

    if answer is None:
        return [None] * len(completions)
    return [None if a is None else float(check(c, str(a))) for c, a in zip(completions, answer)]
