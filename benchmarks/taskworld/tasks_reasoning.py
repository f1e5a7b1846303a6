"""Training tasks about numbers, lists and state: counting, sorting, arithmetic, comparison, logic, tracking."""

import random

from benchmarks.taskworld import lexicon as lx
from benchmarks.taskworld.core import define_task
from benchmarks.taskworld.tasks_words import spelled, yes_no


def numbers(rng: random.Random, k: int, high: int = 99) -> list[int]:
    return [rng.randint(0, high) for _ in range(k)]


def joined(items) -> str:
    return " ".join(map(str, items))


def truth(flag: bool) -> str:
    return "true" if flag else "false"


# --- counting ------------------------------------------------------------------------------------------------------

@define_task("count_words", "counting", "How many words are in the list?")
def _count_words(rng):
    k = rng.randint(1, 9)
    return joined(rng.choices(lx.WORDS, k=k)), str(k)


def count_category(rng: random.Random, category: str) -> tuple[str, str]:
    """A list of 3-8 nouns, some of `category`; the answer is how many of them are."""
    k = rng.randint(3, 8)
    hits = rng.randint(0, min(k, 5))
    others = [w for w in lx.ALL_NOUNS if lx.CATEGORY_OF[w] != category]
    words = rng.choices(lx.NOUNS[category], k=hits) + rng.choices(others, k=k - hits)
    rng.shuffle(words)
    return joined(words), str(hits)


for _category, _plural in (("animal", "animals"), ("tool", "tools"), ("clothing", "pieces of clothing"),
                           ("instrument", "instruments")):
    define_task(f"count_{_category}", "counting", f"How many {_plural} are in the list?")(
        lambda rng, category=_category: count_category(rng, category))


@define_task("count_letter", "counting",
             "How many times does the letter before the colon appear in the spelled word?")
def _count_letter(rng):
    word = rng.choice(lx.WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"{letter} : {spelled(word)}", str(word.count(letter))


@define_task("count_word", "counting", "How many times does the word before the colon appear in the list?")
def _count_word(rng):
    target, *others = rng.sample(lx.ALL_NOUNS, 4)
    k = rng.randint(3, 8)
    words = [rng.choice([target] + others) for _ in range(k)]
    return f"{target} : {joined(words)}", str(words.count(target))


# --- sorting -------------------------------------------------------------------------------------------------------

@define_task("sort_numbers", "sorting", "Sort the numbers from smallest to largest.")
def _sort_numbers(rng):
    values = numbers(rng, rng.randint(3, 5))
    return joined(values), joined(sorted(values))


@define_task("sort_numbers_desc", "sorting", "Sort the numbers from largest to smallest.")
def _sort_numbers_desc(rng):
    values = numbers(rng, rng.randint(3, 5))
    return joined(values), joined(sorted(values, reverse=True))


@define_task("sort_words", "sorting", "Sort the words in alphabetical order.")
def _sort_words(rng):
    words = rng.sample(lx.ALL_NOUNS, 3)
    return joined(words), joined(sorted(words))


@define_task("first_alphabetically", "sorting", "Which word comes first in alphabetical order?")
def _first_alphabetically(rng):
    words = rng.sample(lx.WORDS, rng.randint(2, 4))
    return joined(words), min(words)


@define_task("reverse_list", "sorting", "Write the words in reverse order.")
def _reverse_list(rng):
    words = rng.sample(lx.ALL_NOUNS, rng.randint(2, 4))
    return joined(words), joined(reversed(words))


# --- arithmetic ----------------------------------------------------------------------------------------------------

@define_task("add", "arithmetic", "Add the two numbers.")
def _add(rng):
    a, b = numbers(rng, 2)
    return f"{a} + {b}", str(a + b)


@define_task("subtract", "arithmetic", "Subtract the second number from the first.")
def _subtract(rng):
    a, b = sorted(numbers(rng, 2), reverse=True)
    return f"{a} - {b}", str(a - b)


@define_task("multiply", "arithmetic", "Multiply the two numbers.")
def _multiply(rng):
    a, b = rng.randint(2, 25), rng.randint(2, 9)
    return f"{a} * {b}", str(a * b)


@define_task("add_three", "arithmetic", "Add the three numbers.")
def _add_three(rng):
    values = numbers(rng, 3, high=9)
    return " + ".join(map(str, values)), str(sum(values))


@define_task("double", "arithmetic", "What is twice the number?")
def _double(rng):
    a = rng.randint(0, 499)
    return str(a), str(2 * a)


@define_task("halve", "arithmetic", "What is half of the number?")
def _halve(rng):
    a = rng.randint(0, 499)
    return str(2 * a), str(a)


@define_task("next_number", "arithmetic", "What number comes right after this one?")
def _next_number(rng):
    a = rng.randint(0, 998)
    return str(a), str(a + 1)


# --- comparison ----------------------------------------------------------------------------------------------------

@define_task("larger", "comparison", "Which of the two numbers is larger?")
def _larger(rng):
    values = rng.sample(range(100), 2)
    return joined(values), str(max(values))


@define_task("smaller", "comparison", "Which of the two numbers is smaller?")
def _smaller(rng):
    values = rng.sample(range(100), 2)
    return joined(values), str(min(values))


@define_task("max_of_list", "comparison", "What is the largest number in the list?")
def _max_of_list(rng):
    values = numbers(rng, rng.randint(3, 6))
    return joined(values), str(max(values))


@define_task("min_of_list", "comparison", "What is the smallest number in the list?")
def _min_of_list(rng):
    values = numbers(rng, rng.randint(3, 6))
    return joined(values), str(min(values))


@define_task("is_even", "comparison", "Is the number even? Answer yes or no.")
def _is_even(rng):
    a = rng.randint(0, 999)
    return str(a), yes_no(a % 2 == 0)


@define_task("compare", "comparison", "Is the first number less than, greater than or equal to the second? "
                                      "Answer less, greater or equal.")
def _compare(rng):
    a = rng.randint(0, 99)
    b = a if rng.random() < 0.2 else rng.randint(0, 99)
    return f"{a} {b}", "less" if a < b else "greater" if a > b else "equal"


# --- logic ---------------------------------------------------------------------------------------------------------

def facts(rng: random.Random) -> tuple[str, str, bool, bool, str]:
    """Two named truth values: (name_a, name_b, value_a, value_b, 'x is true. y is false.')."""
    a, b = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
    va, vb = rng.random() < 0.5, rng.random() < 0.5
    return a, b, va, vb, f"{a} is {truth(va)}. {b} is {truth(vb)}."


@define_task("logic_and", "logic", "Evaluate the expression. Answer true or false.")
def _logic_and(rng):
    a, b, va, vb, text = facts(rng)
    return f"{text} {a} and {b}", truth(va and vb)


@define_task("logic_or", "logic", "Evaluate the expression. Answer true or false.")
def _logic_or(rng):
    a, b, va, vb, text = facts(rng)
    return f"{text} {a} or {b}", truth(va or vb)


@define_task("logic_not", "logic", "Evaluate the expression. Answer true or false.")
def _logic_not(rng):
    a, b, va, vb, text = facts(rng)
    return (f"{text} not {a}", truth(not va)) if rng.random() < 0.5 else (f"{text} not {b}", truth(not vb))


def named_values(rng: random.Random, all_same: bool, value: bool) -> str:
    """2-5 people with truth values ('alice true bob false'); with `all_same` every value is `value`."""
    people = rng.sample(lx.NAMES, rng.randint(2, 5))
    values = [value if all_same else rng.random() < 0.5 for _ in people]
    if not all_same and all(v == value for v in values):
        values[rng.randrange(len(values))] = not value
    return joined(f"{p} {truth(v)}" for p, v in zip(people, values))


@define_task("all_true", "logic", "Is every value true? Answer yes or no.")
def _all_true(rng):
    yes = rng.random() < 0.5
    return named_values(rng, all_same=yes, value=True), yes_no(yes)


@define_task("any_true", "logic", "Is at least one value true? Answer yes or no.")
def _any_true(rng):
    no = rng.random() < 0.5
    return named_values(rng, all_same=no, value=False), yes_no(not no)


@define_task("logic_xor", "logic", "Evaluate the expression. Answer true or false.")
def _logic_xor(rng):
    a, b, va, vb, text = facts(rng)
    return f"{text} {a} xor {b}", truth(va != vb)


# --- state tracking ------------------------------------------------------------------------------------------------

def walk(rng, moves: tuple[int, int], largest: int, down: str, up: str) -> tuple[str, str]:
    """A walk on the naturals from 0..9: each of `moves` (min, max) steps goes down by 1..largest when it can and
    a coin says so, else up. Returns the steps as text and the end point."""
    value = rng.randint(0, 9)
    steps = [f"start at {value}."]
    for _ in range(rng.randint(*moves)):
        amount = rng.randint(1, largest)
        if rng.random() < 0.5 and value >= amount:
            value -= amount
            steps.append(f"{down} {amount}.")
        else:
            value += amount
            steps.append(f"{up} {amount}.")
    return " ".join(steps), str(value)


@define_task("counter", "state", "Follow the steps and give the final number.")
def _counter(rng):
    return walk(rng, moves=(2, 4), largest=5, down="subtract", up="add")


@define_task("swap_two", "state", "Two people swap what they hold as told. What does the person asked about hold?")
def _swap_two(rng):
    a, b = rng.sample(lx.NAMES, 2)
    x, y = rng.sample(lx.ALL_NOUNS, 2)
    swaps = rng.randint(1, 3)
    asked = rng.choice((a, b))
    held = {a: x, b: y}
    if swaps % 2:
        held = {a: y, b: x}
    text = f"{a} has the {x}. {b} has the {y}. " + " ".join(["they swap."] * swaps) + f" what does {asked} have?"
    return text, held[asked]


@define_task("light_switch", "state", "Each person flips the switch once. Is the lamp on or off at the end?")
def _light_switch(rng):
    on = rng.random() < 0.5
    people = rng.choices(lx.NAMES, k=rng.randint(1, 5))
    text = f"the lamp is {'on' if on else 'off'}. " + " ".join(f"{p} flips the switch." for p in people)
    return text, "on" if on ^ (len(people) % 2 == 1) else "off"


@define_task("position", "state", "Start at the given number on a line and follow the moves. Where do you end?")
def _position(rng):
    return walk(rng, moves=(1, 4), largest=4, down="move left", up="move right")
