"""``tasa serve``: an OpenAI-compatible HTTP server for one model (a tasa folder, usually).

Endpoints (the subset of OpenAI's API that chat UIs, agents, client libraries and lm-eval's
``local-completions`` / ``local-chat-completions`` models use):

``GET /v1/models``             the one model, under its id (the folder's name unless ``--name``)
``POST /v1/completions``       ``prompt`` (text, token ids, or a list of either), ``max_tokens``
                               (0 with ``echo`` scores the prompt), ``temperature``, ``top_p``,
                               ``top_k``, ``seed``, ``stop``, ``echo``, ``logprobs`` (0-20),
                               ``stream``
``POST /v1/chat/completions``  ``messages`` through the tokenizer's chat template,
                               ``max_tokens``/``max_completion_tokens``, the same sampling
                               options, ``stop``, ``stream``
``GET /health``                ``{"status": "ok"}``

Built on FastAPI + uvicorn. Requests are queued: one worker thread runs the model, first come
first served (the decode loop is batch 1; a CPU has no spare compute for a second stream, and
queued requests keep their order), at most ``max_queue`` waiting before new ones get 503.
Streaming uses server-sent events (``data: {...}`` chunks, then ``data: [DONE]``); a client
that disconnects mid-stream stops its generation at the next token and the server goes on.
Bad requests get OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``)
with 400 (404 for an unknown model id): options tasa does not implement (``n`` > 1,
penalties, ``logit_bias``, tools) are refused rather than silently ignored. Defaults follow
OpenAI's (``temperature`` 1, ``max_tokens`` 16 for completions) except that a chat answer may
run to the model's context.

Binds to 127.0.0.1 by default: there is no authentication.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from . import generation

__all__ = ["build_app", "serve", "ApiError"]

log = logging.getLogger("uvicorn.error")     # uvicorn's own log: errors beside the access lines
MAX_LOGPROBS = 20          # OpenAI allows 5 for completions, 20 for chat
MAX_STOP = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                         code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=100)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: bool = False
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict] = None


class CompletionRequest(_Common):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=0)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int = 1


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, List[dict], None] = None


class ChatRequest(_Common):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    tools: Optional[list] = None


def _refuse_unsupported(req: _Common) -> None:
    if req.n != 1 or getattr(req, "best_of", 1) != 1:
        raise ApiError(400, "tasa serves one choice per request: n and best_of must be 1", "n")
    if req.frequency_penalty or req.presence_penalty:
        raise ApiError(400, "frequency_penalty / presence_penalty are not supported",
                       "frequency_penalty")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", "logit_bias")
    if getattr(req, "tools", None):
        raise ApiError(400, "tools / function calling are not supported", "tools")
    if getattr(req, "logprobs", None) and req.stream:
        raise ApiError(400, "logprobs are not available when streaming", "logprobs")


def _stops(req: _Common) -> List[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    return [s for s in stop if s]


def _sampling(req: _Common) -> generation.Sampling:
    t = 1.0 if req.temperature is None else req.temperature
    try:
        return generation.Sampling(t, 1.0 if req.top_p is None else req.top_p, req.top_k or 0,
                                   0 if req.seed is None else req.seed)
    except ValueError as e:
        raise ApiError(400, str(e).removeprefix("tasa: "), "temperature") from None


class Engine:
    """The model, its tokenizer and the single worker that runs them."""

    def __init__(self, model, tokenizer, model_id: str, max_queue: int = 64):
        self.model, self.tok, self.model_id = model.eval(), tokenizer, model_id
        self.ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tasa-serve")
        self.max_queue, self.pending = max_queue, 0
        self.cancelled = 0       # generations stopped early because their client went away
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.vocab = len(tokenizer)

    # ---- queue
    async def run(self, fn, *args):
        with self.lock:
            if self.pending >= self.max_queue:
                raise ApiError(503, f"server busy: {self.pending} requests queued", None,
                               "queue_full", "server_error")
            self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            with self.lock:
                self.pending -= 1

    # ---- inputs
    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server has "
                                f"{self.model_id!r} (GET /v1/models)", "model",
                           "model_not_found")

    def prompt_ids(self, prompt) -> List[torch.Tensor]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise ApiError(400, "prompt is empty", "prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.tok(p, return_tensors="pt").input_ids
            else:
                if not p or any((not isinstance(i, int)) or i < 0 or i >= self.vocab for i in p):
                    raise ApiError(400, f"token ids must be a non-empty list of integers in "
                                        f"[0, {self.vocab})", "prompt")
                ids = torch.tensor([p], dtype=torch.long)
            if ids.shape[1] == 0:
                raise ApiError(400, "prompt is empty", "prompt")
            out.append(ids)
        return out

    def check_length(self, ids: torch.Tensor, max_new: int) -> None:
        if isinstance(self.ctx, int) and ids.shape[1] + max_new > self.ctx:
            raise ApiError(400, f"the prompt ({ids.shape[1]} tokens) + max_tokens ({max_new}) "
                                f"exceed the model's context of {self.ctx} tokens",
                           "max_tokens", "context_length_exceeded")

    # ---- work (in the worker thread)
    def generate(self, ids, max_new, sampling, stops, on_text=None, cancel=None):
        def gone(_tokens):
            if cancel.is_set():
                self.cancelled += 1
                return True
            return False

        return generation.generate(self.model, self.tok, ids, max_new, sampling=sampling,
                                   stop_strings=stops, on_text=on_text,
                                   stop=gone if cancel is not None else None)

    @torch.inference_mode()
    def logprobs(self, ids: torch.Tensor, k: int) -> dict:
        """OpenAI's ``logprobs`` object for every token of ``ids`` (the first has none)."""
        logits = self.model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        toks = ids[0].tolist()
        strs = [self.tok.decode([t]) for t in toks]
        token_lp: List[Optional[float]] = [None]
        top: List[Optional[dict]] = [None]
        for i in range(1, len(toks)):
            token_lp.append(float(lp[i - 1, toks[i]]))
            if k > 0:
                v, j = lp[i - 1].topk(k)
                d = {}
                for val, t in zip(v.tolist(), j.tolist()):
                    d.setdefault(self.tok.decode([t]), val)
                top.append(d)
            else:
                top.append({})
        offsets, n = [], 0
        for s in strs:
            offsets.append(n)
            n += len(s)
        return {"tokens": strs, "token_logprobs": token_lp, "top_logprobs": top,
                "text_offset": offsets}


def _error(e: ApiError) -> JSONResponse:
    log.warning("tasa: %d %s", e.status, e.message)
    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(model, tokenizer, model_id: str, max_queue: int = 64,
              max_tokens_chat: Optional[int] = None) -> FastAPI:
    """The FastAPI application serving ``model`` under ``model_id``."""
    eng = Engine(model, tokenizer, model_id, max_queue)
    app = FastAPI(title="tasa", version="1")
    app.state.engine = eng

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(ApiError(400, f"invalid request: {where}: {first.get('msg', e)}"
                               if where else f"invalid request: {first.get('msg', e)}", where))

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        return _error(ApiError(500, f"{type(e).__name__}: {e}", None, None, "server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": eng.pending, "cancelled": eng.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model",
                                            "created": eng.created, "owned_by": "tasa"}]}

    def _stream(request: Request, make_chunk, final_chunk, ids, max_new, sampling, stops):
        """SSE body: the worker pushes text deltas into a queue; this coroutine sends them."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():
            try:
                r = eng.generate(ids, max_new, sampling, stops,
                                 on_text=lambda t: loop.call_soon_threadsafe(q.put_nowait, t),
                                 cancel=cancel)
                loop.call_soon_threadsafe(q.put_nowait, r)
            except Exception as e:  # reported in the stream, the server goes on
                loop.call_soon_threadsafe(q.put_nowait, e)

        async def body():
            fut = asyncio.ensure_future(eng.run(work))
            try:
                while True:
                    item = await q.get()
                    if isinstance(item, str):
                        yield _sse(make_chunk(item))
                    elif isinstance(item, Exception):
                        e = item if isinstance(item, ApiError) else ApiError(
                            400 if isinstance(item, ValueError) else 500,
                            str(item).removeprefix("tasa: "))
                        yield _sse(e.body())
                        break
                    else:
                        yield _sse(final_chunk(item))
                        break
                yield "data: [DONE]\n\n"
                await fut
            finally:           # the client went away (or the stream ended): stop the work
                cancel.set()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        eng.check_model(req.model)
        _refuse_unsupported(req)
        stops, sampling = _stops(req), _sampling(req)
        prompts = eng.prompt_ids(req.prompt)
        max_new = int(req.max_tokens if req.max_tokens is not None else 16)
        for ids in prompts:
            eng.check_length(ids, max_new)
        if max_new == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 needs echo (scoring the prompt)", "max_tokens")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model_id}
        if req.stream:
            if len(prompts) != 1 or max_new == 0:
                raise ApiError(400, "streaming takes one prompt and max_tokens >= 1", "stream")
            pre = tokenizer.decode(prompts[0][0]) if req.echo else ""
            first = {"sent": False}

            def chunk(text):
                if not first["sent"]:
                    first["sent"] = True
                    text = pre + text
                return {**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": None}]}

            def final(r):
                return {**head, "choices": [{"index": 0, "text": "" if first["sent"] else pre,
                                             "logprobs": None,
                                             "finish_reason": r.finish_reason}]}

            return _stream(request, chunk, final, prompts[0], max_new, sampling, stops)

        def work():
            choices, n_prompt, n_new = [], 0, 0
            for i, ids in enumerate(prompts):
                if max_new > 0:
                    r = eng.generate(ids, max_new, sampling, stops)
                    new, text, reason = r.tokens, r.text, r.finish_reason
                else:
                    new, text, reason = [], "", "length"
                lp = None
                if req.logprobs is not None:
                    full = torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1) if new \
                        else ids
                    lp = eng.logprobs(full, req.logprobs)
                    if not req.echo:
                        lp = {k: v[ids.shape[1]:] for k, v in lp.items()}
                if req.echo:
                    text = tokenizer.decode(ids[0]) + text
                choices.append({"index": i, "text": text, "logprobs": lp,
                                "finish_reason": reason})
                n_prompt += ids.shape[1]
                n_new += len(new)
            return {**head, "choices": choices,
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                              "total_tokens": n_prompt + n_new}}

        try:
            return await eng.run(work)
        except ValueError as e:
            raise ApiError(400, str(e).removeprefix("tasa: ")) from None

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        eng.check_model(req.model)
        _refuse_unsupported(req)
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported for chat; use /v1/completions",
                           "logprobs")
        if not generation.has_chat_template(tokenizer):
            raise ApiError(400, f"{model_id} has no chat template; use /v1/completions",
                           "messages")
        msgs = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):      # [{"type": "text", "text": ...}, ...]
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise ApiError(400, "only text content parts are supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        stops, sampling = _stops(req), _sampling(req)
        try:
            ids = generation.chat_ids(tokenizer, msgs)
        except Exception as e:   # the template refused the conversation (roles, order)
            raise ApiError(400, f"the chat template refused these messages: {e}",
                           "messages") from None
        room = (eng.ctx - ids.shape[1]) if isinstance(eng.ctx, int) else 4096
        want = req.max_completion_tokens or req.max_tokens
        max_new = int(want if want is not None else min(room, max_tokens_chat or room))
        if max_new < 1:
            raise ApiError(400, f"the messages ({ids.shape[1]} tokens) fill the model's "
                                f"context of {eng.ctx} tokens", "messages",
                           "context_length_exceeded")
        eng.check_length(ids, max_new)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model_id}
        if req.stream:
            chead = {**head, "object": "chat.completion.chunk"}
            first = {"sent": False}

            def chunk(text):
                delta = {"content": text}
                if not first["sent"]:
                    first["sent"] = True
                    delta = {"role": "assistant", "content": text}
                return {**chead, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": None}]}

            def final(r):
                delta = {} if first["sent"] else {"role": "assistant", "content": ""}
                return {**chead, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": r.finish_reason}]}

            return _stream(request, chunk, final, ids, max_new, sampling, stops)

        def work():
            r = eng.generate(ids, max_new, sampling, stops)
            return {**head, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": r.text},
                                         "logprobs": None, "finish_reason": r.finish_reason}],
                    "usage": {"prompt_tokens": int(ids.shape[1]),
                              "completion_tokens": len(r.tokens),
                              "total_tokens": int(ids.shape[1]) + len(r.tokens)}}

        try:
            return await eng.run(work)
        except ValueError as e:
            raise ApiError(400, str(e).removeprefix("tasa: ")) from None

    return app


def serve(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
          max_queue: int = 64, log_level: str = "info") -> None:
    """Runs the server until Ctrl-C."""
    import uvicorn

    uvicorn.run(build_app(model, tokenizer, model_id, max_queue), host=host, port=port,
                log_level=log_level)
