"""tiny-python: a synthetic benchmark of small Python functions, small enough for the offline tiny profile
to learn and to be scored exactly like HumanEval.

Light module: standard library only (the panel and `tas` may import it).

Each *template* is one kind of function with an integer parameter `a` that is part of its name and its
behaviour: `add_7(x)` returns `x + 7`, `first_3(s)` returns `s[:3]`, `fill_4(v)` builds a list in a loop.
There are 29 templates over arithmetic, strings, lists, conditionals and loops. A *problem* is a template
with one value of `a`:

* `instruction`: a natural request, one of several phrasings ("Write a Python function `add_7(x)` that
  returns x plus 7.", "I need a function add_7(x) that adds 7 to x. Please write it.", ...);
* `canonical_solution`: the reference function; `answer(problem)` is the chat reply a good model gives
  (the function in a ```python block);
* `test`: a HumanEval-style `check(candidate)` whose expected values come from an independent Python
  reference (`Template.reference`), never from the solution text, so a wrong solution fails;
* `prompt`: the instruction as a comment, what a base (non-chat) model continues.

The values of `a` of every template are split once, by a fixed seed, into three disjoint sets:

* `pretrain`: what the tiny teacher is pretrained on when the tiny cache is built (`pretraining_pairs`);
* `prompts`:  the instructions the pipeline's `data` stage extracts (shipped as `tiny:tiny-python`);
  the teacher answers them, the assistant and the students train on those answers;
* `heldout`:  the benchmark (`eval.code.benchmark: tiny-python`), which no training stage ever sees.

So a model passes a held-out problem only if it learned the mapping from instruction to code, not the
answers: `add_11` is in the benchmark, `add_9` in the prompts, `add_7` in the teacher's pretraining.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 2026
SPLITS = ("pretrain", "prompts", "heldout")
HELDOUT_PER_TEMPLATE = 3
PROMPTS_PER_TEMPLATE = 12
BENCHMARK = "tiny-python"

# How a request is phrased: `sig` is the signature (add_7(x)), `does` what the function does, in the
# third person ("returns x plus 7"). Every template has two `does` phrasings: 5 × 2 ways to ask.
FRAMES = (
    "Write a Python function `{sig}` that {does}.",
    "Implement `{sig}`: it {does}.",
    "Define {sig} in Python. It {does}.",
    "I need a function {sig} that {does}. Please write it.",
    "Create a Python function called {name} which takes {args} and {does}.",
)

TEXT = "the quick brown fox jumps over the lazy dog again"  # 49 characters: indexes up to 40 all differ
LETTERS = string.ascii_letters  # 52 different characters: s[a] tells every index up to 40 apart


@dataclass(frozen=True)
class Template:
    """One kind of function; `{a}` in `name`, `does` and `body` is the parameter."""

    name: str  # the function's name, e.g. "add_{a}"
    args: str  # its parameters, e.g. "x"
    does: tuple[str, str]
    body: str  # indented by 4, one or more lines
    reference: Callable[[int], Callable]  # a -> an independent implementation, for the tests' expected values
    inputs: Callable[[int], list[tuple]]  # a -> argument tuples the tests call the function with
    values: range  # the values of a

    def problem(self, a: int, frame: int, does: int, split: str) -> dict:
        name = self.name.format(a=a)
        sig = f"{name}({self.args})"
        instruction = FRAMES[frame].format(
            sig=sig, name=name, args=_args_phrase(self.args), does=self.does[does].format(a=a)
        )
        solution = f"def {sig}:\n" + self.body.format(a=a) + "\n"
        reference = self.reference(a)
        asserts = [
            f"    assert candidate({', '.join(map(repr, args))}) == {reference(*args)!r}" for args in self.inputs(a)
        ]
        return {
            "task_id": f"{BENCHMARK}/{name}",
            "instruction": instruction,
            "prompt": f"# {instruction}\n",
            "canonical_solution": solution,
            "test": "def check(candidate):\n" + "\n".join(asserts) + "\n",
            "entry_point": name,
            "template": self.name.format(a="{a}"),
            "split": split,
        }


def _primes(n: int) -> list[int]:
    """The prime factors of n (each once): `is_div_{a}` also tests a // p, which every proper divisor of a divides."""
    return [p for p in range(2, n + 1) if n % p == 0 and all(p % q for q in range(2, p))]


def _args_phrase(args: str) -> str:
    names = [part.strip() for part in args.split(",")]
    return f"one argument {names[0]}" if len(names) == 1 else "the arguments " + " and ".join(names)


NUMBERS = lambda a: [(0,), (5,), (-3,), (100,)]  # noqa: E731 - a table of small lambdas reads best
BIG_NUMBERS = lambda a: [(1000,), (12345,), (7,), (999,)]  # noqa: E731
AROUND = lambda a: [(a - 1,), (a,), (a + 1,), (a + 20,), (-a,)]  # noqa: E731
LISTS = lambda a: [([1, 2, 3],), ([],), ([a, -a, 10 * a],), (list(range(0, 3 * a, 2)),)]  # noqa: E731
WORDS = lambda a: [(TEXT,), (TEXT.upper()[: a + 5],), ("ab",)]  # noqa: E731

TEMPLATES: tuple[Template, ...] = (
    # arithmetic
    Template(
        "add_{a}",
        "x",
        ("returns x plus {a}", "adds {a} to x and returns the result"),
        "    return x + {a}",
        lambda a: lambda x: x + a,
        NUMBERS,
        range(2, 70),
    ),
    Template(
        "sub_{a}",
        "x",
        ("returns x minus {a}", "subtracts {a} from x and returns the result"),
        "    return x - {a}",
        lambda a: lambda x: x - a,
        NUMBERS,
        range(2, 70),
    ),
    Template(
        "times_{a}",
        "x",
        ("returns x multiplied by {a}", "multiplies x by {a}"),
        "    return x * {a}",
        lambda a: lambda x: x * a,
        NUMBERS,
        range(2, 70),
    ),
    Template(
        "pow_{a}",
        "x",
        ("returns x to the power of {a}", "raises x to the power {a}"),
        "    return x ** {a}",
        lambda a: lambda x: x**a,
        lambda a: [(2,), (-1,), (3,), (0,)],
        range(2, 70),
    ),
    Template(
        "mod_{a}",
        "x",
        ("returns the remainder of x divided by {a}", "returns x modulo {a}"),
        "    return x % {a}",
        lambda a: lambda x: x % a,
        lambda a: BIG_NUMBERS(a) + [(2 * a - 1,)],
        range(2, 70),
    ),
    Template(
        "div_{a}",
        "x",
        ("returns x divided by {a}, rounded down", "returns the integer quotient of x and {a}"),
        "    return x // {a}",
        lambda a: lambda x: x // a,
        BIG_NUMBERS,
        range(2, 70),
    ),
    Template(
        "is_div_{a}",
        "n",
        ("returns True when n is divisible by {a} and False otherwise", "checks whether n is a multiple of {a}"),
        "    return n % {a} == 0",
        lambda a: lambda n: n % a == 0,
        lambda a: [(3 * a,), (3 * a + 1,), (a + 1,), (0,), (a,)] + [(a // p,) for p in _primes(a)],
        range(2, 70),
    ),
    Template(
        "above_{a}",
        "x",
        ("returns True if x is greater than {a}", "tells whether x is more than {a}"),
        "    return x > {a}",
        lambda a: lambda x: x > a,
        AROUND,
        range(2, 70),
    ),
    Template(
        "cap_{a}",
        "x",
        ("returns x, but never more than {a}", "returns the smaller of x and {a}"),
        "    return min(x, {a})",
        lambda a: lambda x: min(x, a),
        AROUND,
        range(2, 70),
    ),
    Template(
        "at_least_{a}",
        "x",
        ("returns x, but never less than {a}", "returns the larger of x and {a}"),
        "    return max(x, {a})",
        lambda a: lambda x: max(x, a),
        AROUND,
        range(2, 70),
    ),
    Template(
        "dist_{a}",
        "x",
        ("returns the distance between x and {a}", "returns the absolute difference of x and {a}"),
        "    return abs(x - {a})",
        lambda a: lambda x: abs(x - a),
        AROUND,
        range(2, 70),
    ),
    Template(
        "double_plus_{a}",
        "x",
        ("returns twice x plus {a}", "doubles x and adds {a}"),
        "    return 2 * x + {a}",
        lambda a: lambda x: 2 * x + a,
        NUMBERS,
        range(2, 70),
    ),
    # strings
    Template(
        "first_{a}",
        "s",
        ("returns the first {a} characters of s", "keeps only the first {a} characters of the string s"),
        "    return s[:{a}]",
        lambda a: lambda s: s[:a],
        WORDS,
        range(1, 41),
    ),
    Template(
        "last_{a}",
        "s",
        ("returns the last {a} characters of s", "keeps only the last {a} characters of the string s"),
        "    return s[-{a}:]",
        lambda a: lambda s: s[-a:],
        WORDS,
        range(1, 41),
    ),
    Template(
        "skip_{a}",
        "s",
        ("returns s without its first {a} characters", "drops the first {a} characters of the string s"),
        "    return s[{a}:]",
        lambda a: lambda s: s[a:],
        WORDS,
        range(1, 41),
    ),
    Template(
        "repeat_{a}",
        "s",
        ("returns the string s repeated {a} times", "repeats s {a} times"),
        "    return s * {a}",
        lambda a: lambda s: s * a,
        lambda a: [("ab",), ("",), ("xyz",)],
        range(2, 70),
    ),
    Template(
        "char_{a}",
        "s",
        ("returns the character of s at index {a}", "returns the character at position {a} of s, counting from 0"),
        "    return s[{a}]",
        lambda a: lambda s: s[a],
        lambda a: [(TEXT,), (TEXT[::-1],), (LETTERS,)],
        range(0, 41),
    ),
    Template(
        "longer_than_{a}",
        "s",
        (
            "returns True when s has more than {a} characters",
            "checks whether the string s is longer than {a} characters",
        ),
        "    return len(s) > {a}",
        lambda a: lambda s: len(s) > a,
        lambda a: [("x" * a,), ("y" * (a + 1),), ("",), ("z" * (a - 1),)],
        range(1, 70),
    ),
    Template(
        "stars_{a}",
        "s",
        ("returns s followed by {a} stars", "appends {a} asterisks to s and returns it"),
        '    return s + "*" * {a}',
        lambda a: lambda s: s + "*" * a,
        lambda a: [("ab",), ("",)],
        range(1, 70),
    ),
    # lists
    Template(
        "total_plus_{a}",
        "xs",
        ("returns the sum of the list xs plus {a}", "adds {a} to the sum of the numbers in xs"),
        "    return sum(xs) + {a}",
        lambda a: lambda xs: sum(xs) + a,
        LISTS,
        range(2, 70),
    ),
    Template(
        "count_{a}",
        "xs",
        ("returns how many times {a} occurs in the list xs", "counts the occurrences of {a} in xs"),
        "    return xs.count({a})",
        lambda a: lambda xs: xs.count(a),
        lambda a: [([a, 1, a],), ([],), ([a + 1, a - 1],), ([a] * 3 + [2 * a],)],
        range(2, 70),
    ),
    Template(
        "has_{a}",
        "xs",
        ("returns True if {a} is in the list xs", "checks whether the list xs contains {a}"),
        "    return {a} in xs",
        lambda a: lambda xs: a in xs,
        lambda a: [([a, 1],), ([],), ([a + 1, a - 1],)],
        range(2, 70),
    ),
    Template(
        "shift_{a}",
        "xs",
        ("returns a new list with {a} added to each element of xs", "adds {a} to every number in the list xs"),
        "    return [x + {a} for x in xs]",
        lambda a: lambda xs: [x + a for x in xs],
        LISTS,
        range(2, 70),
    ),
    Template(
        "scale_{a}",
        "xs",
        (
            "returns a new list with each element of xs multiplied by {a}",
            "multiplies every number in the list xs by {a}",
        ),
        "    return [x * {a} for x in xs]",
        lambda a: lambda xs: [x * a for x in xs],
        LISTS,
        range(2, 70),
    ),
    Template(
        "keep_above_{a}",
        "xs",
        ("returns the elements of xs that are greater than {a}", "keeps only the numbers in xs that are above {a}"),
        "    return [x for x in xs if x > {a}]",
        lambda a: lambda xs: [x for x in xs if x > a],
        lambda a: LISTS(a) + [([a - 1, a, a + 1],)],
        range(2, 70),
    ),
    Template(
        "take_{a}",
        "xs",
        ("returns the first {a} elements of the list xs", "keeps only the first {a} items of xs"),
        "    return xs[:{a}]",
        lambda a: lambda xs: xs[:a],
        lambda a: [(list(range(100)),), ([1, 2],)],
        range(1, 70),
    ),
    # conditionals
    Template(
        "size_{a}",
        "x",
        (
            'returns "big" when x is at least {a} and "small" otherwise',
            'classifies x as "big" if it is {a} or more, else "small"',
        ),
        '    if x >= {a}:\n        return "big"\n    return "small"',
        lambda a: lambda x: "big" if x >= a else "small",
        AROUND,
        range(2, 70),
    ),
    # loops
    Template(
        "sum_mult_{a}",
        "n",
        ("returns the sum of the multiples of {a} below n", "adds up every multiple of {a} smaller than n"),
        "    total = 0\n    for i in range(n):\n        if i % {a} == 0:\n            total += i\n    return total",
        lambda a: lambda n: sum(i for i in range(n) if i % a == 0),
        lambda a: [(100,), (a,), (3 * a + 1,)],
        range(2, 70),
    ),
    Template(
        "fill_{a}",
        "v",
        ("returns a list of {a} copies of v", "builds a list that holds v {a} times"),
        "    result = []\n    for _ in range({a}):\n        result.append(v)\n    return result",
        lambda a: lambda v: [v] * a,
        lambda a: [(0,), ("x",)],
        range(1, 70),
    ),
)


def _split_values(template: Template) -> dict[str, list[int]]:
    """The template's values of `a`, shuffled by a fixed seed and cut into the three splits."""
    values = list(template.values)
    random.Random(f"{SEED}:{template.name}").shuffle(values)
    heldout, rest = values[:HELDOUT_PER_TEMPLATE], values[HELDOUT_PER_TEMPLATE:]
    prompts, pretrain = rest[:PROMPTS_PER_TEMPLATE], rest[PROMPTS_PER_TEMPLATE:]
    return {"heldout": sorted(heldout), "prompts": sorted(prompts), "pretrain": sorted(pretrain)}


def problems(split: str = "heldout") -> dict[str, dict]:
    """task_id -> problem of one split, in template order; each problem's phrasing is fixed by the seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown tiny-python split {split!r}; there are: {', '.join(SPLITS)}")
    out: dict[str, dict] = {}
    for template in TEMPLATES:
        rng = random.Random(f"{SEED}:{template.name}:{split}")
        for a in _split_values(template)[split]:
            problem = template.problem(a, rng.randrange(len(FRAMES)), rng.randrange(2), split)
            out[problem["task_id"]] = problem
    return out


def answer(problem: dict) -> str:
    """The reply a good chat model gives: the function in a fenced Python block."""
    return f"```python\n{problem['canonical_solution']}```"


def pretraining_pairs() -> list[tuple[str, str]]:
    """(instruction, answer) for the teacher's pretraining: every `pretrain` value of every template in
    every phrasing (FRAMES × the template's two `does`), so the teacher learns the phrasings, not one sentence."""
    pairs = []
    for template in TEMPLATES:
        for a in _split_values(template)["pretrain"]:
            for frame in range(len(FRAMES)):
                for does in range(2):
                    problem = template.problem(a, frame, does, "pretrain")
                    pairs.append((problem["instruction"], answer(problem)))
    return pairs


def prompt_records(split: str = "prompts") -> list[dict]:
    """{"instruction", "task_id"} per problem of a split, in `problems` order: the shipped prompt set's lines."""
    return [{"instruction": p["instruction"], "task_id": p["task_id"]} for p in problems(split).values()]


def write_prompts_asset(path: str | Path) -> Path:
    """Write the `prompts` split as the data stage's shipped set `tiny:tiny-python` (JSONL, key "instruction").

    The committed file engine/assets/prompts/tiny_python_prompts.jsonl is this function's output; a test keeps
    the two equal. Regenerate with `python -m engine.models.tiny_python --write-prompts PATH`."""
    path = Path(path)
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in prompt_records("prompts")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.models.tiny_python", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--write-prompts",
        type=Path,
        metavar="PATH",
        required=True,
        help="write the prompts split as a JSONL prompt set ({instruction, task_id} a line)",
    )
    args = parser.parse_args(argv)
    path = write_prompts_asset(args.write_prompts)
    print(f"wrote {len(problems('prompts'))} prompts to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
