"""Sampling, stop strings, chat templates and the `tasa generate` options (issue 28 item 2)."""
import io
import math

import pytest
import torch

import tasa
from tasa import cli
from tasa import generation as G

from helpers import byte_tokenizer, tiny_llama

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tasa.quantize(tiny_llama(), None, bits=4, method="rtn", group_size=32, progress=False)


# ---- Sampling ---------------------------------------------------------------------------------------

def test_sampling_validates():
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                dict(top_p=1.5), dict(top_k=-1), dict(top_k=1.5)):
        with pytest.raises(ValueError):
            G.Sampling(**bad)


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(1, 97)
    for s in (G.Sampling(), G.Sampling(temperature=5.0, top_k=1, seed=3)):
        assert s.greedy and int(s.picker()(logits)) == int(logits.argmax())


def test_sampling_is_seeded_and_leaves_the_global_rng():
    logits = torch.randn(1, 50)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = G.Sampling(temperature=1.0, seed=7).picker()
    b = G.Sampling(temperature=1.0, seed=7).picker()
    draws_a = [int(a(logits)) for _ in range(40)]
    assert draws_a == [int(b(logits)) for _ in range(40)]
    assert torch.rand(1) == before                       # global RNG not advanced
    c = G.Sampling(temperature=1.0, seed=8).picker()
    assert draws_a != [int(c(logits)) for _ in range(40)]


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    t, n = 0.7, 20000
    pick = G.Sampling(temperature=t, seed=1).picker()
    counts = torch.bincount(torch.stack([pick(logits) for _ in range(n)]).reshape(-1),
                            minlength=5).double()
    p = torch.softmax(logits[0].double() / t, -1)
    # each count within 5 binomial standard deviations of n*p
    assert torch.all((counts - n * p).abs() <= 5 * torch.sqrt(n * p * (1 - p)) + 1)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_p = {int(G.Sampling(temperature=1.0, top_p=0.8, seed=s).picker()(logits))
              for s in range(300)}
    assert seen_p == {0, 1}                        # 0.5 + 0.3 reaches 0.8: the nucleus
    seen_k = {int(G.Sampling(temperature=1.0, top_k=3, seed=s).picker()(logits))
              for s in range(300)}
    assert seen_k == {0, 1, 2}


# ---- stop strings ---------------------------------------------------------------------------------

def test_text_stream_holds_back_a_possible_stop_string():
    tok = byte_tokenizer()
    ids = tok("ab<END>cd").input_ids
    st = G.TextStream(tok, ["<END>"])
    shown = [st.push(i) for i in ids]
    assert "".join(shown) == "ab" and st.text == "ab" and st.stopped
    assert shown[2] == ""                    # '<' could start the stop string: held back
    st = G.TextStream(tok, ["<END>"])
    shown = [st.push(i) for i in tok("a<b").input_ids]
    assert "".join(shown) == "a<b"           # '<b' is no stop string: released
    st = G.TextStream(tok, ["xyz"])
    shown = [st.push(i) for i in tok("caf\u00e9 x").input_ids]
    assert "\ufffd" not in "".join(shown)    # a half-decoded character is never shown
    assert "".join(shown) + st.flush() == "caf\u00e9 x"


def test_generate_with_stop_strings_and_finish_reason(model):
    tok = byte_tokenizer()
    ids = tok("The", return_tensors="pt").input_ids
    free = G.generate(model, tok, ids, 24, min_new_tokens=24)
    assert free.finish_reason == "length"
    stop = free.text[5:8]
    assert stop and stop not in free.text[:5]
    chunks = []
    r = G.generate(model, tok, ids, 24, stop_strings=[stop], on_text=chunks.append)
    assert r.finish_reason == "stop"
    assert r.text == free.text[:free.text.index(stop)]
    assert "".join(chunks) == r.text
    assert r.tokens == free.tokens[:len(r.tokens)]


def test_sampled_generation_is_reproducible_on_both_paths(model):
    tok = byte_tokenizer()
    ids = tok("Hi", return_tensors="pt").input_ids
    s = G.Sampling(temperature=1.5, top_p=0.95, seed=11)
    for fast in (True, False):
        a = G.generate(model, tok, ids, 16, min_new_tokens=16, sampling=s, fast=fast)
        b = G.generate(model, tok, ids, 16, min_new_tokens=16, sampling=s, fast=fast)
        assert a.tokens == b.tokens
        greedy = G.generate(model, tok, ids, 16, min_new_tokens=16, fast=fast)
        assert a.tokens != greedy.tokens          # temperature 1.5 on a random model


# ---- chat template ------------------------------------------------------------------------------

def test_chat_ids_apply_the_template():
    tok = chat_tokenizer()
    ids = G.chat_ids(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert tok.decode(ids[0]) == "<system>S\n<user>Q\n<assistant>"
    with pytest.raises(ValueError, match="role"):
        G.chat_ids(tok, [{"role": "user"}])
    with pytest.raises(ValueError, match="no chat template"):
        G.chat_ids(byte_tokenizer(), [{"role": "user", "content": "Q"}])


def _folder(tmp_path, model, tok):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


def test_cli_chat_raw_system_and_sampling(tmp_path, model, capsys):
    d = _folder(tmp_path, model, chat_tokenizer())
    assert cli.main(["generate", "--model", d, "--prompt", "Hello", "--max-new-tokens", "6",
                     "--system", "Be brief."]) == 0
    cap = capsys.readouterr()
    assert not cap.out.startswith("Hello")             # the answer, not a continuation
    chat_answer = cap.out
    assert cli.main(["generate", "--model", d, "--prompt", "Hello", "--max-new-tokens", "6",
                     "--raw"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert cli.main(["generate", "--model", d, "--prompt", "Hello", "--max-new-tokens", "6",
                     "--raw", "--system", "x"]) == 2
    assert "--system needs a chat template" in capsys.readouterr().err
    # the chat answer is the greedy continuation of the templated prompt
    tok = chat_tokenizer()
    ids = G.chat_ids(tok, [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hello"}])
    assert chat_answer == G.generate(model, tok, ids, 6).text + "\n"
    outs = []
    for _ in range(2):
        assert cli.main(["generate", "--model", d, "--prompt", "Hello", "--max-new-tokens", "8",
                         "--temperature", "1.2", "--top-k", "20", "--seed", "5"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", d, "--prompt", "x", "--top-p", "nope"])
    assert cli.main(["generate", "--model", d, "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cli_interactive_keeps_the_conversation(tmp_path, model, capsys, monkeypatch):
    d = _folder(tmp_path, model, chat_tokenizer())
    seen = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda m, t, ids, *a, **k: seen.append(
        t.decode(ids[0])) or real(m, t, ids, *a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/reset\nthird\n\n"))
    assert cli.main(["generate", "--model", d, "-i", "--max-new-tokens", "4"]) == 0
    assert len(seen) == 3
    assert seen[1].startswith("<user>first\n<assistant>") and "<user>second" in seen[1]
    assert seen[2].startswith("<user>third")                 # /reset forgot the first two
    assert cli.main(["generate", "--model", d]) == 2
    assert "--interactive" in capsys.readouterr().err


def test_history_is_cut_to_the_context():
    tok = chat_tokenizer()
    msgs = [{"role": "system", "content": "S"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"q{i}" * 10}, {"role": "assistant",
                                                             "content": f"a{i}" * 10}]
    msgs.append({"role": "user", "content": "last"})
    full = G.chat_ids(tok, msgs).shape[1]
    kept = cli._fit_history(tok, msgs, 10, full - 30)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last"
    assert G.chat_ids(tok, kept).shape[1] + 10 <= full - 30 < full
    assert len(kept) % 2 == 0 and math.isclose(len(kept), len(msgs) - 2 * (
        (len(msgs) - len(kept)) // 2))


def test_cli_says_when_the_model_is_not_quantized(tmp_path, capsys):
    m = tiny_llama()
    d = _folder(tmp_path, m, byte_tokenizer())
    assert cli.main(["generate", "--model", d, "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert "is not quantized" in capsys.readouterr().err


# ---- the thread governor (issue 28 item 5) -------------------------------------------------------

class _FakeThreads:
    def __init__(self, monkeypatch, n=2, busy=0):
        self.n, self.calls = n, []
        monkeypatch.setattr(G.torch, "get_num_threads", lambda: self.n)
        monkeypatch.setattr(G.torch, "set_num_threads", self.set)
        monkeypatch.setattr(G, "other_running_threads", lambda: busy)
        monkeypatch.setattr(G.os, "cpu_count", lambda: 2)

    def set(self, n):
        self.calls.append(n)
        self.n = n


def _drive(gov, threads, cost, steps):
    """Feeds the governor the step time ``cost[threads now]`` for ``steps`` steps."""
    for _ in range(steps):
        gov.step_done(cost[threads.n])


def test_governor_keeps_the_wide_team_on_an_idle_machine(monkeypatch):
    th = _FakeThreads(monkeypatch)
    gov = G.ThreadGovernor()
    assert th.n == 2
    _drive(gov, th, {2: 0.008, 1: 0.012}, 2000)
    assert gov.current == 2 and gov.history == [(0, 2)]
    probes = sum(1 for a, b in zip(th.calls, th.calls[1:]) if a == 1 and b == 2)
    assert probes <= 8                      # the interval doubles after each losing probe
    gov.close()
    assert th.n == 2


def test_governor_moves_to_one_thread_under_contention(monkeypatch):
    th = _FakeThreads(monkeypatch)
    gov = G.ThreadGovernor()
    # 2 threads: mostly 20 ms steps with time-slice stalls; 1 thread: a steady 25 ms
    seq = iter(([0.02] * 4 + [0.2]) * 400)
    for _ in range(300):
        gov.step_done(next(seq) if th.n == 2 else 0.025)
    assert gov.current == 1 and gov.history[-1][1] == 1 and gov.history[-1][0] <= 20


def test_governor_starts_from_the_free_cpus_and_comes_back(monkeypatch):
    th = _FakeThreads(monkeypatch, busy=1)
    gov = G.ThreadGovernor()
    assert gov.current == 1 and th.n == 1           # one CPU taken by someone else
    _drive(gov, th, {2: 0.008, 1: 0.012}, 400)      # ... who then stopped
    assert gov.current == 2
    # a collapsing probe is cut short
    th2 = _FakeThreads(monkeypatch, busy=1)
    gov = G.ThreadGovernor()
    times = []
    for _ in range(100):
        t = 0.5 if th2.n == 2 else 0.02
        times.append(t)
        gov.step_done(t)
    assert gov.current == 1 and times.count(0.5) <= 6


def test_greedy_tokens_do_not_depend_on_the_thread_count(model):
    tok = byte_tokenizer()
    ids = tok("Thread", return_tensors="pt").input_ids
    n = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(G.generate(model, tok, ids, 24, min_new_tokens=24,
                                   adapt_threads=False).tokens)
    finally:
        torch.set_num_threads(n)
    assert outs[0] == outs[1]
