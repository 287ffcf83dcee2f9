"""Chat: the build keeps the checkpoint's chat template and end-of-turn tokens; prompts render token for
token as transformers' `apply_chat_template` does (the embedded template, a Qwen-style and a gpt-oss-style
one, written here: no hub access); `model.chat`, `run --message`, and `run --chat` driven through tmux."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from conftest import VARIANTS, _once, _shared_root
from moe_compile import load
from moe_compile.build import build, save_tokenizer
from moe_compile.cli import main
from moe_compile.errors import RequestError
from moe_compile.models.embedded import build_tokenizer, write_checkpoint
from moe_compile.runtime.chat_template import render

SYSTEM = "You are terse."
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi. What do you need?"}, {"role": "user", "content": "A mixture of experts"}]

# Qwen1.5-Chat's ChatML template (it lives in tokenizer_config.json there): <|im_end|> ends a turn.
QWEN_TOKENS = ["<|im_start|>", "<|im_end|>"]
QWEN_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# gpt-oss's harmony format (chat_template.jinja there): a fixed system header, the system message as the
# developer's, channels on assistant turns, <|return|> or <|call|> ends the model's turn.
GPT_OSS_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
GPT_OSS_STYLE = (
    "<|start|>system<|message|>You are ChatGPT.\nReasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final.<|end|>"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}<|start|>developer<|message|># Instructions\n\n{{ message.content }}<|end|>"
    "{%- elif message.role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>{{ message.content }}"
    "{%- if loop.last and not add_generation_prompt %}<|return|>{% else %}<|end|>{% endif -%}"
    "{%- else -%}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def chat_tokenizer(path, specials: list[str], template: str, in_config: bool = False):
    """The embedded byte-level BPE with `specials` as single tokens (ids below the tiny models' 512) and
    `template`, saved to `path` as chat_template.jinja or, as older checkpoints keep it, in tokenizer_config.json."""
    tokenizer = build_tokenizer(480)
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    if in_config:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        (path / "chat_template.jinja").unlink()
    return tokenizer


def transformers_prompt(checkpoint, messages) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(messages, add_generation_prompt=True,
                                                                        return_dict=False)


@pytest.fixture(scope="session")
def qwen_style(tmp_path_factory):
    """A 1-layer tiny Qwen2-MoE with the Qwen-style template whose generation_config.json ends turns at
    <|im_end|> (config.json names only <|endoftext|>), built. Its lm_head rows of <|im_end|> and of the
    third token of its greedy reply to CONVERSATION are swapped: that reply is two tokens and <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM

    def make(root):
        root.mkdir()
        checkpoint = root / "checkpoint"
        write_checkpoint(dict(VARIANTS["qwen2_moe"], num_hidden_layers=1), checkpoint)
        tokenizer = chat_tokenizer(checkpoint, QWEN_TOKENS, QWEN_STYLE, in_config=True)
        im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", tokenizer.eos_token])
        generation = json.loads((checkpoint / "generation_config.json").read_text())
        (checkpoint / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [im_end, endoftext]}))
        prompt = transformers_prompt(checkpoint, CONVERSATION)
        with torch.no_grad():
            model = AutoModelForCausalLM.from_pretrained(checkpoint)
            reply = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, len(prompt):].tolist()
        assert reply[2] not in reply[:2] + [im_end], reply
        weights = load_file(checkpoint / "model.safetensors")
        weights["lm_head.weight"][[im_end, reply[2]]] = weights["lm_head.weight"][[reply[2], im_end]].clone()
        save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
        build(str(checkpoint), root / "build", max_batch=4, max_seq=128, progress=False, backend="onnx")
        (root / "reply.json").write_text(json.dumps(reply[:2] + [im_end]))

    root = _once(_shared_root(tmp_path_factory) / "chat-qwen-style", make)
    return root / "checkpoint", root / "build", json.loads((root / "reply.json").read_text())


@pytest.mark.parametrize("style", ["embedded", "qwen", "gpt-oss"])
def test_prompt_renders_as_transformers(style, checkpoint, qwen_style, tmp_path):
    """The build's copy of the tokenizer renders CONVERSATION into transformers' very token ids."""
    from transformers import AutoTokenizer

    if style == "embedded":
        source, starts = checkpoint("qwen2_moe"), None
    elif style == "qwen":
        source, starts = qwen_style[0], ("<|im_start|>", len(CONVERSATION) + 1)
    else:
        source, starts = tmp_path / "gpt-oss", ("<|start|>", len(CONVERSATION) + 2)
        chat_tokenizer(source, GPT_OSS_TOKENS, GPT_OSS_STYLE)
    save_tokenizer(source, tmp_path / "tokenizer", trust_remote_code=False)
    kept = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = render(kept, CONVERSATION)
    assert ids == transformers_prompt(source, CONVERSATION)
    if starts:  # each turn marker is one special token, not its characters
        assert ids.count(kept.convert_tokens_to_ids(starts[0])) == starts[1]
    assert kept.decode(ids).endswith("assistant" if style == "gpt-oss" else "assistant\n")


def test_build_keeps_template_and_end_of_turn(qwen_style):
    checkpoint, out, reply = qwen_style
    model = load(out)
    im_end, endoftext = model.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.manifest.eos_token_ids == [im_end, endoftext]  # generation_config.json's, not config.json's
    assert model.chat_prompt(CONVERSATION) == transformers_prompt(checkpoint, CONVERSATION)
    streamed = []
    result = model.chat(CONVERSATION, stream=lambda row, token: streamed.append((row, token)))
    assert result.token_ids == reply and streamed == [(0, t) for t in reply]  # stopped at the end of the turn
    assert result.text == model.tokenizer.decode(reply[:2]) and "<|im_end|>" not in result.text


def test_chat_is_generate_on_the_rendered_prompt(built):
    """The embedded template end to end: chat feeds the backend exactly transformers' prompt."""
    model = load(built("qwen2_moe", form="ort"))
    prompt = model.chat_prompt(CONVERSATION)
    assert model.chat(CONVERSATION, max_new_tokens=6).token_ids == model.generate([prompt], max_new_tokens=6)[0].token_ids
    assert model.chat(CONVERSATION, temperature=0.8, seed=3, max_new_tokens=6).token_ids == \
        model.generate([prompt], temperature=0.8, seed=3, max_new_tokens=6)[0].token_ids
    with pytest.raises(RequestError, match="messages must be"):
        model.chat("Hello")
    with pytest.raises(RequestError, match="max_seq"):
        model.chat([{"role": "user", "content": "word " * 200}])


def run_cli(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def test_message_prints_one_reply(qwen_style, capsys):
    out = qwen_style[1]
    rc, stdout, _ = run_cli(capsys, "run", str(out), "--system", SYSTEM, "--message", CONVERSATION[1]["content"],
                            "--max-new-tokens", "8")
    assert rc == 0
    model = load(out)
    assert stdout == model.chat(CONVERSATION[:2], max_new_tokens=8).text + "\n"


@pytest.mark.parametrize("args,words", [
    (["--chat"], ["has no chat template", "--prompt"]),
    (["--message", "Hello"], ["has no chat template"]),
    (["--prompt", "Hello", "--system", "x"], ["--system", "--chat or --message"]),
    (["--message", " "], ["empty message"]),
], ids=["chat", "message", "system-without-chat", "empty-message"])
def test_chat_refusals_are_one_line(built, tmp_path, capsys, args, words):
    out = tmp_path / "base-model-build"
    shutil.copytree(built("qwen2_moe", form="ort"), out)
    (out / "tokenizer" / "chat_template.jinja").unlink()  # as a build of a checkpoint without a template
    rc, _, err = run_cli(capsys, "run", str(out), *args)
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert all(word in err for word in words), err


class Tmux:
    """Terminals: a tmux server of its own (private socket, no user config); a pane prints its command's
    exit status and stays after it ends."""

    def __init__(self, name: str):
        self.base = ["tmux", "-u", "-L", name, "-f", "/dev/null"]

    def start(self, session: str, command: list[str]) -> None:
        self("new-session", "-d", "-s", session, "-x", "200", "-y", "50", f'{shlex.join(command)}; echo "[exit $?]"')
        self("set-option", "-t", session, "remain-on-exit", "on")

    def type(self, session: str, text: str) -> None:
        self("send-keys", "-t", session, "-l", text)
        self("send-keys", "-t", session, "Enter")

    def screen(self, session: str) -> str:
        return self("capture-pane", "-p", "-J", "-t", session).stdout

    def wait(self, session: str, done, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while not done(screen := self.screen(session)):
            assert time.monotonic() < deadline, f"timed out; the screen:\n{screen}"
            time.sleep(0.2)
        return screen

    def __call__(self, *args):
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, timeout=30)


def prompts(screen: str) -> int:
    """How many times the chat asked for a turn (its prompt is '> ')."""
    return sum(line.startswith(">") for line in screen.splitlines())


def waiting(n: int):
    return lambda screen: prompts(screen) == n and screen.rstrip().endswith(">")


def flat(text: str) -> str:
    """Text as the screen shows it, spaces normalised: a random model's reply has control characters, which a
    terminal does not display, and tmux renders U+FFFD (a partial character) by its width alone."""
    return " ".join("".join(c if c.isprintable() and c != "\ufffd" else " " for c in text).split())


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_in_a_terminal(qwen_style):
    """Type two turns, read the screen, /reset, one turn, Ctrl-D; and /exit in a second terminal."""
    out = qwen_style[1]
    command = [sys.executable, "-m", "moe_compile.cli", "run", str(out), "--chat", "--max-new-tokens", "8"]
    tmux = Tmux(f"moe-compile-test-{os.getpid()}")
    try:
        tmux.start("talk", [*command, "--system", SYSTEM])
        tmux.start("leave", command)
        first, second = CONVERSATION[1]["content"], CONVERSATION[3]["content"]
        tmux.wait("talk", waiting(1))
        tmux.type("talk", first)
        tmux.wait("talk", waiting(2))
        tmux.type("talk", second)
        screen = tmux.wait("talk", waiting(3))

        model = load(out)
        reply1 = model.chat(CONVERSATION[:2], max_new_tokens=8).text  # ends at <|im_end|> (see qwen_style)
        history = [*CONVERSATION[:2], {"role": "assistant", "content": reply1}, CONVERSATION[3]]
        reply2 = model.chat(history, max_new_tokens=8).text
        assert f"> {first}" in screen and f"> {second}" in screen
        assert flat(f"{first} {reply1} > {second} {reply2} >") in flat(screen), screen

        tmux.type("talk", "/reset")
        tmux.type("talk", second)
        screen = tmux.wait("talk", waiting(5))
        alone = model.chat([CONVERSATION[0], CONVERSATION[3]], max_new_tokens=8).text
        assert "(new conversation)" in screen and flat(f"{second} {alone} >") in flat(screen.split("(new conversation)")[1])
        tmux("send-keys", "-t", "talk", "C-d")
        tmux.wait("talk", lambda screen: "[exit 0]" in screen, timeout=60)

        tmux.wait("leave", waiting(1))
        tmux.type("leave", "/help")
        tmux.wait("leave", lambda screen: "unknown command /help" in screen and waiting(2)(screen))
        tmux.type("leave", "/exit")
        tmux.wait("leave", lambda screen: "[exit 0]" in screen, timeout=60)
    finally:
        subprocess.run([*tmux.base, "kill-server"], capture_output=True)
