"""The built-in lexicon every taskworld generator draws from.

Plain data plus a few derived tables: nouns by category (with plurals), adjective opposites, sentiment words,
topic keywords, names, and a made-up language ("zorbish") whose words are fixed by a seeded generator.
Everything is lowercase so that the tiny base's lowercasing tokenizer loses nothing.
"""

import random

NOUNS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "orange", "peach", "pear",
              "plum", "kiwi", "lime", "apricot", "fig", "papaya", "coconut", "strawberry", "raspberry", "date"),
    "vegetable": ("carrot", "potato", "onion", "cabbage", "pepper", "tomato", "lettuce", "turnip", "radish",
                  "leek", "pumpkin", "cucumber", "celery", "spinach", "garlic", "bean", "pea", "beet",
                  "zucchini", "broccoli"),
    "animal": ("dog", "cat", "horse", "cow", "sheep", "goat", "pig", "mouse", "rabbit", "fox", "wolf", "bear",
               "lion", "tiger", "deer", "monkey", "elephant", "zebra", "camel", "donkey"),
    "bird": ("eagle", "owl", "parrot", "crow", "swan", "duck", "goose", "robin", "sparrow", "pigeon", "hawk",
             "falcon", "penguin", "flamingo", "peacock", "turkey", "heron", "stork", "finch", "raven"),
    "vehicle": ("car", "bus", "truck", "train", "bicycle", "boat", "plane", "tractor", "taxi", "van",
                "scooter", "ship", "tram", "motorcycle", "helicopter", "canoe", "rocket", "wagon", "sled",
                "ferry"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "axe", "chisel", "screwdriver", "pliers",
             "ladder", "brush", "knife", "file", "clamp", "ruler", "spade", "trowel", "mallet", "crowbar"),
    "clothing": ("shirt", "coat", "hat", "scarf", "glove", "sock", "boot", "dress", "skirt", "jacket",
                 "sweater", "belt", "tie", "shoe", "sandal", "vest", "cap", "blouse", "hoodie", "apron"),
    "furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "stool", "bench", "cabinet", "dresser",
                  "couch", "wardrobe", "bookcase", "cupboard", "armchair", "crib", "ottoman", "futon",
                  "hammock", "cot"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "banjo", "tuba",
                   "clarinet", "oboe", "saxophone", "trombone", "ukulele", "accordion", "harmonica", "bagpipe",
                   "xylophone", "mandolin"),
    "body": ("hand", "foot", "head", "arm", "leg", "nose", "ear", "eye", "mouth", "knee", "elbow", "finger",
             "toe", "neck", "shoulder", "chin", "tooth", "wrist", "ankle", "heel"),
}

_IRREGULAR_PLURALS = {
    "mouse": "mice", "sheep": "sheep", "deer": "deer", "goose": "geese", "foot": "feet", "tooth": "teeth",
    "knife": "knives", "wolf": "wolves", "pliers": "pliers", "shelf": "shelves", "scarf": "scarves",
}


def plural_of(noun: str) -> str:
    """English plural of a lexicon noun: irregular table first, then the spelling rules."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")) or noun in ("potato", "tomato", "mango"):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


CATEGORY_OF = {word: category for category, words in NOUNS.items() for word in words}
ALL_NOUNS = tuple(CATEGORY_OF)
PLURAL_OF = {noun: plural_of(noun) for noun in ALL_NOUNS}
SINGULAR_OF = {plural: noun for noun, plural in PLURAL_OF.items() if plural != noun}

_OPPOSITE_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("old", "young"), ("high", "low"), ("long", "short"), ("open", "closed"), ("full", "empty"),
    ("early", "late"), ("hard", "soft"), ("wet", "dry"), ("rich", "poor"), ("strong", "weak"),
    ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("wide", "narrow"), ("deep", "shallow"),
    ("sweet", "sour"), ("heavy", "airy"), ("near", "far"), ("safe", "dangerous"), ("true", "false"),
    ("cheap", "costly"), ("brave", "timid"), ("calm", "angry"), ("smooth", "rough"),
    ("tight", "loose"), ("sharp", "blunt"), ("first", "last"), ("inside", "outside"), ("up", "down"),
    ("left", "right"), ("day", "night"), ("win", "lose"), ("push", "pull"), ("buy", "sell"),
)
OPPOSITE_OF = {a: b for a, b in _OPPOSITE_PAIRS} | {b: a for a, b in _OPPOSITE_PAIRS}
OPPOSITE_WORDS = tuple(OPPOSITE_OF)

POSITIVE_WORDS = ("good", "great", "wonderful", "excellent", "lovely", "amazing", "fantastic", "pleasant",
                  "delightful", "superb", "brilliant", "charming", "perfect", "nice", "enjoyable", "splendid",
                  "fun", "beautiful", "marvelous", "fine")
NEGATIVE_WORDS = ("bad", "awful", "terrible", "horrible", "boring", "poor", "dreadful", "disappointing", "ugly",
                  "annoying", "nasty", "dull", "sad", "weak", "miserable", "lousy", "gloomy", "tedious", "bland",
                  "messy")
SENTIMENT_OF = {w: "positive" for w in POSITIVE_WORDS} | {w: "negative" for w in NEGATIVE_WORDS}
REVIEW_SUBJECTS = ("movie", "meal", "concert", "trip", "book", "hotel", "game", "show", "party", "class",
                   "song", "play", "museum", "park", "cafe", "lecture")

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "sports": ("goal", "team", "match", "coach", "stadium", "player", "referee", "league", "score", "tournament"),
    "food": ("recipe", "dinner", "soup", "oven", "kitchen", "flavor", "dessert", "chef", "bakery", "salad"),
    "weather": ("rain", "snow", "storm", "sunshine", "wind", "cloud", "forecast", "thunder", "fog", "frost"),
    "music": ("song", "band", "melody", "concert", "singer", "album", "chorus", "rhythm", "choir", "lyrics"),
    "school": ("teacher", "exam", "homework", "lesson", "student", "classroom", "grade", "textbook",
               "principal", "quiz"),
    "money": ("bank", "price", "salary", "coins", "budget", "loan", "savings", "tax", "wallet", "invoice"),
    "health": ("doctor", "medicine", "hospital", "fever", "nurse", "clinic", "vaccine", "pharmacy", "injury",
               "therapy"),
    "travel": ("flight", "passport", "luggage", "airport", "hostel", "tourist", "journey", "map", "visa",
               "suitcase"),
}
TOPIC_OF = {word: topic for topic, words in TOPIC_WORDS.items() for word in words}

COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "violet", "pink", "brown", "gray", "silver")
NAMES = ("alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


def _make_zorbish(words: tuple[str, ...], seed: int) -> dict[str, str]:
    """A fixed made-up word for each English word: two or three consonant-vowel syllables, all distinct."""
    rng = random.Random(seed)
    consonants, vowels = "bdgklmnprstvz", "aeiou"
    english = set(words) | set(OPPOSITE_WORDS) | set(COLORS)
    table: dict[str, str] = {}
    used: set[str] = set()
    for word in words:
        while True:
            syllables = rng.choice((2, 2, 3))
            made_up = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
            made_up += rng.choice(("", "", "r", "n", "x"))
            if made_up not in used and made_up not in english:
                break
        used.add(made_up)
        table[word] = made_up
    return table


ZORBISH_OF = _make_zorbish(ALL_NOUNS + COLORS, seed=1234)
ENGLISH_OF_ZORBISH = {made_up: english for english, made_up in ZORBISH_OF.items()}

# every distinct lexicon word: the pool for word-level string and list tasks
WORDS = tuple(dict.fromkeys(ALL_NOUNS + OPPOSITE_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS + tuple(TOPIC_OF) + COLORS))
