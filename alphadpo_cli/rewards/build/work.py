"""The work directory of a build, and which process does which batches.

`<work>/identity.json` holds the work directory's identity: what makes the answers (model,
adapter, chat template, backend, dtype, decoding, samples, batch size) and the reward that scores
them. Every process appends its finished batches to its own `artefacts.WorkLog`s,
`answers.<rank>-of-<world>.jsonl` and `scores.<rank>-of-<world>.jsonl`, whose header identity is
the work directory's: the answers identity for answers logs, answers and reward for scores logs.
So `--rescore` (only the reward changed) starts the scores logs again and `--overwrite` starts
everything again; any other change is refused with the differences named. Records are taken by
batch id and the hash of its prompts (scores also by the hash of their answers), from every
process's logs, so finished batches count whoever did them.

Logs written before headers existed are kept: identity.json vouches for them, and a process
adopts its own log (puts the header in front) when it next appends to it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from ...artefacts import ArtefactError, WorkLog, check_identity, normalised, read_lines
from ...config import ConfigError
from ...integrity import json_sha256
from ...io import atomic_write_json
from .prompts import Batch

KINDS = {"answers": "data build answers", "scores": "data build scores"}
REDO_HINT = "pass --overwrite to start again, or choose another --output-dir/--work-dir"
RESCORE_HINT = "pass --rescore to score its answers again with this one, or --overwrite to start again"


def answers_hash(rec: dict) -> str:
    return json_sha256(rec["answers"])


class WorkStore:
    """The work directory: identity.json, and per process append-only answers/scores work logs."""

    def __init__(self, root: Path, rank: int = 0, world: int = 1, identity: dict | None = None):
        self.root, self.rank, self.world, self.identity = Path(root), rank, world, identity

    @classmethod
    def existing(cls, root: Path) -> "WorkStore":
        """The work directory of an earlier build, to read (`load_scored`)."""
        store = cls(root)
        store.identity = store._saved_identity()
        if store.identity is None:
            raise ConfigError(f"{root} holds no data build (no identity.json): run `alphadpo data build` first")
        return store

    def log_path(self, kind: str) -> Path:
        return self.root / f"{kind}.{self.rank}-of-{self.world}.jsonl"

    def log_identity(self, kind: str) -> dict:
        answers = self.identity["answers"]
        return answers if kind == "answers" else {"answers": answers, "reward": self.identity["reward"]}

    def _paths(self, kind: str) -> list[Path]:
        return sorted(self.root.glob(f"{kind}.*.jsonl"))

    def _saved_identity(self) -> dict | None:
        path = self.root / "identity.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ArtefactError(f"{path} is not valid JSON (the file was damaged); {REDO_HINT}") from None

    def _records(self, path: Path, kind: str) -> list[dict]:
        records = WorkLog.read(path, self.log_identity(kind), kind=KINDS[kind])
        if records or WorkLog.header_identity(path) is not None:
            return records
        return [v for v in read_lines(path) if isinstance(v, dict)]  # from before headers: identity.json vouches

    def read(self, kind: str, batches: Iterable[Batch], answers: dict | None = None) -> dict[str, dict]:
        """{batch id: record} of every process's log: records of these prompts only (and, for
        scores, of these answers); the last one wins."""
        wanted = {b.id: b.hash for b in batches}
        out = {}
        for path in self._paths(kind):
            for rec in self._records(path, kind):
                bid = rec.get("id")
                if wanted.get(bid) != rec.get("hash"):
                    continue
                if answers is not None and (bid not in answers or answers_hash(answers[bid]) != rec.get("answers_hash")):
                    continue
                out[bid] = rec
        return out

    def log(self, kind: str) -> WorkLog:
        """This process's log of `kind`, to append to (a context manager)."""
        return WorkLog(self.log_path(kind), self.log_identity(kind), kind=KINDS[kind], adopt_headerless=True,
                       hint=REDO_HINT)

    def prepare(self, identity: dict, *, overwrite: bool, rescore: bool) -> None:
        """Refuse a work directory made with other settings, or start it again (overwrite), or
        start its scores logs again (rescore, when only the reward changed)."""
        if (overwrite or rescore) and self.world > 1:
            raise ConfigError("--overwrite/--rescore with several shards: run it once in one process first "
                              f"(or delete {self.root}), then launch the shards")
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        old = self._saved_identity()
        if old is not None:
            check_identity(self.root, old.get("answers"), identity["answers"],
                           what="holds answers made with other settings", hint=REDO_HINT)
            if not rescore:
                check_identity(self.root, old.get("reward"), identity["reward"],
                               what="was scored with another reward", hint=RESCORE_HINT)
            elif normalised(old.get("reward")) != normalised(identity["reward"]):
                for path in self._paths("scores"):  # header-less ones too
                    path.unlink()
        self.identity = identity
        self._check_headers(rescore)
        if normalised(old) != normalised(identity):
            atomic_write_json(self.root / "identity.json", identity)

    def _check_headers(self, rescore: bool) -> None:
        """Every log's header against the work directory's identity: a scores log of another
        reward is started again with `rescore`; any other difference is refused."""
        for kind in KINDS:
            expected = normalised(self.log_identity(kind))
            for path in self._paths(kind):
                found = WorkLog.header_identity(path)
                if found is None or normalised(found) == expected:
                    continue
                other_reward = isinstance(found, dict) and normalised(found.get("answers")) == expected.get("answers")
                if kind == "scores" and rescore and other_reward:
                    path.unlink()
                    continue
                check_identity(path, found, expected, what=f"({KINDS[kind]}) was written with other settings",
                               hint=REDO_HINT)


def shard_from_env(env: dict | None = None) -> tuple[int, int]:
    """(rank, world) from RANK/WORLD_SIZE (torchrun, accelerate), else LOCAL_RANK/LOCAL_WORLD_SIZE."""
    env = os.environ if env is None else env
    for r, w in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if env.get(w):
            world, rank = int(env[w]), int(env.get(r) or 0)
            if not 0 <= rank < world:
                raise ConfigError(f"{r}={rank} is not below {w}={world}")
            return rank, world
    return 0, 1


def gpu_for_shard(env: dict | None = None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a process launched one per GPU (LOCAL_RANK set, several
    processes): its own GPU only, so that vLLM, transformers and the reward model all use it as
    cuda:0. None when there is nothing to pin (one process, or already pinned)."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1) < 2:
        return None
    local = int(env["LOCAL_RANK"])
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:
        return None  # already one GPU per process
    return visible[local] if visible and local < len(visible) else str(local)
