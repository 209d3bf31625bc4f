"""Prompt templates: the one table, and how a conversation becomes token segments.

API (stable; `zhtrain sft` trains with it and `zhtrain generate` prompts with it)::

    from zhtrain.data.templates import get_template, TEMPLATES, save_template, load_saved_template

    template = get_template("vicuna_v1.1")                  # unknown name -> ZhtrainError listing TEMPLATES
    ids  = template.encode_prompt(tokenizer, "你好")          # token ids up to where the assistant answers
    text = template.render_prompt("你好", tokenizer=tokenizer) # the same prompt as text (display, llama.cpp)
    stop = template.stop_token_ids(tokenizer)                # ids that end an assistant reply
    segments = template.segments(tokenizer, messages)        # training: [Segment(text|special, trained)]
    pieces = encode_segments(tokenizer, segments)            # [(token ids, trained)] in order
    batch = encode_segments_batch(tokenizer, [segments, ...]) # the same for many samples, one tokenizer call

`messages` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``: an optional
system message first, then user and assistant strictly alternating, starting with user. For
training it ends with an assistant reply; for `encode_prompt`/`render_prompt` it ends with a user
turn (a bare string means one user turn). `system=None` uses the template's default system prompt.

Masks are built by construction, never by re-splitting a rendered string: every prompt part and
every reply is its own segment, tokenized on its own (``add_special_tokens=False``), BOS/EOS are
added by id, and in the built-in templates a special-token string typed in a message (say "</s>")
stays plain text instead of becoming an EOS in mid-reply. (With `tokenizer`, the chat_template's
markup is text, so special-token strings are parsed in prompts, as `apply_chat_template` does;
replies stay text.) So the trained tokens of a sample are exactly each assistant reply plus its end
token. A generation prompt built with `encode_prompt` is token for token the prompt the model was
trained on; `render_prompt` is the template's canonical text (FastChat's ``get_prompt()``, the
reference Alpaca prompt, Meta's Llama-2 layout), which tokenizes the same way with LLaMA's
SentencePiece tokenizers (a reply's leading space is SentencePiece's word-start mark) and may
differ by a space at reply boundaries with byte-level BPE tokenizers, so prefer the ids.

Templates (the table `TEMPLATES` below is the only place they are defined):
  vicuna_v1.1  FastChat's (the seed's train_mem.py): "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ..."
  alpaca       Chinese-Alpaca's training prompt (run_clm_sft_with_peft.py):
               "<s>{system}\\n\\n### Instruction:\\n{q}\\n\\n### Response: {a}</s>"
  llama2_chat  Chinese-Alpaca-2's:
               "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a}</s><s>[INST] {q2} [/INST]"
  tokenizer    the model's own `chat_template` (apply_chat_template), e.g. SmolLM2's ChatML
The built-in templates end a reply with the tokenizer's EOS (FastChat's "</s>" is LLaMA's EOS) and
start with its BOS when it has one (as pre-training documents do).

The template used for training is saved with the output (`zhtrain_template.json`) so generation
uses it: `load_saved_template(folder)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from zhtrain.errors import ZhtrainError
from zhtrain.files import write_json_atomic

BOS, EOS = "bos", "eos"
TEMPLATE_FILE = "zhtrain_template.json"

Messages = list[dict]


@dataclass(frozen=True)
class Segment:
    """A piece of a sample: `text` to tokenize, or `special` ("bos"/"eos": the tokenizer's own token)."""

    text: str = ""
    special: Optional[str] = None
    trained: bool = False
    # Read special-token strings in `text` as special tokens? Only for a chat_template's own markup;
    # in built-in templates a "</s>" typed in a message stays text (BOS/EOS are added by id).
    parse_special: bool = False


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    default_system: Optional[str]
    first_user: str = ""  # format of the first user turn: {system} and {query}
    next_user: str = ""  # format of later user turns: {query}
    turn_bos: bool = False  # Llama-2: every turn is its own <s> ... </s>
    reply_separator: str = " "  # text between the prompt and the reply in the canonical rendering
    uses_chat_template: bool = False
    aliases: tuple = field(default=())

    # -- training ------------------------------------------------------------------------------

    def segments(self, tokenizer, messages: Messages) -> list[Segment]:
        """A training conversation (ending with an assistant reply) as segments."""
        system, turns = split_turns(messages, self.name, for_generation=False)
        if self.uses_chat_template:
            return _chat_template_segments(tokenizer, messages, self.name, for_generation=False)
        return self._builtin_segments(system, turns)

    # -- generation ----------------------------------------------------------------------------

    def encode_prompt(self, tokenizer, messages: Union[str, Messages], system: Optional[str] = None) -> list[int]:
        """Token ids of the prompt up to where the assistant answers (same tokens as in training)."""
        pieces = encode_segments(tokenizer, self.prompt_segments(tokenizer, messages, system))
        return [token for ids, _ in pieces for token in ids]

    def prompt_segments(self, tokenizer, messages: Union[str, Messages], system: Optional[str] = None) -> list[Segment]:
        messages = _with_system(_as_messages(messages), system)
        sys_text, turns = split_turns(messages, self.name, for_generation=True)
        if self.uses_chat_template:
            return _chat_template_segments(tokenizer, messages, self.name, for_generation=True)
        return self._builtin_segments(sys_text, turns)

    def render_prompt(self, messages: Union[str, Messages], system: Optional[str] = None, tokenizer=None) -> str:
        """The prompt as the template's canonical text (see the module docstring on spaces)."""
        messages = _with_system(_as_messages(messages), system)
        if self.uses_chat_template:
            _require_chat_template(tokenizer, self.name)
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        sys_text, turns = split_turns(messages, self.name, for_generation=True)
        bos = getattr(tokenizer, "bos_token", "<s>") if tokenizer is not None else "<s>"
        eos = getattr(tokenizer, "eos_token", "</s>") if tokenizer is not None else "</s>"
        out = []
        for segment in self._builtin_segments(sys_text, turns):
            if segment.special:
                out.append((bos or "") if segment.special == BOS else (eos or ""))
            elif segment.trained:
                out.append(self.reply_separator + segment.text)
            else:
                out.append(segment.text)
        return "".join(out)

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Token ids that end an assistant reply under this template."""
        if self.uses_chat_template:
            probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
            ends = [s for s in _chat_template_segments(tokenizer, probe, self.name, False) if s.trained]
            ids = [i for ids, _ in encode_segments(tokenizer, ends) for i in ids]
            special = set(tokenizer.all_special_ids) | {
                i for i, t in tokenizer.added_tokens_decoder.items() if t.special
            }
            found = [i for i in ids if i in special]
            return sorted(set(found + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    # -- internals -----------------------------------------------------------------------------

    def _builtin_segments(self, system: Optional[str], turns: list[tuple[str, Optional[str]]]) -> list[Segment]:
        system = self.default_system if system is None else system
        out = [Segment(special=BOS)]
        for k, (query, reply) in enumerate(turns):
            if k and self.turn_bos:
                out.append(Segment(special=BOS))
            if k == 0:
                prompt = self.first_user.format(system=system or "", query=query)
                if not system:  # an empty system prompt leaves no dangling separators
                    prompt = self.next_user.format(query=query)
            else:
                prompt = self.next_user.format(query=query)
            out.append(Segment(prompt))
            if reply is not None:
                out += [Segment(reply, trained=True), Segment(special=EOS, trained=True)]
        return out


# The table: the one place templates are defined.
TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="vicuna_v1.1",
            description="FastChat's vicuna_v1.1 (the seed's train_mem.py): SYS USER: q ASSISTANT: a</s>",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions."
            ),
            first_user="{system} USER: {query} ASSISTANT:",
            next_user="USER: {query} ASSISTANT:",
            aliases=("vicuna",),
        ),
        Template(
            name="alpaca",
            description="Chinese-Alpaca's training prompt (run_clm_sft_with_peft.py)",
            default_system="Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.",
            first_user="{system}\n\n### Instruction:\n{query}\n\n### Response: ",
            next_user="### Instruction:\n{query}\n\n### Response: ",
            reply_separator="",
        ),
        Template(
            name="llama2_chat",
            description="Chinese-Alpaca-2's Llama-2 chat prompt: [INST] <<SYS>> ... <</SYS>> q [/INST] a</s>",
            default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
            first_user="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{query} [/INST]",
            next_user="[INST] {query} [/INST]",
            turn_bos=True,
            aliases=("llama2", "llama-2"),
        ),
        Template(
            name="tokenizer",
            description="the model's own chat_template (tokenizer_config / chat_template.jinja), e.g. SmolLM2's",
            default_system=None,
            uses_chat_template=True,
            aliases=("chat_template",),
        ),
    )
}


def get_template(name: str) -> Template:
    for template in TEMPLATES.values():
        if name == template.name or name in template.aliases:
            return template
    raise ZhtrainError(f"--template {name}: unknown template; choose one of {', '.join(TEMPLATES)}")


def encode_segments(tokenizer, segments: list[Segment]) -> list[tuple[list[int], bool]]:
    """Tokenize each segment on its own: [(ids, trained)]. BOS is skipped if the tokenizer has none."""
    return encode_segments_batch(tokenizer, [segments])[0]


def encode_segments_batch(tokenizer, samples: list[list[Segment]]) -> list[list[tuple[list[int], bool]]]:
    """`encode_segments` for many samples, with one batched tokenizer call (fast tokenizers run it in parallel)."""
    token_ids = {}
    for parse in (False, True):
        texts = [
            s.text
            for segments in samples
            for s in segments
            if s.special is None and s.text and s.parse_special == parse
        ]
        encoded = (
            tokenizer(texts, add_special_tokens=False, split_special_tokens=not parse)["input_ids"] if texts else []
        )
        token_ids[parse] = iter(encoded)
    out = []
    for segments in samples:
        pieces = []
        for segment in segments:
            if segment.special == BOS:
                ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            elif segment.special == EOS:
                if tokenizer.eos_token_id is None:
                    raise ZhtrainError(
                        f"tokenizer {tokenizer.name_or_path}: no eos_token; a reply needs an end token to learn to stop"
                    )
                ids = [tokenizer.eos_token_id]
            else:
                ids = next(token_ids[segment.parse_special]) if segment.text else []
            if ids:
                pieces.append((list(ids), segment.trained))
        out.append(pieces)
    return out


def split_turns(
    messages: Messages, template: str, for_generation: bool
) -> tuple[Optional[str], list[tuple[str, Optional[str]]]]:
    """(system or None, [(user, assistant or None)]), checking the shape every template relies on."""
    if not messages:
        raise ZhtrainError("empty conversation: at least one user message is needed")
    system = None
    rest = list(messages)
    if rest[0].get("role") == "system":
        system = rest.pop(0)["content"]
    turns: list[tuple[str, Optional[str]]] = []
    for k, message in enumerate(rest):
        role = message.get("role")
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ZhtrainError(
                f"message {k + (system is not None)}: role {role!r} where {expected!r} is expected; roles must "
                "alternate user/assistant"
            )
        if expected == "user":
            turns.append((message["content"], None))
        else:
            turns[-1] = (turns[-1][0], message["content"])
    last = rest[-1]["role"] if rest else None
    if for_generation and last != "user":
        raise ZhtrainError(f"template {template}: a generation prompt must end with a user message")
    if not for_generation and last != "assistant":
        raise ZhtrainError(f"template {template}: a training conversation must end with an assistant reply")
    return system, turns


def _as_messages(messages: Union[str, Messages]) -> Messages:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _with_system(messages: Messages, system: Optional[str]) -> Messages:
    if system is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system}] + messages


# ---------------------------------------------------------------------------------------------
# The `tokenizer` template: segments from the model's chat_template, rendered message by message


def _require_chat_template(tokenizer, name: str) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise ZhtrainError(
            f"--template {name}: tokenizer {where} has no chat_template; choose --template "
            f"{', '.join(t for t in TEMPLATES if t != name)}"
        )


def _chat_template_segments(tokenizer, messages: Messages, name: str, for_generation: bool) -> list[Segment]:
    """Render the conversation one message at a time; each new message's text is its own segment.

    For an assistant message the new text is `before + reply + after`: `before` (e.g. a role
    header the template adds) is prompt, the reply and `after` up to its first special token (the
    end-of-turn token, e.g. <|im_end|>) are trained, what follows (e.g. a newline) is prompt.
    """
    _require_chat_template(tokenizer, name)

    def render(msgs, generation_prompt):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises its own types (e.g. a template that refuses system messages)
            raise ZhtrainError(
                f"--template {name}: the tokenizer's chat_template fails on this conversation ({err}); choose a "
                "built-in template"
            ) from err

    specials = sorted(
        set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
        key=len,
        reverse=True,
    )
    segments: list[Segment] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with_header = _extend(done, render(messages[:index], True), name)
        full = _extend(with_header, render(messages[: index + 1], False), name)
        segments.append(Segment(with_header[len(done) :], parse_special=True))
        added = full[len(with_header) :]
        reply = message["content"]
        start = added.find(reply) if reply else -1
        if start < 0:
            raise ZhtrainError(
                f"--template {name}: the chat_template changes assistant replies (e.g. strips them), so the reply "
                "cannot be trained exactly; strip your replies or choose a built-in template"
            )
        after = added[start + len(reply) :]
        end = _end_of_turn(after, specials)
        if end is None:
            raise ZhtrainError(
                f"--template {name}: the chat_template puts no end-of-turn special token after a reply, so the model "
                "would never learn to stop; choose a built-in template "
                f"({', '.join(t for t in TEMPLATES if t != name)})"
            )
        segments += [
            Segment(added[:start], parse_special=True),
            Segment(reply, trained=True),  # the reply's own text stays text, even "<|im_end|>" typed in it
            Segment(after[:end], trained=True, parse_special=True),
            Segment(after[end:], parse_special=True),
        ]
        done = full
    if for_generation:
        segments.append(Segment(_extend(done, render(messages, True), name)[len(done) :], parse_special=True))
    return [s for s in segments if s.text]


def _extend(prefix: str, rendered: str, name: str) -> str:
    if not rendered.startswith(prefix):
        raise ZhtrainError(
            f"--template {name}: the chat_template renders earlier messages differently once later ones are added, "
            "so prompt and reply parts cannot be separated exactly; choose a built-in template"
        )
    return rendered


def _end_of_turn(after: str, specials: list[str]) -> Optional[int]:
    """Index just past the first special token in `after`, or None."""
    best = None
    for token in specials:
        position = after.find(token)
        if position >= 0 and (best is None or position < best[0]):
            best = (position, position + len(token))
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------
# Saved with the output so generation uses the training template


def save_template(folder: Union[str, Path], name: str, system: Optional[str] = None) -> Path:
    """Write `zhtrain_template.json` ({"template", "system"}) into `folder` (atomically)."""
    template = get_template(name)
    path = Path(folder) / TEMPLATE_FILE
    write_json_atomic(path, {"template": template.name, "system": system})
    return path


def load_saved_template(folder: Union[str, Path]) -> Optional[tuple[Template, Optional[str]]]:
    """(template, system prompt or None) saved by `zhtrain sft` in `folder`, or None if there is none."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return get_template(data["template"]), data.get("system")
    except (ValueError, KeyError, TypeError) as err:
        raise ZhtrainError(f"{path}: unreadable ({err}); delete it or pass --template") from err
