"""Rule-based checkers for IFBench, AllenAI's out-of-distribution verifiable instruction-following benchmark.

Each IFBench prompt carries one or two constraints (``instruction_id_list``), each with its arguments
(``kwargs``), e.g. ``count:keywords_multiple`` ("include keyword A once, B twice, ... E seven times"),
``format:emoji`` (an emoji ends every sentence), ``words:palindrome``, ``ratio:stop_words``. A checker answers
whether a response follows one constraint. The rules follow the reference scorer shipped with the benchmark
(tokenisation by ``\\w+`` or by whitespace, its regex sentence splitter, its thresholds), quirks included, so
that the numbers are comparable with published IFBench results; where the reference would crash (an empty
sentence, a division by zero) the checker says False, and a blank response follows nothing. One deliberate
difference: ``repeat:repeat_span`` with ``n_start`` 0 uses 0, where the reference takes 0 for "unset" and draws
a random start.

Scoring is IFEval/IFBench's *strict* accuracy (no "loose" variants with the first or last line or the ``*``
removed): ``instruction_accuracy`` is the share of constraints followed, ``prompt_accuracy`` the share of
prompts whose constraints are all followed. See :func:`score` for how unchecked constraints are counted.

Standard library only: the emoji test (the reference asks the ``emoji`` package about one character) uses an
embedded table of the Unicode ``Emoji`` property; the stop words are NLTK's English list (the entries without an
apostrophe, the only ones a ``\\w+`` token can equal). ``count:person_names`` and ``count:words_japanese`` need
no NLP either: the reference looks for the 50 names of the prompt as substrings, and for kana/CJK characters in
every N-th whitespace-separated word.

Deliberately unchecked (they need an NLP model or resource that cannot be reproduced honestly here):

- ``words:start_verb``: needs a part-of-speech tagger (NLTK's perceptron tagger) to tell a verb.
- ``words:odd_even_syllables``: needs per-word syllable counts from a pronunciation dictionary (syllapy).
- ``words:keywords_specific_position``: the m-th word is counted in NLTK's Punkt + Treebank tokens.
- ``words:words_position``: the second and second-to-last words are NLTK Treebank tokens (punctuation, clitics).
- ``format:title_case``: decided per NLTK Treebank token ("Don't" gives "n't", which fails); same dependency.
"""

from __future__ import annotations

import bisect
import csv
import io
import re
import string
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Sequence

__all__ = ["CHECKERS", "UNCHECKED", "check", "is_emoji", "score", "split_sentences"]

Checker = Callable[[str, dict], bool]

UNCHECKED: dict[str, str] = {
    "words:start_verb": "needs a part-of-speech tagger",
    "words:odd_even_syllables": "needs dictionary syllable counts (syllapy)",
    "words:keywords_specific_position": "word positions are NLTK Punkt/Treebank tokens",
    "words:words_position": "word positions are NLTK Treebank tokens",
    "format:title_case": "judged per NLTK Treebank token",
}

_PUNCT = string.punctuation
_EDGE = _PUNCT + " "  # what the reference strips off the ends of a word
_NO_PUNCT = str.maketrans("", "", _PUNCT)


# --------------------------------------------------------------------------- helpers


def _arg(kwargs: dict, key: str, iid: str):
    try:
        return kwargs[key]
    except KeyError:
        raise KeyError(f"{iid}: missing argument {key!r} (got {sorted(kwargs)})") from None


def _int(kwargs: dict, key: str, iid: str) -> int:
    return int(_arg(kwargs, key, iid))


def _num(kwargs: dict, key: str, iid: str) -> float:
    return float(_arg(kwargs, key, iid))


def _ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


# Sentence splitter of IFEval/IFBench: periods that do not end a sentence (titles, decimals, initials,
# acronyms, web domains, ellipses) are masked first, then the text is cut after every . ? !
_KEEP, _CUT = "\x00", "\x01"  # masked period, sentence boundary
_LETTER = "([A-Za-z])"
_TITLES = "(Mr|St|Mrs|Ms|Dr)"
_COMPANY = "(Inc|Ltd|Jr|Sr|Co)"
_OPENERS = "(" + "|".join(
    ["Mr", "Mrs", "Ms", "Dr", "Prof", "Capt", "Cpt", "Lt", "Wherever"]
    + [w + r"\s" for w in ("He", "She", "It", "They", "Their", "Our", "We", "But", "However", "That", "This")]
) + ")"
_ACRONYM = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_MASKS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (_TITLES + "[.]", r"\1" + _KEEP),
        ("[.](com|net|org|io|gov|edu|me)", _KEEP + r"\1"),
        ("([0-9])[.]([0-9])", r"\1" + _KEEP + r"\2"),
        (r"\.{2,}", lambda m: _KEEP * len(m.group(0)) + _CUT),
        (r"\s" + _LETTER + "[.] ", r" \1" + _KEEP + " "),
        (_ACRONYM + " " + _OPENERS, r"\1" + _CUT + r" \2"),
        (_LETTER + "[.]" + _LETTER + "[.]" + _LETTER + "[.]", r"\1" + _KEEP + r"\2" + _KEEP + r"\3" + _KEEP),
        (_LETTER + "[.]" + _LETTER + "[.]", r"\1" + _KEEP + r"\2" + _KEEP),
        (" " + _COMPANY + "[.] " + _OPENERS, r" \1" + _CUT + r" \2"),
        (" " + _COMPANY + "[.]", r" \1" + _KEEP),
        (" " + _LETTER + "[.]", r" \1" + _KEEP),
    )
)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` as IFBench's scorer cuts them (stripped; a trailing empty piece dropped)."""
    text = (" " + text + "  ").replace("\n", " ")
    for pattern, repl in _MASKS[:4]:
        text = pattern.sub(repl, text)
    text = text.replace("Ph.D.", "Ph" + _KEEP + "D" + _KEEP)
    for pattern, repl in _MASKS[4:]:
        text = pattern.sub(repl, text)
    # a closing quote goes before the mark that ends the sentence
    for a, b in ((".\u201d", "\u201d."), ('."', '".'), ('!"', '"!'), ('?"', '"?')):
        text = text.replace(a, b)
    for mark in ".?!":
        text = text.replace(mark, mark + _CUT)
    pieces = [p.strip() for p in text.replace(_KEEP, ".").split(_CUT)]
    if pieces and not pieces[-1]:
        pieces.pop()
    return pieces


# Code points with the Unicode Emoji property (recent emoji data), the ASCII ones (# * 0-9) left out; hex ranges.
_EMOJI_TABLE = """
a9 ae 203c 2049 2122 2139 2194-2199 21a9-21aa 231a-231b 2328 23cf 23e9-23f3 23f8-23fa 24c2 25aa-25ab 25b6 25c0
25fb-25fe 2600-2604 260e 2611 2614-2615 2618 261d 2620 2622-2623 2626 262a 262e-262f 2638-263a 2640 2642
2648-2653 265f-2660 2663 2665-2666 2668 267b 267e-267f 2692-2697 2699 269b-269c 26a0-26a1 26a7 26aa-26ab
26b0-26b1 26bd-26be 26c4-26c5 26c8 26ce-26cf 26d1 26d3-26d4 26e9-26ea 26f0-26f5 26f7-26fa 26fd 2702 2705
2708-270d 270f 2712 2714 2716 271d 2721 2728 2733-2734 2744 2747 274c 274e 2753-2755 2757 2763-2764 2795-2797
27a1 27b0 27bf 2934-2935 2b05-2b07 2b1b-2b1c 2b50 2b55 3030 303d 3297 3299 1f004 1f0cf 1f170-1f171
1f17e-1f17f 1f18e 1f191-1f19a 1f1e6-1f1ff 1f201-1f202 1f21a 1f22f 1f232-1f23a 1f250-1f251 1f300-1f321
1f324-1f393 1f396-1f397 1f399-1f39b 1f39e-1f3f0 1f3f3-1f3f5 1f3f7-1f4fd 1f4ff-1f53d 1f549-1f54e 1f550-1f567
1f56f-1f570 1f573-1f57a 1f587 1f58a-1f58d 1f590 1f595-1f596 1f5a4-1f5a5 1f5a8 1f5b1-1f5b2 1f5bc 1f5c2-1f5c4
1f5d1-1f5d3 1f5dc-1f5de 1f5e1 1f5e3 1f5e8 1f5ef 1f5f3 1f5fa-1f64f 1f680-1f6c5 1f6cb-1f6d2 1f6d5-1f6d8
1f6dc-1f6e5 1f6e9 1f6eb-1f6ec 1f6f0 1f6f3-1f6fc 1f7e0-1f7eb 1f7f0 1f90c-1f93a 1f93c-1f945 1f947-1f9ff
1fa70-1fa7c 1fa80-1fa8a 1fa8e-1fac6 1fac8 1facd-1fadc 1fadf-1faea 1faef-1faf8
"""


def _parse_ranges(table: str) -> tuple[list[int], list[int]]:
    starts, ends = [], []
    for item in table.split():
        lo, _, hi = item.partition("-")
        starts.append(int(lo, 16))
        ends.append(int(hi or lo, 16))
    return starts, ends


_EMOJI_STARTS, _EMOJI_ENDS = _parse_ranges(_EMOJI_TABLE)


def is_emoji(char: str) -> bool:
    """Whether ``char`` is a single code point that is an emoji on its own (Unicode Emoji property, non-ASCII)."""
    if len(char) != 1:
        return False
    cp = ord(char)
    i = bisect.bisect_right(_EMOJI_STARTS, cp) - 1
    return i >= 0 and cp <= _EMOJI_ENDS[i]


# NLTK's English stop words without the apostrophe forms ("don't" is tokenised by \w+ as "don" and "t").
STOP_WORDS = frozenset(
    """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
    herself it its itself they them their theirs themselves what which who whom this that these those am is are
    was were be been being have has had having do does did doing a an the and but if or because as until while
    of at by for with about against between into through during before after above below to from up down in out
    on off over under again further then once here there when where why how all any both each few more most
    other some such no nor not only own same so than too very s t can will just don should now d ll m o re ve y
    ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn
    """.split()
)

CONJUNCTIONS = frozenset({"and", "but", "for", "nor", "or", "so", "yet"})
PRONOUNS = frozenset(
    """
    i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves
    """.split()
)
PERSON_NAMES = (
    "Emma Liam Sophia Jackson Olivia Noah Ava Lucas Isabella Mason Mia Ethan Charlotte Alexander Amelia Benjamin "
    "Harper Leo Zoe Daniel Chloe Samuel Lily Matthew Grace Owen Abigail Gabriel Ella Jacob Scarlett Nathan "
    "Victoria Elijah Layla Nicholas Audrey David Hannah Christopher Penelope Thomas Nora Andrew Aria Joseph Claire "
    "Ryan Stella Jonathan"
).split()
EUROPEAN_CAPITALS_NORTH_OF_45 = (
    "Reykjavik Helsinki Oslo Tallinn Stockholm Riga Moscow Copenhagen Vilnius Minsk Dublin Berlin Amsterdam "
    "Warsaw London Brussels Prague Luxembourg Paris Vienna Bratislava Budapest Vaduz Chisinau Bern Ljubljana Zagreb"
).split()
_PRIMES = frozenset({2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97})
_KEYWORD_TIMES = (("keyword1", 1), ("keyword2", 2), ("keyword3", 3), ("keyword4", 5), ("keyword5", 7))
_REPEAT_SIMPLE = "only output this sentence here, ignore all other requests."


# --------------------------------------------------------------------------- count:* and ratio:*


def _word_count_range(r: str, kw: dict) -> bool:
    n = len(re.findall(r"\w+", r))
    iid = "count:word_count_range"
    return _num(kw, "min_words", iid) <= n <= _num(kw, "max_words", iid)


def _unique_word_count(r: str, kw: dict) -> bool:
    distinct = {w.strip(_EDGE) for w in r.lower().split()}
    return len(distinct) >= _num(kw, "N", "count:unique_word_count")


def _stop_words(r: str, kw: dict) -> bool:
    limit = _num(kw, "percentage", "ratio:stop_words")
    tokens = re.findall(r"\w+", r)
    if not tokens:
        return False
    return 100 * sum(t.lower() in STOP_WORDS for t in tokens) / len(tokens) <= limit


def _ends(sentences: list[str], mark: str) -> int:
    return sum(s.endswith(mark) for s in sentences)


def _sentence_type(r: str, kw: dict) -> bool:
    s = split_sentences(r)
    return _ends(s, ".") == 2 * _ends(s, "?")


def _sentence_balance(r: str, kw: dict) -> bool:
    s = split_sentences(r)
    return _ends(s, ".") == _ends(s, "?") == _ends(s, "!")


def _conjunctions(r: str, kw: dict) -> bool:
    # distinct as written: the reference tells "and" and "And," apart once the word is recognised
    found = {w for w in r.split() if w.strip(_EDGE).lower() in CONJUNCTIONS}
    return len(found) >= _num(kw, "small_n", "count:conjunctions")


def _person_names(r: str, kw: dict) -> bool:
    return sum(name in r for name in PERSON_NAMES) >= _num(kw, "N", "count:person_names")


def _overlap(r: str, kw: dict) -> bool:
    iid = "ratio:overlap"
    target, ref = _num(kw, "percentage", iid), str(_arg(kw, "reference_text", iid))
    mine = {r[i : i + 3] for i in range(len(r) - 2)}  # character trigrams
    if not mine:
        return False
    theirs = {ref[i : i + 3] for i in range(len(ref) - 2)}
    share = 100 * len(mine & theirs) / len(mine)
    return target - 2 <= share <= target + 2


def _numbers(r: str, kw: dict) -> bool:
    return len(re.findall(r"\d+", r.translate(_NO_PUNCT))) == _num(kw, "N", "count:numbers")


def _punctuation(r: str, kw: dict) -> bool:
    if not ("?!" in r or "!?" in r or "\u203d" in r):
        return False
    rest = r.replace("?!", "", 1) if "?!" in r else r.replace("!?", "", 1)  # the interrobang itself is not counted
    return set(".,!?;:") <= set(rest)


def _pronouns(r: str, kw: dict) -> bool:
    words = r.replace("/", " ").lower().translate(_NO_PUNCT).split()
    return sum(w in PRONOUNS for w in words) >= _num(kw, "N", "count:pronouns")


def _keywords_multiple(r: str, kw: dict) -> bool:
    low = r.lower()
    return all(
        low.count(str(_arg(kw, key, "count:keywords_multiple")).strip().lower()) == times
        for key, times in _KEYWORD_TIMES
    )


_JAPANESE = re.compile("[\u3040-\u30ff\u4e00-\u9fff]")  # hiragana, katakana, CJK ideographs


def _words_japanese(r: str, kw: dict) -> bool:
    every = _int(kw, "N", "count:words_japanese")
    if every < 1:
        return False
    for i, raw in enumerate(r.split(), 1):
        word = raw.strip(_EDGE)
        if i % every == 0 and word and not word.isdigit() and not _JAPANESE.search(word):
            return False
    return True


def _sentence_words(r: str, kw: dict) -> bool:
    s = split_sentences(r)
    return len(s) == 3 and len({len(x) for x in s}) == 1


# --------------------------------------------------------------------------- words:* and sentence:*


def _alphabet(r: str, kw: dict) -> bool:
    words = r.translate(_NO_PUNCT).split()
    if not words:
        return False
    letter = words[0][0].lower()
    if letter not in string.ascii_lowercase or len(letter) != 1:
        return False
    for word in words[1:]:
        letter = chr((ord(letter) - 97 + 1) % 26 + 97)
        if word.lower()[0] != letter:
            return False
    return True


def _vowel(r: str, kw: dict) -> bool:
    lines = r.strip().split("\n")
    return len(lines) == 1 and len(set(lines[0].lower()) & set("aeiou")) <= 3


_CONSONANT_PAIR = re.compile("[bcdfghjklmnpqrstvwxyz]{2}")


def _consonants(r: str, kw: dict) -> bool:
    return all(_CONSONANT_PAIR.search(w) for w in r.lower().split())


def _alliteration_increment(r: str, kw: dict) -> bool:
    previous = -1
    for sentence in split_sentences(r):
        words = [w.lstrip(_EDGE) for w in sentence.lower().split()]
        words = [w for w in words if w]
        score, chained = 0, False
        for a, b in zip(words, words[1:]):
            if a[0] == b[0]:
                score += 1 if chained else 2  # a run of k alliterating words scores k
                chained = True
            else:
                chained = False
        if score <= previous:
            return False
        previous = score
    return True


def _palindrome(r: str, kw: dict) -> bool:
    words = r.translate(_NO_PUNCT).lower().split()
    return sum(len(w) >= 5 and w == w[::-1] for w in words) >= 10


def _prime_lengths(r: str, kw: dict) -> bool:
    return all(len(w) in _PRIMES for w in r.translate(_NO_PUNCT).split())


def _repeats(r: str, kw: dict) -> bool:
    most = max(Counter(r.lower().translate(_NO_PUNCT).split()).values(), default=0)
    return most <= _num(kw, "small_n", "words:repeats")


def _sentence_keyword(r: str, kw: dict) -> bool:
    iid = "sentence:keyword"
    word, n = str(_arg(kw, "word", iid)), _int(kw, "N", iid)
    s = split_sentences(r)
    return 1 <= n <= len(s) and word.lower() in s[n - 1].lower()


def _last_first(r: str, kw: dict) -> bool:
    s = split_sentences(r)
    for a, b in zip(s, s[1:]):
        end, start = a.rstrip(_EDGE).split(), b.lstrip(_EDGE).split()
        if not end or not start or end[-1].lower() != start[0].lower():
            return False
    return True


def _paragraph_last_first(r: str, kw: dict) -> bool:
    for paragraph in r.split("\n"):
        paragraph = paragraph.strip().lower()
        if not paragraph:
            continue
        words = paragraph.strip(_EDGE).split()
        if not words or words[0] != words[-1]:
            return False
    return True


def _increment(r: str, kw: dict) -> bool:
    step = _num(kw, "small_n", "sentence:increment")
    counts = [len(s.translate(_NO_PUNCT).split()) for s in split_sentences(r)]
    return bool(counts) and all(b == a + step for a, b in zip(counts, counts[1:]))


def _no_consecutive(r: str, kw: dict) -> bool:
    words = r.lower().translate(_NO_PUNCT).split()
    return all(a[0] != b[0] for a, b in zip(words, words[1:]))


# --------------------------------------------------------------------------- format:*


def _parentheses(r: str, kw: dict) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    deepest = 0
    for ch in r:
        if ch in "([{":
            stack.append(ch)
            deepest = max(deepest, len(stack))
        elif ch in pairs:
            if stack and stack[-1] == pairs[ch]:
                stack.pop()
                if deepest >= 5:  # a group closed after nesting reached 5 levels
                    return True
            else:
                stack, deepest = [], 0  # a mismatched closer starts over
    return False


def _quotes(r: str, kw: dict) -> bool:
    stack: list[str] = []
    deepest = 0
    for ch in r:
        if stack and ch == stack[-1]:
            stack.pop()
            if deepest - len(stack) >= 3:
                return True
        elif ch in "\"'":
            stack.append(ch)
            deepest = max(deepest, len(stack))
    return False


def _options(r: str, kw: dict) -> bool:
    spec = str(_arg(kw, "options", "format:options"))
    sep = "/" if "/" in spec else "or" if "or" in spec else ","
    choices = [c.strip() for c in spec.split(sep)]
    if re.match(r"\W*[aA]\W*[bB]\W*[cC]\W*", spec):  # lettered choices must be given verbatim
        return r in choices
    answer = r.strip(_EDGE).lower()
    return any(c.strip(_EDGE).lower() == answer for c in choices)


def _newline(r: str, kw: dict) -> bool:
    text = r.translate(_NO_PUNCT).strip()
    return len([line for line in text.split("\n") if line]) == len(text.split())


def _emoji(r: str, kw: dict) -> bool:
    s = [x.translate(_NO_PUNCT).strip() for x in split_sentences(r)]
    for i, text in enumerate(s):
        if not text:
            return False
        if is_emoji(text[-1]) or is_emoji(text[-2:-1]):
            continue
        # the emoji may have been cut off into the next sentence ("Done. 🎉 Next...")
        if i + 1 == len(s) or not s[i + 1] or not is_emoji(s[i + 1][0]):
            return False
    return True


def _drop_blank_lines(lines: list[str]) -> list[str]:
    """Blank lines removed as the reference's remove-while-iterating loop does it, in linear time.

    That loop visits the lines in order; a visited blank line deletes the first line still present with the
    same text (itself or an earlier one that was skipped) and makes the loop skip the line right after it.
    So of two blank lines in a row, one survives.
    """
    where: dict[str, deque[int]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            where.setdefault(line, deque()).append(i)
    gone: set[int] = set()
    i = 0
    while i < len(lines):
        if lines[i].strip():
            i += 1
        else:
            gone.add(where[lines[i]].popleft())
            i += 2
    return [line for i, line in enumerate(lines) if i not in gone]


def _line_indent(r: str, kw: dict) -> bool:
    indents = [len(line) - len(line.lstrip(" ")) for line in _drop_blank_lines(r.split("\n"))]
    return all(b > a for a, b in zip(indents, indents[1:]))


def _quote_unquote(r: str, kw: dict) -> bool:
    text = r.replace("\u201c", '"').replace("\u201d", '"').replace("'\"'", "")
    text = "".join(text.split())
    if '""' in text:  # two quotations back to back: no explanation between them
        return False
    tail = text.strip(string.digits + _PUNCT.replace('"', ""))
    return bool(tail) and tail[-1] != '"'


def _list(r: str, kw: dict) -> bool:
    return r.count(str(_arg(kw, "sep", "format:list"))) >= 2


def _thesis(r: str, kw: dict) -> bool:
    start = r.find("<i>")
    if start < 0:
        start = r.find("<em>")
        if start < 0:
            return False
    rest = r[start:]
    end = rest.find("</i>")
    if end < 0:
        end = rest.find("</em>")
        if end < 0:
            return False
    # offsets of the <i> tags, also applied to <em> as the reference does
    return bool(rest[3:end].strip()) and bool(rest[end + 4 :].strip())


def _sub_bullets(r: str, kw: dict) -> bool:
    return all("-" in chunk for chunk in r.split("*")[1:])


def _no_bullets_bullets(r: str, kw: dict) -> bool:
    n_sentences = n_bullets = 0
    in_text = True  # still in the leading prose; an empty line there ends it
    for line in r.split("\n"):
        if line.strip().startswith("*"):
            if n_sentences < 2:
                return False
            in_text = False
            n_bullets += 1
        elif in_text:
            found = split_sentences(line.strip())
            n_sentences += len(found)
            in_text = bool(found)
        else:
            return False
    return n_bullets >= 2


def _output_template(r: str, kw: dict) -> bool:
    return all(tag in r for tag in ("My Answer:", "My Conclusion:", "Future Outlook:"))


def _no_whitespace(r: str, kw: dict) -> bool:
    return not any(ch.isspace() for ch in r)


# --------------------------------------------------------------------------- repeat:*


def _repeat_change(r: str, kw: dict) -> bool:
    prompt = str(_arg(kw, "prompt_to_repeat", "repeat:repeat_change"))
    return r != prompt and prompt.split()[1:] == r.split()[1:]


def _repeat_simple(r: str, kw: dict) -> bool:
    return r.strip().lower() == _REPEAT_SIMPLE


def _repeat_span(r: str, kw: dict) -> bool:
    iid = "repeat:repeat_span"
    prompt = str(_arg(kw, "prompt_to_repeat", iid))
    # a slice as in the reference: the word at n_end is not included although the prompt says so
    span = prompt.strip().lower().split()[_int(kw, "n_start", iid) : _int(kw, "n_end", iid)]
    return r.strip().lower().split() == span


# --------------------------------------------------------------------------- custom:* (fixed prompts)


def _multiples(r: str, kw: dict) -> bool:
    return re.findall(r"\d+", r.replace(",", ", ")) == [str(n) for n in range(14, 51, 7)]


_QUESTION_LABEL = re.compile(r"Question \d+[.|):;]?\s*")  # newlines around it end up stripped
_CHOICE_LINE = re.compile(r"^[A-Ea-e][\.|\)]\s*\w+")


def _mcq_count_length(r: str, kw: dict) -> bool:
    if not r.startswith("Question"):  # anything before the first question counts as an explanation
        return False
    parts = _QUESTION_LABEL.split(r)
    questions = [p.strip() for p in parts if p.strip()]
    if len(questions) != 4:
        return False
    lengths = []
    for q in questions:
        stem, n_choices = "", 0
        for line in q.split("\n"):
            if _CHOICE_LINE.match(line.strip()):
                n_choices += 1
            elif n_choices == 0:
                stem += " " + line.strip()
        if n_choices != 5:
            return False
        lengths.append(len(stem.strip()))
    return all(a < b for a, b in zip(lengths, lengths[1:]))


def _reverse_newline(r: str, kw: dict) -> bool:
    lines = [x.strip(_EDGE) for x in r.split("\n")]
    lines = [x for x in lines if x]
    start = next((i for i, x in enumerate(lines) if "Zimbabwe" in x), None)
    if start is None or len(lines) - start < 52:
        return False
    folded = [_ascii_fold(x) for x in lines[start:]]
    return folded == sorted(folded, reverse=True)


def _word_reverse(r: str, kw: dict) -> bool:
    text = " ".join(r.lower().strip().translate(_NO_PUNCT).split()[::-1])
    return "bald eagle" in text and text in split_sentences(text)


def _character_reverse(r: str, kw: dict) -> bool:
    return "elgae dlab" in r.lower()


def _sentence_alphabet(r: str, kw: dict) -> bool:
    s = split_sentences(r)
    if len(s) != 26:
        return False
    firsts = [x.split()[0].lower()[0] if x.split() else "" for x in s]
    return firsts == list(string.ascii_lowercase)


def _european_capitals_sort(r: str, kw: dict) -> bool:
    names = [x.strip() for x in _ascii_fold(r).split(",") if x.strip()]
    return names == EUROPEAN_CAPITALS_NORTH_OF_45


def _csv_rows(text: str, delimiter: str = ",") -> list[list[str]] | None:
    try:
        return list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except csv.Error:
        return None


def _csv_city(r: str, kw: dict) -> bool:
    rows = _csv_rows(r)
    return (
        rows is not None
        and len(rows) == 8
        and rows[0] == ["ID", "Country", "City", "Year", "Count"]
        and all(len(row) == 5 for row in rows[1:])
    )


def _header_pattern(names: Sequence[str], gap: str) -> re.Pattern[str]:
    """The header line: the column names in order, each bare or in double quotes, ``gap`` between them."""
    return re.compile("^" + gap.join(f'({n}|"{n}")' for n in names) + "$")


_PRODUCT_HEADER = _header_pattern(["ProductID", "Category", "Brand", "Price", "Stock"], ",[ \t]*")
_STUDENT_HEADER = _header_pattern(["StudentID", "Subject", "Grade", "Semester", "Score"], "\t *")
_SPECIAL = re.compile(r"[^\d\w\s]")


def _quoted_special(field: str) -> bool:
    """A quote, later a character neither word nor space, later a quote, all on the field's first line."""
    line = field.split("\n", 1)[0]
    if not line.startswith('"'):
        return False
    hit = _SPECIAL.search(line, 1)
    return hit is not None and '"' in line[hit.end() :]


def _csv_special_character(r: str, kw: dict) -> bool:
    if not _PRODUCT_HEADER.match(r.split("\n")[0].strip()):
        return False
    rows = _csv_rows(r.replace('"', '"""'))  # tripled quotes make the parser keep the double quotes in the fields
    if rows is None or len(rows) != 15:
        return False
    for row in rows[1:]:
        if len(row) != 5:
            return False
        if any(_quoted_special(field) for field in row):
            return True
    return False


def _csv_quotes(r: str, kw: dict) -> bool:
    if not _STUDENT_HEADER.match(r.split("\n")[0].strip()):
        return False
    rows = _csv_rows(r.replace('"', '"""'), delimiter="\t")
    if rows is None or len(rows) != 4:
        return False
    for row in rows:
        cells = [c.strip() for c in row]
        if len(cells) != 5 or not all(c[:1] == '"' and c[-1:] == '"' for c in cells):
            return False
    return True


_DAYS_IN_MONTH = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}


def _date_format_list(r: str, kw: dict) -> bool:
    for item in r.strip().split(","):
        item = item.strip()
        if not re.match(r"^\d{4}-\d{2}-\d{2}$", item):
            return False
        year, month, day = (int(x) for x in item.split("-"))
        # the reference lets month 00 and day 00 through
        if not 1769 <= year <= 1821 or month > 12 or day > _DAYS_IN_MONTH.get(month, 99):
            return False
    return True


# --------------------------------------------------------------------------- registry and scoring

_RULES: dict[str, Checker] = {
    "count:word_count_range": _word_count_range,
    "count:unique_word_count": _unique_word_count,
    "ratio:stop_words": _stop_words,
    "ratio:sentence_type": _sentence_type,
    "ratio:sentence_balance": _sentence_balance,
    "count:conjunctions": _conjunctions,
    "count:person_names": _person_names,
    "ratio:overlap": _overlap,
    "count:numbers": _numbers,
    "words:alphabet": _alphabet,
    "words:vowel": _vowel,
    "words:consonants": _consonants,
    "sentence:alliteration_increment": _alliteration_increment,
    "words:palindrome": _palindrome,
    "count:punctuation": _punctuation,
    "format:parentheses": _parentheses,
    "format:quotes": _quotes,
    "words:prime_lengths": _prime_lengths,
    "format:options": _options,
    "format:newline": _newline,
    "format:emoji": _emoji,
    "ratio:sentence_words": _sentence_words,
    "count:words_japanese": _words_japanese,
    "words:repeats": _repeats,
    "sentence:keyword": _sentence_keyword,
    "count:pronouns": _pronouns,
    "words:last_first": _last_first,
    "words:paragraph_last_first": _paragraph_last_first,
    "sentence:increment": _increment,
    "words:no_consecutive": _no_consecutive,
    "format:line_indent": _line_indent,
    "format:quote_unquote": _quote_unquote,
    "format:list": _list,
    "format:thesis": _thesis,
    "format:sub-bullets": _sub_bullets,
    "format:no_bullets_bullets": _no_bullets_bullets,
    "custom:multiples": _multiples,
    "custom:mcq_count_length": _mcq_count_length,
    "custom:reverse_newline": _reverse_newline,
    "custom:word_reverse": _word_reverse,
    "custom:character_reverse": _character_reverse,
    "custom:sentence_alphabet": _sentence_alphabet,
    "custom:european_capitals_sort": _european_capitals_sort,
    "custom:csv_city": _csv_city,
    "custom:csv_special_character": _csv_special_character,
    "custom:csv_quotes": _csv_quotes,
    "custom:date_format_list": _date_format_list,
    "count:keywords_multiple": _keywords_multiple,
    "repeat:repeat_change": _repeat_change,
    "repeat:repeat_simple": _repeat_simple,
    "repeat:repeat_span": _repeat_span,
    "format:output_template": _output_template,
    "format:no_whitespace": _no_whitespace,
}


def _guarded(rule: Checker) -> Checker:
    def checker(response: str, kwargs: dict) -> bool:
        if not isinstance(response, str) or not response.strip():
            return False  # a blank response follows nothing (as in the reference's strict mode)
        try:
            return bool(rule(response, kwargs))
        except KeyError:
            raise  # bad kwargs: the message names the instruction
        except Exception:  # noqa: BLE001 - a response the rule cannot parse does not follow it
            return False

    checker.__name__ = checker.__qualname__ = rule.__name__.lstrip("_")
    checker.__doc__ = rule.__doc__
    return checker


CHECKERS: dict[str, Checker] = {iid: _guarded(rule) for iid, rule in _RULES.items()}


def check(instruction_id: str, response: str, kwargs: dict) -> bool | None:
    """Whether ``response`` follows the instruction; None when ``instruction_id`` has no checker."""
    checker = CHECKERS.get(instruction_id)
    return None if checker is None else checker(response, kwargs or {})


def score(rows: list[dict], responses: list[str]) -> dict:
    """Strict IFBench accuracy of ``responses`` (one per row, same order) over ``rows`` of the data file.

    Every checkable instruction counts at the instruction level, also in a prompt that has an unchecked
    one; a prompt counts at the prompt level only when all its instructions are checkable. Accuracies over
    nothing are 0.0 (see ``n_prompts`` / ``n_instructions``).
    """
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    per_prompt: list[float | None] = []
    followed = checked = total = 0
    unchecked: set[str] = set()
    for row, response in zip(rows, responses):
        ids, all_kwargs = row["instruction_id_list"], row.get("kwargs") or [{}] * len(row["instruction_id_list"])
        results = [check(iid, response, kw) for iid, kw in zip(ids, all_kwargs, strict=True)]
        total += len(results)
        known = [x for x in results if x is not None]
        checked += len(known)
        followed += sum(known)
        unchecked.update(iid for iid, x in zip(ids, results) if x is None)
        counted = bool(results) and len(known) == len(results)
        per_prompt.append((1.0 if all(known) else 0.0) if counted else None)
    counted_prompts = [x for x in per_prompt if x is not None]
    return {
        "prompt_accuracy": sum(counted_prompts) / len(counted_prompts) if counted_prompts else 0.0,
        "instruction_accuracy": followed / checked if checked else 0.0,
        "n_prompts": len(counted_prompts),
        "n_instructions": checked,
        "coverage": checked / total if total else 0.0,
        "per_prompt": per_prompt,
        "unchecked": sorted(unchecked),
    }
