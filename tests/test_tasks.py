"""The chat demo's verifiable tasks: worked replies end in the right answer, the verifier's rules,
train/test disjointness and a split that is a pure function of the seed."""

import json
import random

from lmforge.data.tasks import TASK_TYPES, _instance, answer, check, final_answer, make_split, solution, write_split


def test_worked_replies_match_hand_written_ones():
    assert solution(("add", 347, 285)) == "7+5=12, 4+8+1=13, 3+2+1=6. Answer: 632"
    assert solution(("add", 999, 1)) == "9+1=10, 9+0+1=10, 9+0+1=10. Answer: 1000"
    assert solution(("subtract", 512, 89)) == "12-9=3, 11-1-8=2, 5-1-0=4. Answer: 423"
    assert solution(("subtract", 100, 99)) == "10-9=1, 10-1-9=0, 1-1-0=0. Answer: 1"
    assert solution(("count", "fig", "fig", "pear", "fig")) == "Counting fig: fig 1, pear 1, fig 2. Answer: 2"
    assert solution(("sequence", 3, 4, 4)) == "7-3: 7-3=4, so 4. 15+4: 5+4=9, 1+0=1, so 19. Answer: 19"
    assert solution(("sequence", 48, 12, 3)) == ("60-48: 10-8=2, 6-1-4=1, so 12. 72+12: 2+2=4, 7+1=8, so 84. "
                                                 "Answer: 84")
    assert solution(("reverse", "pear", "apple", "fig")) == "fig, apple, pear"
    assert solution(("sort", "pear", "apple", "fig")) == "apple, fig, pear"


def test_every_worked_reply_ends_in_the_true_answer():
    rng = random.Random(3)
    for _ in range(3000):
        inst = _instance(rng.choice(TASK_TYPES), rng)
        assert check(solution(inst), answer(inst)), inst
    # each column of a worked sum is itself correct arithmetic
    for _ in range(500):
        inst = _instance(rng.choice(("add", "subtract")), rng)
        for step in solution(inst).split(". Answer:")[0].split(", "):
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), (inst, step)  # noqa: S307 (digits and +/- only)


def test_verifier():
    assert final_answer("7+5=12. Answer: 12") == " 12"
    assert check("7+5=12. Answer: 12", "12") and check("Answer: 12.", "12") and check(" 12 ", "12")
    assert not check("7+5=12. Answer: 13", "12") and not check("Answer: 12 apples", "12")
    assert check("Answer: 1. Answer: 12", "12")  # the last answer counts
    assert check("fig, apple, pear", "fig, apple, pear") and not check("fig, apple", "fig, apple, pear")


def test_split_is_disjoint_balanced_and_seeded(tmp_path):
    train, test = make_split(3000, 600, seed=5)
    key = lambda ex: (ex["task"], ex["answer"], ex["messages"][0]["content"])  # noqa: E731
    assert {ex["task"] for ex in test} == set(TASK_TYPES)
    assert [sum(ex["task"] == k for ex in test) for k in TASK_TYPES] == [100] * 6
    test_prompts = {ex["messages"][0]["content"] for ex in test}
    assert not test_prompts & {ex["messages"][0]["content"] for ex in train}
    assert [key(e) for e in make_split(3000, 600, seed=5)[1]] == [key(e) for e in test]
    assert [key(e) for e in make_split(3000, 600, seed=6)[1]] != [key(e) for e in test]
    paths = write_split(tmp_path, n_train=50, n_test=12, seed=5)
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert check(row["messages"][1]["content"], row["answer"])
