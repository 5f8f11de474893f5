#!/usr/bin/env python
"""Build the demo preference dataset: a miniature of the paper's "v0.2" on-policy pipeline.

1. Prompts: topic questions x verifiable constraints (word limit, lowercase, include a word,
   exactly K bullets, end with a phrase, no commas), one or two constraints per prompt.
   Whole topics are held out for the test split, so test prompts never occur in train.
2. On-policy samples: `--k` answers per prompt from SmolLM2-135M-Instruct itself (the model the
   demo trains), batched with left padding, temperature sampling, a short token budget.
3. Reward: `verifiable_reward.score_response` (fraction of constraints satisfied + a small
   brevity tie-break; answers cut off by the token budget get no tie-break).
4. Pairs: best answer that finished on its own = chosen, worst answer = rejected, kept when the
   score gap exceeds `--min-gap` and the texts differ.

Writes <out>/train.jsonl and <out>/test.jsonl (UltraFeedback-binarized style rows) and prints a
JSON summary. Run from the repo root:

    python examples/build_demo_dataset.py --out examples/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
try:
    import alphadpo_cli  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parent))

import verifiable_reward as vr  # noqa: E402

from alphadpo_cli.io import atomic_write_text, cache_home  # noqa: E402
from alphadpo_cli.models.sources import DEMO_MODEL, resolve_model_source

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


def load_model(spec: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    path = resolve_model_source(spec)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


def _load_batches(cache_file: Path | None) -> dict[int, dict]:
    """Batches already sampled by an earlier, interrupted run (a torn last line is ignored)."""
    done: dict[int, dict] = {}
    if cache_file is None or not cache_file.exists():
        return done
    for line in cache_file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[rec["start"]] = rec
    return done


def sample_answers(tok, model, prompts, *, k, batch_prompts, max_new_tokens, temperature, top_p,
                   seed, cache_file: Path | None = None, log=print):
    """k sampled answers per prompt: ([[(text, finished), ...k], ...], generation seconds).

    Each batch is seeded on its own (seed, batch start), so the samples do not depend on which
    batches ran before; finished batches are appended to `cache_file`, and a rerun after an
    interruption reuses them and samples only the rest.
    """
    import torch

    done = _load_batches(cache_file)
    fh = None
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torn = cache_file.exists() and not cache_file.read_bytes().endswith(b"\n")
        fh = open(cache_file, "a", encoding="utf-8")
        if torn and cache_file.stat().st_size:
            fh.write("\n")  # keep the next record off a torn last line
    results = []
    seconds = 0.0
    start = time.perf_counter()
    try:
        for b in range(0, len(prompts), batch_prompts):
            batch = prompts[b:b + batch_prompts]
            rec = done.get(b)
            if rec is not None and rec["prompts"] == batch:
                results.extend([[(t, f) for t, f in ans] for ans in rec["answers"]])
                seconds += rec.get("seconds", 0.0)
                continue
            batch_start = time.perf_counter()
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed * 100_003 + b)  # reproducible per batch
            with torch.no_grad():
                out = model.generate(
                    **enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                    max_new_tokens=max_new_tokens, num_return_sequences=k,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1]:]
            batch_answers = []
            for i in range(len(batch)):
                answers = []
                for j in range(k):
                    ids = new[i * k + j].tolist()
                    finished = tok.eos_token_id in ids
                    if finished:
                        ids = ids[: ids.index(tok.eos_token_id)]
                    answers.append((tok.decode(ids, skip_special_tokens=True).strip(), finished))
                batch_answers.append(answers)
            results.extend(batch_answers)
            batch_seconds = time.perf_counter() - batch_start
            seconds += batch_seconds
            if fh is not None:
                fh.write(json.dumps({"start": b, "prompts": batch, "answers": batch_answers,
                                     "seconds": round(batch_seconds, 2)},
                                    ensure_ascii=False) + "\n")
                fh.flush()
            log(f"  {b + len(batch)}/{len(prompts)} prompts, "
                f"{time.perf_counter() - start:.0f} s")
    finally:
        if fh is not None:
            fh.close()
    return results, seconds


def make_pair(prompt: str, constraints: list[str], answers, min_gap: float):
    """Best finished answer vs worst answer by the verifiable reward, or None.

    The chosen answer must have ended on its own (an answer cut off by the token budget would
    teach the model to stop mid-sentence); the rejected one may be cut off.
    """
    scored = []
    for text, finished in answers:
        if text:
            score = vr.score_response(text, constraints, finished=finished, prompt=prompt)
            scored.append((score, finished, text))
    finished_answers = [s for s in scored if s[1]]
    if len(scored) < 2 or not finished_answers:
        return None
    best = max(finished_answers, key=lambda s: s[0])
    worst = min(scored, key=lambda s: s[0])
    if best[0] - worst[0] <= min_gap or best[2] == worst[2]:
        return None
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": best[2]}],
        "rejected": [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": worst[2]}],
        "score_chosen": round(best[0], 4),
        "score_rejected": round(worst[0], 4),
        "constraints": constraints,
    }


def summarise(rows, answers, constraints_per_prompt):
    def words(row, key):
        return vr.count_words(row[key][-1]["content"])

    flat = [(text, fin, cons) for ans, cons in zip(answers, constraints_per_prompt)
            for text, fin in ans]
    per_constraint: dict[str, list[bool]] = {}
    for text, _fin, cons in flat:
        for c in cons:
            per_constraint.setdefault(vr.parse(c)[0], []).append(vr.check(text, c))
    sc = [r["score_chosen"] for r in rows]
    sr = [r["score_rejected"] for r in rows]
    return {
        "prompts": len(answers),
        "samples": len(flat),
        "samples_finished": round(sum(f for _, f, _ in flat) / max(1, len(flat)), 3),
        "pairs": len(rows),
        "score_chosen_mean": round(statistics.fmean(sc), 3) if rows else None,
        "score_rejected_mean": round(statistics.fmean(sr), 3) if rows else None,
        "gap_mean": round(statistics.fmean(a - b for a, b in zip(sc, sr)), 3) if rows else None,
        "pairs_constraint_gap": sum(
            vr.constraint_score(r["chosen"][-1]["content"], r["constraints"])
            > vr.constraint_score(r["rejected"][-1]["content"], r["constraints"]) for r in rows),
        "chosen_all_satisfied": sum(
            vr.constraint_score(r["chosen"][-1]["content"], r["constraints"]) == 1.0
            for r in rows),
        "words_chosen_mean": round(statistics.fmean(words(r, "chosen") for r in rows), 1)
        if rows else None,
        "words_rejected_mean": round(statistics.fmean(words(r, "rejected") for r in rows), 1)
        if rows else None,
        "sample_satisfaction": {k: round(sum(v) / len(v), 3)
                                for k, v in sorted(per_constraint.items())},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(_HERE / "demo"), help="output directory")
    ap.add_argument("--model", default=DEMO_MODEL, help="model reference (see alphadpo sources)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-topic", type=int, default=4, help="prompts per topic")
    ap.add_argument("--test-topics", type=int, default=20, help="topics held out for test")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--batch-prompts", type=int, default=16, help="prompts per generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-gap", type=float, default=0.0, help="keep pairs with a larger gap")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts per split")
    ap.add_argument("--no-resume", action="store_true",
                    help="ignore samples cached by an interrupted run (cache_home()/demo-samples)")
    args = ap.parse_args(argv)

    random.seed(args.seed)
    train_prompts, test_prompts = build_prompts(args.seed, args.per_topic, args.test_topics)
    if args.limit:
        train_prompts, test_prompts = train_prompts[: args.limit], test_prompts[: args.limit]
    print(f"{len(train_prompts)} train prompts, {len(test_prompts)} test prompts", flush=True)

    import torch

    tok, model = load_model(args.model, args.threads)
    out_dir = Path(args.out)
    summary = {"model": args.model, "args": vars(args), "torch_threads": torch.get_num_threads()}
    gen_seconds = 0.0
    # Samples of finished batches are cached so that an interrupted build resumes where it was.
    key = json.dumps([resolve_model_source(args.model), args.seed, args.per_topic,
                      args.test_topics, args.k, args.batch_prompts, args.max_new_tokens,
                      args.temperature, args.top_p])
    cache_dir = cache_home() / "demo-samples" / hashlib.sha256(key.encode()).hexdigest()[:12]
    if args.no_resume:
        shutil.rmtree(cache_dir, ignore_errors=True)
    for split, prompts in (("train", train_prompts), ("test", test_prompts)):
        answers, seconds = sample_answers(
            tok, model, [p for p, _ in prompts], k=args.k, batch_prompts=args.batch_prompts,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed + (0 if split == "train" else 1),
            cache_file=cache_dir / f"{split}.jsonl",
            log=lambda msg: print(f"[{split}]{msg}", flush=True),
        )
        gen_seconds += seconds
        rows = [row for (p, cons), ans in zip(prompts, answers)
                if (row := make_pair(p, cons, ans, args.min_gap)) is not None]
        atomic_write_text(out_dir / f"{split}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary[split] = summarise(rows, answers, [c for _, c in prompts])
        summary[split]["generation_seconds"] = round(seconds, 1)
    summary["generation_seconds"] = round(gen_seconds, 1)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
