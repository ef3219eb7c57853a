"""`tasa serve` end to end: a live server on 127.0.0.1 in its own process, driven by the official
openai client, raw HTTP, and lm-eval's local-completions model (issue 28 item 3)."""
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import tasa  # noqa: E402
from tasa import evaluation as tev  # noqa: E402
from tasa import generation as G  # noqa: E402

from helpers import byte_tokenizer, rtn_folder  # noqa: E402
from test_chat import chat_tokenizer  # noqa: E402

NAME = "tiny-tasa"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = rtn_folder(tmp_path_factory.mktemp("served"), chat_tokenizer())
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tasa.cli", "serve", "--model", str(d),
                             "--name", NAME, "--port", str(port), "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() - t0 > 120:
            log.flush()
            pytest.fail(f"server did not start: {(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)
    ref = tasa.load(str(d))
    yield {"base": base, "folder": d, "model": ref, "tok": chat_tokenizer(),
           "client": openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)}
    proc.terminate()
    proc.wait(30)
    log.close()


def _greedy(s, ids, n, stop=()):
    return G.generate(s["model"], s["tok"], ids, n, stop_strings=stop)


def test_models_and_completions_match_generate(server):
    c = server["client"]
    assert [m.id for m in c.models.list().data] == [NAME]
    r = c.completions.create(model=NAME, prompt="The cat", max_tokens=12, temperature=0)
    want = _greedy(server, server["tok"]("The cat", return_tensors="pt").input_ids, 12)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.tokens)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="The cat", max_tokens=12, temperature=0, stream=True))
    assert streamed == want.text


def test_chat_completions_with_stop_and_stream(server):
    c = server["client"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = G.chat_ids(server["tok"], msgs)
    free = _greedy(server, ids, 20)
    stop = free.text[4:7]
    want = _greedy(server, ids, 20, stop=[stop])
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0,
                                  stop=[stop])
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=20,
                                            temperature=0, stop=[stop], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    # sampling with a seed is reproducible over HTTP
    a, b = (c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=1.3,
                                      seed=4).choices[0].message.content for _ in range(2))
    assert a == b


def test_bad_requests_get_openai_errors(server):
    c = server["client"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    for kw in (dict(n=2), dict(temperature=-1), dict(frequency_penalty=0.5),
               dict(max_tokens=10 ** 6), dict(logit_bias={"1": 5})):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(**{"model": NAME, "prompt": "x", "max_tokens": 2, **kw})
    r = httpx.post(server["base"] + "/v1/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"]
    r = httpx.post(server["base"] + "/v1/completions", json={"model": NAME, "prompt": [99999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server["base"] + "/v1/completions",
                   json={"model": NAME, "prompt": "x", "max_tokens": 10 ** 6})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_disconnect_mid_stream_and_queued_requests(server):
    base = server["base"]
    before = httpx.get(base + "/health").json()["cancelled"]
    with httpx.stream("POST", base + "/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": "Once", "max_tokens": 500,
                            "temperature": 0, "stream": True, "stop": ["\x00\x01"]}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # the generation stops early (it is counted), the server lives and answers correctly
    t0 = time.time()
    while httpx.get(base + "/health").json()["cancelled"] == before:
        assert time.time() - t0 < 60, "the abandoned generation was never stopped"
        time.sleep(0.05)
    assert httpx.get(base + "/health").json()["status"] == "ok"
    c = server["client"]
    prompts = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    want = [_greedy(server, server["tok"](p, return_tensors="pt").input_ids, 8).text
            for p in prompts]
    with cf.ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda p: c.completions.create(model=NAME, prompt=p, max_tokens=8,
                                                         temperature=0).choices[0].text,
                          prompts))
    assert got == want


def test_echo_logprobs_score_the_prompt(server):
    tok, model = server["tok"], server["model"]
    ids = tok("2 + 2 = 4", return_tensors="pt").input_ids
    r = httpx.post(server["base"] + "/v1/completions",
                   json={"model": NAME, "prompt": [ids[0].tolist()], "max_tokens": 0,
                         "echo": True, "logprobs": 2, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), -1)
    want = [float(ref[i - 1, ids[0, i]]) for i in range(1, ids.shape[1])]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6
               for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))


def test_lm_eval_local_completions_against_the_server(server, tmp_path):
    """lm-eval's own API model scores tasa's offline gsm8k_nll task through the server: the
    same numbers as the in-process evaluation of the same folder."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    src = tev.resolve_data(None, ["gsm8k_test"])
    gsm = tmp_path / "gsm.jsonl"
    short = [ln for ln in src["gsm8k_test"].read_text().splitlines(keepends=True)
             if len(ln.encode()) < 400][:3]          # byte tokens within the tiny model's 512
    assert len(short) == 3
    gsm.write_text("".join(short))
    data = {"gsm8k_test": str(gsm)}
    args = (f"model={NAME},base_url={server['base']}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={server['folder']},num_concurrent=1,"
            f"max_retries=1,tokenized_requests=True")
    r = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
         "--model_args", args, "--include_path", str(tev.LM_EVAL_TASK_DIR), "--tasks",
         "tasa_gsm8k_nll", "--metadata", json.dumps({"tasa_data": data}),
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    want = tev.evaluate(server["model"], byte_tokenizer(), tasks=["gsm8k_nll"], data=data,
                        progress=False)["results"]["gsm8k_nll"]
    assert got["results"]["tasa_gsm8k_nll"]["nll,none"] == pytest.approx(want["nll"], rel=1e-4)
