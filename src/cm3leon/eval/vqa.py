"""VQA accuracy with the VQAv2 rule (Antol et al. 2015; the official `vqaEval.py`, re-implemented).

An answer is right in proportion to how many humans gave it: min(#matching / 3, 1), averaged
over the 10 leave-one-annotator-out subsets of 9 (so 1, 2, 3, 4+ matching annotators out of
10 give 0.3, 0.6, 0.9, 1.0). CM3Leon reports VQAv2 47.6, VizWiz 37.6, OKVQA 23.8 (SFT-7B).

With one reference answer (the shapes dataset) there is no subset to leave out and the score
is exact match after normalisation."""

from __future__ import annotations

import re
from typing import Sequence

from cm3leon.errors import CM3LeonError

# Tables of the official evaluation code (vqaEval.py), unchanged; keys and values as
# published (some use the typographic apostrophe ’).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s",
    "howd": "how’d", "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll",
    "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve",
    "mightn’tve": "mightn’t’ve", "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve",
    "neednt": "needn’t", "notve": "not’ve", "oclock": "o’clock", "oughtnt": "oughtn’t",
    "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at", "shant": "shan’t",
    "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve", "therere": "there’re",
    "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve",
    "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t",
    "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll",
    "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll",
    "whyre": "why’re", "whys": "why’s", "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve",
    "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re",
    "youve": "you’ve",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset(["a", "an", "the"])
# The official pattern, including its "(?!<=\d)" (a look-ahead, not the intended look-behind):
# a period is removed unless a digit follows it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a punctuation mark next to a space (or any text with a
    digit,digit comma) is deleted, otherwise replaced by a space; periods not before a digit go."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles,
    expand the official contraction table."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official normalisation of a predicted answer (whitespace, punctuation, digits,
    articles, contractions): "Two dogs." -> "2 dogs", "a dog" -> "dog"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, references: Sequence[str], normalize_references: bool = True) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers (usually 10).

    For each annotator, the other answers that equal the prediction are counted and
    min(count / 3, 1) is scored; the mean over annotators is returned. One reference: exact
    match after normalisation.

    The official code applies the full normalisation to the prediction only (the released
    VQAv2 answers were normalised already) and punctuation handling to the references when
    they disagree. `normalize_references=True` (default) normalises references exactly like
    the prediction, so un-normalised references (ours, "Two") still match "2"; set False to
    reproduce the official code bit for bit on official annotations."""
    if isinstance(references, str):
        references = [references]
    refs = list(references)
    if not refs:
        raise CM3LeonError("VQA accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    if normalize_references:
        refs = [normalize_answer(r) for r in refs]
    elif len(set(refs)) > 1:
        refs = [process_punctuation(r) for r in refs]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = [r == pred for r in refs]
    total = sum(matches)
    # Leaving out annotator i removes one match if i itself matched.
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def vqa_score(
    predictions: Sequence[str], references: Sequence[Sequence[str]], normalize_references: bool = True
) -> dict:
    """Mean VQA accuracy over questions, in percent like the official code:
    {"vqa_accuracy": 0..100, "n": #questions, "per_question": [0..1, ...]}."""
    if len(predictions) != len(references):
        raise CM3LeonError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise CM3LeonError("no answers to evaluate")
    per_q = [vqa_accuracy(p, r, normalize_references) for p, r in zip(predictions, references)]
    return {"vqa_accuracy": 100.0 * sum(per_q) / len(per_q), "n": len(per_q), "per_question": per_q}
