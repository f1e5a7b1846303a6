"""Held-out tasks: each reuses skills of the training tasks in a new composition, category or answer format.

No zoo adapter and no pretraining of the tiny base ever sees these; the docstring of each generator says which
training skills it shares.
"""

from benchmarks.taskworld import lexicon as lx
from benchmarks.taskworld.core import define_task
from benchmarks.taskworld.tasks_reasoning import count_category, joined, numbers
from benchmarks.taskworld.tasks_words import REVIEW_TEMPLATES, nouns_with_or_without, spelled, yes_no


@define_task("has_vehicle", "lexicon", "Is there a vehicle in the list? Answer yes or no.", held_out=True)
def _has_vehicle(rng):
    """New category for has_fruit / has_animal / has_clothing."""
    present = rng.random() < 0.5
    return joined(nouns_with_or_without(rng, "vehicle", rng.randint(2, 4), present)), yes_no(present)


@define_task("count_birds", "counting", "How many birds are in the list?", held_out=True)
def _count_birds(rng):
    """New category for count_animal / count_tool / ...; birds are never counted in training."""
    return count_category(rng, "bird")


@define_task("sentiment_negated", "sentiment", "Is the review positive or negative?", held_out=True)
def _sentiment_negated(rng):
    """sentiment_review composed with logic_not: 'the movie was not dull' is positive."""
    positive = rng.random() < 0.5
    adjective = rng.choice(lx.NEGATIVE_WORDS if positive else lx.POSITIVE_WORDS)
    return f"the {rng.choice(lx.REVIEW_SUBJECTS)} was not {adjective}", "positive" if positive else "negative"


@define_task("zorbish_category", "zorbish", "Name the category of the Zorbish word, such as fruit or tool.",
             held_out=True)
def _zorbish_category(rng):
    """from_zorbish composed with word_category."""
    word = rng.choice(lx.ALL_NOUNS)
    return lx.ZORBISH_OF[word], lx.CATEGORY_OF[word]


@define_task("zorbish_plural", "zorbish", "Translate the Zorbish word into English and write its plural.",
             held_out=True)
def _zorbish_plural(rng):
    """from_zorbish composed with plural."""
    word = rng.choice(lx.ALL_NOUNS)
    return lx.ZORBISH_OF[word], lx.PLURAL_OF[word]


@define_task("spell_plural", "strings", "Spell the plural of the noun with a space between the letters.",
             held_out=True)
def _spell_plural(rng):
    """plural composed with spell_word."""
    word = rng.choice([w for w in lx.ALL_NOUNS if len(lx.PLURAL_OF[w]) <= 10])
    return word, spelled(lx.PLURAL_OF[word])


@define_task("sort_words_desc", "sorting", "Sort the words in reverse alphabetical order.", held_out=True)
def _sort_words_desc(rng):
    """sort_words with the order of sort_numbers_desc: a new answer format."""
    words = rng.sample(lx.ALL_NOUNS, 3)
    return joined(words), joined(sorted(words, reverse=True))


@define_task("last_alphabetically", "sorting", "Which word comes last in alphabetical order?", held_out=True)
def _last_alphabetically(rng):
    """first_alphabetically asked the other way round."""
    words = rng.sample(lx.WORDS, rng.randint(2, 4))
    return joined(words), max(words)


@define_task("sum_of_extremes", "arithmetic", "Add the largest and the smallest number of the list.",
             held_out=True)
def _sum_of_extremes(rng):
    """max_of_list and min_of_list composed with add."""
    values = numbers(rng, rng.randint(3, 5))
    return joined(values), str(max(values) + min(values))


@define_task("count_even", "counting", "How many numbers in the list are even?", held_out=True)
def _count_even(rng):
    """is_even composed with counting."""
    values = numbers(rng, rng.randint(2, 6))
    return joined(values), str(sum(v % 2 == 0 for v in values))


@define_task("are_opposites", "lexicon", "Are the two words opposites? Answer yes or no.", held_out=True)
def _are_opposites(rng):
    """opposite turned into a yes/no judgement."""
    first = rng.choice(lx.OPPOSITE_WORDS)
    if rng.random() < 0.5:
        return f"{first} {lx.OPPOSITE_OF[first]}", "yes"
    other = rng.choice([w for w in lx.OPPOSITE_WORDS if w not in (first, lx.OPPOSITE_OF[first])])
    return f"{first} {other}", "no"


@define_task("review_and_topic", "topic", "Is the review about food or music, and is it positive or negative? "
                                          "Answer like: food positive.", held_out=True)
def _review_and_topic(rng):
    """sentiment_review and topic_words in one answer: the reviewed thing is a topic keyword."""
    topic = rng.choice(("food", "music"))
    positive = rng.random() < 0.5
    adjective = rng.choice(lx.POSITIVE_WORDS if positive else lx.NEGATIVE_WORDS)
    text = rng.choice(REVIEW_TEMPLATES).format(s=rng.choice(lx.TOPIC_WORDS[topic]), a=adjective)
    return text, f"{topic} {'positive' if positive else 'negative'}"
