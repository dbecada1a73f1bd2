"""A hidden utility for the feedback loop's tests on the tiny byte-level model: the share of a completion's
characters that are ASCII letters (a random tiny model's samples are about a fifth letters; DPO and a reward
model can both pick the preference up from a few dozen votes)."""


def letters(prompts, completions, **_):
    return [sum(c.isascii() and c.isalpha() for c in text) / max(1, len(text)) for text in completions]
