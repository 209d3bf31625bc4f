"""What the tests share: tiny models and tokenizers, data files, flag builders, LoRA adapters, process
environments, and the client of the warm CLI runner (tests/workers/cli_forkserver.py).

Everything here is built in-process from code (no hub, no ../shared needed). Tests import it as
`from helpers import ...` (tests/conftest.py puts this folder on sys.path).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Iterable, Optional

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SRC = REPO / "src"
WORKERS = TESTS / "workers"
SHARED_DATA = REPO.parent / "shared" / "data"  # a development copy of the real data; absent on a fresh machine
SHARED_TOKENIZERS = SHARED_DATA / "tokenizers"
SHARED_CORPUS = SHARED_DATA / "corpora" / "peoples-daily-199801.txt"
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` console script, same code

# ---------------------------------------------------------------------------------------------
# Process environments


def with_src_first(pythonpath: Optional[str]) -> str:
    """PYTHONPATH with this checkout's src/ first: child processes import the code under test, whatever the
    editable install points at."""
    parts = [p for p in (pythonpath or "").split(os.pathsep) if p and Path(p).resolve() != SRC]
    return os.pathsep.join([str(SRC), *parts])


def with_bin_first(path: Optional[str]) -> str:
    """PATH with this interpreter's bin/ first, as in an activated venv: its torchrun, and its ninja for the C++
    ops DeepSpeed builds on first use. (The system's older ninja writes another .ninja_log hash, so children that
    alternated between the two would rebuild DeepSpeed's shm op, ~20 s each time.)"""
    parts = [p for p in (path or "").split(os.pathsep) if p and p != str(BIN)]
    return os.pathsep.join([str(BIN), *parts])


def subprocess_env(**extra: str) -> dict:
    """The test process's environment for a child `python -m zhtrain` / torchrun: offline, quiet tokenizers,
    this checkout's src/ first on PYTHONPATH, the venv's bin/ first on PATH."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = with_src_first(env.get("PYTHONPATH"))
    env["PATH"] = with_bin_first(env.get("PATH"))
    env.update(extra)
    return env


def user_shell_env(**extra: str) -> dict:
    """What a user's shell gives a seed script: the venv's bin on PATH, HOME, and little else."""
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(Path.home()),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": with_src_first(None),
    }
    cache = os.environ.get("ZHTRAIN_CACHE")
    if cache:
        env["ZHTRAIN_CACHE"] = cache
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zh(*argv) -> list[str]:
    """`python -m zhtrain <argv>`, as a user runs it."""
    return [sys.executable, "-m", "zhtrain", *map(str, argv)]


def run_fresh(argv: list, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter (start-up output included), captured."""
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=subprocess_env(**env)
    )


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# The warm CLI runner: `zhtrain <argv>` in a child forked from one interpreter that imported everything once


class CliRunner:
    """Client of tests/workers/cli_forkserver.py. Each job is its own process running `zhtrain.cli.main` with
    its own cwd, environment, stdin (/dev/null), stdout/stderr and exit status; only the interpreter start-up
    and the imports (seconds of CPU each) are shared. Jobs may be submitted at once and awaited later."""

    def __init__(self, scratch: Path, pool: int = 4):
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKERS / "cli_forkserver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="default", ZHTRAIN_FORKSERVER_POOL=str(pool)),
            cwd=scratch,
        )
        ready = self.proc.stdout.readline()
        if json.loads(ready or "{}") != {"ready": True}:
            raise RuntimeError(f"cli_forkserver did not start: {ready!r}")
        self.done: dict[str, int] = {}
        self.jobs: dict[str, tuple] = {}
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self.cond:
                self.done[reply["id"]] = reply["rc"]
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def submit(self, argv: Iterable, cwd: Path, env: Optional[dict] = None) -> str:
        job_id = uuid.uuid4().hex[:12]
        argv = [str(a) for a in argv]
        out, err = self.scratch / f"{job_id}.out", self.scratch / f"{job_id}.err"
        job = {
            "id": job_id,
            "argv": argv,
            "cwd": str(cwd),
            "env": env or subprocess_env(OMP_NUM_THREADS="1"),
            "stdout": str(out),
            "stderr": str(err),
        }
        with self.cond:
            self.jobs[job_id] = (argv, out, err)
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        return job_id

    def wait(self, job_id: str, timeout: float = 600) -> subprocess.CompletedProcess:
        with self.cond:
            if not self.cond.wait_for(lambda: job_id in self.done or self.proc.poll() is not None, timeout=timeout):
                raise TimeoutError(f"zhtrain {' '.join(self.jobs[job_id][0])}: no result within {timeout}s")
            if job_id not in self.done:
                raise RuntimeError(f"cli_forkserver exited with {self.proc.returncode}")
            rc = self.done[job_id]
        argv, out, err = self.jobs[job_id]
        return subprocess.CompletedProcess(
            ["zhtrain", *argv], rc, out.read_text(errors="replace"), err.read_text(errors="replace")
        )

    def run(
        self, argv: Iterable, cwd: Path, env: Optional[dict] = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        return self.wait(self.submit(argv, cwd, env), timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Text, tokenizers, tiny models

CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你能而子那得白日依山尽黄河入海流"


def make_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        zh_text = "".join(rng.choice(CHARS) for _ in range(rng.randint(5, 40)))
        lines.append(f"{zh_text}，the number {i} is {rng.randint(0, 999)}。")
    return lines


def chinese_lines(n: int, seed: int = 5) -> list[str]:
    """Chinese text with recurring words, so that multi-character pieces are worth learning."""
    rng = random.Random(seed)
    words = ["黄河", "中国", "人民", "发展", "经济", "白日", "大海", "山川", "国家", "时代"]
    return [
        "".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(CHARS) for _ in range(rng.randint(8, 30)))
        + "。"
        for _ in range(n)
    ]


def write_corpus(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_text_dir(folder: Path, files: int = 2, lines: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        (folder / f"part{k}.txt").write_text("\n".join(make_lines(lines, seed=10 + k)) + "\n", encoding="utf-8")
    return folder


def make_sp_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """Train a small SentencePiece BPE model with LLaMA's layout (<unk>=0 <s>=1 </s>=2, byte fallback)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_lines(3000, seed=1)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))  # adds tokenizer.json / tokenizer_config.json beside tokenizer.model
    assert len(AutoTokenizer.from_pretrained(str(folder))) == vocab_size
    return folder


def llama_like_sentencepiece(folder: Path) -> Path:
    """A small SentencePiece model with LLaMA's settings (identity normaliser, byte fallback): its tokenizer.model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_lines(3000, seed=5)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def make_bpe_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """A tiny SmolLM2-style tokenizer: byte-level BPE trained on English only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    english = [f"the number {i} is {i * 7 % 1000} and the river runs to the sea" for i in range(500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(english, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(str(folder))
    return folder


def bigger_tokenizer(sp_tokenizer_dir: Path, dest: Path, words=("白日依山尽", "黄河入海流", "number")) -> Path:
    """The fixture tokenizer plus added tokens: a larger custom vocabulary (400 + 3)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    tokenizer.add_tokens(list(words))
    tokenizer.save_pretrained(str(dest))
    return dest


def extended_tokenizer(sp_tokenizer_dir: Path, dest: Path, words=("白日依山尽", "黄河入海流", "人民日报")) -> Path:
    """As bigger_tokenizer, with the SentencePiece model beside it (as after extension)."""
    bigger_tokenizer(sp_tokenizer_dir, dest, words)
    shutil.copyfile(Path(sp_tokenizer_dir) / "tokenizer.model", Path(dest) / "tokenizer.model")
    return dest


def extend_sentencepiece(base_model: Path, pieces, dest: Path) -> Path:
    """Append pieces (score 0, normal) to a SentencePiece model, as the seed's merge_tokenizers.py does."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString(Path(base_model).read_bytes())
    present = {p.piece for p in proto.pieces}
    for piece in pieces:
        if piece not in present:
            present.add(piece)
            proto.pieces.add(piece=piece, score=0.0)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.model").write_bytes(proto.SerializeToString())
    AutoTokenizer.from_pretrained(str(dest)).save_pretrained(str(dest))
    return dest


def make_tiny_llama(
    folder: Path, vocab_size: int, tie: bool = False, seed: int = 0, max_positions: int = 256, **sizes
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    shape.update(sizes)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return folder


def model_with_tokenizer(model_dir: Path, tokenizer_dir: Path, dest: Path) -> Path:
    """A model folder with its own tokenizer in it, as real model folders are."""
    shutil.copytree(model_dir, dest)
    for item in Path(tokenizer_dir).iterdir():
        shutil.copy(item, dest / item.name)
    return dest


def copy_tokenizer(source: Path, dest: Path) -> None:
    for name in (
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(dest) / name)


def load_model(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def logits_of(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(vocab: int):
    import torch

    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    ids[:, -3:] = torch.arange(vocab - 3, vocab)  # the newest rows
    return ids


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def plant_pickle(path: Path, marker: Path, key: str = "weight") -> Path:
    """A torch .bin/.pth whose unpickling would run `touch marker`."""
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({key: Payload()}, path)
    return path


# ---------------------------------------------------------------------------------------------
# LoRA adapters made directly with PEFT

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    model,
    out: Path,
    tokenizer_dir: Optional[Path] = None,
    targets=ALL_TARGETS,
    modules_to_save=("embed_tokens", "lm_head"),
    r: int = 4,
    alpha: float = 8,
    seed: int = 1,
    randomize: bool = True,
    **lora_kwargs,
) -> Path:
    """Attach a LoRA to `model` (a model, or a folder to load), as training would (resized to the tokenizer,
    untied when embeddings are trained), and save it. `randomize`: non-zero B and moved modules_to_save, so
    that a merge matters; otherwise PEFT's own init (B = 0)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from zhtrain.model.vocab import resize_embeddings, untie_embeddings

    if isinstance(model, (str, Path)):
        model = load_model(model)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        resize_embeddings(model, len(AutoTokenizer.from_pretrained(str(tokenizer_dir))), init="mean")
    if modules_to_save:
        untie_embeddings(model)
    config = LoraConfig(
        target_modules=list(targets),
        r=r,
        lora_alpha=alpha,
        modules_to_save=list(modules_to_save) or None,
        **lora_kwargs,
    )
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    peft_model = get_peft_model(model, config)
    if randomize:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
                elif "modules_to_save" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    return out


def peft_reference(base_dir: Path, adapters: list[Path], vocabs: list[int]):
    """Independent of zhtrain's merge and verify: adapter 1 merged with PEFT, grown, adapter 2 attached, ..."""
    from peft import PeftModel

    from zhtrain.model.vocab import resize_embeddings, untie_embeddings

    model = load_model(base_dir)
    for position, (adapter, vocab) in enumerate(zip(adapters, vocabs)):
        resize_embeddings(model, vocab, init="mean")
        untie_embeddings(model)
        model = PeftModel.from_pretrained(model, str(adapter))
        if position < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


def merged_model(root: Path, base: Path, tokenizer_dir: Path, *extra: str) -> Path:
    """`zhtrain merge` of one randomised adapter (trained embeddings, grown to the tokenizer) into `base`."""
    from zhtrain.merge import merge, parse_merge_args

    adapter = make_adapter(load_model(base), root / "pt_lora_model", tokenizer_dir)
    out = root / "merged"
    merge(parse_merge_args(["--base_model", str(base), "--lora_model", str(adapter), "--output_dir", str(out), *extra]))
    return out


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def embedding(weights: dict, name: str):
    return next(t for k, t in weights.items() if name in k)


# ---------------------------------------------------------------------------------------------
# Conversations (SFT)

# SmolLM2's chat template (ChatML with a default system prompt), as shipped in its tokenizer_config.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Replies avoid full-width punctuation: the fixture SentencePiece model normalises it (NFKC).
CONVERSATIONS = [
    [("user", "白日依山尽"), ("assistant", "黄河入海流")],
    [("system", "你是一个乐于助人的助手"), ("user", "the number 12 is"), ("assistant", "它是 twelve 的意思")],
    [
        ("user", "你好"),
        ("assistant", "你好 有什么可以帮你"),
        ("user", "USER: 这是一个 ASSISTANT: 测试"),  # template markers inside the text must not confuse masks
        ("assistant", "ASSISTANT: 没有问题 </s> USER:"),
        ("user", "再说一次"),
        ("assistant", "好的 the number 7"),
    ],
]

ALPACA_ONE = json.dumps([{"instruction": "你好", "output": "你好！"}], ensure_ascii=False)


def as_messages(conversation) -> list[dict]:
    return [{"role": role, "content": text} for role, text in conversation]


def sharegpt_records(conversations=CONVERSATIONS) -> list[dict]:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [
        {"id": f"conv_{k}", "conversations": [{"from": names[role], "value": text} for role, text in conv]}
        for k, conv in enumerate(conversations)
    ]


def write_sharegpt(path: Path, copies: int = 1, conversations=CONVERSATIONS) -> Path:
    records = []
    for copy in range(copies):
        for record in sharegpt_records(conversations):
            records.append(dict(record, id=f"{record['id']}_{copy}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_alpaca(path: Path, n: int = 8) -> Path:
    records = [
        {
            "instruction": f"把数字 {k} 写成中文",
            "input": "" if k % 2 else "用一个字",
            "output": "一二三四五六七八"[k % 8],
        }
        for k in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def make_chat_tokenizer(sp_tokenizer_dir: Path, folder: Path) -> Path:
    """The SentencePiece fixture plus ChatML special tokens and SmolLM2's chat_template (402 tokens)."""
    from transformers import AutoTokenizer

    if folder.exists():
        return folder
    shutil.copytree(sp_tokenizer_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------
# Command-line flags

# The seed's LoRA settings (run_pt.sh / run_sft.sh).
SEED_LORA = [
    "--trainable",
    "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj",
    "--modules_to_save",
    "embed_tokens,lm_head",
    "--lora_rank",
    "8",
    "--lora_alpha",
    "32",
    "--lora_dropout",
    "0.05",
]
SMALL_LORA = ["--lora_rank", "4", "--lora_alpha", "8", "--trainable", "q_proj,v_proj"]

PRETRAIN_DEFAULTS = dict(
    block_size=32,
    per_device_train_batch_size=2,
    max_steps=4,
    learning_rate=1e-3,
    do_train=True,
    seed=7,
    report_to="none",
    logging_steps=1,
    save_steps=2,
    validation_split_percentage=0.05,
    disable_tqdm=True,
)
SFT_DEFAULTS = dict(
    per_device_train_batch_size=2,
    max_steps=3,
    learning_rate=1e-3,
    do_train=True,
    seed=7,
    report_to="none",
    logging_steps=1,
    save_steps=2,
    disable_tqdm=True,
    model_max_length=256,
)


def as_flags(settings: dict) -> list[str]:
    """{name: value} -> ['--name', 'value', ...]; None leaves the flag out."""
    return [item for name, value in settings.items() if value is not None for item in (f"--{name}", str(value))]


def pretrain_flags(model, tokenizer, data, out, *extra, lora=SEED_LORA, cache=None, **settings) -> list[str]:
    """`zhtrain pretrain` flags for a few steps on a tiny model; keyword settings replace the defaults."""
    values = {
        "model_name_or_path": model,
        "tokenizer_name_or_path": tokenizer,
        "dataset_dir": data,
        "data_cache_dir": cache or Path(out).parent / "cache",
        "output_dir": out,
        **PRETRAIN_DEFAULTS,
        **settings,
    }
    return as_flags(values) + [str(a) for a in (*lora, *extra)]


def sft_flags(model, tokenizer, out, *extra, lora=(), **settings) -> list[str]:
    """`zhtrain sft` flags for a few steps on a tiny model (data flags go in `extra` or `settings`)."""
    values = {
        "model_name_or_path": model,
        "tokenizer_name_or_path": tokenizer,
        "output_dir": out,
        **SFT_DEFAULTS,
        **settings,
    }
    return as_flags(values) + [str(a) for a in (*lora, *extra)]


def run_pretrain(argv: list):
    from zhtrain.pretrain import parse_pretrain_args, pretrain

    return pretrain(*parse_pretrain_args([str(a) for a in argv]))


def run_sft(argv: list):
    from zhtrain.sft import parse_sft_args, sft

    return sft(*parse_sft_args([str(a) for a in argv]))


def losses_of(history: list) -> list[float]:
    return [entry["loss"] for entry in history if "loss" in entry]


def seed_script_args(script: Path, module: str, substitutions: Optional[dict] = None) -> list[str]:
    """The argument list after `module` in the torchrun line of a seed-style shell script, its variables filled in
    (unknown ones become 1)."""
    text = Path(script).read_text()
    variables = dict(re.findall(r"^(\w+)=(\S+)$", text, flags=re.M))
    variables.update(substitutions or {})
    command = text[text.index("torchrun") :].replace("\\\n", " ")
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "1"), command)
    argv = shlex.split(command)
    return argv[argv.index(module) + 1 :]


def copy_run(source: Path, dest: Path) -> Path:
    """A copy of a finished run's output folder (a run's identity does not include its folder)."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


def sp(path):
    """The raw SentencePiece processor of a .model file."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def tiny_peft_model(model_dir, modules_to_save=("embed_tokens", "lm_head"), targets=("q_proj", "v_proj"), dropout=0.0):
    """The tiny model with a LoRA whose B is not zero (so that it counts)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=list(targets),
        modules_to_save=list(modules_to_save) or None,
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


# ---------------------------------------------------------------------------------------------
# Source packages as PyPI would serve them (for the fetch paths, without the network)


def make_tarball(path: Path, files: dict) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def fake_sdist(tmp_path: Path, member: str, data: bytes, name: str = "fakepkg"):
    """A source package on 'PyPI' (a folder) and the Sdist record that pins it."""
    import hashlib

    from zhtrain import files

    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    tarball = make_tarball(index / f"{name}-1.0.tar.gz", {member: data})
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    return files.Sdist(name, "1.0", tarball.name, sha, member), tarball


def copying_downloader(source: Path, calls: list):
    def download(sdist, folder: Path) -> None:
        calls.append(sdist.requirement)
        (folder / sdist.filename).write_bytes(source.read_bytes())

    return download


def leftovers(folder: Path) -> list[str]:
    """Temp names the atomic helpers use: nothing of the kind may survive."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith("."))


needs_shared_tokenizers = __import__("pytest").mark.skipif(
    not (
        (SHARED_TOKENIZERS / "llama-32000.model").is_file() and (SHARED_TOKENIZERS / "chinese_sp-20000.model").is_file()
    ),
    reason=f"real tokenizers not found in {SHARED_TOKENIZERS} (llama-32000.model, chinese_sp-20000.model)",
)


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as the Trainer + zhtrain write it (with the completeness manifest unless not complete)."""
    from zhtrain.training.checkpoints import write_manifest

    folder = out / f"checkpoint-{step}"
    (folder / "pt_lora_model").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    (folder / "pt_lora_model" / "adapter_model.safetensors").write_bytes(b"y" * 50)
    if complete:
        write_manifest(folder, step)
    return folder


def training_args(out: Path, **overrides):
    from zhtrain.training.args import ZhtrainTrainingArguments

    values = dict(
        output_dir=str(out),
        max_steps=8,
        save_steps=2,
        save_total_limit=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-3,
        seed=0,
        report_to="none",
        disable_tqdm=True,
    )
    values.update(overrides)
    return ZhtrainTrainingArguments(**values)


# LoRA of the multi-process comparisons: the seed's, without dropout (masks differ between 1 and 2 processes).
DIST_LORA = [*SEED_LORA[:-2], "--lora_dropout", "0"]


def dist_flags(model, tokenizer, data, out, cache, batch: int, *extra) -> list[str]:
    """pretrain flags of the multi-process runs: 4 steps, --per_device_train_batch_size `batch`, a fresh output."""
    return pretrain_flags(
        model,
        tokenizer,
        data,
        out,
        *extra,
        lora=DIST_LORA,
        cache=cache,
        per_device_train_batch_size=batch,
        overwrite_output_dir=True,
    )


def new_rows_flags(model, tokenizer, data, out, *extra) -> list[str]:
    """pretrain flags of the vocabulary-extension runs: custom vocabulary, a small LoRA, no checkpoints or eval."""
    return pretrain_flags(
        model,
        tokenizer,
        data,
        out,
        *extra,
        lora=SMALL_LORA,
        custom_vocab=True,
        learning_rate=1e-2,
        weight_decay=0.01,
        save_strategy="no",
        seed=1,
        validation_split_percentage=0,
        max_steps=None,
        logging_steps=None,
        save_steps=None,
    )


# ---------------------------------------------------------------------------------------------
# Chat templates: what is trained


def trained_spans(sample) -> list[list[int]]:
    """Runs of consecutive trained positions, as token ids."""
    from zhtrain.data.supervised import IGNORE_INDEX

    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token  # labels are the inputs themselves (the model shifts)
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def encode_all(tokenizer, template_name, max_length=4096):
    from zhtrain.data.chat import Conversation
    from zhtrain.data.supervised import encode_conversations
    from zhtrain.data.templates import get_template

    conversations = [Conversation(f"c{k}", as_messages(c), f"c{k}") for k, c in enumerate(CONVERSATIONS)]
    return conversations, encode_conversations(conversations, tokenizer, get_template(template_name), max_length)


def check_labels_are_exactly_the_replies(tokenizer, template_name, end_token):
    conversations, samples = encode_all(tokenizer, template_name)
    for conversation, sample in zip(conversations, samples):
        replies = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
        decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in trained_spans(sample)]
        assert decoded == [reply + end_token for reply in replies], (template_name, conversation.id)
        assert sample.truncated == 0 and sample.dropped is None
        assert sample.turns == len(replies)
