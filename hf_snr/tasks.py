"""Natural-language preference tasks with a known truth, generated in code.

:func:`make_arithmetic_dataset`: "What is 37 + 48?" with the correct answer ("85") chosen and a
plausible wrong one (off by one, off by ten, or its digits swapped) rejected. A pretrained
instruct model half knows this task: it prefers the right sum more often than not, but not always,
so DPO has something to learn and swapped pairs something to corrupt. Every label is checkable.

Imports only the standard library and ``datasets``.
"""

from __future__ import annotations

import random
import re

from datasets import Dataset, DatasetDict

OPS = ("+", "-", "*")
# Shares of the operations among the questions drawn: mostly two-digit sums and differences, a few
# small products (there are only 11 x 11 of those).
OP_WEIGHTS = {"+": 0.45, "-": 0.45, "*": 0.10}
TWO_DIGIT = range(10, 100)
SMALL = range(2, 13)
PROMPT_TEMPLATE = "What is {a} {op} {b}? Answer with the number only."
_PROMPT_RE = re.compile(r"^What is (\d+) ([+*-]) (\d+)\?")

__all__ = ["make_arithmetic_dataset", "question_space", "answer_of", "parse_question", "wrong_answers", "OPS"]


def answer_of(a: int, op: str, b: int) -> int:
    """The true value of ``a op b``."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"Invalid operation {op!r} (accepted: {', '.join(OPS)})")


def question_space(op: str) -> list[tuple[int, str, int]]:
    """Every question of one operation, in a fixed order: two-digit a + b; two-digit a - b with a >= b (the
    answer is never negative); a * b with both in 2..12."""
    if op == "+":
        return [(a, op, b) for a in TWO_DIGIT for b in TWO_DIGIT]
    if op == "-":
        return [(a, op, b) for a in TWO_DIGIT for b in TWO_DIGIT if a >= b]
    if op == "*":
        return [(a, op, b) for a in SMALL for b in SMALL]
    raise ValueError(f"Invalid operation {op!r} (accepted: {', '.join(OPS)})")


def parse_question(prompt: str) -> tuple[int, str, int]:
    """(a, op, b) of a prompt made by :data:`PROMPT_TEMPLATE` (a string or a list of chat messages)."""
    if isinstance(prompt, list):
        prompt = " ".join(m["content"] for m in prompt if m.get("role") == "user")
    match = _PROMPT_RE.match(prompt)
    if not match:
        raise ValueError(f"Not an arithmetic question: {prompt!r}")
    return int(match.group(1)), match.group(2), int(match.group(3))


def wrong_answers(answer: int) -> list[int]:
    """The plausible wrong answers to a question whose answer is ``answer``: +-1, +-10 and the digits swapped
    (two-digit answers with two different digits), never negative, never the answer itself, sorted."""
    candidates = {answer - 1, answer + 1, answer - 10, answer + 10}
    text = str(answer)
    if len(text) == 2 and text[0] != text[1] and text[1] != "0":
        candidates.add(int(text[::-1]))
    return sorted(c for c in candidates if c >= 0 and c != answer)


def _draw(rng: random.Random, pools: dict[str, list], n: int, ops: tuple[str, ...]) -> list[tuple[int, str, int]]:
    """n distinct questions, popped from the shuffled pools (so never drawn twice), op by op as weighted."""
    out = []
    weights = [OP_WEIGHTS[op] for op in ops]
    for _ in range(n):
        live = [(op, w) for op, w in zip(ops, weights) if pools[op]]
        op = rng.choices([o for o, _ in live], weights=[w for _, w in live])[0]
        out.append(pools[op].pop())
    return out


def _rows(rng: random.Random, questions, conversational: bool, system_prompt: str | None = None) -> dict[str, list]:
    cols: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "answer": []}
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    for a, op, b in questions:
        answer = answer_of(a, op, b)
        wrong = rng.choice(wrong_answers(answer))
        prompt = PROMPT_TEMPLATE.format(a=a, op=op, b=b)
        if conversational:
            cols["prompt"].append([*system, {"role": "user", "content": prompt}])
            cols["chosen"].append([{"role": "assistant", "content": str(answer)}])
            cols["rejected"].append([{"role": "assistant", "content": str(wrong)}])
        else:  # TRL's standard format concatenates prompt + completion: completions start with a space
            cols["prompt"].append(prompt)
            cols["chosen"].append(f" {answer}")
            cols["rejected"].append(f" {wrong}")
        cols["answer"].append(answer)
    return cols


def make_arithmetic_dataset(n_train: int = 2000, n_eval: int = 500, seed: int = 0, *, conversational: bool = True,
                            ops: tuple[str, ...] = OPS, system_prompt: str | None = None) -> DatasetDict:
    """The arithmetic preference task as a ``DatasetDict`` with splits ``"train"`` and ``"test"``.

    Each row: ``prompt`` "What is a op b? Answer with the number only.", ``chosen`` the true answer,
    ``rejected`` a wrong one from :func:`wrong_answers` (conversational: one user message / one
    assistant message, as :func:`hf_snr.synthetic.make_preference_dataset`; else strings), and
    ``answer``, the true value (an int column that no swap touches). Deterministic in ``seed``. No
    question is in both splits, nor twice in one. The test split is drawn first, from its own random
    stream, so it does not change with ``n_train``.

    ``system_prompt`` (conversational only): None leaves the prompt a single user message, so the chat
    template adds the model's own default system message if it has one (SmolLM2: 20 tokens of "You are a
    helpful AI assistant named SmolLM, ..."); a string, even "", puts that system message first instead
    (SmolLM2 then renders ~33 tokens a sequence instead of ~49: ~40 % less compute a DPO step).
    """
    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r} (accepted: an integer >= 0)")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"Invalid system_prompt: {system_prompt!r} (accepted: None or a string)")
    if system_prompt is not None and not conversational:
        raise ValueError(f"Invalid system_prompt: {system_prompt!r} with conversational=False (accepted: None; a "
                         "system message needs the chat format)")
    ops = tuple(ops)
    bad = [op for op in ops if op not in OPS]
    if not ops or bad:
        raise ValueError(f"Invalid ops: {ops!r} (accepted: a non-empty subset of {OPS})")
    space = {op: question_space(op) for op in ops}
    total = sum(len(v) for v in space.values())
    if n_train + n_eval > total:
        raise ValueError(f"Invalid n_train + n_eval: {n_train} + {n_eval} = {n_train + n_eval} (accepted: at most "
                         f"{total}, the number of distinct questions with ops {ops})")
    shuffler = random.Random(f"arithmetic-pools-{seed}")
    pools = {}
    for op in ops:
        pool = list(space[op])
        shuffler.shuffle(pool)
        pools[op] = pool
    eval_rng = random.Random(f"arithmetic-eval-{seed}")
    train_rng = random.Random(f"arithmetic-train-{seed}")
    test_q = _draw(eval_rng, pools, n_eval, ops)
    train_q = _draw(train_rng, pools, n_train, ops)
    return DatasetDict({
        "train": Dataset.from_dict(_rows(train_rng, train_q, conversational, system_prompt)),
        "test": Dataset.from_dict(_rows(eval_rng, test_q, conversational, system_prompt)),
    })
