"""The spec's "How to use PhiMoE" script, the pipeline, Auto classes and the CLI, end to end on a
tiny checkpoint with a tokenizer trained in the test."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, randomize_
from tok_util import build_tokenizer

import moetorch
from moetorch import cli

# The spec's usage example (shared/spec/000, "How to use PhiMoE"), verbatim but for the import
# line, the checkpoint path and a print of the result's type.
SPEC_SCRIPT = '''
import torch
from {lib} import AutoModelForCausalLM, AutoTokenizer, pipeline 

torch.random.manual_seed(0) 

model = AutoModelForCausalLM.from_pretrained( 
    "{path}",  
    device_map="auto",  
    dtype="auto",
) 

tokenizer = AutoTokenizer.from_pretrained("{path}") 

messages = [ 
    {{"role": "system", "content": "You are a helpful AI assistant."}}, 
    {{"role": "user", "content": "Can you provide ways to eat combinations of bananas and dragonfruits?"}}, 
    {{"role": "assistant", "content": "Sure! Here are some ways to eat bananas and dragonfruits together: 1. Banana and dragonfruit smoothie: Blend bananas and dragonfruits together with some milk and honey. 2. Banana and dragonfruit salad: Mix sliced bananas and dragonfruits together with some lemon juice and honey."}}, 
    {{"role": "user", "content": "What about solving an 2x + 3 = 7 equation?"}}, 
] 

pipe = pipeline( 
    "text-generation", 
    model=model, 
    tokenizer=tokenizer, 
) 

generation_args = {{ 
    "max_new_tokens": 500, 
    "return_full_text": False, 
    "temperature": 0.0, 
    "do_sample": False, 
}} 

output = pipe(messages, **generation_args) 
print(output[0]['generated_text'])
'''


def tiny_checkpoint(arch, directory, seed=0):
    build_tokenizer(directory)
    tok = moetorch.Tokenizer.from_pretrained(directory)
    config = arch.our_config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, max_position_embeddings=1024)
    model = arch.ours["causal_lm"](config)
    randomize_(model, seed, std=0.3)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param.name))


def run_script(lib, path):
    code = SPEC_SCRIPT.format(lib=lib, path=path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_spec_usage_script_runs_unchanged_and_matches_transformers(checkpoint):
    ours = run_script("moetorch", checkpoint)
    theirs = run_script("transformers", checkpoint)
    assert ours == theirs
    assert len(ours.strip()) > 0


def test_pipeline_inputs_and_outputs(checkpoint):
    pipe = moetorch.pipeline("text-generation", model=str(checkpoint))
    hf_pipe = transformers.pipeline("text-generation", model=str(checkpoint))
    args = {"max_new_tokens": 6, "do_sample": False}
    for prompt in ("The experts", ["Bananas and", "Solve 2x"]):
        assert pipe(prompt, **args) == hf_pipe(prompt, **args)
    chat = [{"role": "user", "content": "What about 2x + 3 = 7?"}]
    out = pipe(chat, **args)
    assert out == hf_pipe(chat, **args)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(pipe(chat, return_full_text=False, **args)[0]["generated_text"], str)
    torch.manual_seed(1)
    sampled = pipe("The experts", do_sample=True, temperature=0.7, max_new_tokens=5)
    assert sampled[0]["generated_text"].startswith("The experts")
    with pytest.raises(ValueError, match="unsupported task"):
        moetorch.pipeline("summarization", model=str(checkpoint))
    # a torch Dataset (Transformers' KeyDataset) runs lazily; `return_type` as Transformers takes it
    from transformers.pipelines.pt_utils import KeyDataset
    from transformers.pipelines.text_generation import ReturnType

    data = KeyDataset([{"text": "The experts"}, {"text": "Solve 2x"}], "text")
    ours = pipe(data, **args)
    assert not isinstance(ours, list) and list(ours) == list(hf_pipe(data, **args))
    for kind in ReturnType:
        assert pipe("The experts", return_type=kind, **args) == hf_pipe("The experts", return_type=kind, **args), kind


def test_pipeline_model_kwargs_load_the_model_as_transformers_does(checkpoint):
    """model_kwargs reach from_pretrained (dtype, device_map), as in Transformers; a dtype or a
    device_map given both as an argument and in model_kwargs is an error, as there."""
    kw = dict(model_kwargs={"torch_dtype": torch.bfloat16, "device_map": "cpu"})
    pipe = moetorch.pipeline("text-generation", model=str(checkpoint), **kw)
    hf_pipe = transformers.pipeline("text-generation", model=str(checkpoint), **kw)
    assert pipe.model.dtype == hf_pipe.model.dtype == torch.bfloat16
    args = {"max_new_tokens": 6, "do_sample": False}
    assert pipe("The experts", **args) == hf_pipe("The experts", **args)
    for lib in (moetorch, transformers):
        with pytest.raises(ValueError, match="dtype"):
            lib.pipeline("text-generation", model=str(checkpoint), dtype="float32", model_kwargs={"dtype": torch.bfloat16})
    with pytest.raises(ValueError, match="device_map"):
        moetorch.pipeline("text-generation", model=str(checkpoint), device_map="cpu", model_kwargs={"device_map": "cpu"})


def test_pipeline_defaults_are_transformers(checkpoint):
    """Transformers' pipeline samples at temperature 0.7 (256 new tokens) where neither the call,
    the pipeline's arguments, a generation_config nor the model's generation config set those, and
    sets the tokenizer's padding side to left; the same seeds draw the same text."""
    pipes = (moetorch.pipeline("text-generation", model=str(checkpoint)),
             transformers.pipeline("text-generation", model=str(checkpoint)))
    assert pipes[0].tokenizer.padding_side == pipes[1].tokenizer.padding_side == "left"
    calls = []
    original = pipes[0].model.generate
    pipes[0].model.generate = lambda *a, **kw: calls.append(kw) or original(*a, **kw)

    def both(*args, per_lib=lambda lib: {}, **kw):
        outs = []
        for pipe, lib in zip(pipes, (moetorch, transformers)):
            torch.manual_seed(3)
            outs.append(pipe(*args, **kw, **per_lib(lib)))
        assert outs[0] == outs[1], kw
        return outs[0], calls[-1]

    _, got = both("The experts", max_new_tokens=6)
    assert (got["do_sample"], got["temperature"]) == (True, 0.7)
    assert "temperature" not in both("The experts", max_new_tokens=6, do_sample=False)[1]  # greedy
    assert both("The experts", max_new_tokens=6, top_k=5)[1]["temperature"] == 0.7
    _, got = both("The experts", per_lib=lambda lib: {"generation_config": lib.GenerationConfig(
        max_new_tokens=5, temperature=1.5, do_sample=True)})
    assert got["generation_config"].temperature == 1.5 and got["generation_config"].max_new_tokens == 5
    out, got = both("Bananas", max_length=9, return_tensors=True)
    assert "max_new_tokens" not in got and len(out[0]["generated_token_ids"]) == 9
    for pipe in pipes:  # the model's own settings beat the pipeline's
        pipe.model.generation_config.temperature = 1.3
    _, got = both("The experts", max_new_tokens=6)
    assert got["do_sample"] and "temperature" not in got


def test_auto_classes_pick_the_architecture(checkpoint, tmp_path):
    model = moetorch.AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    assert model.config.model_type == model_type
    assert type(moetorch.AutoConfig.from_pretrained(checkpoint)).__name__.lower().startswith(model_type[:3])
    base = moetorch.AutoModel.from_pretrained(checkpoint)
    assert not hasattr(base, "lm_head")
    # an original-style config.json naming only `architectures`
    cfg = json.loads((checkpoint / "config.json").read_text())
    original = {"phimoe": "PhiMoEForCausalLM", "jetmoe": "JetMoEForCausalLM"}[model_type]
    cfg.pop("model_type")
    cfg["architectures"] = [original]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert moetorch.AutoModelForCausalLM.class_for(tmp_path) is type(model)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moetorch.ConfigError, match="not supported"):
        moetorch.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_cli_generate_streams_the_continuation(checkpoint, capsys):
    assert cli.main(["generate", "--model", str(checkpoint), "The experts", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    tok = moetorch.Tokenizer.from_pretrained(checkpoint)
    model = moetorch.AutoModelForCausalLM.from_pretrained(checkpoint)
    enc = tok("The experts", return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=8, do_sample=False)
    expected = "The experts" + tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.out.strip() == expected.strip()
    assert "tokens/s" in out.err


def test_cli_output_held_to_json_or_a_regex(capsys, monkeypatch, tmp_path):
    """generate --json / --json-schema (text or @file) / --regex, and chat --regex on every turn:
    the text the grammar allows; bad or clashing flags are errors that name the flag."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    for flags in (["--json-schema", json.dumps(schema)], ["--json-schema", f"@{tmp_path / 's.json'}"]):
        assert cli.main(["generate", "def f():", "--max-new-tokens", "40", *flags]) == 0
        value = json.loads(capsys.readouterr().out[len("def f():"):])
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    assert cli.main(["generate", "x = ", "--max-new-tokens", "12", "--regex", r"(yes|no)!", "--temperature", "1.5",
                     "--seed", "3"]) == 0
    assert re.fullmatch(r"x = (yes|no)!\s*", capsys.readouterr().out)
    assert cli.main(["generate", "x = ", "--max-new-tokens", "3", "--json"]) == 0
    assert capsys.readouterr().out.startswith("x = {")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAgain\n/exit\n"))
    assert cli.main(["chat", "--max-new-tokens", "8", "--regex", "[0-9]{2}"]) == 0
    replies = re.findall(r"assistant> (.*)", capsys.readouterr().out)
    assert len(replies) == 2 and all(re.fullmatch("[0-9]{2}", r.strip()) for r in replies), replies
    for flags, match in ((["--regex", "(a"], "(?s)--regex: .*unclosed group"),
                         (["--json-schema", "{type: 1"], "--json-schema: schema: not JSON"),
                         (["--json-schema", "@/nonexistent/s.json"], "--json-schema: .*No such file"),
                         (["--json", "--regex", "a"], "--json and --regex both set what the output is")):
        with pytest.raises(SystemExit, match=match):
            cli.main(["generate", "hi", *flags])


def test_cli_chat_keeps_history(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd then?\n/reset\nAgain\n/exit\nnever read\n"))
    assert cli.main(["chat", "--model", str(checkpoint), "--max-new-tokens", "5", "--system", "Be brief."]) == 0
    out = capsys.readouterr()
    assert out.out.count("assistant> ") == 3 and "history cleared" in out.err


def _ctrl_c_after(monkeypatch, tokens: int) -> None:
    """Sends this process SIGINT once the streamer has shown `tokens` generated tokens' puts."""
    import os
    import signal

    from moetorch.generation import TextStreamer

    real, seen = TextStreamer.put, [0]

    def put(self, value):
        prompt = self.next_tokens_are_prompt
        real(self, value)
        if not prompt:
            seen[0] += 1
            if seen[0] == tokens:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TextStreamer, "put", put)


def test_cli_ctrl_c_stops_a_reply(capsys, monkeypatch, python_ctrl_c):
    """generate: Ctrl-C ends the output at the tokens shown (exit 130, no traceback, the handler
    restored). chat: it ends the reply, which stays in the history, and the next turn runs; Ctrl-C
    at the prompt quits."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    _ctrl_c_after(monkeypatch, 3)
    assert cli.main(["generate", "def fibonacci(n):", "--max-new-tokens", "40"]) == 130
    out = capsys.readouterr()
    assert "stopped (Ctrl-C) after 3 tokens" in out.err and "Traceback" not in out.err
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-phimoe")
    enc = tok("def fibonacci(n):", return_tensors="pt")
    full = tok.decode(model.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc["input_ids"].shape[1]:],
                      skip_special_tokens=True)
    shown = out.out[len("def fibonacci(n):"):].rstrip("\n")
    assert shown and full.startswith(shown) and len(shown) < len(full)
    assert signal.getsignal(signal.SIGINT) is before

    calls = []
    real_stream = cli._stream

    def stream(model, tok, input_ids, kwargs):
        result = real_stream(model, tok, input_ids, kwargs)
        calls.append((tok.decode(input_ids[0]), result))
        return result

    monkeypatch.setattr(cli, "_stream", stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAgain\n/exit\n"))
    _ctrl_c_after(monkeypatch, 2)
    assert cli.main(["chat", "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr()
    assert out.out.count("assistant> ") == 2 and out.err.count("reply stopped (Ctrl-C)") == 1
    (_, (first, n, _, stopped)), (prompt2, (_, _, _, stopped2)) = calls
    assert stopped and n == 2 and first and not stopped2
    assert first in prompt2  # the shown part of the stopped reply is the history's assistant turn

    # a reply stopped before any text was shown leaves no turn behind
    calls.clear()
    first = [True]

    def stream_stopped_first(model, tok, input_ids, kwargs):
        if first[0]:
            first[0] = False
            calls.append((tok.decode(input_ids[0]), None))
            return "", 0, 0.1, True
        return stream(model, tok, input_ids, kwargs)

    monkeypatch.setattr(cli, "_stream", stream_stopped_first)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Question one\nQuestion two\n/exit\n"))
    assert cli.main(["chat", "--max-new-tokens", "4"]) == 0
    assert "Question one" in calls[0][0] and "Question two" in calls[1][0] and "Question one" not in calls[1][0]
    capsys.readouterr()

    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    assert cli.main(["chat", "--max-new-tokens", "4"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    for command in ("generate", "chat", "info", "train", "train-tokenizer", "bench"):
        assert command in listed
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])  # the benchmark's own parser
    assert "--layer-tokens" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--model .*nope: .*nope' is not a local directory"):
        cli.main(["generate", "--model", str(tmp_path / "nope"), "hi"])
    with pytest.raises(SystemExit, match="--model someone/nothing: .*could not be had.*Embedded models"):
        cli.main(["generate", "--model", "someone/nothing", "hi"])
    with pytest.raises(SystemExit, match=f"--model {tmp_path}: no config.json found"):  # a directory, no checkpoint
        cli.main(["generate", "--model", str(tmp_path), "hi"])
    (tmp_path / "config.json").write_text('{"model_type": "phimoe"}')
    with pytest.raises(SystemExit, match=f"--model {tmp_path}: no model.safetensors"):
        cli.main(["generate", "--model", str(tmp_path), "hi"])
    bad = (("--device", "gpu0"), ("--dtype", "int8"), ("--temperature", "-1"), ("--temperature", "nan"),
           ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"), ("--temperature", "abc"), ("--top-k", "x"))
    for flag, value in bad:  # usage errors, before anything loads
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli.main(["generate", "hi", flag, value])
        assert exited.value.code == 2 and f"argument {flag}: '{value}' is not a" in capsys.readouterr().err
    for value in ("0", "-3"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["chat", "--max-new-tokens", value])
        assert exited.value.code == 2 and "argument --max-new-tokens: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="the prompt has 1502 tokens, more than the model's 1024-token context"):
        cli.main(["generate", "def f(x): " * 300])


def test_cli_broken_files_templates_and_text_are_named(tmp_path, capsys, monkeypatch):
    """Each of these gave a traceback (and `chat` lost its history): a broken tokenizer file, a chat
    template that does not compile or that refuses a conversation (its raise_exception), a prompt
    or chat line that is not UTF-8 (Python decodes such argv and stdin bytes to lone surrogates), a
    seed past torch's range; and --max-memory's "0" (nothing on that GPU) failed the loader."""
    from moetorch.defaults import resolve_model

    source, _ = resolve_model(None)
    for name, file, text in (("tok", "tokenizer.json", "{1}"), ("cfg", "tokenizer_config.json", "{")):
        shutil.copytree(source, tmp_path / name)
        (tmp_path / name / file).write_text(text)
        with pytest.raises(SystemExit, match=f"^moetorch: .*{name}/{file} is not (a )?valid"):
            cli.main(["generate", "--model", str(tmp_path / name), "hi"])

    def with_template(name, template):
        shutil.copytree(source, tmp_path / name)
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        (tmp_path / name / "chat_template.jinja").unlink(missing_ok=True)
        config["chat_template"] = template
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    broken = with_template("broken", "{% for m in messages %}{{ m.content }")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    with pytest.raises(SystemExit, match="broken: chat_template is not a valid jinja template"):
        cli.main(["chat", "--model", broken])
    picky = with_template("picky", "{% for m in messages %}{% if m.content == 'forbidden' %}"
                                   "{{ raise_exception('no such word') }}{% endif %}{{ m.content }}\n{% endfor %}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("forbidden\nab\udcffcd\nhi\n"))
    capsys.readouterr()
    assert cli.main(["chat", "--model", picky, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr()
    assert "the chat template refused this conversation (no such word); the message was not sent" in out.err
    assert "that message is not valid UTF-8 (bytes b'\\xff' at character 2); it was not sent" in out.err
    assert out.out.count("assistant> ") == 1  # the chat went on to "hi"
    with pytest.raises(SystemExit, match=r"the prompt is not valid UTF-8 \(bytes b'\\xff' at character 2\)"):
        cli.main(["generate", "ab\udcffcd"])
    with pytest.raises(SystemExit, match=r"--system is not valid UTF-8 \(bytes b'\\xff' at character 0\)"):
        cli.main(["chat", "--model", picky, "--system", "\udcff"])
    for seed, message in (("99999999999999999999", "must be below 2\\*\\*64"),
                          ("-99999999999999999999", "must be at least -9223372036854775808")):
        with pytest.raises(SystemExit) as exited:
            cli.main(["generate", "hi", f"--seed={seed}"])
        assert exited.value.code == 2 and re.search(f"argument --seed: {message}", capsys.readouterr().err)
    from moetorch.serve import worker

    seen, load = [], worker.load_pretrained
    monkeypatch.setattr(worker, "load_pretrained", lambda *a: seen.append(a[1:]) or load(*a))
    assert cli.main(["generate", "hi", "--max-new-tokens", "2", "--max-memory", "0=0,cpu=8GiB",
                     "--device", "sequential"]) == 0
    assert seen == [("sequential", "auto", {0: 0, "cpu": "8GiB"})]


def test_cli_chat_outgrowing_the_context_and_a_closed_pipe(capsys, monkeypatch):
    """A chat longer than the model's context drops its oldest turns (saying so) and goes on; a
    message too long alone is not sent, and the chat goes on. `moetorch generate ... | head` ends
    quietly when the reader goes away (exit 141, no traceback)."""
    turns = [f"message {i}: " + "tell me more about experts " * 12 for i in range(10)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns + ["def f(x): " * 300, "hi"]) + "\n"))
    assert cli.main(["chat", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.count("assistant> ") == 11 and "oldest turns were dropped" in out.err
    assert "more than the model's 1024-token context; it was not sent" in out.err
    monkeypatch.undo()
    run = subprocess.run(f"{sys.executable} -m moetorch generate 'def f(' --max-new-tokens 64 | head -c 10",
                         shell=True, capture_output=True, text=True, timeout=300,
                         executable="/bin/bash")
    assert len(run.stdout) == 10 and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr
    code = subprocess.run(f"set -o pipefail; {sys.executable} -m moetorch generate 'def f(' --max-new-tokens 64 "
                          "| head -c 10 > /dev/null", shell=True, timeout=300, executable="/bin/bash").returncode
    assert code == 141


def test_cli_device_takes_a_placement(tmp_path, monkeypatch, capsys):
    # a strategy name places the layers (here, with no GPU, all on the CPU)
    monkeypatch.setenv("MOETORCH_HOME", str(tmp_path))
    assert cli.main(["generate", "def main():", "--max-new-tokens", "4", "--device", "sequential"]) == 0
    assert "parameters on cpu" in capsys.readouterr().err


def test_cli_max_memory(tmp_path, monkeypatch, capsys):
    """--max-memory DEVICE=SIZE,... reaches from_pretrained as max_memory with a --device placement;
    a malformed list, or one with a single device (--device cpu), is a usage error naming it."""
    from moetorch.serve import worker

    monkeypatch.setenv("MOETORCH_HOME", str(tmp_path))
    seen = []
    load = worker.load_pretrained
    monkeypatch.setattr(worker, "load_pretrained", lambda *a: seen.append(a[1:]) or load(*a))
    assert cli.main(["generate", "def main():", "--max-new-tokens", "4", "--max-memory", "0=1MiB, cpu=8GiB",
                     "--device", "sequential"]) == 0
    assert seen == [("sequential", "auto", {0: "1MiB", "cpu": "8GiB"})]
    assert "parameters on cpu" in capsys.readouterr().err
    bad = {"x=3GiB": "'x' is not a GPU index or cpu", "0=abc": "0's size must be a positive size",
           "0=1GiB,0=2GiB": "'0' is given twice", "cpu": "'cpu' is not DEVICE=SIZE", "0=-1GB": "0's size must be a positive size"}
    for value, message in bad.items():
        with pytest.raises(SystemExit) as exited:
            cli.main(["generate", "hi", "--max-memory", value])
        assert exited.value.code == 2 and f"argument --max-memory: {message}" in capsys.readouterr().err
    for argv in (["info", "--device", "cpu"], ["serve", "--port", "0", "--device", "cpu"]):
        with pytest.raises(SystemExit) as exited:
            cli.main([*argv, "--max-memory", "cpu=1GiB"])
        assert exited.value.code == 2 and "--max-memory applies to a placement" in capsys.readouterr().err


def test_cli_default_model_runs_without_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOETORCH_HOME", str(tmp_path))
    assert cli.main(["generate", "def main():", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def main():") and "tiny-phimoe" in out.err and "random" not in out.err
    assert cli.main(["generate", "Hello", "--max-new-tokens", "4", "--model", "tiny-phimoe-random"]) == 0
    assert "random weights" in capsys.readouterr().err
    assert cli.main(["info", "--model", "tiny-jetmoe"]) == 0
    assert "jetmoe" in capsys.readouterr().out


def test_cli_info_names_the_expert_kernels_block_sizes_on_a_gpu(tmp_path, monkeypatch, capsys):
    # on a CUDA device `moetorch info` says which block-size file the expert kernels read (this
    # machine may have no GPU: the model reports one, and the file lookup is the library's own)
    from moetorch.modeling_utils import PreTrainedModel
    from moetorch.ops import triton_moe

    monkeypatch.setattr(PreTrainedModel, "device", property(lambda self: torch.device("cuda", 1)))
    asked = []
    for answer, line in ((tmp_path / "NVIDIA_H200.json", f"block sizes from {tmp_path / 'NVIDIA_H200.json'}"),
                         (None, "block sizes from untuned defaults (no file for this GPU)")):
        monkeypatch.setattr(triton_moe, "config_file", lambda index, answer=answer: asked.append(index) or answer)
        assert cli.main(["info", "--model", "tiny-jetmoe"]) == 0
        assert f"expert kernels: triton, {line}" in capsys.readouterr().out
    assert asked == [1, 1]
    monkeypatch.setattr(cli, "triton_available", lambda: False)
    assert cli.main(["info", "--model", "tiny-jetmoe"]) == 0
    assert "expert kernels: torch code (triton is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_cli_banner_names_experts_held_in_host_memory(arch, capsys):
    """A model placed with layers on the CPU keeps those layers' experts in host memory for the GPU
    to read: the banner counts the layers and their bytes; a model with none says nothing of it."""
    from moetorch.ops import host

    model = arch.ours["causal_lm"](arch.our_config())
    cli._banner(cli.Path("m"), model, is_random=False)
    assert "host memory" not in capsys.readouterr().err
    held = [model.model.layers[i].get_parameter(n) for i in (0, 1) for n in type(model.model.layers[i]).host_mappable]
    for p in held:
        setattr(p, host._MAPPED, p.data_ptr())  # as host_mapped_parameter marks one (it needs CUDA to pin)
    cli._banner(cli.Path("m"), model, is_random=False)
    size = sum(p.numel() * p.element_size() for p in held) / 2**30
    assert f"(the experts of 2 layers, {size:.2f} GiB, in host memory: read over the bus)" in capsys.readouterr().err


def test_cli_info_shows_a_placement_over_devices(tmp_path, monkeypatch, capsys):
    """`moetorch info` on a model that from_pretrained placed over several devices prints its
    hf_device_map as runs of modules a device, the decoder layers as ranges; on one device, nothing."""
    from moetorch.serve import worker

    monkeypatch.setenv("MOETORCH_HOME", str(tmp_path))
    assert cli.main(["info", "--model", "tiny-phimoe"]) == 0
    assert "placement:" not in capsys.readouterr().out
    load = worker.load_pretrained

    def placed(*args):  # this machine may have no GPU: the map is what a GPU + CPU plan gives
        model = load(*args)
        n = model.config.num_hidden_layers
        model.hf_device_map = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < n - 2 else "cpu" for i in range(n)},
                               "model.norm": "cpu", "lm_head": "cpu"}
        return model

    monkeypatch.setattr(worker, "load_pretrained", placed)
    assert cli.main(["info", "--model", "tiny-phimoe"]) == 0
    n = json.loads((cli.resolve_model("tiny-phimoe")[0] / "config.json").read_text())["num_hidden_layers"]
    want = f"placement: model.embed_tokens, model.layers.0-{n - 3} on 0; model.layers.{n - 2}-{n - 1}, model.norm, lm_head on cpu"
    assert want in capsys.readouterr().out
