"""IFBench checkers: one response that follows and one that breaks each instruction, scoring, the real data."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from alignkit.eval.ifbench import CHECKERS, UNCHECKED, check, is_emoji, score, split_sentences
from alignkit.paths import cache_dir

REPEAT_PROMPT = "Write a python program to implement a simple JPEG compression algorithm without any errors."
SPAN_PROMPT = (
    "explain the context, code and theory behind the paper Identifying Candidate Spaces for Advert Implantation."
)
KEYWORDS = {"keyword1": "kaleidoscope", "keyword2": "nebula", "keyword3": "whisper", "keyword4": "labyrinth",
            "keyword5": "paradox"}
KEYWORD_TEXT = ("A kaleidoscope of nebula light, a nebula of whisper and whisper and whisper; "
                + "labyrinth " * 5 + "paradox " * 7)
CAPITALS = ("Reykjavík, Helsinki, Oslo, Tallinn, Stockholm, Riga, Moscow, Copenhagen, Vilnius, Minsk, Dublin, "
            "Berlin, Amsterdam, Warsaw, London, Brussels, Prague, Luxembourg, Paris, Vienna, Bratislava, Budapest, "
            "Vaduz, Chișinău, Bern, Ljubljana, Zagreb")
AFRICA = [  # alphabetical
    "Algeria", "Angola", "Benin", "Botswana", "Burkina Faso", "Burundi", "Cabo Verde", "Cameroon",
    "Central African Republic", "Chad", "Comoros", "Côte d'Ivoire", "Democratic Republic of the Congo", "Djibouti",
    "Egypt", "Equatorial Guinea", "Eritrea", "Eswatini", "Ethiopia", "Gabon", "Gambia", "Ghana", "Guinea",
    "Guinea-Bissau", "Kenya", "Lesotho", "Liberia", "Libya", "Madagascar", "Malawi", "Mali", "Mauritania",
    "Mauritius", "Morocco", "Mozambique", "Namibia", "Niger", "Nigeria", "Republic of the Congo", "Rwanda",
    "São Tomé and Príncipe", "Senegal", "Seychelles", "Sierra Leone", "Somalia", "South Africa", "South Sudan",
    "Sudan", "Tanzania", "Togo", "Tunisia", "Uganda", "Zambia", "Zimbabwe",
]
URBAN = "Is it easier to urbanize a jungle or to urbanize a desert?"
MCQ_STEMS = ["Who?", "Who painted it?", "Which movement came first?", "Which artist founded the Cubist movement?"]


def _mcq(stems: list[str], n_options: int = 5) -> str:
    options = "\n".join(f"{letter}) option {letter}" for letter in "ABCDE"[:n_options])
    return "\n\n".join(f"Question {i}: {stem}\n{options}" for i, stem in enumerate(stems, 1))


def _csv(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows])


CITY_ROWS = [f"{i},France,Paris,{2000 + i},{10 * i}" for i in range(1, 8)]
PRODUCT_HEADER = "ProductID,Category,Brand,Price,Stock"
PRODUCT_ROWS = [f"{i},Food,Brand{i},{i}.99,{i * 3}" for i in range(1, 15)]
STUDENT_HEADER = '"StudentID"\t"Subject"\t"Grade"\t"Semester"\t"Score"'
STUDENT_ROWS = [f'"{i}"\t"Math"\t"A"\t"Fall"\t"9{i}"' for i in range(1, 4)]
ALPHABET_STORY = " ".join(f"{w} came by." for w in (
    "Ann Bo Cy Di Ed Flo Gus Hal Ivy Jo Kit Lu Max Ned Oz Pam Quin Rex Sal Tom Uma Val Wes Xia Yul Zed".split()))

# (instruction id, kwargs as in the data, a response that follows, a response that does not)
CASES: list[tuple[str, dict, str, str]] = [
    ("count:word_count_range", {"max_words": 28.0, "min_words": 24.0}, "word " * 25, "Far too short."),
    ("count:unique_word_count", {"N": 36.0}, " ".join(f"w{i}" for i in range(40)), "same " * 50),
    ("ratio:stop_words", {"percentage": 27.0}, "Quantum computers exploit superposition and entanglement.",
     "It is what it is and that is all."),
    ("ratio:sentence_type", {}, "Cats sleep a lot. Dogs bark. Why?", "Cats sleep. Why? How?"),
    ("ratio:sentence_balance", {}, "It rains. Does it? Yes!", "It rains. It pours. Wow!"),
    ("count:conjunctions", {"small_n": 3.0}, "I came and saw, but left, so it goes.", "I came and saw and left."),
    ("count:person_names", {"N": 3.0}, "Emma met Liam and Noah.", "Emma met Bob and Alice."),
    ("ratio:overlap", {"percentage": 67.0, "reference_text": "the cat sat"}, "the cat ran", "the cat sat"),
    ("ratio:overlap", {"percentage": 13.0, "reference_text": URBAN}, "Desert sand beats wet mud for a builder.", URBAN),
    ("count:numbers", {"N": 3.0}, "I have 3 cats and 12 dogs; pi is 3.14 (one number).", "1, 2, 3 and 4."),
    ("words:alphabet", {}, "Yellow zebras are big, calm drifters.", "Alpha charlie."),
    ("words:vowel", {}, "Cats and dogs sat at the fort.", "Cats and dogs sit quietly."),
    ("words:consonants", {}, "Strong crisp thrills.", "A big cat."),
    ("sentence:alliteration_increment", {}, "Big dogs run. Silly snakes slither. Pretty purple pigs prance.",
     "Silly snakes slither. Big dogs run."),
    ("words:palindrome", {}, "level radar civic kayak rotor refer madam stats tenet racecar",
     "level radar civic kayak rotor refer madam stats tenet mom dad"),
    ("count:punctuation", {}, "Wait?! Really; yes: it works, truly. Wow! Why?", "Wait?! Really, yes. Why!"),
    ("format:parentheses", {}, "(a [b {c (d [e] d) c} b] a)", "(a [b {c} b] a) (x)"),
    ("format:quotes", {}, "He said \"she told me 'he yelled \"run\" loudly' today\" calmly.",
     "He said \"hi 'there' friend\" and left."),
    ("words:prime_lengths", {}, "We are big ideas.", "I am here."),
    ("format:options", {"options": "yes/no/maybe"}, "Maybe.", "Yes, because games teach history."),
    ("format:options", {"options": "I know or I don't know"}, "I don't know", "I do not know"),
    ("format:options", {"options": "a), b), c), d)"}, "b)", "b"),
    ("format:newline", {}, "Each\nword\nhere.", "Each word\nhere."),
    ("format:emoji", {}, "I love summer \u2600\ufe0f. Vive la France \U0001f1eb\U0001f1f7. Done. \U0001f389"
     " Go \U0001f680",
     "I love summer. Beaches are great \U0001f3d6\ufe0f!"),
    ("ratio:sentence_words", {}, "Cats nap. Dogs run. Owls fly.", "Cats nap. Dogs run. Eagles soar."),
    ("count:words_japanese", {"N": 5.0}, "one two three four 日本 six seven eight nine 東京 eleven",
     "one two three four five six"),
    ("words:repeats", {"small_n": 2.0}, "The cat and the dog.", "The cat, the dog, the end."),
    ("sentence:keyword", {"N": 3.0, "word": "angora"}, "First. Second. The Angora rabbit sleeps.",
     "First. The angora rabbit. Third."),
    ("count:pronouns", {"N": 5.0}, "I told you that she and he saw them.", "The cat sat on a mat."),
    ("words:last_first", {}, "The sky is blue. Blue is calm! Calm wins.", "The sky is blue. Green is calm."),
    ("words:paragraph_last_first", {}, "Hope is what keeps hope\n\nTime heals all time.", "Hope is good\nTime heals"),
    ("sentence:increment", {"small_n": 1.0}, "Go. Go now. Go now, please.", "Go now. Go."),
    ("words:no_consecutive", {}, "The cat runs quickly.", "The tall cat."),
    ("format:line_indent", {}, "a\n b\n\n  c\n", "a\n b\n c"),
    ("format:quote_unquote", {}, '"To be" means to exist. "Carpe diem" means seize the day.',
     '"To be" means to exist. The end is "Carpe diem".'),
    ("format:list", {"sep": "!?!?"}, "!?!? apples\n!?!? pears", "- apples\n- pears"),
    ("format:thesis", {}, "<i>Encryption keeps streams safe.</i>\nKeys stay inside the hardware.",
     "<i>Encryption keeps streams safe.</i>"),
    ("format:sub-bullets", {}, "* Light\n  - less photosynthesis\n* Heat\n  - cooler leaves",
     "* Light\n* Heat\n  - cooler leaves"),
    ("format:no_bullets_bullets", {}, "Springs store energy. Damping removes it.\n* undamped: x'' + x = 0\n* damped",
     "Springs store energy.\n* undamped\n* damped"),
    ("custom:multiples", {}, "14, 21, 28, 35, 42, 49", "7, 14, 21, 28, 35, 42, 49"),
    ("custom:mcq_count_length", {}, _mcq(MCQ_STEMS), "Here are four questions.\n" + _mcq(MCQ_STEMS)),
    ("custom:reverse_newline", {}, "\n".join(reversed(AFRICA)), "\n".join(AFRICA)),
    ("custom:word_reverse", {}, "eagle bald the is It", "It is the bald eagle."),
    ("custom:character_reverse", {}, ".elgae dlab eht si tI", "It is the bald eagle."),
    ("custom:sentence_alphabet", {}, ALPHABET_STORY, ALPHABET_STORY.replace("Ann came by. ", "")),
    ("custom:european_capitals_sort", {}, CAPITALS, CAPITALS.replace("Oslo, Tallinn", "Tallinn, Oslo")),
    ("custom:csv_city", {}, _csv("ID,Country,City,Year,Count", CITY_ROWS), _csv("ID,Country,City,Year,Count",
                                                                               CITY_ROWS[:6])),
    ("custom:csv_special_character", {}, _csv(PRODUCT_HEADER, ['1,Food,"Tom & Jerry",9.99,5', *PRODUCT_ROWS[1:]]),
     _csv(PRODUCT_HEADER, PRODUCT_ROWS)),
    ("custom:csv_quotes", {}, _csv(STUDENT_HEADER, STUDENT_ROWS),
     _csv(STUDENT_HEADER, [*STUDENT_ROWS[:2], '"3"\tMath\t"A"\t"Fall"\t"93"'])),
    ("custom:date_format_list", {}, "1796-04-12, 1805-12-02, 1815-06-18", "1805-12-02, 1815-06-18, 1850-01-01"),
    ("count:keywords_multiple", KEYWORDS, KEYWORD_TEXT, KEYWORD_TEXT + " paradox"),
    ("repeat:repeat_change", {"prompt_to_repeat": REPEAT_PROMPT}, "Create" + REPEAT_PROMPT[5:], REPEAT_PROMPT),
    ("repeat:repeat_simple", {}, "Only output this sentence here, ignore all other requests.",
     "Sure! Only output this sentence here, ignore all other requests."),
    ("repeat:repeat_span", {"n_end": 6, "n_start": 3, "prompt_to_repeat": SPAN_PROMPT}, "code and theory",
     "code and theory behind"),
    ("format:output_template", {}, "My Answer: yes My Conclusion: fine Future Outlook: bright",
     "My Answer: yes My Conclusion: fine"),
    ("format:no_whitespace", {}, "NoSpacesHere!", "Has a space"),
]


def test_every_checker_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(CHECKERS)
    assert not set(CHECKERS) & set(UNCHECKED)


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_checker_follows_and_breaks(iid: str, kwargs: dict, good: str, bad: str) -> None:
    assert check(iid, good, kwargs) is True
    assert check(iid, bad, kwargs) is False
    assert CHECKERS[iid]("   \n", kwargs) is False  # a blank response follows nothing


def test_reference_quirks_kept() -> None:
    # the reference counts distinct conjunctions as written, and copies the span without its last index
    assert check("count:conjunctions", "and And and, so", {"small_n": 4.0}) is True
    assert check("repeat:repeat_span", "code and theory behind", {"n_end": 7, "n_start": 3,
                                                                   "prompt_to_repeat": SPAN_PROMPT}) is True
    assert check("format:sub-bullets", "No bullets at all.", {}) is True


def test_helpers() -> None:
    assert split_sentences("Dr. Smith met Mr. Jones at 3.30 p.m. today. He left... Did he?! Yes.") == [
        "Dr. Smith met Mr. Jones at 3.30 p.m. today.", "He left...", "Did he?", "!", "Yes."]
    assert split_sentences("") == []
    assert [is_emoji(c) for c in "\U0001f600\U0001f1eb\u00a9\u2764\U0001f3fd"] == [True] * 5
    assert [is_emoji(c) for c in "a#7\ufe0f\u200d\u00e9"] + [is_emoji("\U0001f600\U0001f600")] == [False] * 7
    assert AFRICA == sorted(AFRICA, key=lambda s: unicodedata.normalize("NFKD", s)) and len(AFRICA) == 54


def test_check_unknown_and_bad_kwargs() -> None:
    assert check("no:such_instruction", "text", {}) is None
    with pytest.raises(KeyError, match="count:numbers"):
        check("count:numbers", "12 apples", {})


ODD = ["", " ", "\n\n", "\u200b", "日本語のテキスト。", "\U0001f600" * 3, "Question 1" + "\n" * 20000 + "x",
       "\n" * 50000 + "  a", "(" * 10000 + ")" * 10000, "x. " * 30000, '"' + "!" * 20000, "\x00\x01<stop><prd>"]


@pytest.mark.parametrize("iid", sorted(CHECKERS))
def test_odd_input_never_raises(iid: str) -> None:
    kwargs = next(c[1] for c in CASES if c[0] == iid)
    for response in ODD:
        assert isinstance(CHECKERS[iid](response, kwargs), bool)


def test_score_known_answers() -> None:
    rows = [
        {"instruction_id_list": ["format:no_whitespace"], "kwargs": [{}]},
        {"instruction_id_list": ["format:no_whitespace", "count:numbers"], "kwargs": [{}, {"N": 2.0}]},
        {"instruction_id_list": ["words:start_verb", "format:no_whitespace"], "kwargs": [{}, {}]},
    ]
    result = score(rows, ["abc", "12", "Run"])
    assert result == {
        "prompt_accuracy": 0.5,
        "instruction_accuracy": 0.75,
        "n_prompts": 2,
        "n_instructions": 4,
        "coverage": 0.8,
        "per_prompt": [1.0, 0.0, None],
        "unchecked": ["words:start_verb"],
    }
    with pytest.raises(ValueError):
        score(rows, ["abc"])


DATA = cache_dir() / "data" / "ifbench" / "data.jsonl"


def _real_rows(path: Path = DATA) -> list[dict]:
    if not path.exists():
        pytest.skip(f"no IFBench data at {path} (alignkit data fetch ifbench)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_real_data_ids_and_kwargs() -> None:
    rows = _real_rows()
    ids = {iid for row in rows for iid in row["instruction_id_list"]}
    assert ids <= set(CHECKERS) | set(UNCHECKED), ids - set(CHECKERS) - set(UNCHECKED)
    for row in rows:
        for iid, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            if iid in CHECKERS:
                for dummy in ("A dummy response. It has two sentences!", row["prompt"], ""):
                    assert isinstance(CHECKERS[iid](dummy, kwargs), bool)
    result = score(rows, [row["prompt"] for row in rows])
    assert result["unchecked"] == sorted(ids & set(UNCHECKED))
    assert 0.9 < result["coverage"] < 1.0 and result["n_prompts"] > 250
