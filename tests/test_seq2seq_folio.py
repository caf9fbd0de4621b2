"""The Folio parallel corpus: speech extraction from both editions' formats, spelling-insensitive
alignment (misaligned and unmatched speeches dropped and counted), and the substitution anchor."""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.data.folio import align, folio_speeches, modern_speeches, play_pairs, skeleton

FOLIO = """The Tragedie of Hamlet

Actus Primus. Scoena Prima.

Enter Barnardo and Francisco two Centinels.

  Barnardo. Who's there?
  Fran. Nay answer me: Stand & vnfold
your selfe

   Bar. Long liue the King

   Fran. Barnardo?
  Bar. He

   Fran. A speech the modern edition does not have at all

   Fran. You come most carefully vpon your houre
Enter Horatio and Marcellus.

  Hor. Friends to this ground
"""

MODERN = """ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Fran.
Bernardo?

Ber.
He.

Fran.
You come most carefully upon your hour.

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.
"""


def test_speeches_of_both_editions():
    f = folio_speeches(FOLIO)
    assert f[:3] == ["Who's there?", "Nay answer me: Stand & vnfold your selfe", "Long liue the King"]
    assert "Enter Horatio and Marcellus." not in " ".join(f) and f[-1] == "Friends to this ground"
    m = modern_speeches(MODERN)
    assert m[:3] == ["Who's there?", "Nay, answer me: stand, and unfold yourself.", "Long live the king!"]
    assert len(m) == 7 and all("[" not in s for s in m)


def test_spelling_insensitive_alignment_drops_what_does_not_match():
    assert skeleton("vnfold") == skeleton("unfold") and skeleton("selfe") == skeleton("self")
    assert skeleton("liue") == skeleton("live") and skeleton("houre") == skeleton("hour")
    pairs, stats = play_pairs(FOLIO, MODERN, min_similarity=0.5)
    assert ("Long liue the King", "Long live the king!") in pairs
    assert ("You come most carefully vpon your houre", "You come most carefully upon your hour.") in pairs
    assert all("does not have" not in s for s, _ in pairs)
    # "Barnardo?" / "Bernardo?" share no word skeleton: aligned but below the similarity bar, dropped
    assert stats["folio_speeches"] == 8 and stats["modern_speeches"] == 7 and stats["pairs"] == 6
    assert stats["dropped_low_similarity"] == 1
    # monotonic: a pair never crosses another
    matched = align(folio_speeches(FOLIO), modern_speeches(MODERN))
    assert [i for i, _, _ in matched] == sorted(i for i, _, _ in matched)


def test_word_substitution_anchor_learns_most_frequent_modern_form():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from folio import apply_table, substitution_table

    train = [{"source": "Long liue the King", "target": "Long live the king!"},
             {"source": "liue and let liue", "target": "live and let live"},
             {"source": "the King is dead", "target": "The king is dead."}]
    table = substitution_table(train)
    assert table["liue"] == "live" and table["King"] == "king"
    assert apply_table(table, "Long liue the King, sirrah") == "Long live the king, sirrah"


def test_aligned_cuts_spans_and_shuffled_units_keep_folio_and_modern_forms_paired():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from folio import aligned_cuts, shuffled_pairs, span_pairs

    src, tgt = "Stand & vnfold your selfe", "Stand, and unfold yourself."
    # "&"/"and" and "your selfe"/"yourself" do not pair one to one: the only inner cut is before vnfold/unfold
    assert aligned_cuts(src, tgt) == [(0, 0), (8, 11), (len(src), len(tgt))]
    pair = {"source": "I burie a second husband in deliuering my sonne",
            "target": "I bury a second husband, in delivering my son."}
    spans = span_pairs([pair], per_pair=20, seed=1)
    assert len(spans) == 20
    for s in spans:  # each span is a slice of both texts, cut at aligned words
        assert s["source"] in pair["source"] and s["target"].rstrip(".") in pair["target"]
        assert len(s["source"].split()) == len(s["target"].split())
    # a span that stops inside the speech leaves the comma the editor put before the next word out
    assert not any(s["target"].endswith(",") for s in spans)
    units = dict(zip(pair["source"].split(), pair["target"].rstrip(".").replace(",", "").split()))
    for s in shuffled_pairs([pair], 30, seed=2):
        words_src, words_tgt = s["source"].split(), s["target"].split()
        assert 4 <= len(words_src) <= 24
        assert [units[w] for w in words_src] == words_tgt  # punctuation the source lacks is dropped


def test_jackknifed_table_inputs_leave_words_of_held_out_plays_unknown_and_guard_keeps_small_edits():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from folio import guarded, jackknifed_table_inputs, word_change

    pairs = [{"source": "Long liue the King", "target": "Long live the king!", "play": "a"},
             {"source": "liue and let liue", "target": "live and let live", "play": "b"},
             {"source": "the Queene doth liue", "target": "the queen doth live", "play": "b"}]
    by_source = {p["target"]: p["source"] for p in jackknifed_table_inputs(pairs, folds=2)}
    # play a's "liue" is mapped by play b's table; play b's sources see only play a's table,
    # which knows "liue" and "the" but never saw "Queene"
    assert by_source == {"Long live the king!": "Long live the King", "live and let live": "live and let live",
                         "the queen doth live": "the Queene doth live"}
    assert word_change("Long live the King", "Long live the king!") == 0.0  # case and punctuation are not words
    assert word_change("a b c d", "a b x d") == 0.25 and word_change("a b", "c d") == 1.0
    inputs = ["Looke how our Partner's rapt", "Unfold it"]
    outputs = ["Look, how our Partner's rapt.", "Uncle, ho, ho!"]
    assert guarded(inputs, outputs, 0.2) == ["Look, how our Partner's rapt.", "Unfold it"]


def test_clause_pieces_cut_sources_and_training_pairs_at_the_same_places():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from folio import aligned_pieces, piece_pairs, source_pieces

    n_words = lambda text: len(text.split())  # noqa: E731 -- a stand-in for a tokenizer's count
    src = "Go sir Andrew: scout mee for him, so soone as euer thou seest him, draw"
    tgt = "Go, Sir Andrew; scout me for him; so soon as ever thou seest him, draw."
    # cut after every clause end; a clause longer than the limit stays whole
    assert source_pieces(src, 4, n_words) == ["Go sir Andrew:", "scout mee for him,", "so soone as euer thou seest him,",
                                               "draw"]
    # clauses joined again while the piece stays within the limit
    assert source_pieces(src, 8, n_words) == ["Go sir Andrew: scout mee for him,", "so soone as euer thou seest him, draw"]
    # the targets are cut after the aligned partner of each source cut, with the editor's punctuation
    assert aligned_pieces(src, tgt, 4, n_words) == [
        ("Go sir Andrew:", "Go, Sir Andrew;"), ("scout mee for him,", "scout me for him;"),
        ("so soone as euer thou seest him,", "so soon as ever thou seest him,"), ("draw", "draw.")]
    assert aligned_pieces(src, tgt, 8, n_words) == [
        ("Go sir Andrew: scout mee for him,", "Go, Sir Andrew; scout me for him;"),
        ("so soone as euer thou seest him, draw", "so soon as ever thou seest him, draw.")]
    # "your selfe," has no one-to-one partner in "yourself,": no cut there, the pair stays whole
    assert aligned_pieces("vnfold your selfe, Stand", "unfold yourself, stand.", 2, n_words) == [
        ("vnfold your selfe, Stand", "unfold yourself, stand.")]
    pairs = [{"source": src, "target": tgt}, {"source": "Who's there?", "target": "Who's there?"}]
    assert [p["source"] for p in piece_pairs(pairs, 8, n_words)] == source_pieces(src, 8, n_words) + ["Who's there?"]
