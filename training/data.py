"""Deterministic generator of checkable chat conversations for the built-in model.

Every conversation asks one question whose answer can be checked exactly: arithmetic, word
puzzles, unit conversions, capitals, or a greeting. Each question has a *key* and a stable hash
of the key puts it in the held-out split or the training split, so the two never overlap and the
held-out split is never trained on. Keys are the operands (two numbers; a converted value and
its units; the word of every word puzzle, so a held-out word is in no training puzzle at all);
facts that can only be memorized (capitals, the time-unit table, the greeting) are keyed by the
fact together with its phrasing (and, for greetings, the system message), so a held-out
question asks a trained fact in an untrained phrasing.
"""

import hashlib
import random

TASKS = ("add", "sub", "reverse", "sort", "count", "convert", "capital", "greeting")

# Sampling weights of the training mix: arithmetic needs the most examples.
WEIGHTS = {"add": 0.18, "sub": 0.18, "reverse": 0.15, "sort": 0.15, "count": 0.14,
           "convert": 0.08, "capital": 0.08, "greeting": 0.04}

HELDOUT_PERCENT = 10

GREETING_REPLY = ("Hello! I am the built-in upg-backend demo model, a tiny Phi-4-style model. "
                  "I can add and subtract, reverse, sort and count letters, convert units "
                  "and name capitals.")

SYSTEMS = (
    "You are a helpful assistant.",
    "You are the built-in upg-backend demo model.",
    "Answer briefly.",
    "You are a concise assistant. Reply with the answer only.",
    "You are a friendly assistant that answers questions exactly.",
)
SYSTEM_PROBABILITY = 0.3
MULTI_TURN_PROBABILITY = 0.15

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "United Kingdom": "London", "Ireland": "Dublin",
    "Netherlands": "Amsterdam", "Belgium": "Brussels", "Austria": "Vienna",
    "Switzerland": "Bern", "Poland": "Warsaw", "Czechia": "Prague", "Hungary": "Budapest",
    "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja", "South Africa": "Pretoria",
    "Morocco": "Rabat", "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "United States": "Washington", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
}

# (big unit singular, plural, abbreviation, small unit singular, plural, abbreviation, factor)
UNITS = (
    ("kilometer", "kilometers", "km", "meter", "meters", "m", 1000),
    ("meter", "meters", "m", "centimeter", "centimeters", "cm", 100),
    ("centimeter", "centimeters", "cm", "millimeter", "millimeters", "mm", 10),
    ("kilogram", "kilograms", "kg", "gram", "grams", "g", 1000),
    ("gram", "grams", "g", "milligram", "milligrams", "mg", 1000),
    ("liter", "liters", "L", "milliliter", "milliliters", "mL", 1000),
    ("hour", "hours", "h", "minute", "minutes", "min", 60),
    ("minute", "minutes", "min", "second", "seconds", "s", 60),
    ("day", "days", "d", "hour", "hours", "h", 24),
)
# Decimal factors are learnable rules (append or strip zeros); the time factors are a small
# table of facts, so those values stay small and their held-out unit includes the phrasing.
TIME_MAX = 24

# Puzzle words: real words (none that the templates use, which the BPE keeps whole) and
# pseudo-words.
COMMON_WORDS = tuple(sorted(set(
    "apple banana cherry orange lemon melon grape peach mango river ocean forest garden "
    "window kitchen pencil paper number planet rocket silver golden yellow purple "
    "green black white house mouse horse tiger zebra monkey rabbit turtle dragon castle "
    "bridge tower market school teacher student doctor music guitar piano violin summer "
    "winter spring autumn cloud storm thunder rainbow sunset evening coffee butter "
    "bread cheese pizza pasta sugar honey candle mirror basket bottle button camera "
    "jacket pocket ticket wallet hammer ladder engine wheel travel island desert valley "
    "mountain world python computer keyboard program machine token simple little happy "
    "quick brown lazy jumps friend family animal flower puzzle spoon table chair".split())))
COMMON_SHARE = 0.15

_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v",
           "w", "x", "y", "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ea", "oo", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "x", "ck", "nd", "st")

_TEMPLATES = {
    "add": ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}.",
            "What is the sum of {a} and {b}?", "Calculate {a} plus {b}.", "{a}+{b}",
            "what is {a} plus {b}"),
    "sub": ("What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?",
            "Subtract {b} from {a}.", "What is {a} minus {b}?", "Calculate {a} minus {b}.",
            "{a}-{b}", "What is the difference between {a} and {b}?"),
    "reverse": ("Reverse the word '{w}'.", "What is '{w}' spelled backwards?",
                "Write {w} backwards.", "Reverse the letters of \"{w}\".", "reverse {w}",
                "Spell the word {w} in reverse order."),
    "sort": ("Sort the letters of '{w}' alphabetically.",
             "Put the letters of {w} in alphabetical order.",
             "Sort the letters in \"{w}\".", "sort letters: {w}",
             "Arrange the letters of the word {w} in alphabetical order."),
    "count": ("How many times does the letter '{c}' appear in '{w}'?",
              "Count the letter {c} in {w}.", "How many {c}'s are in \"{w}\"?",
              "How many times does {c} occur in the word {w}?",
              "count '{c}' in {w}"),
    "convert": ("How many {sp} are in {n} {bn}?", "Convert {n} {ba} to {sa}.",
                "What is {n} {bn} in {sp}?", "{n} {ba} = ? {sa}", "{n} {bn} to {sp}"),
    "convert_back": ("How many {bp} are in {n} {sn}?", "Convert {n} {sa} to {ba}.",
                     "What is {n} {sn} in {bp}?", "{n} {sa} = ? {ba}", "{n} {sn} to {bp}"),
    "capital": ("What is the capital of {x}?", "Capital of {x}?",
                "Name the capital city of {x}.", "Which city is the capital of {x}?",
                "Tell me the capital of {x}.", "What's the capital city of {x}?",
                "capital of {x}", "What city is the capital of {x}?"),
    "greeting": ("Hi", "Hi!", "Hello", "Hello!", "hello", "Hey", "Hey there!",
                 "Good morning!", "Who are you?", "What are you?", "Introduce yourself.",
                 "What is your name?", "Tell me about yourself.", "Hi, who are you?",
                 "What model are you?", "Hello, what can you do?"),
}


def is_heldout(key):
    """Whether a question key belongs to the held-out split (a stable hash, not Python's)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 100 < HELDOUT_PERCENT


def _number(rng):
    digits = rng.randint(1, 4)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _word(rng):
    if rng.random() < COMMON_SHARE:
        return rng.choice(COMMON_WORDS)
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
        word += rng.choice(_CODAS)
        if 3 <= len(word) <= 9:
            return word


def _random_letters(rng):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


def _add(rng, system, word):
    a, b = _number(rng), _number(rng)
    q = rng.choice(_TEMPLATES["add"]).format(a=a, b=b)
    return ("add", a, b), q, f"{a} + {b} = {a + b}"


def _sub(rng, system, word):
    a, b = sorted((_number(rng), _number(rng)), reverse=True)
    q = rng.choice(_TEMPLATES["sub"]).format(a=a, b=b)
    return ("sub", a, b), q, f"{a} - {b} = {a - b}"


def _reverse(rng, system, word):
    w = word(rng)
    return ("word", w), rng.choice(_TEMPLATES["reverse"]).format(w=w), w[::-1]


def _sort(rng, system, word):
    w = word(rng)
    return ("word", w), rng.choice(_TEMPLATES["sort"]).format(w=w), "".join(sorted(w))


def _count(rng, system, word):
    w = word(rng)
    c = rng.choice(w) if rng.random() < 0.75 else chr(rng.randint(ord("a"), ord("z")))
    return ("word", w), rng.choice(_TEMPLATES["count"]).format(c=c, w=w), str(w.count(c))


def _convert(rng, system, word):
    bs, bp, ba, ss, sp, sa, factor = rng.choice(UNITS)
    decimal = factor in (10, 100, 1000)
    n = rng.randint(1, 999) if decimal else rng.randint(1, TIME_MAX)
    t = rng.randrange(len(_TEMPLATES["convert"]))
    if rng.random() < 0.5:
        q = _TEMPLATES["convert"][t].format(n=n, bn=bs if n == 1 else bp, ba=ba, sp=sp, sa=sa)
        key, reply = ("convert", ba, sa, n), f"{n} {ba} = {n * factor} {sa}"
    else:
        m = n * factor
        q = _TEMPLATES["convert_back"][t].format(n=m, sn=sp, sa=sa, bp=bp, ba=ba)
        key, reply = ("convert", sa, ba, m), f"{m} {sa} = {n} {ba}"
    return (key if decimal else key + (t,)), q, reply


def _capital(rng, system, word):
    country = rng.choice(sorted(CAPITALS))
    t = rng.randrange(len(_TEMPLATES["capital"]))
    return ("capital", country, t), _TEMPLATES["capital"][t].format(x=country), CAPITALS[country]


def _greeting(rng, system, word):
    t = rng.randrange(len(_TEMPLATES["greeting"]))
    return ("greeting", t, system), _TEMPLATES["greeting"][t], GREETING_REPLY


_MAKERS = {"add": _add, "sub": _sub, "reverse": _reverse, "sort": _sort, "count": _count,
           "convert": _convert, "capital": _capital, "greeting": _greeting}


def _question(rng, task, heldout, system=None, fixed_system=False, word=_word):
    """Draws (system, question, answer) of `task` from the requested split.

    The system message (an index into SYSTEMS, or None) is drawn with the question unless
    `fixed_system` keeps the given one: a greeting's key includes it.
    """
    for _ in range(100000):
        if not fixed_system:
            system = _system(rng)
        key, question, answer = _MAKERS[task](rng, system, word)
        if is_heldout(key) == heldout:
            return system, question, answer
    raise RuntimeError(f"no {'held-out' if heldout else 'training'} question found for {task}")


def _system(rng):
    """Index into SYSTEMS, or None for no system message."""
    return rng.randrange(len(SYSTEMS)) if rng.random() < SYSTEM_PROBABILITY else None


def _with_system(system, messages):
    head = [] if system is None else [{"role": "system", "content": SYSTEMS[system]}]
    return head + messages


def _conversations(n, seed, word):
    rng = random.Random(seed)
    tasks, weights = list(WEIGHTS), list(WEIGHTS.values())
    for _ in range(n):
        turns = rng.choice((2, 3)) if rng.random() < MULTI_TURN_PROBABILITY else 1
        system, messages = None, []
        for turn, task in enumerate(rng.choices(tasks, weights, k=turns)):
            system, question, answer = _question(rng, task, False, system, turn > 0, word)
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        yield _with_system(system, messages)


def conversations(n, seed):
    """Yields `n` training conversations (message lists ending with the assistant's reply).

    Tasks follow WEIGHTS; some conversations have a system message and some have two or three
    question/answer turns. Nothing from the held-out split is ever produced.

    Args:
        n: number of conversations.
        seed: seed of the generator; the same (n, seed) always gives the same conversations.
    """
    return _conversations(n, seed, _word)


def tokenizer_corpus(n, seed):
    """Yields the message texts of `n` conversations to train the BPE on.

    Their puzzle words are random letters, so the BPE learns no whole-word tokens for puzzle
    words (a spelling the model would have to memorize word by word): puzzle words split into
    short pieces whose spellings the model learns from many words.
    """
    for messages in _conversations(n, seed, _random_letters):
        yield from (m["content"] for m in messages)


def heldout(n, seed, task=None):
    """Yields `n` held-out (messages, expected_answer) pairs that are never trained on.

    `messages` holds an optional system message and one user question; the model's reply must
    equal `expected_answer` exactly.

    Args:
        n: number of pairs.
        seed: seed of the generator.
        task: one of TASKS, or None to cycle through all tasks in turn.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = random.Random(f"heldout-{seed}")
    for i in range(n):
        t = task or TASKS[i % len(TASKS)]
        system, question, answer = _question(rng, t, True)
        yield _with_system(system, [{"role": "user", "content": question}]), answer
