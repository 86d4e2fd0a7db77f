"""Rule-based sentence splitting: character spans of the sentences of a text.

`sentence_spans` cuts a text into sentences (half-open character spans into the original text,
so entity spans can be shifted onto sentences); `split_sentences` returns the strings. The
corpus builder (data/corpora.py) splits documents into sentence records with it, and
data/contexts.py cuts task passages into sentences that contain an answer.

The splitter is dependency-free and rule-based. We use rules rather than spaCy's sentencizer
because the sentencizer splits after every "." (so "Dr. Smith", "the U.S. Army", "J. R. R.
Tolkien" break) and the statistical parser is far too slow for Wikipedia-scale text on a CPU.
The rules (newlines, terminal punctuation, abbreviation tables, initials, dotted acronyms) are
documented on `sentence_spans`.
"""

from __future__ import annotations

import re

# Abbreviations that (practically) never end a sentence: titles before a name, "e.g.", months
# before a day, "Fig. 3". Matched case-sensitively against the word before the period.
_NEVER_FINAL = frozenset(
    "Mr Mrs Ms Mx Dr Prof Rev Hon Gen Col Lt Sgt Capt Cmdr Adm Maj Gov Sen Rep Pres Supt Fr "
    "St Ste Mt Ft vs v cf viz approx ca Fig Figs fig figs Vol Vols vol pp Eq Eqs Sec Ch Art "
    "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec e.g i.e E.g I.e".split()
)
# Abbreviations that end a sentence only sometimes ("He founded Acme Inc. The firm ...", but
# "Acme Inc. shares", "the U.S. Army", "No. 5"). After these we split only when the next word
# is a common sentence opener.
_AMBIGUOUS = frozenset("Jr Sr Inc Ltd Co Corp Bros Assn Dept Univ etc al No Nos Op".split())
_SENTENCE_OPENERS = frozenset(
    "The A An He She It They We I You In On At This That These Those His Her Its Their Our "
    "My There Here After Before During While When Where However Although Though As But And "
    "Since From For By With Following Despite Today Some Many Most One Both Also Then Thus "
    "If Other Each Every All No Several According Later Meanwhile Yet So".split()
)
# A terminal punctuation run, optional closing quotes/brackets, then whitespace.
_BOUNDARY = re.compile(r"([.!?]+)([\"'”’)\]]*)(\s+)")
_DOTTED_ACRONYM = re.compile(r"(?:[A-Za-z]{1,3}\.)+[A-Za-z]{1,3}")
_OPENING = "\"'“‘(["


def _starts_sentence(text: str, j: int) -> bool:
    """Whether a sentence may start at text[j]: an uppercase letter or digit, possibly quoted."""
    while j < len(text) and text[j] in _OPENING:
        j += 1
    return j < len(text) and (text[j].isupper() or text[j].isdigit())


def _next_word(text: str, j: int) -> str:
    m = re.match(r"[\"'“‘(\[]*(\w+)", text[j:])
    return m.group(1) if m else ""


def _is_boundary(text: str, match: re.Match) -> bool:
    """Decide whether the punctuation run in `match` ends a sentence (rules: `sentence_spans`)."""
    nxt = match.end()
    if not _starts_sentence(text, nxt):
        return False
    punct, closing = match.group(1), match.group(2)
    if punct != "." or closing:
        return True  # "!", "?", "...", or a period inside a closed quote: always a boundary.
    # The word the period is attached to, without leading quotes/brackets.
    start = match.start()
    word_start = start
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:start].lstrip(_OPENING)
    if word in _NEVER_FINAL:
        return False
    if len(word) == 1 and word.isalpha():
        return False  # an initial: "John F. Kennedy", "J. R. R. Tolkien".
    if word in _AMBIGUOUS or _DOTTED_ACRONYM.fullmatch(word):
        return _next_word(text, nxt) in _SENTENCE_OPENERS
    return True


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Half-open character spans of the sentences of `text`, whitespace-trimmed.

    A newline is always a boundary (Wikipedia puts paragraphs and headings on their own lines).
    Within a line, a run of ".", "!" or "?" (plus closing quotes/brackets) followed by whitespace
    and an uppercase letter or digit ends a sentence, except after titles ("Dr."), initials
    ("F."), "e.g.", and - unless the next word is a common sentence opener - after ambiguous
    abbreviations ("Inc.", "No.") and dotted acronyms ("U.S.", "Ph.D."). Decimals ("3.14") never
    split because no whitespace follows the period. Known misses: a sentence that really ends
    in a title or an initial ("... vitamin C. The") stays joined to the next.
    """
    spans: list[tuple[int, int]] = []
    for line in re.finditer(r"[^\n]+", text):
        cut = line.start()
        line_text = line.group(0)
        for m in _BOUNDARY.finditer(line_text):
            if _is_boundary(line_text, m):
                spans.append((cut, line.start() + m.end(2)))
                cut = line.start() + m.end()
        spans.append((cut, line.end()))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (see `sentence_spans` for the rules)."""
    return [text[a:b] for a, b in sentence_spans(text)]
