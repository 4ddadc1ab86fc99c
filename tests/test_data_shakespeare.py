"""Parsing the plays into speeches, LEAF's per-role texts, and the character codes."""

from __future__ import annotations

import numpy as np

from fedlowrank.data.shakespeare import VOCAB, VOCAB_SIZE, decode, encode, load_plays, parse_play, role_texts

PLAY = """\
THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Alpha, a Lord.
Beta, his friend.

SCENE: A room.

ACT I.

Scene I. A hall.

[Enter ALPHA and BETA.]

Alp.
Good morrow, friend;
how fares the day?

BETA.[Aside]
He knows not
[Draws his sword.]
what I know.

MRS. PAGE.
A word, sir.

1 Clown.
Here's a song:

  Hey, nonny, nonny.

GAMMA
No dot on this tag,
as in one play.

[Exeunt.]

An orphan line nobody speaks.

SCENE II. Another room.

Alp.
Alone at last.
"""


def test_parse_play_reads_tags_asides_stage_directions_and_scenes():
    title, speeches = parse_play(PLAY)
    assert title == "THE TRAGEDY OF TESTING"
    got = [(s.scene, s.role, s.text) for s in speeches]
    assert got == [
        (3, "ALP", "Good morrow, friend; how fares the day?"),
        (3, "BETA", "He knows not what I know."),  # aside tag, stage direction dropped
        (3, "MRS. PAGE", "A word, sir."),
        (3, "1 CLOWN", "Here's a song: Hey, nonny, nonny."),  # an untagged block continues it
        (3, "GAMMA", "No dot on this tag, as in one play."),
        (4, "ALP", "Alone at last."),
    ]  # headings count scenes (SCENE:, ACT I., Scene I.); the cast list is skipped; a stage
    # direction closes the speech before it, so the orphan line is nobody's


def test_the_package_plays():
    plays = load_plays()
    assert len(plays) == 37  # the poems have no speaker tags
    hamlet = next(p for p in plays if p.name == "hamlet")
    assert hamlet.title == "HAMLET, PRINCE OF DENMARK"
    roles = {s.role for s in hamlet.speeches}
    assert {"HAM", "HOR", "KING", "QUEEN", "OPH"} <= roles
    assert sum(s.role == "HAM" for s in hamlet.speeches) > 300
    dream = next(p for p in plays if p.name == "midsummer_nights_dream")  # tags without "."
    assert sum(s.role == "LYSANDER" for s in dream.speeches) > 40


def test_role_texts_one_client_per_play_and_role():
    texts = role_texts(min_speeches=64)
    assert "hamlet/HAM" in texts and "othello/IAGO" in texts
    assert all(k.count("/") == 1 for k in texts)
    assert len(role_texts(min_speeches=1)) > len(texts) > 100
    ham = [s.text for s in next(p for p in load_plays() if p.name == "hamlet").speeches if s.role == "HAM"]
    assert texts["hamlet/HAM"] == "\n".join(ham)


def test_character_codes_round_trip_and_unknowns_map_to_zero():
    assert VOCAB_SIZE == 97 and VOCAB[0] == "\n"
    text = "To be, or not to be:\nthat is the question."
    ids = encode(text)
    assert ids.dtype == np.uint8 and ids.min() >= 1 and decode(ids) == text
    assert list(encode("a\u00e9\tb")) == [encode("a")[0], 0, 0, encode("b")[0]]  # non-ASCII, tab
