"""Training tasks about words: lexicon knowledge, sentiment, topic, Zorbish translation and letter-level edits."""

import random

from benchmarks.taskworld import lexicon as lx
from benchmarks.taskworld.core import define_task


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def spelled(word: str) -> str:
    """'cat' -> 'c a t': letters as separate tokens, so letter-level skills are learnable word by word."""
    return " ".join(word)


def nouns_with_or_without(rng: random.Random, category: str, length: int, present: bool) -> list[str]:
    """`length` distinct nouns containing at least one of `category` exactly when `present`."""
    others = [w for w in lx.ALL_NOUNS if lx.CATEGORY_OF[w] != category]
    words = rng.sample(others, length)
    if present:
        words[rng.randrange(length)] = rng.choice(lx.NOUNS[category])
    return words


# --- lexicon -------------------------------------------------------------------------------------------------------

@define_task("word_category", "lexicon", "Name the category of the word, such as fruit, animal or tool.")
def _word_category(rng):
    word = rng.choice(lx.ALL_NOUNS)
    return word, lx.CATEGORY_OF[word]


@define_task("plural", "lexicon", "Write the plural of the noun.")
def _plural(rng):
    word = rng.choice(lx.ALL_NOUNS)
    return word, lx.PLURAL_OF[word]


@define_task("singular", "lexicon", "Write the singular of the plural noun.")
def _singular(rng):
    plural = rng.choice(tuple(lx.SINGULAR_OF))
    return plural, lx.SINGULAR_OF[plural]


@define_task("opposite", "lexicon", "Write the opposite of each word.")
def _opposite(rng):
    words = rng.sample(lx.OPPOSITE_WORDS, rng.choice((1, 2)))
    return " ".join(words), " ".join(lx.OPPOSITE_OF[w] for w in words)


def _has_category(category: str):
    def make(rng):
        present = rng.random() < 0.5
        return " ".join(nouns_with_or_without(rng, category, rng.randint(2, 4), present)), yes_no(present)

    return make


for _name, _category, _kind in (("has_fruit", "fruit", "a fruit"), ("has_animal", "animal", "an animal"),
                                ("has_clothing", "clothing", "a piece of clothing")):
    define_task(_name, "lexicon", f"Is there {_kind} in the list? Answer yes or no.")(_has_category(_category))


@define_task("same_category", "lexicon", "Do the two words belong to the same category? Answer yes or no.")
def _same_category(rng):
    first = rng.choice(lx.ALL_NOUNS)
    same = rng.random() < 0.5
    pool = [w for w in lx.ALL_NOUNS if (lx.CATEGORY_OF[w] == lx.CATEGORY_OF[first]) == same and w != first]
    return f"{first} {rng.choice(pool)}", yes_no(same)


# --- sentiment -----------------------------------------------------------------------------------------------------

REVIEW_TEMPLATES = ("the {s} was {a}", "i thought the {s} was {a}", "what a {a} {s}", "honestly the {s} was {a}",
                    "my friends found the {s} {a}")


def review(rng: random.Random, positive: bool) -> str:
    adjective = rng.choice(lx.POSITIVE_WORDS if positive else lx.NEGATIVE_WORDS)
    return rng.choice(REVIEW_TEMPLATES).format(s=rng.choice(lx.REVIEW_SUBJECTS), a=adjective)


@define_task("sentiment_review", "sentiment", "Is the review positive or negative?")
def _sentiment_review(rng):
    positive = rng.random() < 0.5
    return review(rng, positive), "positive" if positive else "negative"


@define_task("positive_word", "sentiment", "Which of the two words is positive?")
def _positive_word(rng):
    pair = [rng.choice(lx.POSITIVE_WORDS), rng.choice(lx.NEGATIVE_WORDS)]
    rng.shuffle(pair)
    return " ".join(pair), next(w for w in pair if lx.SENTIMENT_OF[w] == "positive")


@define_task("positive_review", "sentiment", "Which review is positive, the first or the second?")
def _positive_review(rng):
    first_positive = rng.random() < 0.5
    text = f"{review(rng, first_positive)} / {review(rng, not first_positive)}"
    return text, "first" if first_positive else "second"


# --- topic ---------------------------------------------------------------------------------------------------------

TOPIC_TEMPLATES = ("yesterday we talked about the {a} and the {b}", "she wrote a note about the {a} and the {b}",
                   "the news mentioned the {a} and later the {b}", "my question is about the {a} and the {b}")


@define_task("topic_sentence", "topic", "What is the topic of the sentence?")
def _topic_sentence(rng):
    topic = rng.choice(tuple(lx.TOPIC_WORDS))
    a, b = rng.sample(lx.TOPIC_WORDS[topic], 2)
    return rng.choice(TOPIC_TEMPLATES).format(a=a, b=b), topic


@define_task("topic_words", "topic", "Which topic do the words belong to?")
def _topic_words(rng):
    topic = rng.choice(tuple(lx.TOPIC_WORDS))
    return " ".join(rng.sample(lx.TOPIC_WORDS[topic], 2)), topic


@define_task("same_topic", "topic", "Are the two words about the same topic? Answer yes or no.")
def _same_topic(rng):
    first = rng.choice(tuple(lx.TOPIC_OF))
    same = rng.random() < 0.5
    pool = [w for w in lx.TOPIC_OF if (lx.TOPIC_OF[w] == lx.TOPIC_OF[first]) == same and w != first]
    return f"{first} {rng.choice(pool)}", yes_no(same)


# --- zorbish, the made-up language ---------------------------------------------------------------------------------

ZORBISH_WORDS = tuple(lx.ZORBISH_OF)


@define_task("to_zorbish", "zorbish", "Translate the English word into Zorbish.")
def _to_zorbish(rng):
    word = rng.choice(ZORBISH_WORDS)
    return word, lx.ZORBISH_OF[word]


@define_task("from_zorbish", "zorbish", "Translate the Zorbish word into English.")
def _from_zorbish(rng):
    word = rng.choice(ZORBISH_WORDS)
    return lx.ZORBISH_OF[word], word


@define_task("phrase_to_zorbish", "zorbish", "Translate the English phrase into Zorbish, word by word.")
def _phrase_to_zorbish(rng):
    words = (rng.choice(lx.COLORS), rng.choice(lx.ALL_NOUNS))
    return " ".join(words), " ".join(lx.ZORBISH_OF[w] for w in words)


@define_task("phrase_from_zorbish", "zorbish", "Translate the Zorbish phrase into English, word by word.")
def _phrase_from_zorbish(rng):
    words = (rng.choice(lx.COLORS), rng.choice(lx.ALL_NOUNS))
    return " ".join(lx.ZORBISH_OF[w] for w in words), " ".join(words)


# --- strings: letters and brackets ---------------------------------------------------------------------------------

SHORT_WORDS = tuple(w for w in lx.WORDS if len(w) <= 8)
BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


@define_task("spell_word", "strings", "Spell the word with a space between the letters.")
def _spell_word(rng):
    word = rng.choice(SHORT_WORDS)
    return word, spelled(word)


@define_task("join_letters", "strings", "Join the letters into one word.")
def _join_letters(rng):
    word = rng.choice(SHORT_WORDS)
    return spelled(word), word


@define_task("reverse_letters", "strings", "Write the letters in reverse order.")
def _reverse_letters(rng):
    letters = rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 6))
    return " ".join(letters), " ".join(reversed(letters))


@define_task("first_letter", "strings", "What is the first letter of the word?")
def _first_letter(rng):
    word = rng.choice(lx.WORDS)
    return word, word[0]


@define_task("last_letter", "strings", "What is the last letter of the word?")
def _last_letter(rng):
    word = rng.choice(lx.WORDS)
    return word, word[-1]


@define_task("repeat_word", "strings", "Write the word as many times as the number says.")
def _repeat_word(rng):
    word, times = rng.choice(SHORT_WORDS), rng.randint(2, 4)
    return f"{word} {times}", " ".join([word] * times)


@define_task("close_last_bracket", "strings", "Which bracket closes the last open bracket?")
def _close_last_bracket(rng):
    opened = rng.choices(tuple(BRACKETS), k=rng.randint(1, 4))
    return " ".join(opened), BRACKETS[opened[-1]]
