"""Held-out tasks generated in the style of Big-Bench Hard, with short answers and the lexicon's vocabulary.

Each shares skills with training families (logic, sorting, counting, state, strings, arithmetic) but asks for a
longer chain of them than any training task does.
"""

import random

from benchmarks.taskworld import lexicon as lx
from benchmarks.taskworld.core import define_task
from benchmarks.taskworld.tasks_reasoning import joined, truth
from benchmarks.taskworld.tasks_words import BRACKETS, yes_no


def _boolean(rng: random.Random, depth: int) -> tuple[bool, str]:
    """A random expression over true/false with and, or, not and parentheses: (value, text)."""
    if depth == 0 or rng.random() < 0.3:
        value = rng.random() < 0.5
        text = truth(value)
    else:
        op = rng.choice(("and", "or"))
        (left, left_text), (right, right_text) = _boolean(rng, depth - 1), _boolean(rng, depth - 1)
        value = (left and right) if op == "and" else (left or right)
        text = f"( {left_text} {op} {right_text} )"
    if rng.random() < 0.3:
        value, text = not value, f"not {text}"
    return value, text


@define_task("boolean_expressions", "logic", "Evaluate the boolean expression. Answer true or false.",
             held_out=True)
def _boolean_expressions(rng):
    value, text = _boolean(rng, depth=2)
    return text, truth(value)


SORTABLE_WORDS = tuple(w for w in lx.WORDS if len(w) <= 6)


@define_task("word_sorting", "sorting", "Sort the words alphabetically.", held_out=True)
def _word_sorting(rng):
    words = rng.sample(SORTABLE_WORDS, rng.randint(4, 5))
    return joined(words), joined(sorted(words))


_COUNTED = {"fruit": "fruits", "vegetable": "vegetables", "animal": "animals", "instrument": "musical instruments"}


def _amount(noun: str, count: int) -> str:
    if count == 1:
        return ("an " if noun[0] in "aeiou" else "a ") + noun
    return f"{lx.NUMBER_WORDS[count]} {lx.PLURAL_OF[noun]}"


@define_task("object_counting", "counting", "Answer the question with a number.", held_out=True)
def _object_counting(rng):
    category = rng.choice(tuple(_COUNTED))
    nouns = rng.sample(lx.NOUNS[category], rng.randint(1, 3))
    nouns += rng.sample([w for w in lx.ALL_NOUNS if lx.CATEGORY_OF[w] != category], rng.randint(1, 3))
    rng.shuffle(nouns)
    counts = [rng.randint(1, 3) for _ in nouns]
    items = [_amount(noun, count) for noun, count in zip(nouns, counts)]
    total = sum(c for noun, c in zip(nouns, counts) if lx.CATEGORY_OF[noun] == category)
    text = f"i have {', '.join(items[:-1])} and {items[-1]}. how many {_COUNTED[category]} do i have?"
    return text, str(total)


_STEPS = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}
_INVERSE = {"forward": "backward", "backward": "forward", "left": "right", "right": "left"}


@define_task("navigate", "state", "If you follow these instructions, do you return to the starting point? "
                                  "Answer yes or no.", held_out=True)
def _navigate(rng):
    moves = [(rng.choice(tuple(_STEPS)), rng.randint(1, 5)) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        back = [(_INVERSE[d], n) for d, n in moves]
        rng.shuffle(back)
        moves += back
    x = sum(_STEPS[d][0] * n for d, n in moves)
    y = sum(_STEPS[d][1] * n for d, n in moves)
    text = "always face forward. " + " ".join(f"take {n} step{'s' * (n > 1)} {d}." for d, n in moves)
    return text, yes_no(x == 0 and y == 0)


@define_task("tracking_shuffled_objects", "state", "Follow the swaps and answer with a color.", held_out=True)
def _tracking_shuffled_objects(rng):
    people = rng.sample(lx.NAMES, 3)
    colors = rng.sample(lx.COLORS, 3)
    held = dict(zip(people, colors))
    text = ", ".join(f"{p} has a {c} ball" for p, c in held.items()) + "."
    for order in ("first", "then", "finally"):
        a, b = rng.sample(people, 2)
        held[a], held[b] = held[b], held[a]
        text += f" {order} {a} and {b} swap balls."
    asked = rng.choice(people)
    return f"{text} what color is {asked}'s ball?", held[asked]


@define_task("web_of_lies", "logic", "Answer yes or no.", held_out=True)
def _web_of_lies(rng):
    people = rng.sample(lx.NAMES, rng.randint(3, 5))
    honest = rng.random() < 0.5
    sentences = [f"{people[0]} {'tells the truth' if honest else 'lies'}."]
    for speaker, subject in zip(people[1:], people):
        claims_honest = rng.random() < 0.5
        sentences.append(f"{speaker} says {subject} {'tells the truth' if claims_honest else 'lies'}.")
        honest = claims_honest == honest
    return " ".join(sentences) + f" does {people[-1]} tell the truth?", yes_no(honest)


@define_task("dyck_languages", "strings", "Complete the sequence so that every bracket is closed. "
                                          "Write only the missing closing brackets.", held_out=True)
def _dyck_languages(rng):
    stack: list[str] = []
    tokens: list[str] = []
    for _ in range(rng.randint(3, 9)):
        if stack and rng.random() < 0.4:
            tokens.append(BRACKETS[stack.pop()])
        elif len(stack) < 4:
            stack.append(rng.choice(tuple(BRACKETS)))
            tokens.append(stack[-1])
    if not stack:
        stack.append(rng.choice(tuple(BRACKETS)))
        tokens.append(stack[-1])
    return joined(tokens), joined(BRACKETS[b] for b in reversed(stack))


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@define_task("multistep_arithmetic", "arithmetic", "Compute the value of the expression.", held_out=True)
def _multistep_arithmetic(rng):
    a, b, c, d = (rng.randint(-9, 9) for _ in range(4))
    op1, op2, op3 = (rng.choice(tuple(_OPS)) for _ in range(3))
    value = _OPS[op2](_OPS[op1](a, b), _OPS[op3](c, d))
    return f"( {a} {op1} {b} ) {op2} ( {c} {op3} {d} )", str(value)
