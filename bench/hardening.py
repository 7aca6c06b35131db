"""Hardening probe (issue 10): bad input and faults fed to the `finetune` command line, one case at a time.

Every case runs the CLI of a checkout as a subprocess (`PYTHONPATH=<checkout>`, `HF_HUB_OFFLINE=1`,
`OMP_NUM_THREADS=1`, a timeout per case) on tiny offline fixtures built in a temporary folder: a byte-level BPE
tokenizer trained with `tokenizers`, a 2-layer GPT-2 saved like a Hub checkpoint, small text / JSONL / CSV / TSV
files, and two short trained runs (LoRA and full fine-tuning) for the stages that need a model. All outputs stay
in the temporary folder and nothing is written into the checkout (byte code goes to a PYTHONPYCACHEPREFIX
in the temporary folder as well).

Classes probed (those of issue 10): recipe values the libraries reject only later, tracebacks instead of one clear
line, OS faults (read-only and full disks, simulated with tmpfs and bind mounts in a private mount namespace:
needs root and `unshare`), make targets losing overrides, reruns that trust a changed run, leaks (local paths in
the upload folder, run folders outside outputs/, leftover temporary folders), data errors that do not say where,
prompt templates, resume faults, HTTP input; and the classes that were already right.

Outcomes: `ok` (expected success), `clear error` (non-zero exit, no traceback, an `error:` line that names the
key, file or line the case expects), `vague error` (non-zero exit, no traceback, the message does not name it),
`traceback`, `accepted` (bad input taken with exit 0), `stale reuse` (a rerun trusted a broken or changed run),
`leak`, `hang/timeout`, `setup failed` (the case's own fixture failed), `not probed` (no mount namespace here).

SIGKILL inside prepare's final renames or inside a checkpoint save is not timed here (tests/test_prepare.py and
tests/test_train.py do that); the states such kills leave are made directly instead (a shard gone under an intact
manifest, a truncated checkpoint, a torn metrics line), and one prepare is SIGKILLed mid-write and rerun.

    python -m bench.hardening [--checkout PATH] [--out FILE] [--json FILE] [--only REGEX] [--keep]
    python -m bench.hardening --combine BEFORE.json AFTER.json --out TABLE.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

OK, CLEAR, VAGUE, TRACEBACK, ACCEPTED = "ok", "clear error", "vague error", "traceback", "accepted"
STALE, LEAK, HANG, SETUP, SKIPPED = "stale reuse", "leak", "hang/timeout", "setup failed", "not probed"
OUTCOMES = (OK, CLEAR, VAGUE, TRACEBACK, ACCEPTED, STALE, LEAK, HANG, SETUP, SKIPPED)
CLEAN = (OK, CLEAR)  # either is right: the case only must not crash, hang, leak or reuse

G_VALUE, G_LINE, G_OS, G_MAKE = "recipe value", "one clear line", "OS fault", "make overrides"
G_RERUN, G_LEAK, G_WHERE, G_TEMPLATE = "rerun after change", "leak", "data error: where", "template"
G_FAULT, G_HTTP, G_RIGHT = "resume fault", "HTTP", "already right"

EOS = "<|endoftext|>"
DROP = "<drop>"  # a spec value that removes the key from the base recipe
DEFAULT_TIMEOUT = 180.0


@dataclass
class Proc:
    rc: int | None  # None: killed at its timeout
    out: str  # stdout and stderr together
    seconds: float


@dataclass
class Outcome:
    kind: str
    detail: str = ""


@dataclass
class Case:
    id: str
    group: str
    what: str
    probe: Callable[["Probe", Path], Outcome]
    expect: tuple[str, ...] = (CLEAR,)


# ---------------------------------------------------------------------------------------------- processes

def run_proc(cmd: list[str], env: dict, cwd: Path, stdin: bytes | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> Proc:
    """Run `cmd` in its own process group; on timeout the whole group is killed."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(stdin, timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        rc = None
    return Proc(rc, out.decode("utf-8", "replace"), time.monotonic() - start)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int | None, str]:
    """(status, body text); status None when nothing answered."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- classifying

def error_line(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("error:")),
                next((line for line in lines if ": error:" in line), ""))


def exception_line(out: str) -> str:
    lines = out.splitlines()
    last = max(i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line)
    return next((line.strip() for line in lines[last + 1:] if line and not line[0].isspace()), lines[-1])


def last_line(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def classify(proc: Proc, expect: tuple[str, ...], needles: tuple[str, ...] = (), warning: str | None = None) -> Outcome:
    """The outcome of one CLI run. `needles` (regexes) must all be in the error line for a clear error."""
    if proc.rc is None:
        return Outcome(HANG, f"no exit in {proc.seconds:.0f} s: {last_line(proc.out)}")
    if "Traceback (most recent call last)" in proc.out:
        return Outcome(TRACEBACK, f"exit {proc.rc}: {exception_line(proc.out)}")
    if proc.rc == 0:
        if OK not in expect:
            return Outcome(ACCEPTED, f"exit 0: {last_line(proc.out)}")
        if warning and not re.search(warning, proc.out, re.IGNORECASE):
            return Outcome(ACCEPTED, f"exit 0 and no warning matching /{warning}/")
        return Outcome(OK, f"exit 0: {last_line(proc.out)}")
    line = error_line(proc.out)
    named = bool(line) and all(re.search(n, line, re.IGNORECASE) for n in needles)
    return Outcome(CLEAR if named else VAGUE, f"exit {proc.rc}: {line or last_line(proc.out)}")


def classify_http(status: int | None, body: str, expect: tuple[str, ...]) -> Outcome:
    text = " ".join(body.split())[:160]
    if status is None:
        return Outcome(HANG, text)
    if status >= 500:
        return Outcome(TRACEBACK, f"HTTP {status}: {text}")
    if status >= 400:
        try:
            named = "error" in json.loads(body)
        except ValueError:
            named = False
        return Outcome(CLEAR if named else VAGUE, f"HTTP {status}: {text}")
    return Outcome(OK if OK in expect else ACCEPTED, f"HTTP {status}: {text}")


def combine(first: Outcome, rerun: Proc, what: str) -> Outcome:
    """A fault case: the first run's outcome, unless the rerun that follows it fails."""
    if rerun.rc == 0 and "Traceback" not in rerun.out:
        return first
    outcome = classify(rerun, (OK,))
    kind = outcome.kind if outcome.kind in (TRACEBACK, HANG) else STALE
    return Outcome(kind, f"{what} failed: {outcome.detail}")


# ---------------------------------------------------------------------------------------------- fixtures

def pseudo_words(rng: random.Random, n: int) -> list[str]:
    syllables = "ka lo mi ne ru ta so vi be da po ze fu gi ha".split()
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def sentences(rng: random.Random, words: list[str], n: int) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_data(folder: Path) -> list[str]:
    """Text, instruction, chat and classification files; returns the corpus the tokenizer is trained on."""
    rng = random.Random(0)
    words = pseudo_words(rng, 80) + ["negative", "positive", "good", "bad"]
    folder.mkdir(parents=True)
    train, val = sentences(rng, words, 300), sentences(rng, words, 40)
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "val.txt").write_text("\n".join(val) + "\n")
    (folder / "more.txt").write_text("\n".join(sentences(rng, words, 60)) + "\n")
    (folder / "big.txt").write_text("\n".join(sentences(rng, words, 6000)) + "\n")
    short = [" ".join(line.split()[:4]) for line in train]
    for suffix, rows in (("", short[:60]), ("_val", short[60:80])):
        write_jsonl(folder / f"instr{suffix}.jsonl", [{"instruction": f"repeat {a}", "input": "" if i % 2 else "now",
                                                       "output": a} for i, a in enumerate(rows)])
        write_jsonl(folder / f"chat{suffix}.jsonl", [{"messages": [{"role": "user", "content": a},
                                                                   {"role": "assistant", "content": a[::-1]}]}
                                                     for a in rows])
        write_jsonl(folder / f"cls{suffix}.jsonl", [{"text": a, "label": i % 2} for i, a in enumerate(rows)])
    labelled = [{"text": line, "label": i % 2} for i, line in enumerate(train[:80])]
    for name, sep in (("cls.csv", ","), ("cls.tsv", "\t")):
        rows = "".join(f"{row['text']}{sep}{row['label']}\n" for row in labelled)
        (folder / name).write_text(f"text{sep}label\n{rows}")
    return train + val


def train_tokenizer(corpus: list[str], folder: Path):
    """A GPT-2-style byte-level BPE (vocabulary 320, EOS `<|endoftext|>`), saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, min_frequency=1, special_tokens=[EOS],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_gpt2(tokenizer, folder: Path) -> None:
    """A random 2-layer, 32-wide GPT-2 (seed 0) with its tokenizer, laid out like a Hub checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=32, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def merge(base: dict, spec: dict) -> dict:
    out = dict(base)
    for key, value in spec.items():
        if value == DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def lora_base(p: "Probe", d: Path) -> dict:
    return {"name": "probe", "output_dir": str(d / "run"),
            "model": {"base": str(p.fix / "base")},
            "data": {"train": str(p.fix / "data/train.txt"), "validation": str(p.fix / "data/val.txt"),
                     "block_size": 32, "num_proc": 1},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "save_steps": 3, "lr": 1e-3,
                      **p.train_extra},
            "eval": {"max_examples": 8, "batch_size": 4},
            "generate": {"max_new_tokens": 8, "temperature": 0}}


def format_base(fmt: str, stem: str, extra: dict) -> Callable[["Probe", Path], dict]:
    """The LoRA recipe on `<stem>.jsonl` / `<stem>_val.jsonl` in data format `fmt`, 128-token rows."""
    def base(p: "Probe", d: Path) -> dict:
        data = {"train": str(p.fix / "data" / f"{stem}.jsonl"), "validation": str(p.fix / "data" / f"{stem}_val.jsonl"),
                "format": fmt, "block_size": 128, **extra}
        return merge(lora_base(p, d), {"data": data})
    return base


def scratch_base(p: "Probe", d: Path) -> dict:
    return merge(lora_base(p, d), {"model": {"base": DROP, "init": {"n_layer": 1, "n_head": 2, "n_embd": 16,
                                                                    "n_positions": 64}},
                                   "tokenizer": {"train": {"vocab_size": 320, "min_frequency": 1}}, "lora": None})


BASES: dict[str, Callable[["Probe", Path], dict]] = {
    "lora": lora_base,
    "full": lambda p, d: merge(lora_base(p, d), {"lora": None}),
    "scratch": scratch_base,
    "instruction": format_base("instruction", "instr", {"instruction": {"template": "Q: {instruction} {input}\nA:",
                                                                        "template_no_input": "Q: {instruction}\nA:"}}),
    "chat": format_base("chat", "chat", {}),
    "cls": format_base("classification", "cls", {"classification": {"labels": ["negative", "positive"]}}),
}


# ---------------------------------------------------------------------------------------------- the probe

class Probe:
    """Fixtures, trained runs and the subprocess environment for one checkout."""

    def __init__(self, checkout: Path, python: str, root: Path, timeout: float) -> None:
        self.checkout, self.python, self.root, self.timeout = checkout, python, root, timeout
        self.fix = root / "fixtures"
        self.env = {key: value for key, value in os.environ.items() if key != "FINETUNE_API_KEY"}
        self.env.update(PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                        TOKENIZERS_PARALLELISM="false", PYTHONPYCACHEPREFIX=str(root / "pycache"),
                        HF_HOME=str(root / "hf-home"), MPLCONFIGDIR=str(root / "mpl"))
        self.train_extra: dict = {}
        self.runs: dict[str, Path] = {}  # shared trained runs: name -> recipe
        self.can_mount = False
        self._server: tuple[subprocess.Popen, str, Path] | None = None

    # -- running
    def cli(self, args: list[str], cwd: Path, stdin: bytes | None = None, timeout: float | None = None) -> Proc:
        return run_proc([self.python, "-m", "finetune", *args], self.env, cwd, stdin, timeout or self.timeout)

    def make(self, target: str, variables: dict, cwd: Path, stdin: bytes | None = None) -> Proc:
        """A make target of the checkout, with the venv of `self.python` (its `.installed` stamp kept as is)."""
        venv = Path(self.python).parent.parent
        cmd = ["make", "-s", "-C", str(self.checkout), "-o", f"{venv}/.installed", f"VENV={venv}", target,
               *(f"{key}={value}" for key, value in variables.items())]
        return run_proc(cmd, self.env, cwd, stdin, self.timeout)

    def namespace(self, script: str, timeout: float | None = None) -> Proc:
        """A shell script in a private mount namespace (its mounts vanish with it)."""
        return run_proc(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], self.env, self.root,
                        None, timeout or 2 * self.timeout)

    def finetune_cmd(self, *args: str) -> str:
        return shlex.join([self.python, "-m", "finetune", *args])

    # -- fixtures
    def recipe(self, d: Path, spec: dict | None = None, base: str = "lora", file: str = "recipe.yaml") -> Path:
        path = d / file
        data = merge(BASES[base](self, d), fill(spec or {}, self, d))
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return path

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name / "run"

    def setup(self) -> None:
        build = self.root / "build"
        corpus = build_data(self.fix / "data")
        tokenizer = train_tokenizer(corpus, self.fix / "tok")
        save_tiny_gpt2(tokenizer, self.fix / "base")
        self.train_extra = {"report_to": "none"} if self.knows_report_to() else {}
        self.can_mount = bool(shutil.which("unshare")) and \
            self.namespace(f"mkdir -p {build} && mount -t tmpfs -o size=64k tmpfs {build}", 30).rc == 0
        for name, base, steps in (("lora", "lora", 4), ("full", "full", 2)):
            d = self.root / "runs" / name
            d.mkdir(parents=True)
            recipe = self.recipe(d, {"train": {"max_steps": steps, "save_steps": 2}}, base)
            require(self.cli(["train", str(recipe)], d), f"training the shared {name} run")
            self.runs[name] = recipe
        require(self.cli(["eval", str(self.runs["lora"])], self.root), "evaluating the shared lora run")

    def knows_report_to(self) -> bool:
        code = ("import dataclasses, sys; from finetune.recipe import TrainConfig; "
                "sys.exit(0 if 'report_to' in {f.name for f in dataclasses.fields(TrainConfig)} else 1)")
        return run_proc([self.python, "-c", code], self.env, self.root, timeout=120).rc == 0

    # -- the shared server for the HTTP cases
    def server(self) -> str | None:
        if self._server is None:
            port = free_port()
            log = self.root / "serve.log"
            with log.open("wb") as handle:
                proc = subprocess.Popen([self.python, "-m", "finetune", "serve", str(self.runs["lora"]), "--port",
                                         str(port)], cwd=self.root, env=self.env, stdout=handle,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            self._server = (proc, url, log)
            wait_for_health(proc, url, 120)
        proc, url, _ = self._server
        return url if proc.poll() is None else None

    def server_log(self) -> str:
        return self._server[2].read_text(errors="replace") if self._server else ""

    def close(self) -> None:
        if self._server is not None:
            kill_group(self._server[0])
            self._server[0].wait()


def require(proc: Proc, what: str) -> None:
    if proc.rc != 0:
        raise RuntimeError(f"{what} failed (exit {proc.rc}):\n{proc.out[-3000:]}")


def fill(value, p: Probe, d: Path):
    """Placeholders in case arguments and specs: @D = the case folder, @FIX = fixtures, @LORA / @FULL = shared runs."""
    if isinstance(value, str):
        return (value.replace("@D", str(d)).replace("@FIX", str(p.fix))
                .replace("@LORA", str(p.run_dir("lora"))).replace("@FULL", str(p.run_dir("full"))))
    if isinstance(value, dict):
        return {key: fill(item, p, d) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, p, d) for item in value]
    return value


def wait_for_health(proc: subprocess.Popen, url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if http(url + "/health", timeout=2)[0] == 200:
            return True
        time.sleep(0.5)
    return False


# ---------------------------------------------------------------------------------------------- case builders

def write_files(d: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(content)


def cli_case(cid: str, group: str, command: str, *args: str, base: str = "lora", run: str | None = None,
             spec: dict | None = None, files: dict | None = None, recipe_bytes: bytes | None = None,
             needles: tuple[str, ...] = (), expect: tuple[str, ...] = (CLEAR,), stdin: bytes | None = None,
             warning: str | None = None, what: str | None = None) -> Case:
    """`finetune COMMAND RECIPE ARGS...` on a fresh recipe (`base` + `spec`), a shared trained run, or raw bytes."""
    def probe(p: Probe, d: Path) -> Outcome:
        write_files(d, files or {})
        if recipe_bytes is not None:
            recipe = d / "bad-recipe.yaml"
            recipe.write_bytes(fill(recipe_bytes.decode("latin-1"), p, d).encode("latin-1"))
        else:
            recipe = p.runs[run] if run else p.recipe(d, spec, base)
        proc = p.cli([command, str(recipe), *(fill(a, p, d) for a in args)], d / "cwd", stdin)
        return classify(proc, expect, tuple(fill(n, p, d) for n in needles), warning)
    shown = " ".join(args)
    return Case(cid, group, what or f"`{command}` {'(shared ' + run + ' run) ' if run else ''}{shown}".strip(),
                probe, expect)


def serve_case(cid: str, group: str, *args: str, run: str | None = "lora", base: str = "lora",
               needles: tuple[str, ...] = (), expect: tuple[str, ...] = (CLEAR,), what: str | None = None,
               occupy: bool = False) -> Case:
    """Start `finetune serve`: an exit is classified as usual; a server that answers /health is `accepted` (or
    `ok`). `occupy`: another socket listens on the port first."""
    def probe(p: Probe, d: Path) -> Outcome:
        recipe = p.runs[run] if run else p.recipe(d, None, base)
        port = free_port()
        holder = socket.socket()
        if occupy:
            holder.bind(("127.0.0.1", port))
            holder.listen()
        extra = [fill(a, p, d) for a in args]
        if not any(a.startswith("--port") or a.startswith("serve.port") for a in extra):
            extra += ["--port", str(port)]
        try:
            return start_and_classify(p, [str(recipe), *extra], d, expect, needles)
        finally:
            holder.close()
    return Case(cid, group, what or f"`serve` {' '.join(args)}".strip(), probe, expect)


def start_and_classify(p: Probe, args: list[str], d: Path, expect: tuple[str, ...],
                       needles: tuple[str, ...]) -> Outcome:
    log = d / "serve.log"
    start = time.monotonic()
    with log.open("wb") as handle:
        proc = subprocess.Popen([p.python, "-m", "finetune", "serve", *args], cwd=d / "cwd", env=p.env, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        url = wait_until_serving(proc, log, 90)
        running = proc.poll() is None
        kill_group(proc)
        proc.wait()
    if running:
        kind = (OK if OK in expect else ACCEPTED) if url else HANG
        return Outcome(kind, f"the server answered /health on {url}" if url else "still running, not answering")
    out = log.read_text(errors="replace")
    return classify(Proc(proc.returncode, out, time.monotonic() - start), expect, needles)


def wait_until_serving(proc: subprocess.Popen, log: Path, seconds: float) -> str | None:
    """The URL the server reports (uvicorn's 'running on' line) once /health answers there; None if it never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        match = re.search(r"running on (http://[\w.\[\]:]+:\d+)", log.read_text(errors="replace"))
        if match and http(match.group(1) + "/health", timeout=2)[0] == 200:
            return match.group(1)
        time.sleep(0.5)
    return None


def make_case(cid: str, target: str, variables: dict, check: Callable[[Probe, Path], str | None] | None = None,
              fresh: bool = False, stdin: bytes | None = None, expect: tuple[str, ...] = (OK,),
              needles: tuple[str, ...] = ()) -> Case:
    """`make TARGET RECIPE=... VAR=...` on the checkout, with the shared LoRA run or (`fresh`) a new recipe;
    `check` returns a complaint when an override was lost."""
    def probe(p: Probe, d: Path) -> Outcome:
        recipe = p.recipe(d) if fresh else p.runs["lora"]
        proc = p.make(target, {"RECIPE": str(recipe), **fill(variables, p, d)}, d / "cwd", stdin)
        outcome = classify(proc, expect, needles)
        if outcome.kind == OK and check is not None:
            complaint = check(p, d)
            if complaint:
                return Outcome(ACCEPTED, f"exit 0 but {complaint}")
        return outcome
    shown = " ".join(f"{key}={shlex.quote(str(value))}" for key, value in variables.items())
    return Case(cid, G_MAKE, f"`make {target} {shown}`", probe, expect)


# ---------------------------------------------------------------------------------------------- recipe values

TRAIN_VALUES = [  # (overrides, key the message must name): `train` on the tiny LoRA recipe
    (["train.lr=-1"], "train.lr"), (["train.lr=0"], "train.lr"), (["train.lr=.nan"], "train.lr"),
    (["train.lr=.inf"], "train.lr"), (["train.lr=fast"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size"), (["train.batch_size=-4"], "train.batch_size"),
    (["train.batch_size=1.5"], "train.batch_size"), (["train.grad_accum=0"], "train.grad_accum"),
    (["train.max_steps=0", "train.epochs=0"], "train.max_steps"),
    (["train.max_steps=-1", "train.epochs=-1"], "train.epochs"),
    (["train.max_steps=-5"], "train.max_steps"), (["train.save_steps=0"], "train.save_steps"),
    (["train.eval_batch_size=0"], "train.eval_batch_size"), (["train.max_grad_norm=-1"], "train.max_grad_norm"),
    (["train.dataloader_workers=-1"], "train.dataloader_workers"), (["train.logging_steps=0"], "train.logging_steps"),
    (["train.warmup_steps=-1"], "train.warmup_steps"), (["train.warmup_ratio=1.5"], "train.warmup_ratio"),
    (["train.warmup_steps=2", "train.warmup_ratio=0.1"], "warmup"), (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.save_total_limit=0"], "train.save_total_limit"),
    (["train.early_stopping_patience=0"], "train.early_stopping_patience"),
    (["train.eval_steps=-1"], "train.eval_steps"),
    (["train.save_steps=3", "train.eval_steps=2"], "train.save_steps"), (["train.loss_chunk=0"], "train.loss_chunk"),
    (["train.scheduler=bogus"], "train.scheduler"), (["train.resume=@D/no-such-checkpoint"], "train.resume"),
    (["train.extra.optimm=adamw_torch"], "train.extra.optimm"),
    (["train.extra.learning_rate=0.1"], "train.extra.learning_rate"),
    (["train.extra.output_dir=x"], "train.extra.output_dir"),
    (["lora.r=0"], "lora.r"), (["lora.r=-2"], "lora.r"), (["lora.alpha=0"], "lora.alpha"),
    (["lora.dropout=2.0"], "lora.dropout"), (["lora.dropout=-0.1"], "lora.dropout"),
    (["lora.targets=[no_such_module]"], "lora.targets"), (["lora.targets=bogus"], "lora.targets"),
    (["lora.bias=bogus"], "lora.bias"), (["model.dtype=float8"], "model.dtype"),
    (["model.attn_implementation=bogus"], "model.attn_implementation"),
    (["data.block_size=0"], "data.block_size"), (["data.block_size=4"], "data.block_size"),
    (["data.block_size=256"], "block_size"),  # above the base model's 128 positions
    (["data.validation_fraction=0"], "data.validation_fraction"),
    (["data.validation_fraction=1.5"], "data.validation_fraction"), (["data.max_records=0"], "data.max_records"),
    (["data.num_proc=0"], "data.num_proc"), (["data.shard_tokens=0"], "data.shard_tokens"),
    (["data.format=bogus"], "data.format"), (["data.sample_by=bogus"], "data.sample_by"),
    (["data.overflow=bogus"], "data.overflow"),
]
SCRATCH_VALUES = [  # `train` on the tiny from-scratch recipe
    (["model.init={n_layer: 1, n_head: 4, n_embd: 30, n_positions: 64}"], "model.init.n_embd"),
    (["model.init={n_layers: 1, n_head: 2, n_embd: 16, n_positions: 64}"], "model.init.n_layers"),
    (["model.init={n_layer: 0, n_head: 2, n_embd: 16, n_positions: 64}"], "model.init.n_layer"),
    (["model.init={n_layer: 1, n_head: two, n_embd: 16, n_positions: 64}"], "model.init"),
    (["model.init=[1, 2]"], "model.init"),
    (["model.init={n_layer: 1, n_head: 2, n_embd: 16, n_positions: 16}"], "block_size|n_positions"),
    (["tokenizer.train.vocab_size=0"], "tokenizer.train.vocab_size"),
    (["tokenizer.train.vocab_size=100"], "tokenizer.train.vocab_size"),
    (["tokenizer.train.min_frequency=0"], "tokenizer.train.min_frequency"),
]
EVAL_VALUES = [(["eval.batch_size=0"], "eval.batch_size"), (["eval.stride=0"], "eval.stride"),
               (["eval.stride=999"], "eval.stride"), (["eval.shots=-1"], "eval.shots"),
               (["eval.max_examples=0"], "eval.max_examples"), (["eval.max_new_tokens=0"], "eval.max_new_tokens")]
GENERATE_VALUES = [(["generate.max_new_tokens=0"], "max_new_tokens"), (["generate.temperature=-1"], "temperature"),
                   (["generate.top_p=1.5"], "top_p"), (["generate.top_p=0"], "top_p"), (["generate.top_k=-1"], "top_k"),
                   (["generate.repetition_penalty=0"], "repetition_penalty"), (["generate.stop=5"], "generate.stop")]
SERVE_VALUES = [(["serve.port=0"], "serve.port"), (["serve.port=70000"], "serve.port"),
                (["serve.max_new_tokens_cap=0"], "max_new_tokens_cap"),
                (["serve.max_batch_size=0"], "serve.max_batch_size")]


def value_cases() -> list[Case]:
    cases: list[Case] = []
    tables = [("train", "lora", TRAIN_VALUES, ()), ("train", "scratch", SCRATCH_VALUES, ()),
              ("eval", None, EVAL_VALUES, ()), ("generate", None, GENERATE_VALUES, ("--prompt", "hello"))]
    for command, base, table, options in tables:
        for overrides, key in table:
            cid = f"V{len(cases) + 1:02d}"
            if base:
                cases.append(cli_case(cid, G_VALUE, command, *overrides, *options, base=base, needles=(key,),
                                      what=f"`{command}` ({base}) {' '.join(overrides)}"))
            else:
                cases.append(cli_case(cid, G_VALUE, command, *overrides, *options, run="lora", needles=(key,)))
    for overrides, key in SERVE_VALUES:
        cases.append(serve_case(f"V{len(cases) + 1:02d}", G_VALUE, *overrides, needles=(key,)))
    cases.append(cli_case(f"V{len(cases) + 1:02d}", G_VALUE, "prepare", files={"obj.jsonl": OBJECT_TEXT},
                          spec={"data": {"train": "@D/obj.jsonl"}}, needles=("obj.jsonl", "line 2"),
                          what="`prepare` with a JSON object in the text field (obj.jsonl line 2)"))
    cases.append(cli_case(f"V{len(cases) + 1:02d}", G_VALUE, "train", "model.dtype=float16", expect=(OK,),
                          warning=r"float16.*(CPU|CUDA)",
                          what="`train` model.dtype=float16 on CPU (a warning, exit 0)"))
    return cases


OBJECT_TEXT = b'{"text": "kalo mine"}\n{"text": {"nested": "object"}}\n{"text": "ruta so"}\n'


# ---------------------------------------------------------------------------------------------- one clear line

def line_cases() -> list[Case]:
    long_prompt = " ".join(["kalo"] * 3000)
    cases = [
        cli_case("L01", G_LINE, "prepare", recipe_bytes=b"name: caf\xe9\nmodel: {base: x}\n",
                 needles=("bad-recipe.yaml",),
                 what="`prepare` on a recipe that is not UTF-8 (Latin-1 byte)"),
        cli_case("L02", G_LINE, "prepare", recipe_bytes=b"extends: parent.yaml\nname: probe\n",
                 files={"parent.yaml": b"model:\n  base: caf\xe9\n"}, needles=("parent.yaml",),
                 what="`prepare` on a recipe whose `extends:` parent is not UTF-8"),
        cli_case("L03", G_LINE, "generate", "--prompt-file", "@D/prompts.bin", run="lora",
                 files={"prompts.bin": b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfd binary\n"}, needles=("prompts.bin",)),
        cli_case("L04", G_LINE, "generate", "--prompt-file", "@D/missing.txt", run="lora", needles=("missing.txt",)),
        cli_case("L05", G_LINE, "generate", "--prompt-file", "@D/empty.txt", run="lora", files={"empty.txt": b"\n\n"},
                 needles=("empty.txt",)),
        cli_case("L06", G_LINE, "generate", "--prompt-file", "@D/adir", run="lora", files={"adir": None},
                 needles=("adir",)),
        cli_case("L07", G_LINE, "chat", run="lora", stdin=b"hello \xff\xfe there\n/exit\n", needles=("UTF-8|stdin",),
                 expect=CLEAN, warning="UTF-8", what="`chat` (shared lora run) with invalid UTF-8 on stdin (a line "
                 "naming it; skipping the line is fine)"),
        cli_case("L08", G_LINE, "eval", "--model", "@D/not-a-model", run="lora", files={"not-a-model": None},
                 needles=("not-a-model",), what="`eval --model` on an empty folder"),
        cli_case("L09", G_LINE, "eval", "--model", "@D/notes.txt", run="lora", files={"notes.txt": b"hello\n"},
                 needles=("notes.txt",), what="`eval --model` on a text file"),
        cli_case("L10", G_LINE, "eval", "--model", "@D/no-such-folder", run="lora", needles=("no-such-folder",)),
        cli_case("L11", G_LINE, "eval", "--model", "@D/broken", run="lora",
                 files={"broken/config.json": b"{not json", "broken/model.safetensors": b"garbage"},
                 needles=("broken",), what="`eval --model` on a folder with a broken config.json and weights"),
        serve_case("L12", G_LINE, "--port", "99999", needles=("port",)),
        serve_case("L13", G_LINE, "--port", "-1", needles=("port",)),
        cli_case("L14", G_LINE, "generate", "--prompt", "hi", "--num-samples", "0", run="lora",
                 needles=("num.samples",)),
        cli_case("L15", G_LINE, "generate", "--prompt", "hi", "--max-new-tokens", "0", run="lora",
                 needles=("max.new.tokens",)),
        cli_case("L16", G_LINE, "generate", "--prompt", "hi", "--temperature", "-1", run="lora",
                 needles=("temperature",)),
        cli_case("L17", G_LINE, "generate", "--prompt", "hi", "--top-p", "1.5", run="lora", needles=("top.p",)),
        cli_case("L18", G_LINE, "generate", "--prompt", "hi", "--top-k", "-1", run="lora", needles=("top.k",)),
        cli_case("L19", G_LINE, "generate", "--prompt", "hi", "--repetition-penalty", "0", run="lora",
                 needles=("repetition.penalty",)),
        cli_case("L20", G_LINE, "generate", "--prompt", "hi", "--seed", "-1", run="lora", expect=CLEAN,
                 needles=("seed",)),
        cli_case("L21", G_LINE, "generate", "--prompt", "hi", needles=("final",),
                 what="`generate` before any training"),
        cli_case("L22", G_LINE, "chat", stdin=b"hi\n", needles=("final",), what="`chat` before any training"),
        serve_case("L23", G_LINE, run=None, needles=("final",), what="`serve` before any training"),
        cli_case("L24", G_LINE, "merge", needles=("final",), what="`merge` before any training"),
        cli_case("L25", G_LINE, "push", "--repo", "probe-user/probe", "--dry-run", needles=("final",),
                 what="`push --dry-run` before any training"),
        cli_case("L26", G_LINE, "merge", run="full", expect=CLEAN,
                 what="`merge` on a full fine-tuning run (no adapter)"),
        cli_case("L27", G_LINE, "push", "--dry-run", run="lora", needles=("--repo",), what="`push` without --repo"),
        cli_case("L28", G_LINE, "eval", "eval.files=[@D/missing.txt]", run="lora", needles=("missing.txt",)),
        cli_case("L29", G_LINE, "eval", "eval.files=[@D/latin1.txt]", run="lora",
                 files={"latin1.txt": b"caf\xe9 au lait\n"},
                 needles=("latin1.txt",)),
        cli_case("L30", G_LINE, "generate", "--prompt", long_prompt, run="lora", expect=(OK,),
                 what="`generate` with a 3000-word prompt (longer than the context)"),
        cli_case("L31", G_LINE, "push", "--repo", "not a repo id!!", "--dry-run", "--merged", run="lora", expect=CLEAN,
                 needles=("repo",), what="`push --dry-run --merged --repo 'not a repo id!!'`"),
        cli_case("L32", G_LINE, "bogus-command", expect=(CLEAR,), needles=("bogus-command|invalid choice",)),
        cli_case("L33", G_OS, "prepare", spec={"output_dir": "@D/afile"}, files={"afile": b"x"}, expect=(CLEAR,),
                 needles=("afile",), what="`prepare` with output_dir an existing file"),
        cli_case("L34", G_OS, "prepare", spec={"output_dir": "@D/afile/run"}, files={"afile": b"x"}, expect=(CLEAR,),
                 needles=("afile",), what="`prepare` with output_dir under a file"),
    ]
    return cases


# ---------------------------------------------------------------------------------------------- OS faults

def storage_case(cid: str, what: str, body: Callable[[Probe, Path], Outcome]) -> Case:
    def probe(p: Probe, d: Path) -> Outcome:
        if not p.can_mount:
            return Outcome(SKIPPED, "no private mount namespace here (needs root and unshare)")
        return body(p, d)
    return Case(cid, G_OS, what, probe)


def read_only(p: Probe, folder: Path, command: str) -> Proc:
    script = (f"mkdir -p {shlex.quote(str(folder))} && mount --bind {folder} {folder} && "
              f"mount -o remount,ro,bind {folder} {folder} && cd {shlex.quote(str(folder.parent))} && exec {command}")
    return p.namespace(script)


def ro_prepare(p: Probe, d: Path) -> Outcome:
    recipe = p.recipe(d)
    return classify(read_only(p, d / "run", p.finetune_cmd("prepare", str(recipe))), (CLEAR,), ("Read-only", "/run"))


def ro_train(p: Probe, d: Path) -> Outcome:
    recipe = p.recipe(d)
    prepared = p.cli(["prepare", str(recipe)], d / "cwd")
    if prepared.rc != 0:
        return Outcome(SETUP, classify(prepared, (OK,)).detail)
    return classify(read_only(p, d / "run", p.finetune_cmd("train", str(recipe))), (CLEAR,), ("Read-only", "/run"))


def ro_shared(command: str, *args: str) -> Callable[[Probe, Path], Outcome]:
    def body(p: Probe, d: Path) -> Outcome:
        proc = read_only(p, p.run_dir("lora"), p.finetune_cmd(command, str(p.runs["lora"]), *args))
        return classify(proc, (CLEAR,), ("Read-only", "/run"))
    return body


def full_disk_prepare(p: Probe, d: Path) -> Outcome:
    """prepare into a 64 KB tmpfs, then again after the tmpfs grows: one clear line, then a complete store."""
    recipe = p.recipe(d, {"data": {"train": "@FIX/data/big.txt", "shard_tokens": 4000}})
    run = shlex.quote(str(d / "run"))
    prepare = p.finetune_cmd("prepare", str(recipe))
    script = (f"mkdir -p {run} && mount -t tmpfs -o size=64k tmpfs {run} && {prepare}; echo @@rc=$?; "
              f"mount -o remount,size=256m {run} && {prepare}; echo @@rc=$?")
    return split_two_runs(p.namespace(script), ("No space left", "/run"), "the rerun with space")


def full_disk_checkpoint(p: Probe, d: Path) -> Outcome:
    """Full fine-tuning whose checkpoint does not fit: the run folder on a tmpfs 64 KB larger than the prepared
    data; then the tmpfs grows and train runs again."""
    recipe = p.recipe(d, {"train": {"max_steps": 2, "save_steps": 2}}, base="full")
    prepared = p.cli(["prepare", str(recipe)], d / "cwd")
    if prepared.rc != 0:
        return Outcome(SETUP, classify(prepared, (OK,)).detail)
    run, stash = d / "run", d / "stash"
    run.rename(stash)
    train = p.finetune_cmd("train", str(recipe))
    q = shlex.quote
    script = (f"mkdir -p {q(str(run))} && mount -t tmpfs -o size=256m tmpfs {q(str(run))} && "
              f"cp -a {q(str(stash))}/. {q(str(run))}/ && used=$(du -sk {q(str(run))} | cut -f1) && "
              f"mount -o remount,size=$((used + 64))k {q(str(run))} && {train}; echo @@rc=$?; "
              f"mount -o remount,size=256m {q(str(run))} && {train}; echo @@rc=$?")
    return split_two_runs(p.namespace(script), ("No space left", "/run"), "the rerun with space")


def split_two_runs(proc: Proc, needles: tuple[str, ...], second: str) -> Outcome:
    parts = re.split(r"^@@rc=(\d+)$", proc.out, flags=re.MULTILINE)
    if proc.rc is None or len(parts) < 5:
        return classify(proc, (CLEAR,), needles)
    first = classify(Proc(int(parts[1]), parts[0], proc.seconds), (CLEAR,), needles)
    return combine(first, Proc(int(parts[3]), parts[2], proc.seconds), second)


def storage_cases() -> list[Case]:
    return [
        storage_case("O01", "`prepare` with a read-only output_dir", ro_prepare),
        storage_case("O02", "`train` on prepared data in a read-only run folder", ro_train),
        storage_case("O03", "`eval` (shared lora run) with its run folder read-only", ro_shared("eval")),
        storage_case("O04", "`merge` (shared lora run) with its run folder read-only", ro_shared("merge")),
        storage_case("O05", "`push --dry-run --merged` with the run folder read-only",
                     ro_shared("push", "--repo", "probe-user/probe", "--dry-run", "--merged")),
        storage_case("O06", "`prepare` onto a full disk (64 KB tmpfs), then again with space", full_disk_prepare),
        storage_case("O07", "`train` whose checkpoint save fills the disk, then again with space",
                     full_disk_checkpoint),
    ]


# ---------------------------------------------------------------------------------------------- make targets

def manifest_block_size(expected: int) -> Callable[[Probe, Path], str | None]:
    def check(p: Probe, d: Path) -> str | None:
        path = d / "run" / "prepared" / "manifest.json"
        found = json.loads(path.read_text()).get("block_size") if path.is_file() else None
        return None if found == expected else f"prepared block_size is {found}, not {expected}"
    return check


def last_metrics_step(expected: int) -> Callable[[Probe, Path], str | None]:
    def check(p: Probe, d: Path) -> str | None:
        path = d / "run" / "metrics.jsonl"
        steps = [json.loads(line).get("step") for line in path.read_text().splitlines() if line.strip()] \
            if path.is_file() else []
        return None if steps and max(steps) == expected else f"metrics.jsonl ends at step {max(steps or [None])}"
    return check


def make_cases() -> list[Case]:
    final = "@LORA/final"
    chat_in = b"hello\n/exit\n"
    return [
        make_case("M01", "prepare", {"ARGS": "--force data.block_size=16"}, manifest_block_size(16), fresh=True),
        make_case("M02", "generate", {"PROMPT": "hello", "ARGS": "generate.max_new_tokens=5"}),
        make_case("M03", "generate", {"PROMPT": "hello", "ARGS": "--max-new-tokens 3 generate.temperature=0"}),
        make_case("M04", "train", {"ARGS": "train.max_steps=2"}, last_metrics_step(2), fresh=True),
        make_case("M05", "eval", {"ARGS": f"eval.max_examples=4 --model {final}"}),
        make_case("M06", "eval", {"ARGS": f"--model {final} eval.max_examples=4"}),
        make_case("M07", "chat", {"ARGS": "generate.max_new_tokens=3"}, stdin=chat_in),
        make_case("M08", "chat", {"ARGS": "--max-new-tokens 3 generate.temperature=0"}, stdin=chat_in),
        make_case("M09", "merge", {"ARGS": "generate.max_new_tokens=3"}),
        make_case("M10", "push", {"REPO": "probe-user/probe", "ARGS": "--dry-run --merged generate.max_new_tokens=3"}),
        make_case("M11", "prepare", {"ARGS": "--force stray"}, fresh=True, expect=(CLEAR,), needles=("stray",)),
        make_case("M12", "prepare", {"ARGS": "data.block_size=16"}, manifest_block_size(16), fresh=True),
    ]


# ---------------------------------------------------------------------------------------------- reruns

def train_then(p: Probe, d: Path, spec: dict | None = None, base: str = "lora") -> tuple[Path, Outcome | None]:
    """A fresh run trained for 4 steps (checkpoints at 2 and 4); the outcome is set when that failed."""
    recipe = p.recipe(d, merge({"train": {"max_steps": 4, "save_steps": 2}}, spec or {}), base)
    first = p.cli(["train", str(recipe)], d / "cwd")
    return recipe, None if first.rc == 0 else Outcome(SETUP, "first train: " + classify(first, (OK,)).detail)


def weights_digest(final: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(final.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def max_metrics_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)


def resumed_old_run(proc: Proc, run: Path, old_final: str) -> str | None:
    """Why a rerun (of a 4-step run, after a change) looks like it went on from the old checkpoints, or None."""
    line = next((line.strip() for line in proc.out.splitlines() if re.search(r"resuming from", line, re.I)), None)
    if line:
        return line[:160]
    if max_metrics_step(run) > 4:
        return f"went on from the old checkpoint to step {max_metrics_step(run)} of train.max_steps 4"
    if weights_digest(run / "final") == old_final:
        return "final/ is byte-identical to the old model"
    return None


def rerun_case(cid: str, what: str, change: Callable[[Probe, Path], list[str]], base: str = "lora",
               expect: tuple[str, ...] = CLEAN, spec: dict | None = None, may_resume: bool = False) -> Case:
    """Train 4 steps, change something (`change` edits files and returns the rerun's overrides), train again:
    refusing or starting over is right; going on from the old checkpoints is stale reuse (unless `may_resume`)."""
    def probe(p: Probe, d: Path) -> Outcome:
        recipe, failed = train_then(p, d, spec, base)
        if failed:
            return failed
        old_final = weights_digest(d / "run" / "final")
        proc = p.cli(["train", str(recipe), *change(p, d)], d / "cwd")
        outcome = classify(proc, expect)
        reason = resumed_old_run(proc, d / "run", old_final) if outcome.kind == OK and not may_resume else None
        return Outcome(STALE, f"exit 0: {reason}") if reason else outcome
    return Case(cid, G_RERUN, what, probe, expect)


def own_data(spec_key: str = "train") -> dict:
    return {"data": {spec_key: "@D/train.txt"}}


def append_data(p: Probe, d: Path) -> list[str]:
    with (d / "train.txt").open("a") as handle:
        handle.write((p.fix / "data/more.txt").read_text())
    return []


def copy_data(p: Probe, d: Path) -> None:
    shutil.copy(p.fix / "data/train.txt", d / "train.txt")


def with_own_data(case: Case) -> Case:
    inner = case.probe

    def probe(p: Probe, d: Path) -> Outcome:
        copy_data(p, d)
        return inner(p, d)
    case.probe = probe
    return case


def eval_checkpoint(tokenizer_change: bool) -> Callable[[Probe, Path], Outcome]:
    def probe(p: Probe, d: Path) -> Outcome:
        recipe, failed = train_then(p, d, base="scratch")
        if failed:
            return failed
        checkpoints = sorted((d / "run" / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
        if not checkpoints:
            return Outcome(SETUP, "no checkpoint was kept")
        extra = ["tokenizer.train.vocab_size=290"] if tokenizer_change else []
        proc = p.cli(["eval", str(recipe), *extra, "--model", str(checkpoints[-1])], d / "cwd")
        return classify(proc, (CLEAR,) if tokenizer_change else (OK,), ("checkpoint|tokenizer",))
    return probe


def two_trains(p: Probe, d: Path) -> Outcome:
    """Two `train` of one recipe at once: the second must refuse while the first runs (a long run, killed at the
    end); a second that is still training after 90 s is accepted input, with metrics.jsonl written by both."""
    recipe = p.recipe(d, {"train": {"max_steps": 20000, "save_steps": 10000, "logging_steps": 50}})
    prepared = p.cli(["prepare", str(recipe)], d / "cwd")
    if prepared.rc != 0:
        return Outcome(SETUP, classify(prepared, (OK,)).detail)
    first = spawn(p, ["train", str(recipe)], d / "first.log", d / "cwd")
    metrics = d / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.2)
    if first.poll() is not None:
        return Outcome(SETUP, "the first train ended first: " + last_line((d / "first.log").read_text()))
    start = time.monotonic()
    second = spawn(p, ["train", str(recipe)], d / "second.log", d / "cwd")
    try:
        second.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    seconds = time.monotonic() - start
    for proc in (second, first):
        kill_group(proc)
        proc.wait()
    out = (d / "second.log").read_text(errors="replace")
    if second.returncode is not None and second.returncode < 0:  # killed by us: it was still training
        return Outcome(ACCEPTED, f"the second train ran alongside the first for {seconds:.0f} s; "
                                 f"{doubled_steps(metrics)} metrics.jsonl steps written twice")
    return classify(Proc(second.returncode, out, seconds), (CLEAR,), ("train|lock|running",))


def spawn(p: Probe, args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as handle:
        return subprocess.Popen([p.python, "-m", "finetune", *args], cwd=cwd, env=p.env, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def doubled_steps(path: Path) -> int:
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
             if line.strip() and '"loss"' in line] if path.is_file() else []
    return len(steps) - len(set(steps))


def same_again(p: Probe, d: Path) -> Outcome:
    """A finished run trained again with the same recipe: nothing more to do, no step past train.max_steps."""
    recipe, failed = train_then(p, d)
    if failed:
        return failed
    outcome = classify(p.cli(["train", str(recipe)], d / "cwd"), (OK,))
    path = d / "run" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    if outcome.kind == OK and max(steps) > 4:
        return Outcome(STALE, f"exit 0 but trained on to step {max(steps)} of train.max_steps 4")
    return outcome


def rerun_cases() -> list[Case]:
    new_init = "model.init={n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}"
    return [
        with_own_data(rerun_case("R01", "`train`, append lines to the data file, `train` again", append_data,
                                 spec=own_data())),
        rerun_case("R02", "`train`, then `train train.lr=0.005`", lambda p, d: ["train.lr=0.005"]),
        rerun_case("R03", "`train`, then `train lora.r=8`", lambda p, d: ["lora.r=8"]),
        rerun_case("R04", "`train`, then `train train.seed=7`", lambda p, d: ["train.seed=7"]),
        rerun_case("R05", "`train` (scratch), then `train` with a wider model.init", lambda p, d: [new_init],
                   base="scratch"),
        rerun_case("R06", "`train`, then `train data.block_size=16`", lambda p, d: ["data.block_size=16"]),
        rerun_case("R07", "`train`, then `train train.max_steps=6` (allowed change: resumes)",
                   lambda p, d: ["train.max_steps=6"], expect=(OK,), may_resume=True),
        with_own_data(rerun_case("R08", "`train`, append to the data, `train train.resume=never`",
                                 lambda p, d: append_data(p, d) + ["train.resume=never"], spec=own_data(),
                                 expect=(OK,))),
        Case("R09", G_RERUN, "`eval --model <checkpoint>` of the same run (scratch)", eval_checkpoint(False), (OK,)),
        Case("R10", G_RERUN, "`eval tokenizer.train.vocab_size=290 --model <checkpoint>` (tokenizer changed)",
             eval_checkpoint(True), (CLEAR,)),
        Case("R11", G_RERUN, "two `train` of one recipe at once", two_trains, (CLEAR,)),
        Case("R12", G_RERUN, "`train` a finished run again, same recipe (max_steps 4)", same_again, (OK,)),
    ]


# ---------------------------------------------------------------------------------------------- leaks

LOCAL_PATH = re.compile(r"(?<![\w.])(/tmp/|/work/|/home/|/root/|/var/folders/)\S*")


def path_leaks(folder: Path, root: Path) -> list[str]:
    """Files under `folder` whose text holds an absolute local path (the probe's temp root or a usual prefix)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", "ignore")
        match = LOCAL_PATH.search(text) or (re.search(re.escape(str(root)) + r"\S*", text))
        if match:
            found.append(f"{path.relative_to(folder)}: {match.group(0)[:80]}")
    return found


def upload_leak(command: str, *args: str, run: str = "lora", folder: str = "hub") -> Callable[[Probe, Path], Outcome]:
    def probe(p: Probe, d: Path) -> Outcome:
        proc = p.cli([command, str(p.runs[run]), *args], d / "cwd")
        outcome = classify(proc, (OK,))
        if outcome.kind != OK:
            return outcome
        leaks = path_leaks(p.run_dir(run) / folder, p.root)
        return Outcome(LEAK, f"{len(leaks)} files: " + "; ".join(leaks[:3])) if leaks else outcome
    return probe


def name_leak(name: str, leaked: str, expect: tuple[str, ...] = (CLEAR,)) -> Callable[[Probe, Path], Outcome]:
    """`prepare` with `name` and no output_dir, from cwd = <case>/cwd: the run must not land at `leaked`."""
    def probe(p: Probe, d: Path) -> Outcome:
        recipe = p.recipe(d, {"name": fill(name, p, d), "output_dir": DROP})
        proc = p.cli(["prepare", str(recipe)], d / "cwd")
        outcome = classify(proc, expect, ("name",))
        target = Path(fill(leaked, p, d))
        if target.exists():
            return Outcome(LEAK, f"exit {proc.rc}; the run folder was written to {target.relative_to(p.root)}")
        return outcome
    return probe


def leftover_folders(run: Path) -> list[str]:
    return sorted(path.name for pattern in ("prepared.tmp-*", "prepared.old-*", "prepared.partial")
                  for path in run.glob(pattern))


def planted_leftovers(p: Probe, d: Path) -> Outcome:
    recipe = p.recipe(d)
    if p.cli(["prepare", str(recipe)], d / "cwd").rc != 0:
        return Outcome(SETUP, "prepare failed")
    for name in ("prepared.tmp-99999", "prepared.old-99999"):
        write_files(d / "run", {f"{name}/train/a-00000.tokens": os.urandom(4096)})
    proc = p.cli(["prepare", str(recipe), "--force"], d / "cwd")
    outcome = classify(proc, (OK,))
    left = leftover_folders(d / "run")
    return Outcome(LEAK, f"exit {proc.rc}; still there: {', '.join(left)}") if outcome.kind == OK and left else outcome


def failed_then_fixed(p: Probe, d: Path) -> Outcome:
    """A prepare that fails on a bad row, then the row fixed and prepare run again: no temporary folder is left."""
    rows = [json.dumps({"text": line}) for line in (p.fix / "data/train.txt").read_text().splitlines()]
    (d / "rows.jsonl").write_text("\n".join(rows[:150] + ['{"text": "torn'] + rows[150:]) + "\n")
    recipe = p.recipe(d, {"data": {"train": "@D/rows.jsonl"}})
    failed = p.cli(["prepare", str(recipe)], d / "cwd")
    if failed.rc == 0:
        return Outcome(ACCEPTED, "the broken line 151 was accepted")
    (d / "rows.jsonl").write_text("\n".join(rows) + "\n")
    proc = p.cli(["prepare", str(recipe)], d / "cwd")
    outcome = classify(proc, (OK,))
    left = leftover_folders(d / "run")
    if outcome.kind == OK and left:
        return Outcome(LEAK, f"first exit {failed.rc}, rerun exit 0; still there: {', '.join(left)}")
    return outcome


def leak_cases() -> list[Case]:
    return [
        Case("K01", G_LEAK, "`push --dry-run --merged` (lora run): local paths in hub/",
             upload_leak("push", "--repo", "probe-user/probe", "--dry-run", "--merged"), (OK,)),
        Case("K02", G_LEAK, "`push --dry-run --base-model probe-user/tiny` (adapter): local paths in hub/",
             upload_leak("push", "--repo", "probe-user/probe", "--dry-run", "--base-model", "probe-user/tiny"), (OK,)),
        Case("K03", G_LEAK, "`push --dry-run` (full fine-tuning run): local paths in hub/",
             upload_leak("push", "--repo", "probe-user/probe", "--dry-run", run="full"), (OK,)),
        Case("K04", G_LEAK, "`merge` (lora run): local paths in merged/", upload_leak("merge", folder="merged"), (OK,)),
        Case("K05", G_LEAK, "`prepare` with `name: ../../x` and no output_dir", name_leak("../../x", "@D/x")),
        Case("K06", G_LEAK, "`prepare` with `name: ..` and no output_dir", name_leak("..", "@D/cwd/prepared")),
        Case("K07", G_LEAK, "`prepare` with `name: <absolute path>` and no output_dir",
             name_leak("@D/abs-run", "@D/abs-run")),
        Case("K08", G_LEAK, "`prepare` with `name: a/b` (stays under outputs/)", name_leak("a/b", "@D/a", CLEAN),
             CLEAN),
        Case("K09", G_LEAK, "leftover prepared.tmp-*/prepared.old-* folders, then `prepare --force`", planted_leftovers,
             (OK,)),
        Case("K10", G_LEAK, "`prepare` fails on a bad row, the row is fixed, `prepare` again: leftovers",
             failed_then_fixed, (OK,)),
    ]


# ---------------------------------------------------------------------------------------------- data errors

CHAT_OK = b'{"messages": [{"role": "user", "content": "kalo"}, {"role": "assistant", "content": "mine"}]}\n'
DATA_ERRORS = [  # (file, content (None: a folder), base, needles, what)
    ("ragged.csv", b"text,label\nkalo mine,0\nruta,so,vi,1\n", "cls", ("ragged.csv", "line|row"),
     "ragged CSV (line 3)"),
    ("ragged.tsv", b"text\tlabel\nkalo mine\t0\nruta\tso\tvi\t1\n", "cls", ("ragged.tsv", "line|row"), "ragged TSV"),
    ("badline.jsonl", b'{"text": "kalo"}\n{"text": "mine"}\n{"text": "ruta\n{"text": "so"}\n', "lora",
     ("badline.jsonl", "line 3"), "JSONL with a broken line 3"),
    ("scalar.json", b"42\n", "lora", ("scalar.json",), "a JSON scalar"),
    ("numbers.json", b"[1, 2, 3]\n", "lora", ("numbers.json",), "a JSON array of numbers"),
    ("broken.json", b'[{"text": "kalo"}, {"text": ', "lora", ("broken.json",), "invalid JSON"),
    ("empty.txt", b"", "lora", ("empty.txt",), "an empty .txt"),
    ("blank.txt", b"\n   \n\n", "lora", ("blank.txt",), "a .txt of blank lines"),
    ("number.jsonl", b'{"text": "kalo"}\n{"text": 5}\n', "lora", ("number.jsonl", "line 2"),
     "a number in the text field (taking it as text is fine)"),
    ("notext.jsonl", b'{"body": "kalo"}\n{"body": "mine"}\n', "lora", ("notext.jsonl", "text"), "no text field"),
    ("latin1.txt", b"kalo mine\ncaf\xe9\n", "lora", ("latin1.txt",), "a .txt that is not UTF-8"),
    ("latin1.jsonl", b'{"text": "kalo"}\n{"text": "caf\xe9"}\n{"text": "mine"}\n', "lora", ("latin1.jsonl",),
     "a .jsonl that is not UTF-8 (line 2)"),
    ("empty.jsonl", b"", "lora", ("empty.jsonl",), "an empty .jsonl"),
    ("nolabel.jsonl", b'{"text": "kalo"}\n{"text": "mine"}\n', "cls", ("nolabel.jsonl", "label"), "no label field"),
    ("nocolumn.csv", b"review,label\nkalo,0\nmine,1\n", "cls", ("nocolumn.csv", "text"), "CSV without the text column"),
    ("corrupt.parquet", b"PAR1 this is not parquet at all", "lora", ("corrupt.parquet",), "a corrupt .parquet"),
    ("chatnolist.jsonl", CHAT_OK + b'{"messages": "hello"}\n' + CHAT_OK, "chat", ("chatnolist.jsonl", "line 2"),
     "chat messages not a list (line 2)"),
    ("chatrole.jsonl",
     CHAT_OK + b'{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}\n' + CHAT_OK,
     "chat", ("chatrole.jsonl", "line 2"), "a chat message with role 'wizard' (line 2)"),
    ("instr.jsonl", b'{"instruction": "a", "output": "b"}\n{"output": "c"}\n', "instruction",
     ("instr.jsonl", "line 2"), "instruction row without its instruction"),
    ("dir.txt", None, "lora", ("dir.txt",), "data.train a folder named dir.txt"),
    ("list.jsonl", b'{"text": "kalo"}\n{"text": ["mine", "ruta"]}\n', "lora", ("list.jsonl", "line 2"),
     "a JSON list in the text field (line 2)"),
    ("objout.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": {"x": 1}}\n', "instruction",
     ("objout.jsonl", "line 2"), "an instruction row whose output is a JSON object (line 2)"),
]


def data_cases() -> list[Case]:
    cases = []
    for i, (name, content, base, needles, what) in enumerate(DATA_ERRORS, 1):
        cases.append(cli_case(f"D{i:02d}", G_WHERE, "prepare", base=base, files={name: content},
                              spec={"data": {"train": f"@D/{name}"}}, needles=needles,
                              expect=CLEAN if name == "number.jsonl" else (CLEAR,),
                              what=f"`prepare` ({base}) on {what}"))
    return cases


# ---------------------------------------------------------------------------------------------- templates

TEMPLATES = [  # (base, data key, template, key named, expect)
    ("instruction", "instruction.template", "Q: {question}\nA:", "data.instruction.template", (CLEAR,)),
    ("instruction", "instruction.template", "Q: {instruction\nA:", "data.instruction.template", (CLEAR,)),
    ("instruction", "instruction.template", "Answer the question.\nA:", "data.instruction.template", (CLEAR,)),
    ("instruction", "instruction.template_no_input", "Q: {instruction} {foo}\nA:", "data.instruction.template_no_input",
     (CLEAR,)),
    ("instruction", "instruction.template", "Q: {instruction!r} {input}\nA:", "data.instruction.template", (CLEAR,)),
    ("cls", "classification.template", "Review:\nLabel:", "data.classification.template", (CLEAR,)),
    ("cls", "classification.template", "{review}\nLabel:", "data.classification.template", (CLEAR,)),
    ("cls", "classification.template", "{text}} Label:", "data.classification.template", (CLEAR,)),
    ("cls", "classification.template", "{text:>10}\nLabel:", "data.classification.template", (CLEAR,)),
    ("chat", "chat.user", "User says\n", "data.chat.user", (CLEAR,)),
    ("chat", "chat.system", "System: {content\n", "data.chat.system", (CLEAR,)),
    ("chat", "chat.assistant_content", " {message}", "data.chat.assistant_content", (CLEAR,)),
    ("cls", "classification.template", "{{literal}} {text}\nLabel:", "", (OK,)),
    ("instruction", "instruction.template", "{instruction} {{braces}} {input}\nA:", "", (OK,)),
]


def template_cases() -> list[Case]:
    cases = []
    for i, (base, key, template, named, expect) in enumerate(TEMPLATES, 1):
        section, field = key.split(".")
        cases.append(cli_case(f"P{i:02d}", G_TEMPLATE, "prepare", base=base,
                              spec={"data": {section: {field: template}}}, needles=(re.escape(named),) if named else (),
                              expect=expect, what=f"`prepare` ({base}) data.{key}={template!r}"))
    return cases


# ---------------------------------------------------------------------------------------------- resume faults

def newest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    return found[-1] if found else None


def damaged_checkpoint(damage: str) -> Callable[[Probe, Path], Outcome]:
    """Train 4 steps, damage the newest checkpoint as a kill during its save would, train on to step 6."""
    def probe(p: Probe, d: Path) -> Outcome:
        recipe, failed = train_then(p, d)
        if failed:
            return failed
        checkpoint = newest_checkpoint(d / "run")
        if checkpoint is None:
            return Outcome(SETUP, "no checkpoint")
        names = {"weights": ("adapter_model.safetensors", "model.safetensors"), "state": ("trainer_state.json",),
                 "optimizer": ("optimizer.pt",)}[damage]
        target = next((checkpoint / n for n in names if (checkpoint / n).is_file()), None)
        if target is None:
            return Outcome(SETUP, f"no {damage} file in {checkpoint.name}")
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        return classify(p.cli(["train", str(recipe), "train.max_steps=6"], d / "cwd"), (OK,))
    return probe


def torn_metrics(p: Probe, d: Path) -> Outcome:
    recipe, failed = train_then(p, d)
    if failed:
        return failed
    with (d / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "epoch": 0.3, "loss": 4.')
    proc = p.cli(["train", str(recipe), "train.max_steps=6"], d / "cwd")
    outcome = classify(proc, (OK,))
    if outcome.kind == OK and doubled_steps(d / "run" / "metrics.jsonl"):
        return Outcome(STALE, "exit 0 but metrics.jsonl holds a step twice")
    return outcome


def prepared_then(p: Probe, d: Path, spec: dict | None = None) -> tuple[Path, Outcome | None]:
    recipe = p.recipe(d, spec)
    proc = p.cli(["prepare", str(recipe)], d / "cwd")
    return recipe, None if proc.rc == 0 else Outcome(SETUP, "prepare: " + classify(proc, (OK,)).detail)


def store_files(run: Path) -> list[Path]:
    return sorted((f for f in (run / "prepared").rglob("*") if f.is_file() and f.name != "manifest.json"
                   and f.suffix not in (".json", ".txt", ".yaml", ".model") and "tokenizer" not in f.name),
                  key=lambda f: -f.stat().st_size)


def damaged_store(damage: str, then: str, trained: bool = False) -> Callable[[Probe, Path], Outcome]:
    """prepare (or train), damage the store under an intact manifest (the validation split or the largest file
    deleted, or a byte of it changed), then run `then`: saying "up to date" on it is stale reuse."""
    def probe(p: Probe, d: Path) -> Outcome:
        recipe, failed = train_then(p, d) if trained else prepared_then(p, d)
        if failed:
            return failed
        validation = d / "run" / "prepared" / "validation"
        if damage == "split" and validation.is_dir():
            shutil.rmtree(validation)
        else:
            files = store_files(d / "run")
            if not files:
                return Outcome(SETUP, "no store files")
            if damage == "flip":
                data = bytearray(files[0].read_bytes())
                data[len(data) // 2] ^= 0xFF
                files[0].write_bytes(bytes(data))
            else:
                files[0].unlink()
        proc = p.cli([then, str(recipe)], d / "cwd")
        if proc.rc == 0 and "up to date" in proc.out and "Traceback" not in proc.out:
            return Outcome(STALE, f"exit 0: {next(l for l in proc.out.splitlines() if 'up to date' in l).strip()}")
        return classify(proc, CLEAN)
    return probe


def killed_prepare(p: Probe, d: Path) -> Outcome:
    """SIGKILL a prepare of a ~2M-token corpus 0.3 s after its work folder appears, run it again: it finishes with
    the uninterrupted result and leaves no temporary folder."""
    (d / "huge.txt").write_text((p.fix / "data/big.txt").read_text() * 20)
    spec = {"data": {"train": str(d / "huge.txt"), "shard_tokens": 20000}}
    (d / "ref" / "cwd").mkdir(parents=True)
    reference = p.recipe(d / "ref", spec)
    done = p.cli(["prepare", str(reference)], d / "ref" / "cwd")
    if done.rc != 0:
        return Outcome(SETUP, "reference prepare: " + classify(done, (OK,)).detail)
    recipe = p.recipe(d, spec)
    proc = spawn(p, ["prepare", str(recipe)], d / "killed.log", d / "cwd")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not list((d / "run").glob("prepared*")):
        time.sleep(0.01)
    time.sleep(0.3)
    killed = proc.poll() is None
    kill_group(proc)
    proc.wait()
    outcome = classify(p.cli(["prepare", str(recipe)], d / "cwd"), (OK,))
    if outcome.kind != OK:
        return outcome
    ours, theirs = (json.loads((run / "prepared" / "manifest.json").read_text())
                    for run in (d / "run", d / "ref" / "run"))
    differs = [s for s in ("train", "validation") if ours.get(s, {}).get("tokens") != theirs.get(s, {}).get("tokens")]
    left = leftover_folders(d / "run")
    note = "killed" if killed else "finished before the kill"
    if differs:
        return Outcome(STALE, f"{note}; rerun tokens differ in {differs}")
    if left:
        return Outcome(LEAK, f"{note}; left: {', '.join(left)}")
    return Outcome(OK, f"{note}; the rerun equals an uninterrupted prepare, nothing left over")


def two_prepares(p: Probe, d: Path) -> Outcome:
    """Two `prepare` of one run folder at once: both finish (taking turns) or one refuses clearly; the store is
    complete either way."""
    recipe = p.recipe(d, {"data": {"train": "@FIX/data/big.txt", "shard_tokens": 4000}})
    results: dict[str, Proc] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, p.cli(["prepare", str(recipe)], d / "cwd")))
               for k in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcomes = [classify(proc, CLEAN) for proc in results.values()]
    worst = next((o for o in outcomes if o.kind not in CLEAN), None) or \
        next((o for o in outcomes if o.kind == CLEAR), None)
    if worst is not None and worst.kind != CLEAR:
        return worst
    check = p.cli(["prepare", str(recipe)], d / "cwd")
    if "up to date" not in check.out:
        return Outcome(STALE, "a third prepare did not find the store up to date")
    return worst or Outcome(OK, "both exit 0; the store is complete")


def fault_cases() -> list[Case]:
    return [
        Case("F01", G_FAULT, "torn last line in metrics.jsonl, then `train train.max_steps=6`", torn_metrics, (OK,)),
        Case("F02", G_FAULT, "newest checkpoint's weights truncated (kill during save), then train on",
             damaged_checkpoint("weights"), (OK,)),
        Case("F03", G_FAULT, "newest checkpoint's trainer_state.json truncated, then train on",
             damaged_checkpoint("state"), (OK,)),
        Case("F04", G_FAULT, "newest checkpoint's optimizer.pt truncated, then train on",
             damaged_checkpoint("optimizer"), (OK,)),
        Case("F05", G_FAULT, "prepared/validation deleted under an intact manifest, then `prepare`",
             damaged_store("split", "prepare"), CLEAN),
        Case("F06", G_FAULT, "`train`, prepared/validation deleted under an intact manifest, then `eval`",
             damaged_store("split", "eval", trained=True), CLEAN),
        Case("F07", G_FAULT, "largest store file deleted, then `train`", damaged_store("delete", "train"), CLEAN),
        Case("F08", G_FAULT, "a byte of the largest store file changed (same size), then `prepare`",
             damaged_store("flip", "prepare"), CLEAN),
        Case("F09", G_FAULT, "SIGKILL `prepare` mid-write (big corpus), then `prepare` again", killed_prepare, (OK,)),
        Case("F10", G_FAULT, "two `prepare` of one run folder at once", two_prepares, CLEAN),
    ]


# ---------------------------------------------------------------------------------------------- HTTP

HTTP_REQUESTS = [  # (id, path, raw body, what, expect)
    ("H01", "/generate", rb'{"prompt": "\ud800 x", "max_new_tokens": 2}', "lone surrogate in prompt", (CLEAR,)),
    ("H02", "/v1/completions", rb'{"prompt": "\ud800", "max_tokens": 2}', "lone surrogate in prompt", (CLEAR,)),
    ("H03", "/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "a \udfff"}], "max_tokens": 2}',
     "lone surrogate in a message", (CLEAR,)),
    ("H04", "/generate", rb'{"prompt": "hi", "stop": ["\ud800"], "max_new_tokens": 2}', "lone surrogate in stop",
     (CLEAR,)),
    ("H05", "/v1/completions", rb'{"prompt": ["ok", "\udc00"], "max_tokens": 2}', "lone surrogate in a prompt list",
     (CLEAR,)),
    ("H06", "/generate", b'{"prompt": ', "malformed JSON", (CLEAR,)),
    ("H07", "/generate", b'{"prompt": 5}', "prompt is a number", (CLEAR,)),
    ("H08", "/generate", b'{"prompt": "hi", "bogus": 1}', "unknown field", (CLEAR,)),
    ("H09", "/generate", b'{"prompt": "hi", "max_new_tokens": -1}', "max_new_tokens -1", (CLEAR,)),
    ("H10", "/generate", b'{"prompt": "hi", "max_new_tokens": 100000}', "max_new_tokens over the cap", (CLEAR,)),
    ("H11", "/generate", b'{"prompt": "hi", "temperature": -1}', "temperature -1", (CLEAR,)),
    ("H12", "/generate", b'{"prompt": "hi", "temperature": NaN}', "temperature NaN", (CLEAR,)),
    ("H13", "/generate", b'{"prompt": "hi", "top_p": 2}', "top_p 2", (CLEAR,)),
    ("H14", "/generate", b'{"prompt": "hi", "seed": "abc"}', "seed a string", (CLEAR,)),
    ("H15", "/generate", b"", "empty body", (CLEAR,)),
    ("H16", "/generate", b"[1, 2]", "body a JSON list", (CLEAR,)),
    ("H17", "/v1/chat/completions", b'{"messages": []}', "no messages", (CLEAR,)),
    ("H18", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role", (CLEAR,)),
    ("H19", "/v1/completions", b'{"prompt": "hi", "logprobs": 2}', "logprobs (unsupported)", (CLEAR,)),
    ("H20", "/v1/completions", b'{"prompt": "hi", "n": 0}', "n 0", (CLEAR,)),
    ("H21", "/v1/completions", b'{"prompt": "hi", "model": "no-such-model"}', "unknown model", (CLEAR,)),
    ("H22", "/v1/completions", b'{"prompt": []}', "empty prompt list", (CLEAR,)),
    ("H23", "/v1/completions", b'{"prompt": "hi", "max_tokens": 3, "stream": true}', "valid streaming request", (OK,)),
    ("H24", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}',
     "valid chat request", (OK,)),
    ("H25", "/generate", b'{"prompt": "hi", "max_new_tokens": 3, "seed": 1}', "valid generate request", (OK,)),
]


def http_case(cid: str, path: str, body: bytes | None, what: str, expect: tuple[str, ...], method: str = "POST",
              group: str = G_HTTP) -> Case:
    def probe(p: Probe, d: Path) -> Outcome:
        url = p.server()
        if url is None:
            return Outcome(SETUP, "the server did not start: " + last_line(p.server_log()))
        status, text = http(url + path, method, body)
        return classify_http(status, text, expect)
    return Case(cid, group, f"{method} {path}: {what}", probe, expect)


def concurrent_requests(p: Probe, d: Path) -> Outcome:
    url = p.server()
    if url is None:
        return Outcome(SETUP, "the server did not start")
    statuses: list[int | None] = []
    body = b'{"prompt": "kalo", "max_new_tokens": 4}'
    threads = [threading.Thread(target=lambda: statuses.append(http(url + "/generate", "POST", body, timeout=120)[0]))
               for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bad = [s for s in statuses if s != 200]
    return Outcome(OK if not bad else TRACEBACK, f"{len(statuses) - len(bad)}/24 answered 200; others: {bad[:5]}")


def server_after(p: Probe, d: Path) -> Outcome:
    url = p.server()
    log = p.server_log()
    if url is None:
        return Outcome(TRACEBACK, "the server died: " + last_line(log))
    if "Traceback" in log:
        return Outcome(TRACEBACK, f"server log: {exception_line(log)}")
    status, _ = http(url + "/health")
    return Outcome(OK if status == 200 else HANG, f"/health {status}; no traceback in the server log")


def http_cases() -> list[Case]:
    oversized = json.dumps({"messages": [{"role": "user", "content": "kalo " * 20000}], "max_tokens": 2}).encode()
    cases = [http_case(cid, path, body, what, expect) for cid, path, body, what, expect in HTTP_REQUESTS]
    cases += [
        http_case("H26", "/health", None, "health", (OK,), method="GET"),
        http_case("H27", "/no-such-path", None, "unknown path", (CLEAR,), method="GET"),
        http_case("H28", "/health", b"{}", "wrong method", (CLEAR,)),
        http_case("H29", "/v1/chat/completions", oversized, "a 20,000-word message (oversized)", (CLEAR,),
                  group=G_RIGHT),
        Case("H30", G_HTTP, "24 concurrent POST /generate", concurrent_requests, (OK,)),
        Case("H31", G_HTTP, "after all requests: server alive, no traceback in its log", server_after, (OK,)),
    ]
    return cases


# ---------------------------------------------------------------------------------------------- already right

def right_cases() -> list[Case]:
    r = G_RIGHT
    return [
        missing_recipe_case(),
        cli_case("A02", r, "prepare", spec={"data": {"train": "@D/none.txt"}}, needles=("none.txt",),
                 what="`prepare` with a missing data file"),
        cli_case("A03", r, "prepare", spec={"data": {"validation": "@D/none-val.txt"}}, needles=("none-val.txt",),
                 what="`prepare` with a missing validation file"),
        cli_case("A04", r, "prepare", "train.lrr=0.1", needles=("train.lrr",)),
        cli_case("A05", r, "prepare", "trian.lr=0.1", needles=("trian",)),
        cli_case("A06", r, "prepare", recipe_bytes=b"name: probe\nmodel: [unclosed\n", needles=("bad-recipe.yaml",),
                 what="`prepare` on invalid YAML"),
        cli_case("A07", r, "prepare", recipe_bytes=b"- a\n- b\n", needles=("bad-recipe.yaml",),
                 what="`prepare` on a recipe that is a list"),
        cli_case("A08", r, "prepare", recipe_bytes=b"extends: other.yaml\nname: probe\n",
                 files={"other.yaml": b"extends: bad-recipe.yaml\n"}, needles=("cycle",),
                 what="`prepare` on an extends cycle"),
        cli_case("A09", r, "prepare", recipe_bytes=b"extends: missing-parent.yaml\nname: probe\n",
                 needles=("missing-parent.yaml",), what="`prepare` extending a missing file"),
        cli_case("A10", r, "prepare", spec={"name": DROP}, needles=("name",), what="`prepare` without name"),
        cli_case("A11", r, "prepare", spec={"model": {"init": {"n_layer": 1}}}, needles=("model.base|model.init",),
                 what="`prepare` with both model.base and model.init"),
        cli_case("A12", r, "prepare", spec={"model": {"base": DROP}}, needles=("model.base|model.init",),
                 what="`prepare` with neither model.base nor model.init"),
        cli_case("A13", r, "prepare", spec={"data": {"train": DROP}}, needles=("data.train",),
                 what="`prepare` without data.train"),
        cli_case("A14", r, "prepare", spec={"data": {"train": "@D/data.xlsx"}}, needles=("data.train",),
                 what="`prepare` with data.train a .xlsx"),
        cli_case("A15", r, "prepare", "train.lr", needles=("train.lr",), what="`prepare` with an override without ="),
        cli_case("A16", r, "prepare", "train.lr=[", needles=("train.lr",),
                 what="`prepare` with an override of bad YAML"),
        cli_case("A17", r, "prepare", base="cls", spec={"data": {"classification": {"labels": None}}},
                 needles=("labels",), what="`prepare` (classification) without labels"),
        cli_case("A18", r, "prepare", base="scratch", spec={"tokenizer": {"path": "@FIX/tok"}},
                 needles=("tokenizer.path|tokenizer.train",), what="`prepare` with tokenizer.path and tokenizer.train"),
        cli_case("A19", r, "prepare", base="scratch", spec={"tokenizer": DROP}, needles=("tokenizer",),
                 what="`prepare` (scratch) without a tokenizer"),
        cli_case("A20", r, "prepare", spec={"model": {"base": "./no-such-model"}}, needles=("no-such-model",),
                 what="`prepare` with model.base a missing folder"),
        cli_case("A21", r, "prepare", spec={"tokenizer": {"path": "@D/no-such-tok"}}, needles=("no-such-tok",),
                 what="`prepare` with tokenizer.path a missing folder"),
        cli_case("A22", r, "prepare", base="cls",
                 files={"labels.jsonl": b'{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n'},
                 spec={"data": {"train": "@D/labels.jsonl"}}, needles=("line 2",),
                 what="`prepare` (classification) with a label outside the set"),
        cli_case("A23", r, "prepare", spec={"data": {"train": {"hub": "probe-user/no-such-set"}}},
                 needles=("no-such-set",), what="`prepare` on a Hub data set while offline"),
        serve_case("A24", r, occupy=True, needles=("port|address",), what="`serve` on a port already in use"),
        serve_case("A25", r, "--host", "999.1.1.1", needles=("999.1.1.1|host",), what="`serve --host 999.1.1.1`"),
        serve_case("A26", r, "--host", "no-such-host.invalid", needles=("no-such-host|host",),
                   what="`serve --host no-such-host.invalid`"),
        cli_case("A27", r, "chat", run="lora", stdin=("kalo " * 5000 + "\n/exit\n").encode(), expect=CLEAN,
                 what="`chat` (shared lora run) with a 5000-word message"),
        cli_case("A28", r, "chat", run="lora", stdin=b"hello\n/reset\nagain\n/exit\n", expect=(OK,),
                 what="`chat` (shared lora run) hello, /reset, again, /exit"),
        cli_case("A29", r, "prepare", base="cls", spec={"data": {"train": "@FIX/data/cls.csv"}}, expect=(OK,),
                 what="`prepare` (classification) on a good CSV"),
        cli_case("A30", r, "prepare", base="cls", spec={"data": {"train": "@FIX/data/cls.tsv"}}, expect=(OK,),
                 what="`prepare` (classification) on a good TSV"),
        Case("A31", r, "`serve --api-key`: requests without / with a wrong / with the key, and /health", api_key,
             (OK,)),
    ]


def api_key(p: Probe, d: Path) -> Outcome:
    """`serve --api-key`: no key or a wrong one is a 401, the right one a 200, /health stays open."""
    log = d / "serve.log"
    args = ["serve", str(p.runs["lora"]), "--port", str(free_port()), "--api-key", "probe-key"]
    proc = spawn(p, args, log, d / "cwd")
    try:
        url = wait_until_serving(proc, log, 90)
        if url is None:
            return Outcome(SETUP, "the server did not start: " + last_line(log.read_text(errors="replace")))
        body = b'{"prompt": "hi", "max_new_tokens": 2}'
        got = {name: http(url + "/generate", "POST", body, headers)[0]
               for name, headers in (("none", {}), ("wrong", {"Authorization": "Bearer nope"}),
                                     ("right", {"Authorization": "Bearer probe-key"}))}
        got["health"] = http(url + "/health")[0]
    finally:
        kill_group(proc)
        proc.wait()
    right = got == {"none": 401, "wrong": 401, "right": 200, "health": 200}
    return Outcome(OK if right else ACCEPTED, f"statuses {got}")


def missing_recipe_case() -> Case:
    def probe(p: Probe, d: Path) -> Outcome:
        return classify(p.cli(["prepare", str(d / "no-such-recipe.yaml")], d / "cwd"), (CLEAR,), ("no-such-recipe",))
    return Case("A01", G_RIGHT, "`prepare` on a missing recipe file", probe)


def all_cases() -> list[Case]:
    return [*value_cases(), *line_cases(), *storage_cases(), *make_cases(), *rerun_cases(), *leak_cases(),
            *data_cases(), *template_cases(), *fault_cases(), *right_cases(), *http_cases()]


# ---------------------------------------------------------------------------------------------- running

def run_all(checkout: Path, python: str, cases: list[Case], timeout: float, keep: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="hardening-"))
    probe = Probe(checkout, python, root, timeout)
    commit = commit_of(checkout)
    start = time.monotonic()
    rows = []
    try:
        probe.setup()
        for case in cases:
            rows.append(run_case(probe, case))
    finally:
        probe.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    if commit_of(checkout) != commit:  # someone committed to the checkout while the cases ran
        commit = f"{commit}..{commit_of(checkout)}"
    return {"checkout": str(checkout), "commit": commit, "python": python,
            "seconds": round(time.monotonic() - start, 1), "cases": rows}


def run_case(probe: Probe, case: Case) -> dict:
    d = probe.root / "cases" / case.id
    (d / "cwd").mkdir(parents=True)
    start = time.monotonic()
    try:
        outcome = case.probe(probe, d)
    except Exception as exc:  # a probe's own failure is reported, never hidden
        outcome = Outcome(SETUP, f"probe raised {type(exc).__name__}: {exc}")
    detail = tidy(outcome.detail, probe)
    seconds = round(time.monotonic() - start, 1)
    mark = "" if outcome.kind in case.expect else "  <-- unexpected"
    print(f"{case.id:4} {outcome.kind:13} {seconds:6.1f}s  {case.what[:70]}  | {detail[:110]}{mark}", flush=True)
    return {"id": case.id, "group": case.group, "what": tidy(case.what, probe), "expect": list(case.expect),
            "outcome": outcome.kind, "detail": detail, "seconds": seconds}


def tidy(text: str, probe: Probe) -> str:
    text = text.replace(str(probe.root), "$TMP").replace(str(probe.checkout), "$CHECKOUT")
    text = text.replace(probe.python, "python")
    return " ".join(text.split())[:240]


def commit_of(checkout: Path) -> str:
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


# ---------------------------------------------------------------------------------------------- tables

def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def counts(rows: list[dict]) -> dict[str, int]:
    return {kind: sum(row["outcome"] == kind for row in rows) for kind in OUTCOMES}


def markdown_run(report: dict) -> str:
    rows = report["cases"]
    unexpected = [row for row in rows if row["outcome"] not in row["expect"]]
    lines = [f"# Hardening probe: {report['checkout']} ({report['commit']})", "",
             f"{len(rows)} cases in {report['seconds']:.0f} s; {len(unexpected)} not as expected.", "",
             "| outcome | cases |", "|---|---|"]
    lines += [f"| {kind} | {n} |" for kind, n in counts(rows).items() if n]
    lines += ["", "| case | class | what was done | expected | outcome | detail |", "|---|---|---|---|---|---|"]
    for row in rows:
        outcome = row["outcome"] if row["outcome"] in row["expect"] else f"**{row['outcome']}**"
        lines.append(f"| {row['id']} | {row['group']} | {cell(row['what'])} | {' or '.join(row['expect'])} | "
                     f"{outcome} | {cell(row['detail'])} |")
    return "\n".join(lines) + "\n"


def short(row: dict | None, expect: list[str]) -> str:
    if row is None:
        return "-"
    outcome = row["outcome"] if row["outcome"] in expect else f"**{row['outcome']}**"
    return f"{outcome}: {cell(row['detail'][:100])}"


def per_class(before: dict, after: dict, expect: dict) -> list[str]:
    """Cases per class of finding, and how many were not as expected before and after."""
    groups = list(dict.fromkeys(row["group"] for row in after["cases"]))
    lines = ["| class | cases | not as expected before | after |", "|---|---|---|---|"]
    for group in groups:
        counts = [sum(row["group"] == group and row["outcome"] not in expect.get(row["id"], row["expect"])
                      for row in report["cases"]) for report in (before, after)]
        total = sum(row["group"] == group for row in after["cases"])
        lines.append(f"| {group} | {total} | {counts[0]} | {counts[1]} |")
    return lines + [""]


def markdown_combined(before: dict, after: dict) -> str:
    old = {row["id"]: row for row in before["cases"]}
    lines = [f"# Issue 10 case table: before ({before['commit']}) / after ({after['commit']})", "",
             f"Before: {len(before['cases'])} cases in {before['seconds']:.0f} s; after: {len(after['cases'])} cases "
             f"in {after['seconds']:.0f} s. Outcomes in bold are not what the case expects "
             "(`python -m bench.hardening`; its docstring defines the outcomes).", "",
             "| outcome | before | after |", "|---|---|---|"]
    before_counts, after_counts = counts(before["cases"]), counts(after["cases"])
    lines += [f"| {kind} | {before_counts[kind]} | {after_counts[kind]} |" for kind in OUTCOMES
              if before_counts[kind] or after_counts[kind]]
    expect = {row["id"]: row["expect"] for row in after["cases"]}
    missed = [sum(row["outcome"] not in expect.get(row["id"], row["expect"]) for row in report["cases"])
              for report in (before, after)]
    lines += [f"| **not as expected** | {missed[0]} | {missed[1]} |", ""]
    lines += per_class(before, after, expect)
    lines += ["| case | class | before | after |", "|---|---|---|---|"]
    for row in after["cases"]:
        name = f"{row['id']} {cell(row['what'])} (expect {' or '.join(row['expect'])})"
        lines.append(f"| {name} | {row['group']} | {short(old.get(row['id']), row['expect'])} | "
                     f"{short(row, row['expect'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main

def default_python(checkout: Path) -> str:
    """The checkout's own venv when it has one, else this interpreter."""
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository whose CLI is probed (default: the one holding this script)")
    parser.add_argument("--python", help="interpreter for the CLI (default: <checkout>/.venv/bin/python, else this "
                                         "one)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the results as JSON here (for --combine)")
    parser.add_argument("--only", help="run only the cases whose id matches this regex")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per CLI run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--combine", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="write the before/after table of two --json results to --out")
    args = parser.parse_args(argv)
    if args.combine:
        before, after = (json.loads(path.read_text()) for path in args.combine)
        text = markdown_combined(before, after)
    else:
        cases = [c for c in all_cases() if not args.only or re.search(args.only, c.id)]
        checkout = args.checkout.resolve()
        report = run_all(checkout, args.python or default_python(checkout), cases, args.timeout, args.keep)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        text = markdown_run(report)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
